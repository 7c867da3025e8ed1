"""When to close an epoch, and when to retry after a failed checkpoint.

External synchrony (DESIGN.md I5): an epoch closes only when output is waiting and the epoch length
has elapsed. An idle unit therefore never checkpoints, and a busy one batches a whole epoch of
output into one checkpoint.

Two length policies:

- `FixedEpoch`: a constant length.
- `AdaptiveEpoch`: a length steered towards a target added latency. A packet emitted at a uniformly
  random time in an epoch waits on average ``length/2`` for the epoch to close, then the pause of
  the cut, then the commit. `observe` moves the length towards the value that makes that sum equal
  the target, by a fraction ``gain`` of the gap per sample, and keeps it within
  ``[min_us, max_us]``. The policy is a value: `observe` returns a new one instead of mutating.
"""

from __future__ import annotations

import enum

import attrs

__all__ = [
    "AdaptiveEpoch",
    "CheckpointRetry",
    "CommitSample",
    "EpochDecision",
    "EpochFacts",
    "EpochPolicy",
    "EpochVerdict",
    "FixedEpoch",
    "RetryDecision",
    "added_latency_us",
    "decide",
    "epoch_length_us",
    "next_retry",
    "observe",
]


def _positive(_inst: object, attr: attrs.Attribute[int], value: int) -> None:
    if value <= 0:
        raise ValueError(f"{attr.name} must be > 0, got {value}")


def _not_negative(_inst: object, attr: attrs.Attribute[int], value: int) -> None:
    if value < 0:
        raise ValueError(f"{attr.name} must be >= 0, got {value}")


@attrs.frozen
class FixedEpoch:
    """Every epoch is ``length_us`` long."""

    length_us: int = attrs.field(validator=_positive)


@attrs.frozen
class AdaptiveEpoch:
    """An epoch length steered so that the added output latency approaches the target."""

    target_added_latency_us: int = attrs.field(validator=_positive)
    min_us: int = attrs.field(validator=_positive)
    max_us: int = attrs.field(validator=_positive)
    gain: float = 0.5
    length_us: int = attrs.field(default=attrs.Factory(lambda self: self.min_us, takes_self=True))

    def __attrs_post_init__(self) -> None:
        if self.min_us > self.max_us:
            raise ValueError(f"min_us {self.min_us} > max_us {self.max_us}")
        if not 0.0 < self.gain <= 1.0:
            raise ValueError(f"gain must be in (0, 1], got {self.gain}")
        if not self.min_us <= self.length_us <= self.max_us:
            raise ValueError(f"length_us {self.length_us} outside [{self.min_us}, {self.max_us}]")


EpochPolicy = FixedEpoch | AdaptiveEpoch


@attrs.frozen
class CommitSample:
    """What one committed epoch cost: the pause of its cut and the ship-to-ack latency."""

    pause_us: int = attrs.field(validator=_not_negative)
    commit_latency_us: int = attrs.field(validator=_not_negative)


def epoch_length_us(policy: EpochPolicy) -> int:
    return policy.length_us


def added_latency_us(length_us: int, pause_us: int, commit_latency_us: int) -> int:
    """The mean latency output commit adds to a packet, for uniformly spread output."""
    return length_us // 2 + pause_us + commit_latency_us


def observe(policy: EpochPolicy, sample: CommitSample) -> EpochPolicy:
    """The policy after one more commit was observed."""
    if isinstance(policy, FixedEpoch):
        return policy
    ideal = 2 * (policy.target_added_latency_us - sample.pause_us - sample.commit_latency_us)
    stepped = policy.length_us + round(policy.gain * (ideal - policy.length_us))
    bounded = max(policy.min_us, min(policy.max_us, stepped))
    return attrs.evolve(policy, length_us=bounded)


class EpochVerdict(enum.Enum):
    CLOSE = "close"
    IDLE = "idle"  # nothing waits: I5 forbids a checkpoint
    TOO_EARLY = "too-early"  # output waits but the epoch length has not elapsed
    INFLIGHT_FULL = "inflight-full"  # K epochs in flight: I6 forbids another
    BACKING_OFF = "backing-off"  # a checkpoint failed and the retry time has not come


@attrs.frozen
class EpochFacts:
    """What the primary knows about the open epoch when it asks whether to close it."""

    now_us: int
    epoch_started_us: int
    buffered_pkts: int = attrs.field(validator=_not_negative)
    inflight: int = attrs.field(validator=_not_negative)
    max_inflight: int = attrs.field(validator=_positive)
    retry_at_us: int | None = None


@attrs.frozen
class EpochDecision:
    verdict: EpochVerdict
    # When the answer can next change by time alone; None means only a new fact (output, an ack)
    # can change it, so the caller need not wake up for it.
    wake_at_us: int | None = None

    @property
    def close(self) -> bool:
        return self.verdict is EpochVerdict.CLOSE


def decide(policy: EpochPolicy, facts: EpochFacts) -> EpochDecision:
    if facts.buffered_pkts == 0:
        return EpochDecision(EpochVerdict.IDLE)
    if facts.inflight >= facts.max_inflight:
        return EpochDecision(EpochVerdict.INFLIGHT_FULL)
    if facts.retry_at_us is not None and facts.now_us < facts.retry_at_us:
        return EpochDecision(EpochVerdict.BACKING_OFF, facts.retry_at_us)
    due = facts.epoch_started_us + epoch_length_us(policy)
    if facts.now_us < due:
        return EpochDecision(EpochVerdict.TOO_EARLY, due)
    return EpochDecision(EpochVerdict.CLOSE)


@attrs.frozen
class CheckpointRetry:
    """Backoff between attempts after failed checkpoints, and when to raise an alarm.

    The backoff doubles per consecutive failure up to ``max_backoff_us``. Retrying never gives up:
    the output of the failed epochs is held until some later checkpoint commits. The alarm is
    raised once per run of failures, at the ``alarm_after``-th.
    """

    backoff_us: int = attrs.field(default=1_000, validator=_not_negative)
    max_backoff_us: int = attrs.field(default=100_000, validator=_not_negative)
    alarm_after: int = attrs.field(default=3, validator=_positive)


@attrs.frozen
class RetryDecision:
    at_us: int
    alarm: bool


def next_retry(policy: CheckpointRetry, consecutive_failures: int, now_us: int) -> RetryDecision:
    if consecutive_failures < 1:
        raise ValueError(f"consecutive_failures must be >= 1, got {consecutive_failures}")
    # Cap the exponent so a long failure run cannot build a huge integer.
    exponent = min(consecutive_failures - 1, 32)
    delay = min(policy.max_backoff_us, policy.backoff_us << exponent)
    # One alarm per failure run: repeating it on every later failure would only add noise.
    return RetryDecision(at_us=now_us + delay, alarm=consecutive_failures == policy.alarm_after)
