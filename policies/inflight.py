"""How many epochs may be in flight, and when to apply back-pressure (DESIGN.md I6).

An epoch is in flight from the start of its cut until its release: while it is checkpointed,
shipped and waiting for the ack. At most ``max_inflight`` (K) are. At K, or when the output held
for the unit reaches the byte budget, ingress is paused so that the NF stops producing; nothing is
ever dropped. Ingress resumes when fewer than K epochs are in flight and the held bytes have
fallen below ``resume_bytes``. That low-water mark is below the budget so that a unit hovering at
the budget does not flap the data plane's ingress on every packet.
"""

from __future__ import annotations

import attrs

__all__ = [
    "DEFAULT_BUDGET_BYTES",
    "DEFAULT_MAX_INFLIGHT",
    "BackPressure",
    "InflightFacts",
    "InflightPolicy",
    "back_pressure",
    "may_start_epoch",
]

# Four lets epoch e+1..e+3 fill while e ships: enough to hide a commit latency of a few epoch
# lengths, and few enough that a stalled standby backs the unit up quickly.
DEFAULT_MAX_INFLIGHT = 4
DEFAULT_BUDGET_BYTES = 64 * 1024 * 1024


def _positive(_inst: object, attr: attrs.Attribute[int], value: int) -> None:
    if value <= 0:
        raise ValueError(f"{attr.name} must be > 0, got {value}")


@attrs.frozen
class InflightPolicy:
    max_inflight: int = attrs.field(default=DEFAULT_MAX_INFLIGHT, validator=_positive)
    budget_bytes: int = attrs.field(default=DEFAULT_BUDGET_BYTES, validator=_positive)
    resume_bytes: int = attrs.field(
        default=attrs.Factory(lambda self: self.budget_bytes * 3 // 4, takes_self=True),
        validator=_positive,
    )

    def __attrs_post_init__(self) -> None:
        if self.resume_bytes > self.budget_bytes:
            raise ValueError(f"resume_bytes {self.resume_bytes} > budget_bytes {self.budget_bytes}")


@attrs.frozen
class InflightFacts:
    inflight: int
    buffered_bytes: int
    # Whether back-pressure is on now; the answer has hysteresis, so it depends on it.
    paused: bool


@attrs.frozen
class BackPressure:
    on: bool
    reason: str


def may_start_epoch(policy: InflightPolicy, inflight: int) -> bool:
    """Whether one more epoch may go in flight."""
    return inflight < policy.max_inflight


def back_pressure(policy: InflightPolicy, facts: InflightFacts) -> BackPressure:
    if facts.inflight >= policy.max_inflight:
        return BackPressure(True, f"{facts.inflight} epochs in flight, limit {policy.max_inflight}")
    if facts.buffered_bytes >= policy.budget_bytes:
        return BackPressure(
            True, f"{facts.buffered_bytes} bytes held, budget {policy.budget_bytes}"
        )
    if facts.paused and facts.buffered_bytes >= policy.resume_bytes:
        return BackPressure(
            True,
            f"{facts.buffered_bytes} bytes held, resumes below {policy.resume_bytes}",
        )
    return BackPressure(False, "below limits")
