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

**Operator requests** (`FailoverRequested`, `request`). Unplanned (``planned=False``): the
running copy is stopped at the fence (SIGKILL, after the term is durable), then the sequence
goes on as after a crash: the output it produced since the last commit is discarded, and the
unit restarts from the last committed image. Planned (a switchover with no input loss), the
`Quiesce` step before the term is raised:

1. the engine is stepped until nothing is in flight (``PrimaryEngine.drain``), starting no new
   cut meanwhile (``hold_cuts``, or a unit that commits slower than its epochs never settles):
   no cut, dump or ship of its own is left to race the last cut;
2. ``pause_ingress``: from here on inputs wait in the wire port's queue, for the restored copy;
3. the NF gets a moment to read what was delivered to its sockets (CRIU drops UDP receive
   queues), then it is frozen;
4. the open epoch is closed (its output drained into the buffer), the frozen NF is dumped into
   that epoch's image and shipped to the standby (a delta on the engine's own link), and on the
   ack every closed epoch is released: the image covers every input the NF was given and every
   output it made, and all of that output is out;
5. the NF is killed (it is still frozen; nothing it did after the cut exists).

The sequence then raises the term, fences (nothing is left to discard), restores that very
image and resumes ingress: the inputs queued since step 2 reach the restored copy, in order.
A quiesce that fails or passes its deadline aborts the switchover (`Unquiesce`): the NF is
thawed and ingress resumed at the unchanged term, and if the last epoch was already closed in
the data plane (behind the engine's back) a fresh engine takes the unit over from the next
epoch, whose first release also lets the closed one out (releases are cumulative). An engine
that failed while settling may be stuck in the middle of a cut: the next `step` raises that
failure, so the owner recovers it as any failed step (the agent rebuilds it from the data
plane's state, `hamgr.agent.primary.take_over`). A copy that is already dead by then is left
alone, ingress stays paused, and the next step reports its exit: an unplanned failover restores
the last committed image (which is the quiesced one if the ship was acked).

**Owner hooks** (`FailoverHooks`): the driver tells its owner (the agent) of each report, of a
restored copy before it gets any traffic (to record it durably), and of each container it
destroyed, so the owner's records never name a container that no longer exists, nor miss one
that does. The term is kept by a `TermStore` (a `TermFile` by default).

Lossless mode (input replay) is not supported locally: it needs the cut sequence of the committed
image and a local input log, which the engine does not keep (see docs/failover.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import select
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import attrs

from shim import failover as fo
from shim import netns
from shim.chain import load_image
from shim.container import UnitHandle
from shim.engine import PrimaryEngine
from shim.oci import ContainerSpec

__all__ = [
    "EngineFactory",
    "FailoverHooks",
    "FailoverRecord",
    "LocalDataPlane",
    "LocalFailover",
    "LocalFailoverError",
    "ProtectedNf",
    "Restorer",
    "TermFile",
    "TermStore",
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
    def release(self, unit: str, epoch: int, term: int) -> int: ...
    def stats(self, unit: str | None = None) -> Any: ...


class ProtectedNf(UnitHandle, Protocol):
    """What the driver needs of the NF it protects: one `shim.container.Container`, or a
    `shim.chain.Chain` of containers that share one netns and fail over as one."""

    @property
    def spec(self) -> ContainerSpec: ...
    def exited(self, timeout: float = ...) -> bool: ...
    def destroy(self) -> None: ...


NF = TypeVar("NF", bound=ProtectedNf)
NF_co = TypeVar("NF_co", bound=ProtectedNf, covariant=True)
NF_contra = TypeVar("NF_contra", bound=ProtectedNf, contravariant=True)


class Restorer(Protocol[NF_co]):
    """Restores a committed local image into the unit's netns (`RuncBackend`, or
    `shim.chain.ChainBackend` for a chain)."""

    def restore(self, image_dir: Path, netns: str, *, name: str | None = None) -> NF_co: ...


class EngineFactory(Protocol[NF_contra]):
    """Builds the epoch engine that protects `nf` at `term`, starting at epoch `first_epoch`.

    `nf_rx_base` is the data plane's count of NF output at the handover: output of the dead
    incarnation, which the new engine must not treat as waiting (pass it to `PrimaryEngine`).

    It should give the engine a fresh replication link and announce the term to the standby on it
    (``ReplicationClient.hello``), so the standby refuses late transfers of the dead incarnation.
    """

    def __call__(
        self, term: int, first_epoch: int, nf: NF_contra, nf_rx_base: int
    ) -> PrimaryEngine: ...


class TermStore(Protocol):
    """Where the unit's term is kept durably. `write` must be on stable storage when it returns
    and must refuse a term below the recorded one."""

    def read(self) -> int | None: ...
    def write(self, term: int) -> None: ...


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
    exited_us: int  # when the pidfd polled readable, or the operator's request came
    old_term: int = 0
    planned: bool = False
    cause: str = ""
    quiesced_epoch: int | None = None  # planned: the epoch of the last cut of the old copy
    new_pid: int | None = None
    restored_epoch: int | None = None
    discarded_pkts: int = 0
    steps_us: dict[str, int] = attrs.Factory(dict)  # duration of each step
    resumed_us: int | None = None  # ingress flows to the restored NF
    protected_us: int | None = None  # the new engine runs
    first_commit_us: int | None = None  # the new engine released its first epoch
    status: fo.Status = fo.Status.RUNNING
    detail: str = ""
    elapsed_us: int = 0  # the machine's count, from the trigger to the final report

    @property
    def outage_us(self) -> int | None:
        """From the death's detection (or the request) to the restored NF receiving input."""
        return None if self.resumed_us is None else self.resumed_us - self.exited_us

    def to_json(self) -> dict[str, Any]:
        """The record as plain JSON values (milliseconds), for events, replies and the agent's
        history."""

        def ms(us: int | None) -> float | None:
            return None if us is None else round(us / 1000, 3)

        return {
            "term": self.term,
            "old_term": self.old_term,
            "planned": self.planned,
            "cause": self.cause,
            "status": self.status.value,
            "detail": self.detail,
            "old_pid": self.old_pid,
            "new_pid": self.new_pid,
            "restored_epoch": self.restored_epoch,
            "quiesced_epoch": self.quiesced_epoch,
            "discarded_pkts": self.discarded_pkts,
            "elapsed_ms": ms(self.elapsed_us),
            "outage_ms": ms(self.outage_us),
            "steps_ms": {k: ms(v) for k, v in self.steps_us.items()},
        }


def _ignore(*_args: object) -> None:
    return None


@attrs.define
class FailoverHooks(Generic[NF]):
    """What the driver tells its owner, synchronously, on the driver's thread (`destroyed` also
    on a reaper thread). A hook that raises fails the step it runs in (`restored`: the copy is
    then destroyed, never left unrecorded)."""

    # Every `fo.Report` (running, finished, error, aborted), with the record it concerns.
    report: Callable[[fo.Report, FailoverRecord | None], None] = _ignore
    # A restored copy exists (term, container); it has received nothing yet.
    restored: Callable[[int, NF], None] = _ignore
    # A container the driver held is gone: reaped, or destroyed by a failed attempt's cleanup.
    destroyed: Callable[[NF], None] = _ignore
    # A new engine protects the running copy (after a failover, or after an aborted quiesce).
    protected: Callable[[int, NF, PrimaryEngine], None] = _ignore


@attrs.define
class _Quiescing:
    """How far a quiesce got, so that `Unquiesce` undoes exactly that."""

    paused: bool = False
    frozen: bool = False
    closed: int | None = None  # the epoch closed in the data plane behind the engine's back
    nf_rx: int = 0  # the data plane's NF output count right after that close
    released: bool = False
    killed: bool = False
    engine_error: Exception | None = None  # settling the engine failed: it may be mid-cut


def nf_interfaces(pid: int) -> set[str]:
    """The interfaces process `pid` sees: those of its netns."""
    lines = Path(f"/proc/{pid}/net/dev").read_text().splitlines()[2:]
    return {line.split(":", 1)[0].strip() for line in lines}


def _now_us() -> int:
    return time.monotonic_ns() // 1000


class LocalFailover(Generic[NF]):
    """Protects one unit and fails it over locally when its NF dies. Single-threaded.

    The NF is one container, or a chain (`shim.chain`): then the death of any member fails the
    whole chain over, and every member is restored from the chain's one image."""

    def __init__(
        self,
        unit: str,
        *,
        dataplane: LocalDataPlane,
        backend: Restorer[NF],
        nf: NF,
        engine: PrimaryEngine,
        protect: EngineFactory[NF],
        term_file: TermStore,
        standby: str = "standby",
        config: fo.FailoverConfig | None = None,
        clock: Callable[[], int] = _now_us,
        hooks: FailoverHooks[NF] | None = None,
        committed: tuple[Path, int] | None = None,
    ) -> None:
        """`committed`: the last committed image and its epoch, when `engine` has committed
        nothing itself (an owner that restarted finds `nf` dead and `engine` never ran: the
        first step then restores that image)."""
        config = config or fo.FailoverConfig()
        if config.lossless:
            raise LocalFailoverError(
                "lossless local failover needs a local input log and the committed cut; "
                "not supported (docs/failover.md)"
            )
        term = engine.machine.term
        recorded = term_file.read()
        if recorded is not None and recorded > term:
            where = getattr(term_file, "path", "the term store")
            raise LocalFailoverError(
                f"unit {unit}: {where} records term {recorded}, the engine runs at "
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
        self.hooks: FailoverHooks[NF] = hooks or FailoverHooks()
        self.last_ignored: str | None = None
        self._base_name = _GENERATION.sub("", nf.name)
        self._protect = protect
        self._engine: PrimaryEngine | None = engine
        self._containers: dict[int, NF] = {nf.pid: nf}
        self._restored: dict[int, NF] = {}
        self._committed: Path | None = None
        self._committed_epoch = -1
        self._reported: set[int] = set()
        self._reapers: list[threading.Thread] = []
        self._poller = self._watch(nf)
        self._record: FailoverRecord | None = None
        self._open_epoch = 0
        self._nf_rx_base = 0
        self._quiescing: _Quiescing | None = None
        # An engine step that failed inside a quiesce, re-raised by the next `step` (see there).
        self._engine_error: Exception | None = None
        if committed is not None:
            self._committed, self._committed_epoch = committed
        self._note_commit(engine)

    # -- public --------------------------------------------------------------------------

    @property
    def engine(self) -> PrimaryEngine | None:
        """The engine protecting the running NF; None while a failover runs or after FAILED."""
        return self._engine

    @property
    def nf(self) -> NF:
        """The container of the watched incarnation (dead while a failover runs)."""
        pid = self.machine.pid
        assert pid is not None
        return self._containers[pid]

    @property
    def containers(self) -> list[NF]:
        """Every container handle the driver still holds, for a caller's cleanup."""
        return [*self._containers.values(), *self._restored.values()]

    @property
    def in_progress(self) -> bool:
        return self.machine.state in fo.IN_PROGRESS

    def replace_engine(self, engine: PrimaryEngine) -> None:
        """Protect the watched copy with `engine` from now on (the caller rebuilt it after a
        failed step); the old one is never stepped again."""
        if engine.machine.term != self.machine.term:
            raise LocalFailoverError(
                f"unit {self.unit}: the new engine runs at term {engine.machine.term}, the unit "
                f"at {self.machine.term}"
            )
        self._engine = engine
        self._note_commit(engine)

    def request(
        self, reason: str, *, planned: bool, term: int | None = None
    ) -> FailoverRecord | str:
        """An operator's failover, carried out before this returns.

        `term` is the unit's term as the operator saw it (default: the current one), so a retried
        request cannot fail the unit over twice. Returns the attempt's record, or why the machine
        ignored the request (a failover in progress, a stale term).
        """
        before = len(self.records)
        self.last_ignored = None
        self.feed(
            fo.FailoverRequested(reason, planned, self.machine.term if term is None else term)
        )
        if len(self.records) > before:
            return self.records[before]
        return (
            self.last_ignored
            or f"the request started no failover (state {self.machine.state.value})"
        )

    def step(self, wait: float = 0.0002) -> None:
        """Step the engine once, then wait up to `wait` seconds for the NF's death.

        A death already visible is acted on before the engine steps again: a cut of a dead NF
        only fails, and costs time the failover needs. An engine error that ended a switchover
        (while settling the engine) is raised here, once, for the caller's recovery.
        """
        nf = self.nf
        if nf.pid in self._reported:
            time.sleep(wait)
            self.feed(fo.Tick(self.clock()))
            return
        if self._engine_error is not None and not nf.exited():
            exc, self._engine_error = self._engine_error, None
            raise LocalFailoverError(
                f"unit {self.unit}: the epoch engine failed during an aborted switchover: {exc}"
            ) from exc
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
    def _watch(nf: NF) -> select.poll:
        poller = select.poll()
        if not nf.exited():  # a dead one (found so by a restarted owner) has no pidfd to watch
            poller.register(nf.pidfd, select.POLLIN)
        return poller

    def _note_commit(self, engine: PrimaryEngine) -> None:
        committed = engine.last_committed
        if committed is None or committed < self._committed_epoch:
            # Epochs only grow (the data plane numbers them across incarnations): an engine
            # that has not caught up with a newer commit (a quiesce's last cut) changes nothing.
            return
        self._committed_epoch = committed
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
            case fo.Quiesce(timeout_us=timeout_us):
                self._begin_record(term, planned=True)
                if self._record is not None:
                    self._record.planned = True
                epoch = self._quiesce(timeout_us / 1e6)
                if self._record is not None:
                    self._record.quiesced_epoch = epoch
                return fo.Quiesced(term, epoch)
            case fo.RaiseTerm():
                self._begin_record(term, planned=False)
                if self._engine is not None:
                    self._note_commit(self._engine)
                self._engine = None  # the replaced copy's engine is never stepped again
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
                # Its first cut holds its first output back (the outage): the dump's CRIU
                # worker starts now, while the ports are attached and ingress resumes.
                restored.prepare_checkpoint(wait=False)
                if self._record is not None:
                    self._record.new_pid = restored.pid
                self.hooks.restored(term, restored)
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
            f"unit {self.unit}: step {command.step.value} has no local meaning (an "
            "announcement, an input replay or a host survey)"
        )

    def _begin_record(self, term: int, *, planned: bool) -> None:
        if self._record is not None and self._record.term == term:
            return  # begun by the attempt's report
        pid = self.machine.pid
        assert pid is not None
        self._record = FailoverRecord(
            term=term,
            old_pid=pid,
            exited_us=self.clock(),
            old_term=self.machine.term,
            planned=planned,
        )
        self.records.append(self._record)

    def _quiesce(self, budget_s: float) -> int:
        """The planned switchover's last cut (module doc); returns its epoch. The NF is dead
        when this returns, and every output it made is released."""
        deadline = time.monotonic() + budget_s
        engine, nf, term = self._engine, self.nf, self.machine.term
        if engine is None:
            raise LocalFailoverError("no epoch engine protects the unit; nothing to quiesce")
        if nf.exited():
            raise LocalFailoverError(f"the NF (pid {nf.pid}) already exited")
        q = self._quiescing = _Quiescing()
        # Half the budget at most to settle, so the cut and its ship keep the rest.
        try:
            settled = engine.drain(timeout=budget_s / 2, hold_cuts=True)
        except Exception as exc:
            q.engine_error = exc
            raise
        if not settled:
            raise LocalFailoverError(
                f"the epoch engine did not settle within {budget_s / 2:g} s (a cut or a ship "
                "stayed in flight)"
            )
        self._note_commit(engine)
        cut = int(self.dp.pause_ingress(self.unit, term).cut)
        q.paused = True
        drained = getattr(nf, "wait_rx_drained", None)
        if drained is not None:
            result = drained(timeout=min(0.5, max(0.0, deadline - time.monotonic())))
            if not result.drained:
                raise LocalFailoverError(
                    f"the NF left {result.pending_bytes} bytes unread in its sockets; a "
                    "checkpoint now would lose those inputs"
                )
        nf.freeze()
        q.frozen = True
        epoch = int(self.dp.stats(self.unit).units[self.unit].epoch)
        self.dp.close_epoch(self.unit, epoch, term)
        q.closed = epoch
        q.nf_rx = int(self.dp.stats(self.unit).units[self.unit].nf_rx)
        dest = engine.image_dir(epoch)
        shutil.rmtree(dest, ignore_errors=True)
        nf.checkpoint(epoch, dest)
        left = deadline - time.monotonic()
        if left <= 0:
            raise LocalFailoverError("no time left to ship the last checkpoint")
        shipped = engine.shipper.ship_nowait(
            self.unit, epoch, term, dest, meta={"cut_seq": cut, "quiesce": 1}, timeout=left
        )
        shipped.result(timeout=left + 1.0)
        # Committed: the image is the unit's newest committed state from here on, whatever
        # happens next (a failure below still restores it, and loses nothing).
        self._committed, self._committed_epoch = dest, epoch
        self.dp.release(self.unit, epoch, term)
        q.released = True
        nf.kill()
        q.killed = True
        return epoch

    def _unquiesce(self, term: int) -> None:
        """An aborted switchover: the watched copy runs on at `term` (module doc)."""
        q, self._quiescing = self._quiescing, None
        nf = self.nf
        if q is None or nf.exited():
            # Dead (killed at the end of the quiesce, or on its own): its exit is reported at
            # the next step; ingress stays paused until a restored copy is attached.
            log.warning(
                "unit %s: switchover aborted with the NF gone; it will be restored", self.unit
            )
            return
        if q.frozen:
            with contextlib.suppress(Exception):
                nf.thaw()
        with contextlib.suppress(Exception):
            self.dp.resume_ingress(self.unit, term)
        if q.engine_error is not None:
            # The engine failed while settling, possibly in the middle of a cut: the owner's
            # recovery for a failed step (rebuild it from the data plane's state) applies.
            self._engine_error = q.engine_error
            return
        if q.closed is None:
            # The engine's view of the data plane still holds; it cuts again from here on.
            if self._engine is not None:
                self._engine.hold_cuts(False)
            return
        engine = self._protect(term, q.closed + 1, nf, q.nf_rx)
        old, self._engine = self._engine, engine
        if old is not None:
            self._note_commit(old)
        self.hooks.protected(term, nf, engine)

    def _fence(self, term: int) -> fo.Event:
        old = self.nf
        if not old.exited():
            # An operator's unplanned failover: the copy still runs and is stopped now that the
            # new term is durable; what it produced since the last commit dies below.
            log.info("unit %s: stopping the running copy (pid %d)", self.unit, old.pid)
            old.kill()
        else:
            # A chain whose one member died: the others still run, hold their ports and send.
            survivors = getattr(old, "kill_survivors", None)
            if survivors is not None:
                survivors()
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
        image = load_image(self._committed)
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
        self.hooks.protected(term, nf, engine)

    def _run_other(self, command: fo.Command) -> None:
        match command:
            case fo.Reap(pid=pid):
                old = self._containers.pop(pid, None)
                if old is not None:
                    t = threading.Thread(
                        target=self._destroy,
                        args=(old, self.hooks.destroyed),
                        name=f"reap-{pid}",
                        daemon=True,
                    )
                    t.start()
                    self._reapers.append(t)
            case fo.DestroyRestored(term=term):
                restored = self._restored.pop(term, None)
                if restored is not None:
                    self._destroy(restored, self.hooks.destroyed)
            case fo.Unquiesce():
                # The command names the aborted attempt's term; the copy runs on at its own.
                self._unquiesce(self.machine.term)
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
                if status is fo.Status.RUNNING:
                    # The machine has entered the attempt's first step by now: QUIESCING for a
                    # planned switchover.
                    self._begin_record(
                        command.term, planned=self.machine.state is fo.State.QUIESCING
                    )
                    if self._record is not None:
                        self._record.cause = detail
                rec = self._record
                if rec is not None and status is not fo.Status.RUNNING:
                    rec.status = status
                    rec.detail = detail
                    rec.elapsed_us = command.elapsed_us
                    self._record = None
                if status is not fo.Status.RUNNING:
                    self._quiescing = None
                self._tell(command, rec)
            case fo.Ignored(event=event, reason=reason):
                log.debug("unit %s: ignored %r: %s", self.unit, event, reason)
                self.last_ignored = reason
            case _:
                log.info("unit %s: %r has no local meaning", self.unit, command)

    def _tell(self, report: fo.Report, rec: FailoverRecord | None) -> None:
        try:
            self.hooks.report(report, rec)
        except Exception:
            log.exception("unit %s: the report hook failed", self.unit)

    @staticmethod
    def _destroy(c: NF, destroyed: Callable[[NF], None] = _ignore) -> None:
        try:
            c.destroy()
        except Exception as exc:
            log.warning("destroying container %s (pid %d) failed: %s", c.name, c.pid, exc)
            return
        try:
            destroyed(c)
        except Exception:
            log.exception("the hook for destroyed container %s failed", c.name)
