"""Remote failover: the I/O driver of `shim.failover.FailoverMachine` on a unit's standby host.

The standby's agent owns one driver per unit it is standby for. The driver does not decide
anything; it feeds the machine what it observes and carries out the machine's commands through
a `RemoteSteps` implementation (the agent's: `hamgr.agent.remote`), one step at a time, each
bounded by the step's `timeout_us`:

- `PeerDown` comes from this host's data plane (``peer_down`` of the primary's data plane, with
  its CLOCK_MONOTONIC timestamps). `Confirm` asks the primary's agent over the management
  network; no answer within the window counts as dead.
- `RaiseTerm` writes the term durably (fsync) before anything else, then claims it at the
  unit's spares (a compare-and-set against their committed image, `shim.standby`) and reports
  their answers in `TermRecorded.claims`; the machine stands down if a spare refused or none
  granted (`shim.failover.judge_claims`), before anything is restored.
- `FenceDataPlane`: the unit does not exist in this data plane yet; the step makes sure of it
  (a leftover unit of an earlier attempt is removed, its output dropped).
- `LocateImage`: ``ReplicationServer.promote(unit, term)``: the store refuses the old primary from
  now on (I3) and answers the committed checkpoint with its ``cut_seq``.
- `Restore`: ``RuncBackend.restore`` into the netns prepared when the standby was set up; or the
  copy `Prestore` restored while the peer was being confirmed, if it came from the image located
  (the agent's steps keep it and judge it; `DropPrestore` destroys it).
- `AttachPorts`: the prepared veth joins this data plane and the unit is added at the new term,
  ingress paused and without output commit: no standby holds an image of the unit until
  `Reprotect` has seeded the new one (docs/failover.md, "Unprotected window").
  `Announce`: a gratuitous ARP with the NF's MAC as source leaves this host's data link, so
  the fabric learns where the NF lives now.
- `ReplayInputs` (lossless mode, I7): the inputs the old primary mirrored here after the
  image's cut are delivered from this data plane's input log to the restored unit, still
  paused, in order (``replay_input_log``); answered with how many. A replay that fails (the
  log lacks an input after the cut: a gap, an overflow, a trim) fails the step with the data
  plane's message, and the machine's `replay_failure` decides: resume without those inputs,
  with an alarm, or fail the attempt.
- `Resume`: ingress flows, and output leaves at once; the input log is removed.
- `SurveyHosts` / `Reprotect`: output commit goes back on and a new epoch engine ships a full
  image to the chosen standby; its first ack makes the unit protected again.

A step runs on a worker thread and is waited for at most its timeout. A step that times out is
reported as `StepTimedOut`; if it completes later, its completion is fed to the machine as a late
one (a late `Restored` is answered with `DestroyRestored`), so a slow restore never leaves a
stray NF behind. The machine's cleanup commands (`DetachPorts`, `DestroyRestored`,
`DiscardOutput`) are run synchronously, each bounded and idempotent.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

import attrs

from policies.placement import HostFacts
from shim import failover as fo

__all__ = ["RemoteFailover", "RemoteRecord", "RemoteSteps"]

log = logging.getLogger(__name__)

# How much later than its window a peer check may return and still count. The check bounds its
# own waits to the window (a dead host's check returns within it, so this costs a real failure
# nothing); only a check whose thread got no CPU in time returns later. Cut off at the window,
# such a check read as "no answer", and on a host at load 6 a live primary was taken over
# while its kernel had accepted the check's connection at once.
CONFIRM_LATE_US = 100_000
# A check later than that is no verdict: the peer counts as alive and is asked again, at most
# this many times in a row; then the late check counts as no answer. A dead host's check is
# never late (its waits are bounded), so this only ever delays a verdict our own CPU starved.
CONFIRM_LATE_MAX = 3


class RemoteSteps(Protocol):
    """What the standby's agent does for each step; every method may raise."""

    def confirm(self, peer: str, timeout_s: float) -> bool:
        """True if `peer`'s agent answered within `timeout_s`."""
        ...

    def raise_term(self, term: int) -> tuple[fo.Claim, ...] | None:
        """Record `term` durably, then claim it at the unit's spares: one `Claim` per spare
        (empty without spares); None if no claim is made."""
        ...

    def fence(self, term: int) -> tuple[int, int]:
        """Returns (discarded packets, the open epoch the unit will start at)."""
        ...

    def locate(self, term: int) -> tuple[str, int, int]:
        """Promote the store at `term`; returns (image path, epoch, cut_seq)."""
        ...

    def restore(self, image: str, term: int) -> int:
        """Restore into the prepared netns; returns the NF's pid. A copy `prestore(term)` made
        is used if it came from `image`, and destroyed otherwise."""
        ...

    def prestore(self, term: int, peer: str, not_before_us: int) -> None:
        """Restore the committed checkpoint, for the attempt at `term`, at `not_before_us` if
        `peer` is still silent then (`shim.failover.Prestore`). Returns at once; runs in the
        background, in order with `drop_prestore` and the next `restore`."""
        ...

    def drop_prestore(self, term: int) -> None:
        """Destroy the copy of `prestore(term)`, if any, once it is done. Returns at once."""
        ...

    def attach(self, term: int) -> None: ...
    def announce(self, term: int) -> None: ...
    def replay(self, term: int, after_seq: int) -> int:
        """Deliver the logged inputs after `after_seq` to the paused unit; returns how many."""
        ...

    def resume(self, term: int) -> None: ...
    def survey(self, term: int) -> tuple[HostFacts, ...]: ...
    def reprotect(self, term: int, standby: str) -> None: ...
    def detach(self, term: int) -> None: ...
    def destroy_restored(self, term: int, pid: int | None) -> None: ...
    def discard_output(self, term: int) -> None: ...


@attrs.define
class RemoteRecord:
    """One remote failover as this driver saw it (CLOCK_MONOTONIC microseconds)."""

    term: int
    peer: str
    last_rx_us: int  # the last probe from the peer, as the data plane saw it
    peer_down_us: int  # the data plane's peer_down
    started_us: int = 0  # the machine's verdict: the attempt began
    image_epoch: int | None = None
    cut_seq: int | None = None
    new_pid: int | None = None
    # The spares' answers to the term claim, "<spare>: <verdict>[: detail]".
    claims: list[str] = attrs.Factory(list)
    # Lossless mode: the inputs the replay delivered (None: no replay step), and why it was
    # given up when it failed (the inputs after cut_seq it did not deliver are lost).
    replayed: int | None = None
    replay_failed: str = ""
    steps_us: dict[str, int] = attrs.Factory(dict)
    resumed_us: int | None = None
    finished_us: int | None = None
    status: str = "running"
    detail: str = ""

    @property
    def detect_us(self) -> int:
        return self.peer_down_us - self.last_rx_us

    def to_json(self) -> dict[str, object]:
        return {**attrs.asdict(self), "detect_us": self.detect_us}


def _now_us() -> int:
    return time.monotonic_ns() // 1000


class RemoteFailover:
    """Drives one unit's failover machine on its standby host. `feed` from one thread only."""

    def __init__(
        self,
        machine: fo.FailoverMachine,
        steps: RemoteSteps,
        *,
        clock: Callable[[], int] = _now_us,
        on_report: Callable[[fo.Report], None] | None = None,
    ) -> None:
        if machine.peer is None:
            raise ValueError("a remote failover watches a peer data plane, not a local pid")
        self.machine = machine
        self.steps = steps
        self.clock = clock
        self.records: list[RemoteRecord] = []
        self.alarms: list[str] = []
        self.ignored: list[str] = []
        self._on_report = on_report
        self._pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="failover")
        self._late: queue.SimpleQueue[fo.Event] = queue.SimpleQueue()
        self._late_checks = 0  # consecutive peer checks that returned later than allowed
        self._record: RemoteRecord | None = None
        self._peer_down: fo.PeerDown | None = None
        self._lock = threading.Lock()

    @property
    def unit(self) -> str:
        return self.machine.unit

    def peer_down(self, peer: str, last_rx_us: int, now_us: int) -> None:
        """The data plane's ``peer_down`` about `peer` (its timestamps)."""
        ev = fo.PeerDown(peer, last_rx_us, now_us, self.machine.term)
        if self.machine.state is fo.State.WATCHING and peer == self.machine.peer:
            self._peer_down = ev
        self.feed(ev)

    def tick(self) -> None:
        """Feed late completions and the time; call at least at `machine.next_wakeup_us`."""
        while True:
            try:
                ev = self._late.get_nowait()
            except queue.Empty:
                break
            self.feed(ev)
        self.feed(fo.Tick(self.clock()))

    def feed(self, event: fo.Event) -> None:
        """Hand `event` to the machine and carry out everything that follows from it."""
        with self._lock:
            if (isinstance(event, fo.PeerUp) and event.peer == self.machine.peer) or (
                isinstance(event, fo.FailoverRequested)
                and self.machine.state is not fo.State.CONFIRMING
            ):
                # A silence that ended (or that the peer's agent disputed) is not what a later
                # request is about: its record would show that old silence as its detection.
                self._peer_down = None
            events: deque[fo.Event] = deque([event])
            while events:
                ev = events.popleft()
                for command in self.machine.handle(ev):
                    for result in self._execute(command):
                        if isinstance(result, fo.Confirmed):
                            # The check's answer before the time it took: it bounds its own
                            # waits by the window, and a Tick first would read an answer
                            # that came at the window's end as no answer at all.
                            events.append(result)
                            events.append(fo.Tick(self.clock()))
                        else:
                            # A step's time first: one that overran its deadline fails
                            # before its late completion counts.
                            events.append(fo.Tick(self.clock()))
                            events.append(result)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- internals -----------------------------------------------------------------------

    def _execute(self, command: fo.Command) -> list[fo.Event]:
        match command:
            case fo.StepCommand():
                return [self._step(command)]
            case fo.Confirm(peer=peer, timeout_us=timeout_us):
                alive = self._bounded(
                    lambda: self.steps.confirm(peer, timeout_us / 1e6),
                    timeout_us + CONFIRM_LATE_US,
                )
                if alive is None and self._late_checks < CONFIRM_LATE_MAX:
                    self._late_checks += 1
                    log.warning(
                        "unit %s: the check of %s did not return within %d us (this host is "
                        "starved); no verdict, %s is asked again",
                        self.unit,
                        peer,
                        timeout_us + CONFIRM_LATE_US,
                        peer,
                    )
                    return [fo.Confirmed(peer, True, self.clock())]
                self._late_checks = 0
                # No answer in the window is an answer: the peer's agent is not there.
                return [fo.Confirmed(peer, bool(alive), self.clock())]
            case fo.DetachPorts(term=term, timeout_us=t):
                self._cleanup("detach", lambda: self.steps.detach(term), t)
            case fo.DestroyRestored(term=term, pid=pid, timeout_us=t):
                self._cleanup("destroy", lambda: self.steps.destroy_restored(term, pid), t)
            case fo.DiscardOutput(term=term, timeout_us=t):
                self._cleanup("discard", lambda: self.steps.discard_output(term), t)
            case fo.Prestore(term=term, timeout_us=t, peer=peer, not_before_us=at):
                self._cleanup("prestore", lambda: self.steps.prestore(term, peer, at), t)
            case fo.DropPrestore(term=term, timeout_us=t):
                self._cleanup("drop prestore", lambda: self.steps.drop_prestore(term), t)
            case fo.Alarm(reason=reason):
                log.warning("unit %s: %s", self.unit, reason)
                self.alarms.append(reason)
            case fo.Report():
                self._report(command)
            case fo.Ignored(event=event, reason=reason):
                log.debug("unit %s: ignored %r: %s", self.unit, event, reason)
                self.ignored.append(f"{type(event).__name__}: {reason}")
            case _:
                log.info("unit %s: %r has no remote meaning", self.unit, command)
        return []

    def _bounded(self, fn: Callable[[], object], timeout_us: int) -> object:
        fut = self._pool.submit(fn)
        try:
            return fut.result(timeout=timeout_us / 1e6)
        except concurrent.futures.TimeoutError:
            return None

    def _cleanup(self, what: str, fn: Callable[[], None], timeout_us: int) -> None:
        fut = self._pool.submit(fn)
        try:
            fut.result(timeout=timeout_us / 1e6)
        except Exception as exc:  # a cleanup is best effort; the alarm says what is left
            reason = f"unit {self.unit}: cleanup {what} failed: {type(exc).__name__}: {exc}"
            log.warning("%s", reason)
            self.alarms.append(reason)

    def _report(self, report: fo.Report) -> None:
        log.info("unit %s: failover %s: %s", self.unit, report.status.value, report.detail)
        if report.status is fo.Status.RUNNING:
            down = self._peer_down
            now = self.clock()
            self._record = RemoteRecord(
                term=report.term,
                peer=self.machine.peer or "",
                last_rx_us=down.last_rx_us if down else now,
                peer_down_us=down.now_us if down else now,
                started_us=now,
            )
            self.records.append(self._record)
        elif self._record is not None:
            self._record.status = report.status.value
            self._record.detail = report.detail
            self._record.finished_us = self.clock()
            self._record = None
            self._peer_down = None
        if self._on_report is not None:
            self._on_report(report)

    def _step(self, command: fo.StepCommand) -> fo.Event:
        started = self.clock()
        fut = self._pool.submit(self._run_step, command)
        try:
            result = fut.result(timeout=command.timeout_us / 1e6)
        except concurrent.futures.TimeoutError:
            log.warning("unit %s: step %s timed out", self.unit, command.step.value)
            fut.add_done_callback(self._late_completion)
            result = fo.StepTimedOut(command.step, command.term)
        except Exception as exc:
            log.warning("unit %s: step %s failed: %s", self.unit, command.step.value, exc)
            result = fo.StepFailed(command.step, command.term, f"{type(exc).__name__}: {exc}")
        rec = self._record
        if rec is not None:
            rec.steps_us[command.step.value] = self.clock() - started
            match result:
                case fo.TermRecorded(claims=claims) if claims:
                    rec.claims = [
                        f"{c.spare}: {c.verdict.value}" + (f": {c.detail}" if c.detail else "")
                        for c in claims
                    ]
                case fo.ImageLocated(epoch=epoch, cut_seq=cut_seq):
                    rec.image_epoch, rec.cut_seq = epoch, cut_seq
                case fo.InputsReplayed(count=count):
                    rec.replayed = count
                case fo.StepFailed(step=fo.Step.REPLAY, reason=reason):
                    rec.replay_failed = reason
                case fo.StepTimedOut(step=fo.Step.REPLAY):
                    rec.replay_failed = "timed out"
                case fo.Restored(pid=pid):
                    rec.new_pid = pid
                case fo.Resumed():
                    rec.resumed_us = self.clock()
        return result

    def _late_completion(self, fut: concurrent.futures.Future[fo.Event]) -> None:
        if fut.exception() is None:
            self._late.put(fut.result())

    def _run_step(self, command: fo.StepCommand) -> fo.Event:
        s, term = self.steps, command.term
        match command:
            case fo.RaiseTerm():
                return fo.TermRecorded(term, s.raise_term(term))
            case fo.FenceDataPlane():
                discarded, open_epoch = s.fence(term)
                return fo.DataPlaneFenced(term, discarded, open_epoch)
            case fo.LocateImage():
                path, epoch, cut_seq = s.locate(term)
                return fo.ImageLocated(term, path, epoch, cut_seq)
            case fo.Restore(image=image):
                return fo.Restored(term, s.restore(image, term))
            case fo.AttachPorts():
                s.attach(term)
                return fo.PortsAttached(term)
            case fo.Announce():
                s.announce(term)
                return fo.Announced(term)
            case fo.ReplayInputs(after_seq=after_seq):
                return fo.InputsReplayed(term, s.replay(term, after_seq))
            case fo.Resume():
                s.resume(term)
                return fo.Resumed(term)
            case fo.SurveyHosts():
                return fo.HostsSurveyed(term, s.survey(term))
            case fo.Reprotect(standby=standby):
                s.reprotect(term, standby)
                return fo.Reprotected(term, standby)
        raise NotImplementedError(
            f"unit {self.unit}: step {command.step.value} is not supported remotely yet "
            "(planned switchover)"
        )
