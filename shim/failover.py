"""The failover sequence for one unit: a state machine with no I/O.

Everything that decides whether, when and how a unit fails over lives in this file. The machine
runs on the node that would take the unit over: the standby's agent for a remote failover, the
primary's own agent for a local one. Its driver feeds it `Event`s (probe reports, the NF's pidfd,
operator requests, the outcome of every command) through `FailoverMachine.handle` and carries out
the `Command`s it returns, in order. Time is the last `Tick` (CLOCK_MONOTONIC microseconds, the
clock of the data plane's probe events): the driver ticks at least at `next_wakeup_us`.

What the machine watches, the **incarnation**: the unit's running copy, named by its term and
either the peer data plane that runs it (this node is its standby) or the pid of its NF here.
A completed failover makes the restored copy the watched incarnation, so the same machine then
covers the next failure (local failover after a remote one, or two local ones in a row).

Triggers and detection:

- `NfExited(pid)` of the watched pid (the pidfd is authoritative) starts a local failover.
- `PeerDown(peer, last_rx_us, now_us, term)` of the watched peer is only a suspicion.
  `policies.detection.assess` decides; it asks for the agent's own check (`Confirm`), answered by
  `Confirmed(alive)`. The failover starts on the FAILED verdict (check says dead or did not answer
  within the window, and the hold-down has passed). An ALIVE answer is DISPUTED: the data-plane
  path is lost but the host is not, so a failover would split the unit's brain; the machine
  alarms once and keeps asking each window. `PeerUp` ends the suspicion.
- Speculation (`FailoverConfig.prestore`, remote only): with a suspicion's first `Confirm` the
  machine also commands `Prestore`: the committed checkpoint is restored into the prepared netns
  while the check runs, unattached and unannounced, so a FAILED verdict finds its copy restored
  (the restore and the confirmation window overlap instead of adding up). It decides nothing:
  the restore step uses the copy only if it came from the image located at the new term;
  an ALIVE verdict, a `PeerUp`, a stand-down or a failure before the restore commands
  `DropPrestore`.
- `FailoverRequested(reason, planned, term)` comes from an operator and needs no confirmation.
  `planned` first quiesces the running copy (`Quiesce`: a last checkpoint, committed, and the
  copy stopped), so a switchover loses no input; a quiesce that fails aborts the switchover and
  commands `Unquiesce`: nothing changed.

Idempotence (Masakari's recurring bug is a recovery done twice):

- One failover at a time: every trigger while one is in progress is `Ignored`.
- A trigger names the incarnation it is about (term, pid or peer). One that names an incarnation
  already replaced is stale and `Ignored`, so a duplicate PeerDown, a retried request or a probe
  plus an operator request for the same failure cause exactly one failover.
- Every command of an attempt carries the attempt's new term and every completion echoes it, so
  a late completion from an earlier attempt is recognised and dropped; a late `Restored` of a
  copy that is not the running one is answered with `DestroyRestored`.
- After a failed attempt (FAILED) automatic triggers are ignored (they would retry forever); an
  operator's `FailoverRequested` naming the still-current term starts a new attempt at a higher
  term.

The sequence. Each step is one command with a timeout and one completion event; the transition
table below lists them in order. Steps that do not apply are skipped: QUIESCING only for a planned
switchover, ANNOUNCING only for a remote failover (a local one keeps its MAC and IP), REPLAYING
only in lossless mode (I7), SURVEYING only when a new standby must be chosen (remote, or no
standby known); a local failover keeps its standby.

1. `RaiseTerm(term)`: durable before anything else, so that a crash of this agent mid-way never
   reuses the term. The new term is one above any term this machine ever issued. A remote
   takeover also **claims** the term at the unit's spares (`TermRecorded.claims`, one `Claim`
   per spare; see `judge_claims`): a spare grants only if it holds no commit newer than the
   image this node will restore. A refusal means the old primary re-protected itself there
   first, so it is alive and protected: this node **stands down** (`Alarm`, `Report(ABORTED)`
   naming the spare and its commit, back to WATCHING the same incarnation, nothing restored).
   So does a node that no spare answered (an isolated standby must not promote). Without spares
   (`claims == ()`) or without claims at all (`None`, a local failover) the attempt goes on.
2. `FenceDataPlane(term)`: set_term on the taking-over side's data plane. Its buffered output of
   the old term is discarded and never released (I3, I4), and it refuses the old term's commands.
3. `LocateImage(term)`: the last committed checkpoint: the standby store's promotion at `term`
   (which also makes the standby refuse the old primary for ever), or the local copy the primary
   keeps. Answered by `ImageLocated(path, epoch, cut_seq)`.
4. `Restore(image)` into the prepared netns -> `Restored(pid)`.
5. `AttachPorts` (remote: the unit's ports join this data plane; local: the surviving port is
   checked), 6. `Announce` (gratuitous ARP / MAC move), 7. `ReplayInputs(after_seq=cut_seq)`,
8. `Resume` (ingress flows to the restored copy; its output is held until a commit at the new
   term), 9. `SurveyHosts` + `policies.placement.choose_standby`, then `Reprotect(standby)`: a new
   epoch engine protects the unit at the new term. Local only: `Reap(old pid)` after Resume, off
   the critical path.

Failure. A step that reports `StepFailed`, or that passes its deadline (`StepTimedOut` from the
driver, or a `Tick` past the deadline), ends the attempt in FAILED with `Alarm` and
`Report(ERROR)`, after commanding the cleanup of whatever was half-started, in this order:
`DetachPorts` (stop its traffic), `DestroyRestored`, `DiscardOutput` (its held output). The term
stays raised and the data plane fenced: the old copy's output must stay dead. Never a half-started
unit. Three exceptions: a failed quiesce aborts (above); a failed survey or re-protection
leaves the restored unit running unprotected (`Alarm`, `Report(FINISHED)` with the reason):
destroying a serving unit because no standby is free would turn a degraded state into an outage;
and with `FailoverConfig.replay_failure = ReplayFailure.RESUME` a failed or timed-out replay
(an incomplete input log: a gap, an overflow, a trim past the cut) commands an `Alarm` naming
the image's cut, after which the inputs were lost, and the attempt goes on to `Resume` without
them (the final report says so). The default, `FAIL`, treats it like any other step.

How this fits with `shim.epoch.PrimaryMachine` (the old primary's side). This machine never
talks to the old primary: fencing is by term. The old primary learns of the new term from its
agent (`TermRaised`), or from a store that refuses its transfers with a higher term (`Nacked`):
the promoted standby's, or a spare's that granted this node's claim; either makes its machine
FENCED, which discards everything unreleased. Until then it cannot release anything either,
because releases follow acks and neither the promoted store nor a spare that recorded the new
term ever acks the old term again (I3). The one release a remote primary makes itself, after
re-protecting onto a spare (a recovery cut committed there), is what the claim orders: either
that commit lands first and this node stands down, or the claim lands first and the commit is
refused. A partitioned old primary therefore holds its output. `StandbyLossAction.RUN_UNPROTECTED`
would release without commits, so a remote agent refuses it (docs/failover.md, "Partitions").
On one host (local failover) the old and new engines share the data plane, whose set_term makes
it refuse the old engine's commands and drop its buffers.

Any other (state, event) pair raises ProtocolError: it is a bug in the driver.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType
from typing import ClassVar

import attrs

from policies.detection import (
    AgentCheck,
    Dampening,
    DetectionPolicy,
    ProbeFacts,
    Verdict,
    assess,
    dampened,
    recheck_after_us,
    record_dispute,
)
from policies.placement import HostFacts, StandbyNeed, choose_standby
from shim.epoch import ProtocolError

__all__ = [
    "ANY_STATE",
    "IN_PROGRESS",
    "TRANSITIONS",
    "Alarm",
    "Announce",
    "Announced",
    "AttachPorts",
    "Claim",
    "ClaimVerdict",
    "Command",
    "Completion",
    "Confirm",
    "Confirmed",
    "DataPlaneFenced",
    "DestroyRestored",
    "DetachPorts",
    "DiscardOutput",
    "DropPrestore",
    "Event",
    "FailoverConfig",
    "FailoverMachine",
    "FailoverRequested",
    "FenceDataPlane",
    "HostsSurveyed",
    "Ignored",
    "ImageLocated",
    "InputsReplayed",
    "LocateImage",
    "NfExited",
    "PeerDown",
    "PeerUp",
    "PortsAttached",
    "Prestore",
    "ProtocolError",
    "Quiesce",
    "Quiesced",
    "RaiseTerm",
    "Reap",
    "ReplayFailure",
    "ReplayInputs",
    "Report",
    "Reprotect",
    "Reprotected",
    "Restore",
    "Restored",
    "Resume",
    "Resumed",
    "State",
    "Status",
    "Step",
    "StepCommand",
    "StepFailed",
    "StepTimedOut",
    "StepTimeouts",
    "SurveyHosts",
    "TermRecorded",
    "Tick",
    "Unquiesce",
    "judge_claims",
]


class Step(enum.Enum):
    """A step of the sequence; `StepTimedOut` and `StepFailed` name the one that went wrong."""

    QUIESCE = "quiesce"
    RAISE_TERM = "raise-term"
    FENCE = "fence"
    LOCATE = "locate-image"
    RESTORE = "restore"
    ATTACH = "attach"
    ANNOUNCE = "announce"
    REPLAY = "replay"
    RESUME = "resume"
    SURVEY = "survey"
    REPROTECT = "reprotect"


# --- events: what the driver observed -------------------------------------------------------


@attrs.frozen
class Event:
    """Something the driver observed and reports to the machine."""


@attrs.frozen
class Tick(Event):
    now_us: int


@attrs.frozen
class PeerDown(Event):
    """The data plane's `peer_down`: no probe from `peer` since `last_rx_us`.

    `term` is the term the peer's incarnation runs at (the probe's term), so a report about an
    incarnation that was already replaced is recognised as stale.
    """

    peer: str
    last_rx_us: int
    now_us: int
    term: int


@attrs.frozen
class PeerUp(Event):
    peer: str
    now_us: int


@attrs.frozen
class NfExited(Event):
    """The pidfd of the unit's NF polled readable: that process is gone."""

    pid: int
    status: str = ""


@attrs.frozen
class FailoverRequested(Event):
    """An operator's request. `term` is the unit's term as the operator saw it (`hamgr status`);
    a retried request carries the same term and so cannot fail the unit over twice."""

    reason: str
    planned: bool
    term: int


@attrs.frozen
class Confirmed(Event):
    """The answer of the agent's own check of `peer`, over another path than the probes."""

    peer: str
    alive: bool
    now_us: int


@attrs.frozen
class StepTimedOut(Event):
    step: Step
    term: int


@attrs.frozen
class StepFailed(Event):
    step: Step
    term: int
    reason: str


@attrs.frozen
class Completion(Event):
    """A step's outcome; `term` echoes the attempt whose command it completes."""

    term: int


@attrs.frozen
class Quiesced(Completion):
    epoch: int


class ClaimVerdict(enum.Enum):
    """What one spare answered to this node's claim of a new term."""

    GRANTED = "granted"  # the spare recorded the term
    REFUSED = "refused"  # the spare answered no (a newer commit, or a higher term)
    NO_ANSWER = "no-answer"  # unreachable, or no answer in time


@attrs.frozen
class Claim:
    """One spare's answer to the term claim. `committed`: the (term, epoch) of the spare's
    newer commit that refused it, when that was the reason."""

    spare: str
    verdict: ClaimVerdict
    detail: str = ""
    committed: tuple[int, int] | None = None


@attrs.frozen
class TermRecorded(Completion):
    """The term is durable. `claims`: the spares' answers to the term claim of a remote takeover
    (one per spare; empty when the unit has no spare); None when no claim was made."""

    claims: tuple[Claim, ...] | None = None


@attrs.frozen
class DataPlaneFenced(Completion):
    discarded_pkts: int
    open_epoch: int


@attrs.frozen
class ImageLocated(Completion):
    path: str
    epoch: int
    cut_seq: int


@attrs.frozen
class Restored(Completion):
    pid: int


@attrs.frozen
class PortsAttached(Completion):
    pass


@attrs.frozen
class Announced(Completion):
    pass


@attrs.frozen
class InputsReplayed(Completion):
    count: int


@attrs.frozen
class Resumed(Completion):
    pass


@attrs.frozen
class HostsSurveyed(Completion):
    hosts: tuple[HostFacts, ...]


@attrs.frozen
class Reprotected(Completion):
    standby: str


# --- commands: what the driver must do ------------------------------------------------------


@attrs.frozen
class Command:
    """Something the machine asks the driver to do."""


@attrs.frozen
class StepCommand(Command):
    """A step of the sequence: answered by one completion event, or StepFailed/StepTimedOut.

    The driver must give up after `timeout_us` and report `StepTimedOut(step, term)`.
    """

    step: ClassVar[Step]
    term: int
    timeout_us: int


@attrs.frozen
class Quiesce(StepCommand):
    """Planned switchover: a last checkpoint of the running copy, committed; then stop it."""

    step = Step.QUIESCE


@attrs.frozen
class RaiseTerm(StepCommand):
    """Record `term` durably (fsync) as the unit's term before anything else happens."""

    step = Step.RAISE_TERM


@attrs.frozen
class FenceDataPlane(StepCommand):
    """set_term on this node's data plane: the old term's held output dies there."""

    step = Step.FENCE


@attrs.frozen
class LocateImage(StepCommand):
    """Find the last committed checkpoint (promote the standby store at `term`, or the local
    copy) and answer `ImageLocated`."""

    step = Step.LOCATE


@attrs.frozen
class Restore(StepCommand):
    """Restore `image` into the prepared netns. A copy `Prestore` made for this term is used if
    it was restored from this very image; the driver destroys it otherwise."""

    step = Step.RESTORE
    image: str = attrs.field(kw_only=True)


@attrs.frozen
class AttachPorts(StepCommand):
    step = Step.ATTACH


@attrs.frozen
class Announce(StepCommand):
    step = Step.ANNOUNCE


@attrs.frozen
class ReplayInputs(StepCommand):
    """Lossless mode (I7): feed the logged inputs with sequence numbers above `after_seq`."""

    step = Step.REPLAY
    after_seq: int = attrs.field(kw_only=True)


@attrs.frozen
class Resume(StepCommand):
    step = Step.RESUME


@attrs.frozen
class SurveyHosts(StepCommand):
    """Report the candidate hosts for a new standby (`HostsSurveyed`)."""

    step = Step.SURVEY


@attrs.frozen
class Reprotect(StepCommand):
    """Protect the restored unit at `term` with `standby`: a new epoch engine."""

    step = Step.REPROTECT
    standby: str = attrs.field(kw_only=True)


@attrs.frozen
class Confirm(Command):
    """Run the agent's own check of `peer`; answer `Confirmed` (a late answer is harmless)."""

    peer: str
    timeout_us: int


@attrs.frozen
class Prestore(Command):
    """Speculative restore, while a suspect peer is being confirmed (`FailoverConfig.prestore`).

    The driver starts, without waiting, a restore of the store's committed checkpoint as it is
    now into the prepared netns, as the copy the attempt at `term` will need if the verdict is
    FAILED. Nothing is decided by it: no term is raised, nothing is promoted or fenced, no port
    is attached, so the copy receives nothing and nothing it sends leaves the host. The peer may
    commit again meanwhile: `Restore` uses the copy only if the image located then is the one
    it was restored from. No completion event; a failure only loses the head start.

    The restore begins no earlier than `not_before_us` (the silence then is
    `FailoverConfig.prestore_after_us` long) and only if `peer` is still silent in this node's
    data plane then: most silences of a live peer end within a few milliseconds, and a restore
    per such blip would load the very host whose probes it starves. A newer `Prestore`
    supersedes one not yet begun, and `DropPrestore` cancels it.
    """

    term: int
    timeout_us: int
    peer: str = attrs.field(kw_only=True)
    not_before_us: int = attrs.field(kw_only=True)


@attrs.frozen
class DropPrestore(Command):
    """Destroy the speculative copy of `term`, if any (the suspicion ended without a takeover,
    or the attempt ended before its restore). Idempotent, bounded, no completion event."""

    term: int
    timeout_us: int


# Cleanup and follow-up: no completion event; the driver makes each idempotent and bounded.


@attrs.frozen
class Unquiesce(Command):
    """An aborted switchover: let the quiesced copy run on, at its own term."""

    term: int
    timeout_us: int


@attrs.frozen
class DetachPorts(Command):
    """Stop steering the unit's traffic to the copy restored at `term`."""

    term: int
    timeout_us: int


@attrs.frozen
class DestroyRestored(Command):
    """Destroy the copy restored at `term` (`pid`, or whatever the restore left if None)."""

    term: int
    pid: int | None
    timeout_us: int


@attrs.frozen
class DiscardOutput(Command):
    """Drop the output the copy restored at `term` produced; it must never be released."""

    term: int
    timeout_us: int


@attrs.frozen
class Reap(Command):
    """Remove what the dead local incarnation `pid` left (runc state, cgroup, bundle)."""

    pid: int
    timeout_us: int


@attrs.frozen
class Alarm(Command):
    reason: str


class Status(enum.Enum):
    """A failover notification's status, as in Masakari."""

    RUNNING = "running"
    FINISHED = "finished"
    ERROR = "error"
    ABORTED = "aborted"


@attrs.frozen
class Report(Command):
    unit: str
    status: Status
    term: int
    detail: str
    elapsed_us: int = 0


@attrs.frozen
class Ignored(Command):
    """An event was dropped on purpose; the driver logs it and counts it."""

    event: Event
    reason: str


# --- configuration --------------------------------------------------------------------------


@attrs.frozen
class StepTimeouts:
    """Deadline of each step, in microseconds. Restore is CRIU's; the rest are control calls."""

    quiesce_us: int = 10_000_000
    raise_term_us: int = 1_000_000
    fence_us: int = 1_000_000
    locate_us: int = 5_000_000
    restore_us: int = 30_000_000
    attach_us: int = 2_000_000
    announce_us: int = 1_000_000
    replay_us: int = 10_000_000
    resume_us: int = 1_000_000
    survey_us: int = 5_000_000
    reprotect_us: int = 30_000_000
    cleanup_us: int = 10_000_000

    def of(self, step: Step) -> int:
        value: int = getattr(self, f"{step.name.lower()}_us")
        return value


class ReplayFailure(enum.Enum):
    """What a lossless failover does when its replay step fails or times out.

    The restored copy is consistent either way: it holds the committed image plus, at most, a
    prefix of the inputs that followed its cut, in order, and none of its output has left. What
    is lost is inputs, exactly as without lossless mode (Remus).
    """

    # The attempt fails like any other step: cleanup, FAILED, the unit is down.
    FAIL = "fail"
    # Alarm naming the inputs lost, then Resume without them: the unit is up, lossy this once.
    RESUME = "resume"


@attrs.frozen
class FailoverConfig:
    detection: DetectionPolicy = attrs.field(factory=DetectionPolicy)
    timeouts: StepTimeouts = attrs.field(factory=StepTimeouts)
    lossless: bool = False
    replay_failure: ReplayFailure = ReplayFailure.FAIL
    # Memory a new standby needs, for placement.
    standby_mem_bytes: int = 0
    # Remote only: restore the committed checkpoint speculatively while a suspect peer is being
    # confirmed (`Prestore`), so that a real failure finds the copy restored when the verdict
    # comes. Costs one restore (CPU, the NF's memory) per suspicion whose silence outlasts
    # `prestore_after_us` and is not disputed by then; dropped if the peer was alive.
    prestore: bool = False
    # ...begun once the silence is this long (CLOCK_MONOTONIC us after the last probe). With
    # a 10-20 ms confirmation window the copy (a restore, ~45-60 ms under load), not the
    # verdict, ends a dead peer's outage, so it begins early; most live peers' blips are
    # disputed before it (docs/failover.md, "Restored ahead").
    prestore_after_us: int = 5_000


def judge_claims(claims: tuple[Claim, ...] | None) -> str | None:
    """Why this node must stand down instead of taking over, or None to go on.

    - No claim made (None) or no spare configured (()): go on. Without a spare nothing can tell
      a dead primary from a partitioned one (docs/failover.md, "Partitions").
    - Any refusal: stand down. A spare refuses only when it holds a commit newer than the image
      this node would restore (the old primary re-protected itself there first, so it is alive
      and protected), or when it has seen a higher term (someone else took the unit over).
    - No grant at all: stand down. A standby that reaches no spare may be the isolated side of a
      partition, and an isolated standby must not promote.
    """
    if not claims:
        return None
    for c in claims:
        if c.verdict is ClaimVerdict.REFUSED:
            if c.committed is not None:
                t, e = c.committed
                return (
                    f"stand down: {c.spare} holds a newer commit (term {t}, epoch {e}) "
                    "from the old primary"
                )
            return f"stand down: {c.spare} refused the term claim: {c.detail}"
    if not any(c.verdict is ClaimVerdict.GRANTED for c in claims):
        answers = "; ".join(f"{c.spare}: {c.detail or c.verdict.value}" for c in claims)
        return (
            f"stand down: no spare granted the term claim ({answers}); an isolated standby "
            "must not promote"
        )
    return None


# --- the machine ----------------------------------------------------------------------------


class State(enum.Enum):
    WATCHING = "watching"  # the watched incarnation runs; no failover in progress
    CONFIRMING = "confirming"  # a peer is suspect; waiting for the detection verdict
    QUIESCING = "quiescing"
    RAISING_TERM = "raising-term"
    FENCING = "fencing"
    LOCATING = "locating"
    RESTORING = "restoring"
    ATTACHING = "attaching"
    ANNOUNCING = "announcing"
    REPLAYING = "replaying"
    RESUMING = "resuming"
    SURVEYING = "surveying"
    REPROTECTING = "reprotecting"
    FAILED = "failed"  # the last attempt failed and was cleaned up; the unit is down


# The sequence, one completion event per step state, in order. A state missing from an attempt's
# plan is skipped: its successor is the next state of the plan. REPROTECTING leads back to
# WATCHING, with the restored copy as the watched incarnation. A TermRecorded whose claims
# `judge_claims` refuses leads back to WATCHING instead, with the same incarnation (stand down).
TRANSITIONS: Mapping[State, Mapping[type[Event], State]] = MappingProxyType(
    {
        State.WATCHING: {},
        State.CONFIRMING: {Confirmed: State.RAISING_TERM},
        State.QUIESCING: {Quiesced: State.RAISING_TERM},
        State.RAISING_TERM: {TermRecorded: State.FENCING},
        State.FENCING: {DataPlaneFenced: State.LOCATING},
        State.LOCATING: {ImageLocated: State.RESTORING},
        State.RESTORING: {Restored: State.ATTACHING},
        State.ATTACHING: {PortsAttached: State.ANNOUNCING},
        State.ANNOUNCING: {Announced: State.REPLAYING},
        State.REPLAYING: {InputsReplayed: State.RESUMING},
        State.RESUMING: {Resumed: State.SURVEYING},
        State.SURVEYING: {HostsSurveyed: State.REPROTECTING},
        State.REPROTECTING: {Reprotected: State.WATCHING},
        State.FAILED: {},
    }
)

# Triggers, time and step outcomes may come in any state.
ANY_STATE: frozenset[type[Event]] = frozenset(
    {Tick, PeerDown, PeerUp, NfExited, FailoverRequested, StepTimedOut, StepFailed}
)

_STEP_STATES: Mapping[State, Step] = MappingProxyType(
    {
        State.QUIESCING: Step.QUIESCE,
        State.RAISING_TERM: Step.RAISE_TERM,
        State.FENCING: Step.FENCE,
        State.LOCATING: Step.LOCATE,
        State.RESTORING: Step.RESTORE,
        State.ATTACHING: Step.ATTACH,
        State.ANNOUNCING: Step.ANNOUNCE,
        State.REPLAYING: Step.REPLAY,
        State.RESUMING: Step.RESUME,
        State.SURVEYING: Step.SURVEY,
        State.REPROTECTING: Step.REPROTECT,
    }
)
# States in which a failover is in progress.
IN_PROGRESS: frozenset[State] = frozenset(_STEP_STATES)
_COMPLETIONS: frozenset[type[Event]] = frozenset(
    kind for state in IN_PROGRESS for kind in TRANSITIONS[state]
)


@attrs.define
class _Attempt:
    term: int  # the new term
    failed_term: int  # the term of the incarnation being replaced
    local: bool
    planned: bool
    cause: str
    started_us: int
    plan: tuple[State, ...]
    old_pid: int | None
    deadline_us: int = 0
    image: ImageLocated | None = None
    restore_started: bool = False
    restored_pid: int | None = None
    attached: bool = False
    fed: bool = False  # replay or resume began: the restored copy may have produced output
    standby: str | None = None
    replay_failed: str | None = None  # why the lossless replay was given up (ReplayFailure.RESUME)


@attrs.define
class _Suspicion:
    peer: str
    term: int
    last_rx_us: int
    agent: AgentCheck = AgentCheck.NOT_ASKED
    asked_us: int | None = None
    disputed: bool = False
    alarmed: bool = False  # one alarm per suspicion, however often it is asked again
    prestored: bool = False  # one speculative restore per suspicion, at its first check


class FailoverMachine:
    """The failover sequence for one unit on the node that would take it over."""

    def __init__(
        self,
        unit: str,
        term: int,
        config: FailoverConfig | None = None,
        *,
        pid: int | None = None,
        peer: str | None = None,
        standby: str | None = None,
        now_us: int = 0,
        dampening: Dampening | None = None,
    ) -> None:
        """`dampening`: detection starts dampened (`policies.detection.dampened`), for a peer
        known to be busy, such as a primary seeding this node with a full image."""
        if (pid is None) == (peer is None):
            raise ValueError("watch exactly one incarnation: a local pid or a peer data plane")
        self.unit = unit
        self.config = config or FailoverConfig()
        self._term = term
        self._highest = term
        self._pid = pid
        self._peer = peer
        self._standby = standby
        self._protected = True
        self._now = now_us
        self._state = State.WATCHING
        self._attempt: _Attempt | None = None
        self._suspicion: _Suspicion | None = None
        # Disputed suspicions of the watched peer: they lengthen detection (`dampened`).
        self._damp = dampening or Dampening()
        self._failure: str | None = None
        self._wake_at: int | None = None
        # The term of the speculative copy commanded (`Prestore`) and not yet used or dropped.
        self._prestore: int | None = None

    # -- read-only views -----------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def term(self) -> int:
        """The term of the watched incarnation (raised when a failover completes)."""
        return self._term

    @property
    def highest_term(self) -> int:
        """The highest term this machine has issued; the next attempt uses one above it."""
        return self._highest

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def peer(self) -> str | None:
        return self._peer

    @property
    def standby(self) -> str | None:
        return self._standby

    @property
    def protected(self) -> bool:
        return self._protected

    @property
    def failure(self) -> str | None:
        """Why the last attempt failed, while in FAILED."""
        return self._failure

    @property
    def image(self) -> ImageLocated | None:
        """The checkpoint the attempt in progress restores, once located."""
        return None if self._attempt is None else self._attempt.image

    @property
    def next_wakeup_us(self) -> int | None:
        """When a Tick could next change something; None if only an event can."""
        return self._wake_at

    # -- the one entry point -------------------------------------------------------------

    def handle(self, event: Event) -> list[Command]:
        kind = type(event)
        allowed = kind in ANY_STATE or kind is Confirmed or kind in _COMPLETIONS
        if not allowed:
            raise ProtocolError(f"unit {self.unit}: unknown event {event!r}")
        out: list[Command] = []
        match event:
            case Tick(now_us=now):
                if now < self._now:
                    raise ProtocolError(
                        f"unit {self.unit}: clock went back from {self._now} to {now}"
                    )
                self._now = now
                self._on_time(out)
            case PeerDown() | NfExited() | FailoverRequested():
                self._on_trigger(event, out)
            case PeerUp(peer=peer, now_us=now):
                self._advance_clock(now)
                s = self._suspicion
                if self._state is State.CONFIRMING and s is not None and s.peer == peer:
                    self._suspicion = None
                    self._state = State.WATCHING
                    self._drop_prestore(out)
            case Confirmed():
                self._on_confirmed(event, out)
            case StepTimedOut(step=step, term=term):
                a = self._current(event, term, out)
                if a is not None and step is _STEP_STATES[self._state]:
                    self._fail(a, f"step {step.value} timed out", out)
                elif a is not None:
                    out.append(Ignored(event, f"step {step.value} is not in progress"))
            case StepFailed(step=step, term=term, reason=reason):
                a = self._current(event, term, out)
                if a is not None and step is _STEP_STATES[self._state]:
                    self._fail(a, f"step {step.value} failed: {reason}", out)
                elif a is not None:
                    out.append(Ignored(event, f"step {step.value} is not in progress"))
            case _:
                self._on_completion(event, out)
        self._update_wake()
        return out

    # -- triggers ------------------------------------------------------------------------

    def _advance_clock(self, now: int) -> None:
        self._now = max(self._now, now)

    def _on_trigger(
        self, event: PeerDown | NfExited | FailoverRequested, out: list[Command]
    ) -> None:
        if isinstance(event, PeerDown):
            self._advance_clock(event.now_us)
        if self._state in IN_PROGRESS:
            assert self._attempt is not None
            out.append(Ignored(event, f"failover to term {self._attempt.term} in progress"))
            return
        why = self._not_about_watched(event)
        if why is not None:
            out.append(Ignored(event, why))
            return
        if self._state is State.FAILED:
            if not isinstance(event, FailoverRequested):
                out.append(
                    Ignored(
                        event,
                        f"the last failover failed ({self._failure}); only an operator's "
                        f"request for term {self._term} retries it",
                    )
                )
                return
            self._start(event.reason, local=self._pid is not None, planned=False, out=out)
            return
        match event:
            case NfExited(pid=pid, status=status):
                self._start(f"NF pid {pid} exited ({status or 'unknown status'})", True, False, out)
            case FailoverRequested(reason=reason, planned=planned):
                if self._state is State.CONFIRMING:
                    self._suspicion = None
                self._start(f"requested: {reason}", self._pid is not None, planned, out)
            case PeerDown(peer=peer, last_rx_us=last_rx, term=term):
                if self._state is State.CONFIRMING:
                    out.append(Ignored(event, f"peer {peer} is already being confirmed"))
                    return
                self._suspicion = _Suspicion(peer, term, last_rx)
                self._state = State.CONFIRMING
                self._assess(out)

    def _not_about_watched(self, event: PeerDown | NfExited | FailoverRequested) -> str | None:
        """Why `event` is not about the watched incarnation, or None if it is."""
        match event:
            case NfExited(pid=pid):
                if self._pid is None:
                    return f"the unit runs on peer {self._peer}, not in pid {pid}"
                if pid != self._pid:
                    return f"pid {pid} is not the unit's incarnation (pid {self._pid})"
                return None
            case PeerDown(peer=peer, term=term):
                if self._peer is None:
                    return f"the unit runs here (pid {self._pid}) since term {self._term}"
                if peer != self._peer:
                    return f"peer {peer} does not run this unit ({self._peer} does)"
                return self._term_mismatch(term)
            case FailoverRequested(term=term):
                return self._term_mismatch(term)
        raise ProtocolError(f"unit {self.unit}: not a trigger: {event!r}")  # pragma: no cover

    def _term_mismatch(self, term: int) -> str | None:
        if term < self._term:
            return f"stale term {term}: the unit already runs at term {self._term}"
        if term > self._term:
            return f"term {term} is ahead of this node's term {self._term}; resynchronise first"
        return None

    # -- detection -----------------------------------------------------------------------

    def _on_confirmed(self, event: Confirmed, out: list[Command]) -> None:
        self._advance_clock(event.now_us)
        s = self._suspicion
        if self._state is not State.CONFIRMING or s is None or s.peer != event.peer:
            out.append(Ignored(event, "no confirmation pending for this peer"))
            return
        s.agent = AgentCheck.ALIVE if event.alive else AgentCheck.DEAD
        self._assess(out)

    def _assess(self, out: list[Command]) -> None:
        s = self._suspicion
        assert s is not None
        policy = dampened(self.config.detection, self._damp, self._now)
        silent = max(0, self._now - s.last_rx_us)
        # The data plane already counted `misses` before it reported the peer down.
        misses = max(policy.misses, silent // policy.interval_us)
        decision = assess(policy, ProbeFacts(self._now, s.last_rx_us, misses, s.agent, s.asked_us))
        match decision.verdict:
            case Verdict.FAILED:
                self._suspicion = None
                self._start(f"peer {s.peer} failed: {decision.reason}", False, False, out)
            case Verdict.DISPUTED:
                # Alive: the copy restored ahead is not needed, and the peer commits on.
                self._drop_prestore(out)
                if not s.disputed:
                    s.disputed = True
                    self._damp = record_dispute(self.config.detection, self._damp, self._now)
                if not s.alarmed:
                    s.alarmed = True
                    longer = dampened(self.config.detection, self._damp, self._now)
                    out.append(
                        Alarm(
                            f"unit {self.unit}: {decision.reason}; no failover while peer "
                            f"{s.peer} answers (it would split the unit's brain); detection "
                            f"dampened: hold-down {longer.hold_down_us} us, confirmation "
                            f"window {longer.confirm_window_us} us"
                        )
                    )
            case _:
                if decision.ask_agent:
                    s.agent = AgentCheck.PENDING
                    s.asked_us = self._now
                    s.disputed = False
                    if self.config.prestore and not s.prestored and self._prestore is None:
                        # Only at a suspicion's first check: a disputed peer is alive and
                        # committing, and a copy per re-check would be stale every time.
                        s.prestored = True
                        self._prestore = self._highest + 1
                        out.append(
                            Prestore(
                                self._prestore,
                                self.config.timeouts.restore_us,
                                peer=s.peer,
                                not_before_us=s.last_rx_us + self.config.prestore_after_us,
                            )
                        )
                    out.append(Confirm(s.peer, policy.confirm_window_us))

    def _drop_prestore(self, out: list[Command]) -> None:
        if self._prestore is not None:
            out.append(DropPrestore(self._prestore, self.config.timeouts.cleanup_us))
            self._prestore = None

    # -- the sequence --------------------------------------------------------------------

    def _start(self, cause: str, local: bool, planned: bool, out: list[Command]) -> None:
        term = self._highest + 1
        self._highest = term
        self._failure = None
        need_survey = not local or self._standby is None
        plan = tuple(
            s
            for s in _STEP_STATES
            if not (s is State.QUIESCING and not planned)
            and not (s is State.ANNOUNCING and local)
            and not (s is State.REPLAYING and not self.config.lossless)
            and not (s is State.SURVEYING and not need_survey)
        )
        a = _Attempt(
            term=term,
            failed_term=self._term,
            local=local,
            planned=planned,
            cause=cause,
            started_us=self._now,
            plan=plan,
            old_pid=self._pid if local else None,
            standby=None if need_survey else self._standby,
        )
        self._attempt = a
        kind = "local" if local else "remote"
        what = "switchover" if planned else "failover"
        out.append(
            Report(
                self.unit, Status.RUNNING, term, f"{kind} {what} from term {a.failed_term}: {cause}"
            )
        )
        self._enter(a, plan[0], out)

    def _enter(self, a: _Attempt, state: State, out: list[Command]) -> None:
        self._state = state
        step = _STEP_STATES[state]
        timeout = self.config.timeouts.of(step)
        a.deadline_us = self._now + timeout
        match state:
            case State.QUIESCING:
                out.append(Quiesce(a.term, timeout))
            case State.RAISING_TERM:
                out.append(RaiseTerm(a.term, timeout))
            case State.FENCING:
                out.append(FenceDataPlane(a.term, timeout))
            case State.LOCATING:
                out.append(LocateImage(a.term, timeout))
            case State.RESTORING:
                assert a.image is not None
                a.restore_started = True
                if self._prestore == a.term:
                    self._prestore = None  # the restore step uses the copy or destroys it
                else:
                    self._drop_prestore(out)
                out.append(Restore(a.term, timeout, image=a.image.path))
            case State.ATTACHING:
                out.append(AttachPorts(a.term, timeout))
            case State.ANNOUNCING:
                out.append(Announce(a.term, timeout))
            case State.REPLAYING:
                assert a.image is not None
                a.fed = True
                out.append(ReplayInputs(a.term, timeout, after_seq=a.image.cut_seq))
            case State.RESUMING:
                a.fed = True
                out.append(Resume(a.term, timeout))
            case State.SURVEYING:
                out.append(SurveyHosts(a.term, timeout))
            case State.REPROTECTING:
                assert a.standby is not None
                out.append(Reprotect(a.term, timeout, standby=a.standby))

    def _next(self, a: _Attempt, out: list[Command]) -> None:
        i = a.plan.index(self._state)
        if i + 1 < len(a.plan):
            self._enter(a, a.plan[i + 1], out)
        else:
            self._complete(a, None, out)

    def _current(self, event: Event, term: int, out: list[Command]) -> _Attempt | None:
        """The attempt `event` belongs to, or None after reporting why it is ignored."""
        a = self._attempt
        if self._state not in IN_PROGRESS or a is None:
            out.append(Ignored(event, f"no failover in progress (state {self._state.name})"))
            return None
        if term != a.term:
            out.append(Ignored(event, f"for term {term}; the attempt in progress is {a.term}"))
            return None
        return a

    def _on_completion(self, event: Event, out: list[Command]) -> None:
        assert isinstance(event, Completion)
        term = event.term
        if self._state not in IN_PROGRESS or self._attempt is None or term != self._attempt.term:
            self._late(event, term, out)
            return
        a = self._attempt
        if isinstance(event, InputsReplayed) and a.replay_failed is not None:
            # The replay step was given up (it timed out) and the attempt went on without it.
            out.append(Ignored(event, f"the replay at term {term} was already given up"))
            return
        if type(event) not in TRANSITIONS[self._state]:
            expected = ", ".join(k.__name__ for k in TRANSITIONS[self._state])
            raise ProtocolError(
                f"unit {self.unit}: {type(event).__name__} is not allowed in state "
                f"{self._state.name}; expected {expected}"
            )
        match event:
            case Quiesced():
                pass
            case TermRecorded(claims=claims):
                refused = judge_claims(claims)
                if refused is not None:
                    self._stand_down(a, refused, out)
                    return
            case DataPlaneFenced():
                pass
            case ImageLocated():
                a.image = event
            case Restored(pid=pid):
                a.restored_pid = pid
            case PortsAttached():
                a.attached = True
            case Resumed():
                if a.old_pid is not None:
                    out.append(Reap(a.old_pid, self.config.timeouts.cleanup_us))
            case HostsSurveyed(hosts=hosts):
                exclude = frozenset() if self._peer is None else frozenset({self._peer})
                placement = choose_standby(
                    hosts, StandbyNeed(self.config.standby_mem_bytes, True, exclude)
                )
                if placement.host is None:
                    self._complete(a, f"no standby: {placement.reason}", out)
                    return
                a.standby = placement.host
            case Reprotected(standby=standby):
                a.standby = standby
        self._next(a, out)

    def _late(self, event: Event, term: int, out: list[Command]) -> None:
        """A completion of an earlier attempt or step: dropped, but never a stray NF."""
        if isinstance(event, Restored) and not (term == self._term and event.pid == self._pid):
            out.append(DestroyRestored(term, event.pid, self.config.timeouts.cleanup_us))
            return
        out.append(Ignored(event, f"late completion for term {term}"))

    def _on_time(self, out: list[Command]) -> None:
        if self._state is State.CONFIRMING:
            self._assess(out)
            return
        a = self._attempt
        if self._state in IN_PROGRESS and a is not None and self._now >= a.deadline_us:
            step = _STEP_STATES[self._state]
            timeout_ms = self.config.timeouts.of(step) / 1000
            self._fail(a, f"step {step.value} passed its {timeout_ms:g} ms deadline", out)

    def _fail(self, a: _Attempt, cause: str, out: list[Command]) -> None:
        elapsed = self._now - a.started_us
        self._drop_prestore(out)  # an attempt that ends before its restore step
        if self._state is State.QUIESCING:
            out.append(Unquiesce(a.term, self.config.timeouts.cleanup_us))
            reason = f"unit {self.unit}: switchover aborted, term {self._term} runs on: {cause}"
            out.append(Alarm(reason))
            out.append(Report(self.unit, Status.ABORTED, a.term, cause, elapsed))
            self._attempt = None
            self._state = State.WATCHING
            return
        if self._state in (State.SURVEYING, State.REPROTECTING):
            self._complete(a, cause, out)
            return
        if self._state is State.REPLAYING and self.config.replay_failure is ReplayFailure.RESUME:
            self._give_up_replay(a, cause, out)
            return
        cleanup = self.config.timeouts.cleanup_us
        if a.attached or a.fed:
            out.append(DetachPorts(a.term, cleanup))
        if a.restore_started:
            out.append(DestroyRestored(a.term, a.restored_pid, cleanup))
        if a.fed:
            out.append(DiscardOutput(a.term, cleanup))
        reason = (
            f"unit {self.unit}: failover to term {a.term} failed, the unit is down: {cause} "
            f"(trigger: {a.cause})"
        )
        out.append(Alarm(reason))
        out.append(Report(self.unit, Status.ERROR, a.term, cause, elapsed))
        self._failure = cause
        self._attempt = None
        self._state = State.FAILED

    def _give_up_replay(self, a: _Attempt, cause: str, out: list[Command]) -> None:
        """ReplayFailure.RESUME: the unit resumes without the inputs the replay did not deliver.

        Nothing released can be taken back and the restored copy saw a prefix of its inputs in
        order, so I4 holds; what is lost is inputs, as without lossless mode. An operator would
        rather have the unit up with this alarm than down.
        """
        assert a.image is not None
        a.replay_failed = cause
        out.append(
            Alarm(
                f"unit {self.unit}: lossless replay at term {a.term} failed ({cause}); the "
                f"inputs after seq {a.image.cut_seq} of the image (epoch {a.image.epoch}) that it "
                "did not deliver are lost, and the unit resumes without them"
            )
        )
        self._next(a, out)

    def _stand_down(self, a: _Attempt, reason: str, out: list[Command]) -> None:
        """The claim was refused: no takeover. Nothing but the term was touched, and the term
        stays spent (the next attempt uses a higher one); the same incarnation is watched."""
        where = f"peer {self._peer}" if self._peer is not None else f"pid {self._pid}"
        out.append(
            Alarm(
                f"unit {self.unit}: {reason}; no takeover at term {a.term}, the unit stays with "
                f"{where} at term {self._term} (trigger: {a.cause})"
            )
        )
        out.append(Report(self.unit, Status.ABORTED, a.term, reason, self._now - a.started_us))
        self._drop_prestore(out)
        self._attempt = None
        self._suspicion = None
        self._state = State.WATCHING

    def _complete(self, a: _Attempt, unprotected: str | None, out: list[Command]) -> None:
        assert a.restored_pid is not None
        self._term = a.term
        self._pid = a.restored_pid
        self._peer = None
        self._standby = None if unprotected else a.standby
        self._protected = unprotected is None
        self._attempt = None
        self._state = State.WATCHING
        detail = f"restored from epoch {a.image.epoch if a.image else '?'} as pid {a.restored_pid}"
        if a.replay_failed is not None:
            detail += f"; inputs lost: the lossless replay failed ({a.replay_failed})"
        if unprotected is not None:
            out.append(Alarm(f"unit {self.unit}: runs unprotected at term {a.term}: {unprotected}"))
            detail += f"; unprotected: {unprotected}"
        else:
            detail += f"; standby {a.standby}"
        out.append(Report(self.unit, Status.FINISHED, a.term, detail, self._now - a.started_us))

    def _update_wake(self) -> None:
        self._wake_at = None
        if self._state in IN_PROGRESS and self._attempt is not None:
            self._wake_at = self._attempt.deadline_us
        elif self._state is State.CONFIRMING and self._suspicion is not None:
            s = self._suspicion
            policy = dampened(self.config.detection, self._damp, self._now)
            wakes = [s.last_rx_us + policy.hold_down_us]
            if s.asked_us is not None:
                wakes.append(s.asked_us + policy.confirm_window_us)
                if s.agent is AgentCheck.ALIVE:
                    # A disputed silence is asked again then (`policies.detection`), even if
                    # no event comes: its data plane reports a silence once.
                    wakes.append(s.asked_us + recheck_after_us(policy))
            future = [w for w in wakes if w > self._now]
            self._wake_at = min(future) if future else None
