"""Pure decisions for hamgr: ``(observed facts) -> decision``, with no I/O and no state.

Nothing here imports from the rest of the project. Each module is one decision:

- `policies.epoch`: when to close an epoch (I5) and how to retry a failed checkpoint.
- `policies.inflight`: how many epochs may be in flight and when to back-pressure (I6).
- `policies.placement`: which host gets a unit's standby.
- `policies.detection`: when missed probes become a declared failure.
- `policies.standby_loss`: stall or run unprotected when the standby is gone.
"""

from policies.detection import (
    MIN_INTERVAL_US,
    AgentCheck,
    Dampening,
    DetectionDecision,
    DetectionPolicy,
    ProbeFacts,
    StandbyWatch,
    Verdict,
    assess,
    dampened,
    record_dispute,
)
from policies.epoch import (
    AdaptiveEpoch,
    CheckpointRetry,
    CommitSample,
    EpochDecision,
    EpochFacts,
    EpochPolicy,
    EpochVerdict,
    FixedEpoch,
    RetryDecision,
    added_latency_us,
    decide,
    epoch_length_us,
    next_retry,
    observe,
)
from policies.inflight import (
    DEFAULT_BUDGET_BYTES,
    DEFAULT_MAX_INFLIGHT,
    BackPressure,
    InflightFacts,
    InflightPolicy,
    back_pressure,
    may_start_epoch,
)
from policies.placement import HostFacts, Placement, StandbyNeed, choose_standby
from policies.standby_loss import (
    StandbyLossAction,
    StandbyLossDecision,
    StandbyLossFacts,
    StandbyLossPolicy,
    on_standby_loss,
)

__all__ = [
    "DEFAULT_BUDGET_BYTES",
    "DEFAULT_MAX_INFLIGHT",
    "MIN_INTERVAL_US",
    "AdaptiveEpoch",
    "AgentCheck",
    "BackPressure",
    "CheckpointRetry",
    "CommitSample",
    "Dampening",
    "DetectionDecision",
    "DetectionPolicy",
    "EpochDecision",
    "EpochFacts",
    "EpochPolicy",
    "EpochVerdict",
    "FixedEpoch",
    "HostFacts",
    "InflightFacts",
    "InflightPolicy",
    "Placement",
    "ProbeFacts",
    "RetryDecision",
    "StandbyLossAction",
    "StandbyLossDecision",
    "StandbyLossFacts",
    "StandbyLossPolicy",
    "StandbyNeed",
    "StandbyWatch",
    "Verdict",
    "added_latency_us",
    "assess",
    "back_pressure",
    "choose_standby",
    "dampened",
    "decide",
    "epoch_length_us",
    "may_start_epoch",
    "next_retry",
    "observe",
    "on_standby_loss",
    "record_dispute",
]
