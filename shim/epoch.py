"""The primary side of the epoch protocol for one unit: a state machine with no I/O.

Everything that affects this machine lives in this file. A driver feeds it `Event`s (what the data
plane, the checkpoint backend, the replication link and the monitors reported) through
`PrimaryMachine.handle`, and carries out the `Command`s it returns, in order. The machine never
reads a clock: time is the last `Tick`, so the driver ticks at least once per loop iteration.

States of the cut pipeline (DESIGN.md steps 1-5), and the transition table in words:

- RUNNING: the unit runs, no cut in progress. When the epoch policy says close (output waits, the
  epoch length has elapsed, fewer than K epochs are in flight, no retry backoff pending) and the
  unit is protected, the machine commands PauseIngress and goes to PAUSING.
- PAUSING + IngressPaused(cut_seq) -> FREEZING, commands Freeze.
- FREEZING + Frozen -> CLOSING, commands CloseEpoch(e).
- CLOSING + EpochClosed(e) -> CHECKPOINTING, commands Checkpoint(e). Epoch e+1 is now open.
- CHECKPOINTING + CheckpointTaken(e) -> THAWING, commands Thaw.
- CHECKPOINTING + CheckpointFailed(e) -> THAWING, commands Thaw (and Alarm once per failure run).
- THAWING + Thawed -> RESUMING, commands ResumeIngress.
- RESUMING + IngressResumed -> RUNNING, commands Ship(e) (step 6) if the checkpoint was taken and
  the standby is there; then a new cut may start at once.
- Any state but FENCED accepts Tick, OutputWaiting, Acked, Nacked, StandbyLost, StandbyBack,
  HoldCuts and TermRaised without leaving the pipeline state; a TermRaised, Acked or Nacked
  carrying a term above the machine's own moves it to FENCED.
- FENCED is final: the machine has commanded Discard of everything unreleased and ignores the
  rest. Late completions of commands issued before fencing are expected and dropped.

Any other (state, event) pair raises ProtocolError: it is a bug in the driver.

Decisions documented here because the design leaves them open:

- **Cumulative acks.** Acked(e) commits every epoch <= e, and the machine then commands Release
  for each held epoch <= e in epoch order. Checkpoint e captures the unit after every input before
  cut(e), so restoring it never regenerates output of an earlier epoch; releasing that output is
  as safe as releasing e's own. This makes a lost ack harmless, and lets one checkpoint cover the
  buffers of epochs whose own checkpoint failed or was never shipped.
- **Checkpoint failure.** The unit is thawed and resumed as usual; nothing is discarded. The
  failed epoch's buffer stays held and rides with the next checkpoint: the retry is simply the next
  cut, which closes e+1, and its ack releases e and e+1 (cumulative). A retry always closes a new
  epoch instead of checkpointing e again: without the close, output produced before the new cut
  would sit in the open buffer, which that checkpoint does not release, and a failover would lose
  output that the restored state believes was sent. A failed epoch does not count towards K, or K
  failures in a row would block the very cut that could commit them; the byte budget still bounds
  it. Once a later checkpoint is taken the failed epoch no longer counts as waiting output (I5).
  Retries back off per `CheckpointRetry`.
- **Where output is released** (`PrimaryConfig.release_at`). PRIMARY: Acked(e) commands Release,
  and the primary's data plane sends the buffers. STANDBY (remote standbys): every CloseEpoch
  saves the epoch's frames, every Ship names the held epochs up to its own whose saved output
  rides with it, the standby sends the output it has not sent yet once its commit is confirmed
  (the replication link's confirm round, `shim.replication`), and Acked(e), which the driver
  reports only after the standby's released answer, commands Retire: the primary frees its
  buffers without sending them. A primary that dies after the standby's commit then takes
  nothing with it: the output is out, or the standby sends it when it takes over, once.
  Releases the primary makes itself (running unprotected) are still Release.
- **Standby loss** follows `StandbyLossPolicy`. STALL: Alarm, keep holding, ship nothing and start
  no cut (there is nobody to ship to); the open epoch fills until the byte budget back-pressures.
  RUN_UNPROTECTED: Alarm, Release every closed epoch in order, then SetOutputCommit(False); a cut
  in progress is released when it finishes. StandbyBack turns output commit back on.
- **Acks are trusted only from the present standby.** After StandbyLost every ack is ignored, and
  epochs shipped to the lost standby become unshipped: its commits say nothing about the standby a
  failover would use. On StandbyBack the newest checkpoint is shipped again as a full image
  (parent None), and its ack releases everything before it. The driver must use a fresh link for a
  new standby, so late acks from the old one cannot arrive as if from the new one.
- **Back-pressure is its own command.** SetBackPressure(on) is separate from the PauseIngress and
  ResumeIngress of a cut; the data plane admits ingress only when neither holds it.
- **Nacks.** A Nacked epoch is shipped again as a full image, up to `max_ship_attempts` times; then
  the standby counts as lost.
- **Holding cuts.** HoldCuts(True) lets the cut in progress and every ship finish but starts no
  new cut until HoldCuts(False), which may start one at once. A planned switchover holds cuts
  while it lets the engine settle: a unit whose commit takes longer than an epoch (a chain, a
  loaded host) otherwise always has a cut or a ship in flight, and never settles.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType

import attrs

from policies.epoch import (
    CheckpointRetry,
    CommitSample,
    EpochFacts,
    EpochPolicy,
    FixedEpoch,
    decide,
    epoch_length_us,
    next_retry,
    observe,
)
from policies.inflight import InflightFacts, InflightPolicy, back_pressure
from policies.standby_loss import StandbyLossFacts, StandbyLossPolicy, on_standby_loss

__all__ = [
    "ANY_STATE",
    "TRANSITIONS",
    "Acked",
    "Alarm",
    "Checkpoint",
    "CheckpointFailed",
    "CheckpointTaken",
    "CloseEpoch",
    "Command",
    "Discard",
    "EpochClosed",
    "Event",
    "Freeze",
    "Frozen",
    "HoldCuts",
    "Ignored",
    "IngressPaused",
    "IngressResumed",
    "Nacked",
    "OutputWaiting",
    "PauseIngress",
    "PrimaryConfig",
    "PrimaryMachine",
    "Protection",
    "ProtocolError",
    "Release",
    "ReleasePoint",
    "ResumeIngress",
    "Retire",
    "SetBackPressure",
    "SetOutputCommit",
    "Ship",
    "StandbyBack",
    "StandbyLost",
    "State",
    "TermRaised",
    "Thaw",
    "Thawed",
    "Tick",
]


class ProtocolError(Exception):
    """An event the protocol does not allow in the machine's state: a bug in the driver."""


# --- events: what the driver observed -------------------------------------------------------


@attrs.frozen
class Event:
    """Something the driver observed and reports to the machine."""


@attrs.frozen
class Tick(Event):
    now_us: int


@attrs.frozen
class OutputWaiting(Event):
    """The data plane's report on the open epoch's buffer and on all output held for the unit."""

    epoch: int
    buffered_pkts: int
    buffered_bytes: int


@attrs.frozen
class HoldCuts(Event):
    """Start no new cut while `hold` (a driver settling the unit); see the module docstring."""

    hold: bool


@attrs.frozen
class IngressPaused(Event):
    # Sequence number of the last input delivered before the cut.
    cut_seq: int


@attrs.frozen
class Frozen(Event):
    pass


@attrs.frozen
class EpochClosed(Event):
    epoch: int
    pkts: int


@attrs.frozen
class CheckpointTaken(Event):
    epoch: int
    image_digest: str
    size: int


@attrs.frozen
class CheckpointFailed(Event):
    epoch: int
    reason: str


@attrs.frozen
class Thawed(Event):
    pass


@attrs.frozen
class IngressResumed(Event):
    pass


@attrs.frozen
class Acked(Event):
    unit: str
    epoch: int
    term: int


@attrs.frozen
class Nacked(Event):
    unit: str
    epoch: int
    # The standby's term, which may be above ours if it has seen a failover.
    term: int
    reason: str


@attrs.frozen
class StandbyLost(Event):
    reason: str


@attrs.frozen
class StandbyBack(Event):
    pass


@attrs.frozen
class TermRaised(Event):
    term: int


# --- commands: what the driver must do ------------------------------------------------------


@attrs.frozen
class Command:
    """Something the machine asks the driver to do."""


@attrs.frozen
class PauseIngress(Command):
    pass


@attrs.frozen
class Freeze(Command):
    pass


@attrs.frozen
class CloseEpoch(Command):
    """Drain the NF's egress into buffer ``epoch`` and close it. With ``save_output`` the data
    plane also writes the epoch's frames to a file that ships with the checkpoints (release at
    the standby)."""

    epoch: int
    save_output: bool = False


@attrs.frozen
class Checkpoint(Command):
    epoch: int


@attrs.frozen
class Thaw(Command):
    pass


@attrs.frozen
class ResumeIngress(Command):
    pass


@attrs.frozen
class Ship(Command):
    """Send checkpoint ``epoch`` to the standby, as a delta against ``parent`` or full if None."""

    epoch: int
    term: int
    parent: int | None
    cut_seq: int
    # Release at the standby: the epochs whose saved output rides with this checkpoint, in
    # order. Every held epoch up to ``epoch``: the standby sends those it has not sent yet.
    outputs: tuple[int, ...] = ()


@attrs.frozen
class Release(Command):
    """Put buffer ``epoch`` on the wire. Always issued in epoch order."""

    epoch: int


@attrs.frozen
class Retire(Command):
    """Free buffer ``epoch`` without sending it: the standby has released its output. Always
    issued in epoch order."""

    epoch: int


@attrs.frozen
class Discard(Command):
    """Drop every buffer from ``from_epoch`` on, including the open one."""

    from_epoch: int


@attrs.frozen
class Alarm(Command):
    reason: str


@attrs.frozen
class SetBackPressure(Command):
    on: bool


@attrs.frozen
class SetOutputCommit(Command):
    """Whether the data plane holds output for release; off means output passes straight on."""

    enabled: bool


@attrs.frozen
class Ignored(Command):
    """An event was dropped on purpose; the driver logs it and counts it."""

    event: Event
    reason: str


# --- the machine ----------------------------------------------------------------------------


class State(enum.Enum):
    RUNNING = "running"
    PAUSING = "pausing"
    FREEZING = "freezing"
    CLOSING = "closing"
    CHECKPOINTING = "checkpointing"
    THAWING = "thawing"
    RESUMING = "resuming"
    FENCED = "fenced"


class ReleasePoint(enum.Enum):
    """Where committed output leaves: the primary's data plane (after the ack), or the standby's
    (after its commit, from the output shipped with the checkpoint)."""

    PRIMARY = "primary"
    STANDBY = "standby"


class Protection(enum.Enum):
    PROTECTED = "protected"
    STALLED = "stalled"  # standby lost, output held
    UNPROTECTED = "unprotected"  # standby lost, output released without commit


TRANSITIONS: Mapping[State, Mapping[type[Event], State]] = MappingProxyType(
    {
        State.RUNNING: {},
        State.PAUSING: {IngressPaused: State.FREEZING},
        State.FREEZING: {Frozen: State.CLOSING},
        State.CLOSING: {EpochClosed: State.CHECKPOINTING},
        State.CHECKPOINTING: {CheckpointTaken: State.THAWING, CheckpointFailed: State.THAWING},
        State.THAWING: {Thawed: State.RESUMING},
        State.RESUMING: {IngressResumed: State.RUNNING},
        State.FENCED: {},
    }
)

# Events that do not belong to the cut pipeline and may come in any state.
ANY_STATE: frozenset[type[Event]] = frozenset(
    {Tick, OutputWaiting, Acked, Nacked, StandbyLost, StandbyBack, HoldCuts, TermRaised}
)


class _Held(enum.Enum):
    CUTTING = "cutting"
    FAILED = "failed"  # no checkpoint of its own; the next commit covers it
    CHECKPOINTED = "checkpointed"  # image exists, not shipped to the present standby
    SHIPPED = "shipped"  # shipped to the present standby, waiting for its ack


_HAS_IMAGE = frozenset({_Held.CHECKPOINTED, _Held.SHIPPED})


@attrs.define
class _Epoch:
    epoch: int
    cut_started_us: int
    status: _Held = _Held.CUTTING
    pkts: int = 0
    cut_seq: int = 0
    checkpoint_ok: bool = False
    pause_us: int = 0
    shipped_us: int = 0
    ship_attempts: int = 0


@attrs.frozen
class PrimaryConfig:
    epoch: EpochPolicy = attrs.field(factory=lambda: FixedEpoch(1_000))
    inflight: InflightPolicy = attrs.field(factory=InflightPolicy)
    standby_loss: StandbyLossPolicy = attrs.field(factory=StandbyLossPolicy)
    retry: CheckpointRetry = attrs.field(factory=CheckpointRetry)
    max_ship_attempts: int = 3
    release_at: ReleasePoint = ReleasePoint.PRIMARY


class PrimaryMachine:
    """The primary's epoch protocol for one unit. See the module docstring."""

    def __init__(
        self,
        unit: str,
        term: int,
        config: PrimaryConfig | None = None,
        *,
        first_epoch: int = 1,
        now_us: int = 0,
        prompt_first_cut: bool = False,
    ) -> None:
        """`prompt_first_cut`: the first epoch counts as already one epoch long, so its cut
        starts as soon as output waits (still never before: I5). A copy just restored after a
        failover holds its first output until a commit covers it; waiting a whole epoch first
        would add that epoch to the outage."""
        if first_epoch < 1:
            raise ValueError(f"first_epoch must be >= 1, got {first_epoch}")
        self.unit = unit
        self.config = config or PrimaryConfig()
        self._term = term
        self._state = State.RUNNING
        self._protection = Protection.PROTECTED
        self._standby_present = True
        self._now = now_us
        self._policy: EpochPolicy = self.config.epoch
        self._open_epoch = first_epoch
        self._open_started = now_us - (epoch_length_us(self._policy) if prompt_first_cut else 0)
        self._open_pkts = 0
        self._buffered_bytes = 0
        self._held: dict[int, _Epoch] = {}
        self._cutting: _Epoch | None = None
        self._last_released = first_epoch - 1
        self._ship_base: int | None = None
        self._failures = 0
        self._holding = False  # HoldCuts
        self._retry_at: int | None = None
        self._back_pressure = False
        self._wake_at: int | None = None

    # -- read-only views for drivers, status and tests --

    @property
    def state(self) -> State:
        return self._state

    @property
    def protection(self) -> Protection:
        return self._protection

    @property
    def term(self) -> int:
        return self._term

    @property
    def open_epoch(self) -> int:
        return self._open_epoch

    @property
    def last_released(self) -> int:
        return self._last_released

    @property
    def held_epochs(self) -> tuple[int, ...]:
        return tuple(self._held)

    @property
    def inflight(self) -> int:
        return sum(1 for h in self._held.values() if h.status is not _Held.FAILED)

    @property
    def back_pressure(self) -> bool:
        return self._back_pressure

    @property
    def epoch_length_us(self) -> int:
        return epoch_length_us(self._policy)

    @property
    def next_wakeup_us(self) -> int | None:
        """When a Tick could next start a cut; None if only a new event can."""
        return self._wake_at

    # -- the one entry point --

    def handle(self, event: Event) -> list[Command]:
        kind = type(event)
        if self._state is State.FENCED:
            return self._handle_fenced(event)
        target = TRANSITIONS[self._state].get(kind)
        if target is None and kind not in ANY_STATE:
            allowed = sorted(t.__name__ for t in (*TRANSITIONS[self._state], *ANY_STATE))
            raise ProtocolError(
                f"unit {self.unit}: {kind.__name__} is not allowed in state "
                f"{self._state.name}; allowed: {', '.join(allowed)}"
            )
        out: list[Command] = []
        # Dispatch before moving, so that a ProtocolError leaves the machine as it was.
        self._dispatch(event, out)
        if target is not None:
            self._state = target
        if self._state is not State.FENCED:
            self._maybe_cut(out)
            self._update_back_pressure(out)
        return out

    def _dispatch(self, event: Event, out: list[Command]) -> None:
        match event:
            case Tick(now_us=now):
                if now < self._now:
                    raise ProtocolError(
                        f"unit {self.unit}: clock went back from {self._now} to {now}"
                    )
                self._now = now
            case OutputWaiting():
                self._on_output(event, out)
            case HoldCuts(hold=hold):
                self._holding = hold
            case IngressPaused(cut_seq=cut_seq):
                self._cut().cut_seq = cut_seq
                out.append(Freeze())
            case Frozen():
                save = self.config.release_at is ReleasePoint.STANDBY
                out.append(CloseEpoch(self._cut().epoch, save_output=save))
            case EpochClosed():
                self._on_closed(event, out)
            case CheckpointTaken(epoch=epoch):
                cut = self._cut(epoch)
                cut.checkpoint_ok = True
                self._failures = 0
                self._retry_at = None
                out.append(Thaw())
            case CheckpointFailed(epoch=epoch, reason=reason):
                self._cut(epoch).checkpoint_ok = False
                self._failures += 1
                retry = next_retry(self.config.retry, self._failures, self._now)
                self._retry_at = retry.at_us
                out.append(Thaw())
                if retry.alarm:
                    out.append(
                        Alarm(
                            f"unit {self.unit}: {self._failures} checkpoints failed in a row, "
                            f"last at epoch {epoch}: {reason}; output held, retrying"
                        )
                    )
            case Thawed():
                out.append(ResumeIngress())
            case IngressResumed():
                self._on_resumed(out)
            case Acked():
                self._on_ack(event, out)
            case Nacked():
                self._on_nack(event, out)
            case StandbyLost(reason=reason):
                if self._standby_present:
                    self._standby_lost(reason, out)
            case StandbyBack():
                if not self._standby_present:
                    self._standby_back(out)
            case TermRaised(term=term):
                if term > self._term:
                    self._fence(term, "term raised", out)
                else:
                    out.append(Ignored(event, f"term {term} is not above {self._term}"))
            case _:
                raise ProtocolError(f"unit {self.unit}: unknown event {event!r}")

    def _handle_fenced(self, event: Event) -> list[Command]:
        if isinstance(event, Acked | Nacked | TermRaised):
            return [Ignored(event, "fenced: this primary is deposed")]
        if isinstance(event, Tick) and event.now_us > self._now:
            self._now = event.now_us
        return []

    def _cut(self, epoch: int | None = None) -> _Epoch:
        cut = self._cutting
        if cut is None:
            raise ProtocolError(f"unit {self.unit}: no cut in progress")
        if epoch is not None and epoch != cut.epoch:
            raise ProtocolError(
                f"unit {self.unit}: event for epoch {epoch} while cutting epoch {cut.epoch}"
            )
        return cut

    def _on_output(self, event: OutputWaiting, out: list[Command]) -> None:
        if event.epoch > self._open_epoch:
            raise ProtocolError(
                f"unit {self.unit}: data plane reports epoch {event.epoch} open, "
                f"the machine opened only up to {self._open_epoch}"
            )
        self._buffered_bytes = event.buffered_bytes
        if event.epoch < self._open_epoch:
            out.append(Ignored(event, f"epoch {event.epoch} is already closed"))
            return
        self._open_pkts = event.buffered_pkts

    def _on_closed(self, event: EpochClosed, out: list[Command]) -> None:
        cut = self._cut(event.epoch)
        cut.pkts = event.pkts
        self._open_epoch = event.epoch + 1
        self._open_started = self._now
        self._open_pkts = 0
        out.append(Checkpoint(event.epoch))

    def _on_resumed(self, out: list[Command]) -> None:
        cut = self._cut()
        self._cutting = None
        # The next epoch's length counts from here, so the unit runs a whole epoch between two
        # pauses: with a pause as long as the epoch, it would otherwise be frozen all the time.
        self._open_started = self._now
        cut.pause_us = self._now - cut.cut_started_us
        cut.status = _Held.CHECKPOINTED if cut.checkpoint_ok else _Held.FAILED
        if self._protection is Protection.UNPROTECTED:
            self._release_upto(cut.epoch, out)
        elif cut.status is _Held.CHECKPOINTED and self._protection is Protection.PROTECTED:
            self._ship(cut, full=False, out=out)

    def _ship(self, held: _Epoch, *, full: bool, out: list[Command]) -> None:
        parent = None if full else self._ship_base
        outputs: tuple[int, ...] = ()
        if self.config.release_at is ReleasePoint.STANDBY:
            outputs = tuple(sorted(e for e in self._held if e <= held.epoch))
        out.append(Ship(held.epoch, self._term, parent, held.cut_seq, outputs))
        held.status = _Held.SHIPPED
        held.shipped_us = self._now
        held.ship_attempts += 1
        if self._ship_base is None or held.epoch > self._ship_base:
            self._ship_base = held.epoch

    def _check_reply(self, event: Acked | Nacked, out: list[Command]) -> _Epoch | None:
        """The held epoch a standby reply refers to, or None after reporting why it is ignored."""
        if event.unit != self.unit:
            out.append(Ignored(event, f"for unit {event.unit}, this is {self.unit}"))
            return None
        if event.term > self._term:
            self._fence(event.term, f"standby replied with term {event.term}", out)
            return None
        if event.term < self._term:
            out.append(Ignored(event, f"stale term {event.term}, current {self._term}"))
            return None
        if not self._standby_present:
            out.append(Ignored(event, "the standby was declared lost"))
            return None
        held = self._held.get(event.epoch)
        if held is None or held.status is not _Held.SHIPPED:
            if event.epoch <= self._last_released:
                why = f"old epoch {event.epoch}, released up to {self._last_released}"
            else:
                why = f"unknown epoch {event.epoch}: not shipped to this standby"
            out.append(Ignored(event, why))
            return None
        return held

    def _on_ack(self, event: Acked, out: list[Command]) -> None:
        held = self._check_reply(event, out)
        if held is None:
            return
        sample = CommitSample(held.pause_us, max(0, self._now - held.shipped_us))
        self._policy = observe(self._policy, sample)
        # Released at the standby: its ack says the output of every epoch up to this one is out.
        retire = self.config.release_at is ReleasePoint.STANDBY
        self._release_upto(event.epoch, out, retire=retire)

    def _on_nack(self, event: Nacked, out: list[Command]) -> None:
        held = self._check_reply(event, out)
        if held is None:
            return
        if held.ship_attempts >= self.config.max_ship_attempts:
            self._standby_lost(
                f"standby rejected epoch {held.epoch} {held.ship_attempts} times: {event.reason}",
                out,
            )
            return
        self._ship(held, full=True, out=out)

    def _release_upto(self, epoch: int, out: list[Command], *, retire: bool = False) -> None:
        for e in [e for e in self._held if e <= epoch]:
            del self._held[e]
            out.append(Retire(e) if retire else Release(e))
            self._last_released = e

    def _standby_lost(self, cause: str, out: list[Command]) -> None:
        self._standby_present = False
        for held in self._held.values():
            if held.status is _Held.SHIPPED:
                held.status = _Held.CHECKPOINTED
        decision = on_standby_loss(
            self.config.standby_loss, StandbyLossFacts(self.unit, len(self._held), cause)
        )
        out.append(Alarm(decision.alarm))
        if decision.release_held:
            self._protection = Protection.UNPROTECTED
            done = [h.epoch for h in self._held.values() if h is not self._cutting]
            if done:
                self._release_upto(max(done), out)
            out.append(SetOutputCommit(False))
        else:
            self._protection = Protection.STALLED

    def _standby_back(self, out: list[Command]) -> None:
        self._standby_present = True
        self._ship_base = None
        if self._protection is Protection.UNPROTECTED:
            out.append(SetOutputCommit(True))
            self._open_started = self._now
            self._open_pkts = 0
        self._protection = Protection.PROTECTED
        ready = [h for h in self._held.values() if h.status is _Held.CHECKPOINTED]
        if ready:
            self._ship(ready[-1], full=True, out=out)

    def _fence(self, term: int, cause: str, out: list[Command]) -> None:
        out.append(Discard(self._last_released + 1))
        out.append(Alarm(f"unit {self.unit}: fenced at term {self._term} by term {term} ({cause})"))
        self._held.clear()
        self._cutting = None
        self._state = State.FENCED

    def _maybe_cut(self, out: list[Command]) -> None:
        self._wake_at = None
        if self._state is not State.RUNNING or self._protection is not Protection.PROTECTED:
            return
        if self._holding:
            return
        waiting = self._open_pkts + self._uncovered_failed_pkts()
        decision = decide(
            self._policy,
            EpochFacts(
                now_us=self._now,
                epoch_started_us=self._open_started,
                buffered_pkts=waiting,
                inflight=self.inflight,
                max_inflight=self.config.inflight.max_inflight,
                retry_at_us=self._retry_at,
            ),
        )
        self._wake_at = decision.wake_at_us
        if not decision.close:
            return
        cut = _Epoch(self._open_epoch, cut_started_us=self._now)
        self._held[cut.epoch] = cut
        self._cutting = cut
        self._state = State.PAUSING
        out.append(PauseIngress())

    def _uncovered_failed_pkts(self) -> int:
        # A failed epoch older than a taken checkpoint is covered by it (cumulative acks), so
        # its output no longer asks for a checkpoint of its own (I5).
        covered = max((h.epoch for h in self._held.values() if h.status in _HAS_IMAGE), default=0)
        return sum(
            h.pkts for h in self._held.values() if h.status is _Held.FAILED and h.epoch > covered
        )

    def _update_back_pressure(self, out: list[Command]) -> None:
        decision = back_pressure(
            self.config.inflight,
            InflightFacts(self.inflight, self._buffered_bytes, self._back_pressure),
        )
        if decision.on != self._back_pressure:
            self._back_pressure = decision.on
            out.append(SetBackPressure(decision.on))
