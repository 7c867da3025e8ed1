"""When missed liveness probes become a declared failure.

The knobs mean what they mean in keepalived and Pacemaker. Probes go out every ``interval_us``.
After ``misses`` consecutive probes get no reply (the timeout, ``interval_us * misses``), the peer
is suspect. It is declared failed only when both of these hold:

- **hold-down**: the silence has lasted at least ``hold_down_us``. A loaded host can lose a short
  burst of probes, or its prober can stall and count several misses at once; neither lasts long.
- **confirmation**: the agent's own check of the peer, over another path and sent after the
  silence began, says the peer is dead, or has not answered within ``confirm_window_us``.

If the agent's check answers that the peer is alive, the verdict is DISPUTED: the data-plane path
is lost but the host is not, so a failover would split the unit's brain. That answer counts for
``disputed_recheck_us`` (at least ``confirm_window_us``); if the peer is still silent then, it is
asked again.

**Dampening** (as BFD and routing protocols damp a flapping session). A dispute means the probes
went silent while the host was alive: the path or the host is overloaded, and the next silence
may be the same. On a loaded host that repeats, and one slow answer to the agent's check would
then turn a live peer into a failover. So each dispute doubles ``hold_down_us`` and
``confirm_window_us`` (`dampened`), up to ``dampen_max_us``; each ``dampen_decay_us`` without a
dispute halves them again. A dead peer is then declared later, by at most ``dampen_max_us``, and
only after disputes. ``dampen_max_us = 0`` turns dampening off.
"""

from __future__ import annotations

import enum

import attrs

__all__ = [
    "MIN_INTERVAL_US",
    "AgentCheck",
    "Dampening",
    "DetectionDecision",
    "DetectionPolicy",
    "ProbeFacts",
    "StandbyWatch",
    "Verdict",
    "assess",
    "dampened",
    "recheck_after_us",
    "record_dispute",
]

# Below this the probe rate competes with the data plane's own packets for the lcore.
MIN_INTERVAL_US = 200


def _interval(_inst: object, attr: attrs.Attribute[int], value: int) -> None:
    if value < MIN_INTERVAL_US:
        raise ValueError(f"{attr.name} must be >= {MIN_INTERVAL_US} us, got {value}")


def _positive(_inst: object, attr: attrs.Attribute[int], value: int) -> None:
    if value <= 0:
        raise ValueError(f"{attr.name} must be > 0, got {value}")


def _not_negative(_inst: object, attr: attrs.Attribute[int], value: int) -> None:
    if value < 0:
        raise ValueError(f"{attr.name} must be >= 0, got {value}")


@attrs.frozen
class DetectionPolicy:
    interval_us: int = attrs.field(default=1_000, validator=_interval)
    misses: int = attrs.field(default=3, validator=_positive)
    hold_down_us: int = attrs.field(default=5_000, validator=_not_negative)
    confirm_window_us: int = attrs.field(default=5_000, validator=_positive)
    dampen_max_us: int = attrs.field(default=60_000, validator=_not_negative)
    dampen_decay_us: int = attrs.field(default=10_000_000, validator=_positive)
    # A disputed silence (the peer's agent answered) is checked again this long after the
    # question while no probe came back: a peer that died right after answering is still failed
    # over. Not one window: on a loaded 2-CPU testbed whole-host stalls of 100-200 ms followed
    # disputes, and a check every window turned them into takeovers of live primaries.
    disputed_recheck_us: int = attrs.field(default=300_000, validator=_positive)

    @property
    def timeout_us(self) -> int:
        """Silence after which the peer becomes suspect."""
        return self.interval_us * self.misses

    @property
    def max_detection_us(self) -> int:
        """Longest time from the last reply to a declared failure of a dead peer."""
        return max(self.timeout_us + self.confirm_window_us, self.hold_down_us)


@attrs.frozen
class Dampening:
    """Recent disputes of one peer: `level` doublings as of `at_us` (None: never disputed)."""

    level: int = 0
    at_us: int | None = None

    def level_at(self, policy: DetectionPolicy, now_us: int) -> int:
        """The level left at `now_us`: one less per ``dampen_decay_us`` since the last dispute."""
        if self.at_us is None or policy.dampen_max_us == 0:
            return 0
        return max(0, self.level - max(0, now_us - self.at_us) // policy.dampen_decay_us)


def record_dispute(policy: DetectionPolicy, damp: Dampening, now_us: int) -> Dampening:
    """A dispute at `now_us`: one more doubling, no more than reach ``dampen_max_us``."""
    if policy.dampen_max_us == 0:
        return damp
    level = damp.level_at(policy, now_us) + 1
    base = min(policy.hold_down_us, policy.confirm_window_us) or policy.confirm_window_us
    # Past the level at which both knobs are capped, more doublings change nothing.
    while level > 0 and (base << (level - 1)) >= policy.dampen_max_us:
        level -= 1
    return Dampening(level, now_us)


def dampened(policy: DetectionPolicy, damp: Dampening, now_us: int) -> DetectionPolicy:
    """`policy` with hold-down and confirmation window doubled per dispute level, capped."""
    level = damp.level_at(policy, now_us)
    if level == 0:
        return policy

    def longer(us: int) -> int:
        return max(us, min(policy.dampen_max_us, us << level))

    return attrs.evolve(
        policy,
        hold_down_us=longer(policy.hold_down_us),
        confirm_window_us=longer(policy.confirm_window_us),
    )


class AgentCheck(enum.Enum):
    NOT_ASKED = "not-asked"
    PENDING = "pending"
    ALIVE = "alive"
    DEAD = "dead"


@attrs.frozen
class ProbeFacts:
    now_us: int
    # When the last probe reply arrived; the silence is measured from here.
    last_reply_us: int
    consecutive_misses: int
    agent: AgentCheck = AgentCheck.NOT_ASKED
    agent_asked_us: int | None = None


class Verdict(enum.Enum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DISPUTED = "disputed"
    FAILED = "failed"


@attrs.frozen
class DetectionDecision:
    verdict: Verdict
    reason: str
    # The caller should start the agent's confirmation check now.
    ask_agent: bool = False
    # When the verdict can next change by time alone.
    wake_at_us: int | None = None


def _agent_state(policy: DetectionPolicy, facts: ProbeFacts) -> AgentCheck:
    if facts.agent is AgentCheck.NOT_ASKED or facts.agent_asked_us is None:
        return AgentCheck.NOT_ASKED
    # An answer to a question asked before the silence began says nothing about it.
    if facts.agent_asked_us < facts.last_reply_us:
        return AgentCheck.NOT_ASKED
    if facts.agent is AgentCheck.ALIVE and facts.now_us >= facts.agent_asked_us + recheck_after_us(
        policy
    ):
        return AgentCheck.NOT_ASKED
    return facts.agent


def recheck_after_us(policy: DetectionPolicy) -> int:
    """How long after it was asked an alive answer stands: a peer still silent then is asked
    again (``disputed_recheck_us``, at least the window). One window was too short: a check
    that waited its whole window answered already expired, and the peer was asked again at
    once, in a loop, until one answer failed."""
    return max(policy.confirm_window_us, policy.disputed_recheck_us)


def assess(policy: DetectionPolicy, facts: ProbeFacts) -> DetectionDecision:
    if facts.consecutive_misses < policy.misses:
        return DetectionDecision(
            Verdict.ALIVE, f"{facts.consecutive_misses} of {policy.misses} probes missed"
        )
    agent = _agent_state(policy, facts)
    silent_us = facts.now_us - facts.last_reply_us
    if agent is AgentCheck.NOT_ASKED:
        return DetectionDecision(
            Verdict.SUSPECT,
            f"{facts.consecutive_misses} probes missed, {silent_us} us silent; confirming",
            ask_agent=True,
            wake_at_us=facts.now_us + policy.confirm_window_us,
        )
    assert facts.agent_asked_us is not None
    if agent is AgentCheck.ALIVE:
        return DetectionDecision(
            Verdict.DISPUTED,
            f"{facts.consecutive_misses} probes missed but the agent's check answers",
            wake_at_us=facts.agent_asked_us + recheck_after_us(policy),
        )
    confirm_deadline = facts.agent_asked_us + policy.confirm_window_us
    confirmed = agent is AgentCheck.DEAD or facts.now_us >= confirm_deadline
    held_until = facts.last_reply_us + policy.hold_down_us
    held = facts.now_us >= held_until
    if confirmed and held:
        how = "fails" if agent is AgentCheck.DEAD else "timed out"
        return DetectionDecision(
            Verdict.FAILED,
            f"{facts.consecutive_misses} probes missed, {silent_us} us silent, agent's check {how}",
        )
    deadlines = ([] if held else [held_until]) + ([] if confirmed else [confirm_deadline])
    return DetectionDecision(
        Verdict.SUSPECT,
        f"{facts.consecutive_misses} probes missed, {silent_us} us silent; "
        + ("in hold-down" if not held else "awaiting the agent's check"),
        wake_at_us=min(deadlines),
    )


@attrs.define
class StandbyWatch:
    """A primary's watch of its standby (pure: the agent runs the checks it asks for).

    The data plane reports a silence once (the agent then checks the standby and calls
    `answered`), and says when probes come back (`heard`). Each check gets the dampened window
    (`window_us`). An alive answer disputes the silence
    (dampening the next ones, once per silence) and asks again ``disputed_recheck_us`` later,
    for as long as no probe came back (`due`): a standby that dies while a flap is disputed is
    then still found lost. A dead answer loses the standby.
    """

    policy: DetectionPolicy
    damp: Dampening = attrs.Factory(Dampening)
    recheck_at_us: int | None = None  # the next check of a disputed silence
    disputed: bool = False  # this silence was disputed already

    def busy(self, now_us: int) -> None:
        """The standby was just chosen and is being seeded: two doublings up, as its own
        watch of this primary starts."""
        self.damp = Dampening(level=2, at_us=now_us)

    def window_us(self, now_us: int) -> int:
        """The confirmation window a check started now gets."""
        return dampened(self.policy, self.damp, now_us).confirm_window_us

    def heard(self) -> None:
        """Probes came back: the silence is over."""
        self.recheck_at_us = None
        self.disputed = False

    def due(self, now_us: int) -> bool:
        """A disputed silence is to be checked again now (once per call that says so)."""
        if self.recheck_at_us is None or now_us < self.recheck_at_us:
            return False
        self.recheck_at_us = None
        return True

    def answered(self, alive: bool, now_us: int, window_us: int) -> Verdict:
        """The check started with `window_us` answered: DISPUTED the first time in a silence
        (report it), SUSPECT on later alive answers (checked again), FAILED if dead."""
        if not alive:
            self.heard()
            return Verdict.FAILED
        self.recheck_at_us = now_us + max(window_us, recheck_after_us(self.policy))
        if self.disputed:
            return Verdict.SUSPECT
        self.disputed = True
        self.damp = record_dispute(self.policy, self.damp, now_us)
        return Verdict.DISPUTED
