"""Local failover: the I/O driver of `shim.failover.FailoverMachine` for a container NF whose
process died while its host stays up.

The driver owns one protected unit on its primary. Its loop steps the unit's epoch engine and,
between steps, waits on the NF's pidfd (``poll``, never a busy loop). When the pidfd polls
readable it reports `NfExited` and carries out the machine's commands, synchronously and in
order, each timed against its deadline:

- `RaiseTerm`: the term goes to a file, fsynced (`TermFile`), before anything else happens.
- `FenceDataPlane`: ``set_term`` discards every unreleased packet the dead NF produced (I4: the
  outputs of its uncommitted epochs must never leave), ``pause_ingress`` keeps inputs out of the
  NF netns until the restored NF is attached, and a ``close_epoch`` + ``discard`` of the open
  epoch drops the dead NF's last frames that were still queued on the NF port, which set_term
  alone could miss (the data plane reads the port after the command). Inputs that arrive during
  the outage wait in the wire port's queue and reach the restored NF after the resume.
- `LocateImage`: the newest committed local image: the engine keeps the image of its last
  released epoch (`PrimaryEngine.last_committed`); a second failure before the new engine
  committed anything restores that same image again, which is still consistent, because nothing
  was released in between.
- `Restore`: `RuncBackend.restore` into the same, unchanged NF netns, under the name
  ``<name>-t<term>``: a new name needs no ``runc delete`` of the dead container on the critical
  path, and runc's fresh PID namespace frees the PIDs CRIU recreates.
- `AttachPorts`: nothing moves on one host. The data plane's NF port is an af_packet port on a
  veth whose other end lives in the NF netns; hamgr, not the container, owns that netns, so
  both ends survive the NF's death (the integration test shows output flowing again through
  the same port). The step checks the unit still has its port and the restored NF sees its
  interface.
- `Resume`: ``resume_ingress`` at the new term. Output stays held until the new engine commits.
- `Reprotect`: a new `PrimaryEngine` from the caller's factory, at the new term, whose first
  epoch is the data plane's open epoch. `Reap`: the dead container's runc state, cgroup and
  bundle are removed on a worker thread, off the critical path.
- On failure the cleanup commands destroy the restored copy and keep the data plane fenced:
  the unit is down, never half-started, and nothing of the dead NF is ever released.

Lossless mode (input replay) is not supported locally: it needs the cut sequence of the committed
image and a local input log, which the engine does not keep (see docs/failover.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import attrs

from shim import failover as fo
from shim import netns
from shim.container import CheckpointImage, Container, RuncBackend
from shim.engine import PrimaryEngine

__all__ = [
    "EngineFactory",
    "FailoverRecord",
    "LocalDataPlane",
    "LocalFailover",
    "LocalFailoverError",
    "TermFile",
    "nf_interfaces",
]

log = logging.getLogger(__name__)

_GENERATION = re.compile(r"-t\d+$")


class LocalFailoverError(Exception):
    """The driver cannot be set up as asked; the message says why."""


class LocalDataPlane(Protocol):
    """What local failover needs from `dpdk_vhost.client.DataPlaneClient`."""

    def set_term(self, unit: str, term: int, epoch: int | None = None) -> int: ...
    def pause_ingress(self, unit: str, term: int | None = None) -> Any: ...
    def resume_ingress(self, unit: str, term: int | None = None) -> None: ...
    def close_epoch(self, unit: str, epoch: int, term: int | None = None) -> Any: ...
    def discard(self, unit: str, from_epoch: int, term: int | None = None) -> int: ...
    def stats(self, unit: str | None = None) -> Any: ...


class EngineFactory(Protocol):
    """Builds the epoch engine that protects `nf` at `term`, starting at epoch `first_epoch`.

    `nf_rx_base` is the data plane's count of NF output at the handover: output of the dead
    incarnation, which the new engine must not treat as waiting (pass it to `PrimaryEngine`).

    It should give the engine a fresh replication link and announce the term to the standby on it
    (``ReplicationClient.hello``), so the standby refuses late transfers of the dead incarnation.
    """

    def __call__(
        self, term: int, first_epoch: int, nf: Container, nf_rx_base: int
    ) -> PrimaryEngine: ...


@attrs.frozen
class TermFile:
    """The unit's term, durable: written to a temporary file, fsynced, renamed, dir fsynced."""

    path: Path

    def read(self) -> int | None:
        try:
            return int(self.path.read_text().strip())
        except FileNotFoundError:
            return None

    def write(self, term: int) -> None:
        current = self.read()
        if current is not None and term < current:
            raise LocalFailoverError(
                f"{self.path}: term {term} is below the recorded {current}; terms never go down"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, f"{term}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


@attrs.define
class FailoverRecord:
    """One local failover as the driver saw it (CLOCK_MONOTONIC microseconds)."""

    term: int
    old_pid: int
    exited_us: int  # when the pidfd polled readable
    new_pid: int | None = None
    restored_epoch: int | None = None
    discarded_pkts: int = 0
    steps_us: dict[str, int] = attrs.Factory(dict)  # duration of each step
    resumed_us: int | None = None  # ingress flows to the restored NF
    protected_us: int | None = None  # the new engine runs
    first_commit_us: int | None = None  # the new engine released its first epoch
    status: fo.Status = fo.Status.RUNNING
    detail: str = ""

    @property
    def outage_us(self) -> int | None:
        """From the death's detection to the restored NF receiving input again."""
        return None if self.resumed_us is None else self.resumed_us - self.exited_us


def nf_interfaces(pid: int) -> set[str]:
    """The interfaces process `pid` sees: those of its netns."""
    lines = Path(f"/proc/{pid}/net/dev").read_text().splitlines()[2:]
    return {line.split(":", 1)[0].strip() for line in lines}


def _now_us() -> int:
    return time.monotonic_ns() // 1000


class LocalFailover:
    """Protects one unit and fails it over locally when its NF dies. Single-threaded."""

    def __init__(
        self,
        unit: str,
        *,
        dataplane: LocalDataPlane,
        backend: RuncBackend,
        nf: Container,
        engine: PrimaryEngine,
        protect: EngineFactory,
        term_file: TermFile,
        standby: str = "standby",
        config: fo.FailoverConfig | None = None,
        clock: Callable[[], int] = _now_us,
    ) -> None:
        config = config or fo.FailoverConfig()
        if config.lossless:
            raise LocalFailoverError(
                "lossless local failover needs a local input log and the committed cut; "
                "not supported (docs/failover.md)"
            )
        term = engine.machine.term
        recorded = term_file.read()
        if recorded is not None and recorded > term:
            raise LocalFailoverError(
                f"unit {unit}: {term_file.path} records term {recorded}, the engine runs at "
                f"{term}; an older incarnation must not be protected again"
            )
        if recorded != term:
            term_file.write(term)
        self.unit = unit
        self.dp = dataplane
        self.backend = backend
        self.netns = nf.spec.netns
        self.term_file = term_file
        self.clock = clock
        self.machine = fo.FailoverMachine(
            unit, term, config, pid=nf.pid, standby=standby, now_us=clock()
        )
        self.records: list[FailoverRecord] = []
        self.alarms: list[str] = []
        self._base_name = _GENERATION.sub("", nf.name)
        self._protect = protect
        self._engine: PrimaryEngine | None = engine
        self._containers: dict[int, Container] = {nf.pid: nf}
        self._restored: dict[int, Container] = {}
        self._committed: Path | None = None
        self._reported: set[int] = set()
        self._reapers: list[threading.Thread] = []
        self._poller = self._watch(nf)
        self._record: FailoverRecord | None = None
        self._open_epoch = 0
        self._nf_rx_base = 0
        self._note_commit(engine)

    # -- public --------------------------------------------------------------------------

    @property
    def engine(self) -> PrimaryEngine | None:
        """The engine protecting the running NF; None while a failover runs or after FAILED."""
        return self._engine

    @property
    def nf(self) -> Container:
        """The container of the watched incarnation (dead while a failover runs)."""
        pid = self.machine.pid
        assert pid is not None
        return self._containers[pid]

    @property
    def containers(self) -> list[Container]:
        """Every container handle the driver still holds, for a caller's cleanup."""
        return [*self._containers.values(), *self._restored.values()]

    def step(self, wait: float = 0.0002) -> None:
        """Step the engine once, then wait up to `wait` seconds for the NF's death.

        A death already visible is acted on before the engine steps again: a cut of a dead NF
        only fails, and costs time the failover needs.
        """
        nf = self.nf
        if nf.pid in self._reported:
            time.sleep(wait)
            self.feed(fo.Tick(self.clock()))
            return
        engine = self._engine
        died = nf.exited()
        if not died and engine is not None and self.machine.state is fo.State.WATCHING:
            try:
                engine.step()
            except Exception:
                # A cut that meets a dead NF fails in the freezer or in CRIU; the pidfd says
                # which it was, and a live NF means a real engine error.
                if not nf.exited():
                    raise
                log.info("unit %s: engine step failed because the NF died", self.unit)
            self._note_commit(engine)
        died = died or bool(self._poller.poll(wait * 1000)) or nf.exited()
        # Step deadlines count from the machine's clock: it must be current before the trigger.
        self.feed(fo.Tick(self.clock()))
        if died:
            self._reported.add(nf.pid)
            self.feed(fo.NfExited(nf.pid, "exited"))

    def run(self, seconds: float, wait: float = 0.0002) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.step(wait)

    def feed(self, event: fo.Event) -> None:
        """Hand `event` to the machine and carry out everything that follows from it."""
        events: deque[fo.Event] = deque([event])
        while events:
            ev = events.popleft()
            for command in self.machine.handle(ev):
                for result in self._execute(command):
                    # The machine judges a step's deadline by the time its completion came.
                    events.append(fo.Tick(self.clock()))
                    events.append(result)

    def close(self, timeout: float = 15.0) -> None:
        """Wait for the reaping of dead containers (bounded)."""
        deadline = time.monotonic() + timeout
        for t in self._reapers:
            t.join(max(0.0, deadline - time.monotonic()))
        self._reapers = [t for t in self._reapers if t.is_alive()]

    # -- internals -----------------------------------------------------------------------

    @staticmethod
    def _watch(nf: Container) -> select.poll:
        poller = select.poll()
        poller.register(nf.pidfd, select.POLLIN)
        return poller

    def _note_commit(self, engine: PrimaryEngine) -> None:
        committed = engine.last_committed
        if committed is None:
            return
        self._committed = engine.image_dir(committed)
        rec = self.records[-1] if self.records else None
        if rec is not None and rec.first_commit_us is None and rec.protected_us is not None:
            rec.first_commit_us = self.clock()

    def _execute(self, command: fo.Command) -> list[fo.Event]:
        if isinstance(command, fo.StepCommand):
            started = self.clock()
            try:
                result = self._run_step(command)
            except Exception as exc:
                log.warning("unit %s: step %s failed: %s", self.unit, command.step.value, exc)
                result = fo.StepFailed(command.step, command.term, f"{type(exc).__name__}: {exc}")
            if self._record is not None:
                self._record.steps_us[command.step.value] = self.clock() - started
            return [result]
        self._run_other(command)
        return []

    def _run_step(self, command: fo.StepCommand) -> fo.Event:
        term = command.term
        match command:
            case fo.RaiseTerm():
                self._begin_record(term)
                self.term_file.write(term)
                return fo.TermRecorded(term)
            case fo.FenceDataPlane():
                return self._fence(term)
            case fo.LocateImage():
                return self._locate(term)
            case fo.Restore(image=image):
                restored = self.backend.restore(
                    Path(image), self.netns, name=f"{self._base_name}-t{term}"
                )
                self._restored[term] = restored
                if self._record is not None:
                    self._record.new_pid = restored.pid
                return fo.Restored(term, restored.pid)
            case fo.AttachPorts():
                self._check_ports(term)
                return fo.PortsAttached(term)
            case fo.Resume():
                self.dp.resume_ingress(self.unit, term)
                if self._record is not None:
                    self._record.resumed_us = self.clock()
                return fo.Resumed(term)
            case fo.Reprotect(standby=standby):
                self._reprotect(term)
                return fo.Reprotected(term, standby)
        raise LocalFailoverError(
            f"unit {self.unit}: step {command.step.value} has no local meaning (a planned "
            "switchover, an announcement, an input replay or a host survey)"
        )

    def _begin_record(self, term: int) -> None:
        pid = self.machine.pid
        assert pid is not None
        if self._engine is not None:
            self._note_commit(self._engine)
        self._engine = None  # the dead NF's engine is never stepped again
        self._record = FailoverRecord(term=term, old_pid=pid, exited_us=self.clock())
        self.records.append(self._record)

    def _fence(self, term: int) -> fo.Event:
        discarded = self.dp.set_term(self.unit, term)
        self.dp.pause_ingress(self.unit, term)
        # The dead NF's connections still hold the addresses its restored copy reconnects from;
        # the resets this sends reach the NF port, and the close + discard below drop them.
        netns.destroy_tcp_sockets(self.netns)
        unit = self.dp.stats(self.unit).units[self.unit]
        open_epoch = int(unit.epoch)
        # Frames the dead NF queued on the NF port after set_term ran would otherwise open the
        # new term's first epoch: close_epoch drains the port even while paused, discard drops.
        self.dp.close_epoch(self.unit, open_epoch, term)
        discarded += self.dp.discard(self.unit, open_epoch, term)
        self._open_epoch = open_epoch
        self._nf_rx_base = int(self.dp.stats(self.unit).units[self.unit].nf_rx)
        if self._record is not None:
            self._record.discarded_pkts = discarded
        return fo.DataPlaneFenced(term, discarded, open_epoch)

    def _locate(self, term: int) -> fo.Event:
        if self._committed is None:
            raise LocalFailoverError(
                "no committed checkpoint: nothing was ever released, and starting the NF afresh "
                "is not this driver's call"
            )
        image = CheckpointImage.load(self._committed)
        if self._record is not None:
            self._record.restored_epoch = image.epoch
        # The cut sequence of a local image is not recorded; it only matters for replay.
        return fo.ImageLocated(term, str(image.path), image.epoch, 0)

    def _check_ports(self, term: int) -> None:
        # The data plane refuses to remove a port a unit uses, so the unit's NF port is there
        # as long as the unit is; what could be missing is the NF's end of the veth.
        restored = self._restored[term]
        if not self.dp.stats(self.unit).units[self.unit].nf:
            raise LocalFailoverError(f"unit {self.unit} has no NF port in the data plane")
        if not nf_interfaces(restored.pid) - {"lo"}:
            raise LocalFailoverError(
                f"the restored NF (pid {restored.pid}) sees no interface in netns {self.netns}"
            )

    def _reprotect(self, term: int) -> None:
        nf = self._restored.pop(term)
        self._containers[nf.pid] = nf
        # Watched from now on, even if protection fails: the unit then runs unprotected.
        self._poller = self._watch(nf)
        engine = self._protect(term, self._open_epoch, nf, self._nf_rx_base)
        self._engine = engine
        if self._record is not None:
            self._record.protected_us = self.clock()

    def _run_other(self, command: fo.Command) -> None:
        match command:
            case fo.Reap(pid=pid):
                old = self._containers.pop(pid, None)
                if old is not None:
                    t = threading.Thread(
                        target=self._destroy, args=(old,), name=f"reap-{pid}", daemon=True
                    )
                    t.start()
                    self._reapers.append(t)
            case fo.DestroyRestored(term=term):
                restored = self._restored.pop(term, None)
                if restored is not None:
                    self._destroy(restored)
            case fo.DetachPorts(term=term):
                with contextlib.suppress(Exception):
                    self.dp.pause_ingress(self.unit, term)
            case fo.DiscardOutput(term=term):
                with contextlib.suppress(Exception):
                    self.dp.discard(self.unit, self._open_epoch, term)
            case fo.Alarm(reason=reason):
                log.warning("unit %s: %s", self.unit, reason)
                self.alarms.append(reason)
            case fo.Report(status=status, detail=detail):
                log.info("unit %s: failover %s: %s", self.unit, status.value, detail)
                if self._record is not None and status is not fo.Status.RUNNING:
                    self._record.status = status
                    self._record.detail = detail
                    self._record = None
            case fo.Ignored(event=event, reason=reason):
                log.debug("unit %s: ignored %r: %s", self.unit, event, reason)
            case _:
                log.info("unit %s: %r has no local meaning", self.unit, command)

    @staticmethod
    def _destroy(c: Container) -> None:
        try:
            c.destroy()
        except Exception as exc:
            log.warning("destroying container %s (pid %d) failed: %s", c.name, c.pid, exc)
