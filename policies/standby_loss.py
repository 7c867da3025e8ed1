"""What to do when a unit's standby is gone.

- `STALL` (the default) keeps output commit: held output stays held, so the outside world never
  sees output that a later failure could take back. The unit stalls once its in-flight limit or
  byte budget is reached, and an alarm is raised.
- `RUN_UNPROTECTED` gives up output commit until a standby is back: everything held is released
  without a commit, later output passes straight through, and the unit's status says unprotected.
  A failure in that window may roll back output that was already seen.
"""

from __future__ import annotations

import enum

import attrs

__all__ = [
    "StandbyLossAction",
    "StandbyLossDecision",
    "StandbyLossFacts",
    "StandbyLossPolicy",
    "on_standby_loss",
]


class StandbyLossAction(enum.Enum):
    STALL = "stall"
    RUN_UNPROTECTED = "run-unprotected"


@attrs.frozen
class StandbyLossPolicy:
    action: StandbyLossAction = StandbyLossAction.STALL


@attrs.frozen
class StandbyLossFacts:
    unit: str
    held_epochs: int
    cause: str


@attrs.frozen
class StandbyLossDecision:
    action: StandbyLossAction
    # Release held output without a commit, and stop buffering new output.
    release_held: bool
    protected: bool
    alarm: str


def on_standby_loss(policy: StandbyLossPolicy, facts: StandbyLossFacts) -> StandbyLossDecision:
    if policy.action is StandbyLossAction.RUN_UNPROTECTED:
        return StandbyLossDecision(
            action=policy.action,
            release_held=True,
            protected=False,
            alarm=(
                f"unit {facts.unit}: standby lost ({facts.cause}); running UNPROTECTED, "
                f"{facts.held_epochs} held epochs released without commit"
            ),
        )
    return StandbyLossDecision(
        action=policy.action,
        release_held=False,
        protected=True,
        alarm=(
            f"unit {facts.unit}: standby lost ({facts.cause}); output stalled, "
            f"{facts.held_epochs} epochs held"
        ),
    )
