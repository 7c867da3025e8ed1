"""A primary unit whose standby is local, with local failover: `LocalRunner`.

Each primary unit of the agent gets one `LocalRunner` thread. It steps the unit through a
`shim.local_failover.LocalFailover` driver, which steps the unit's epoch engine and, between
steps, waits on the NF's pidfd. When the NF dies, the driver restores it from the last committed
local image exactly as on the test bed (raise the term, fence, locate, restore, resume,
re-protect), inside the same loop: a failover blocks this unit's thread and nothing else.

What the agent gets from it (through `FailoverHooks`, on the runner's thread):

- the restored container (``<host>-<unit>-t<term>``) is recorded in the state database before it
  receives any traffic, and the dead one is forgotten once it is reaped; the term is written to
  the database (`DbTermStore`) before the data plane is fenced. An agent that restarts after a
  failover therefore adopts the restored NF at the new term (`newest_container`), and one that
  died half-way removes what the dead attempt left (`stale_containers`).
- a ``failover`` event per report (running, then finished, failed or aborted), with the term, the
  old and new NF pid and the time of each step; `hamgr status` shows the term, the NF pid, the
  count of failovers and the last one.

Operator requests (`request_failover`, from the control thread) are queued and carried out by
the runner's thread between two steps, so they never race the epoch engine or a failover the
pidfd started. A request while a failover runs is refused at once (`failing_over`); one that
reaches the machine after the unit moved on is ignored by the machine, which says why.

The engine's own step failures are handled as in `hamgr.agent.primary.UnitRunner`: the NF is
thawed, ingress resumed, and a fresh engine takes the unit over (`rebuild`), at most
`MAX_RECOVERIES` times in a row. A failure caused by the NF's death is the driver's business.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from dpdk_vhost.client import DataPlaneClient
from hamgr.agent import unitnet
from hamgr.agent.primary import (
    GOOD_STEPS_RESET,
    IDLE_POLL_S,
    MAX_RECOVERIES,
    STATS_EVERY_S,
    Observed,
    poll_seconds,
    report_engine,
)
from hamgr.agent.state import Resource, StateDB
from shim import epoch as ep
from shim import failover as fo
from shim.container import Container, Freezer, RuncBackend
from shim.engine import PrimaryEngine
from shim.local_failover import (
    EngineFactory,
    FailoverHooks,
    FailoverRecord,
    LocalFailover,
    LocalFailoverError,
)

__all__ = [
    "DbTermStore",
    "FailoverRequest",
    "LocalRunner",
    "destroy_containers",
    "newest_container",
    "record_container",
    "stale_containers",
]

log = logging.getLogger(__name__)

REBUILD_EVERY_S = 1.0

STATUS_NAMES = {
    fo.Status.RUNNING: "running",
    fo.Status.FINISHED: "finished",
    fo.Status.ERROR: "failed",
    fo.Status.ABORTED: "aborted",
}


# --- the unit's containers in the state database -------------------------------------------


def record_container(db: StateDB, unit: str, nf: Container) -> None:
    db.add_resource(unit, "container", nf.name, unitnet.container_detail(nf))


def newest_container(db: StateDB, unit: str) -> Resource | None:
    """The unit's NF: the container recorded last (a restored copy is recorded after the one it
    replaced, and the replaced one is forgotten once reaped)."""
    found = db.resources(unit, "container")
    return found[-1] if found else None


def stale_containers(db: StateDB, unit: str) -> list[Resource]:
    """Containers of replaced incarnations that a dead agent did not reap, newest first."""
    return list(reversed(db.resources(unit, "container")[:-1]))


def destroy_containers(
    db: StateDB, backend: RuncBackend, unit: str, handles: list[Container]
) -> list[str]:
    """Destroy every recorded container of `unit`, newest first, each through its own handle
    when the agent holds one; forget each once it is gone. Returns what could not be removed."""
    by_name = {c.name: c for c in handles}
    problems = []
    for res in reversed(db.resources(unit, "container")):
        try:
            # The same removal as unitnet.teardown's, but with the handle of this very
            # container: a unit that failed over has more than one.
            unitnet.destroy_container(backend, res, by_name.get(res.name))
        except Exception as exc:
            log.warning("removing container %s of %s failed: %s", res.name, unit, exc)
            problems.append(f"container {res.name}: {exc}")
            continue
        db.remove_resource(unit, "container", res.name)
    return problems


@attrs.frozen
class DbTermStore:
    """The unit's term in the state database (roles.term of its primary role): durable when
    `write` returns (WAL, synchronous=FULL), and never lowered."""

    db: StateDB
    unit: str

    def read(self) -> int | None:
        role = self.db.role(self.unit, "primary")
        return None if role is None else role.term

    def write(self, term: int) -> None:
        current = self.read()
        if current is not None and term < current:
            raise LocalFailoverError(
                f"unit {self.unit}: term {term} is below the recorded {current}; terms never "
                "go down"
            )
        self.db.update_role(self.unit, "primary", term=term)


# --- the runner ------------------------------------------------------------------------------


@attrs.frozen
class FailoverRequest:
    """An operator's failover, answered through `reply` (the record) or `refuse` (code, why)."""

    reason: str
    planned: bool
    term: int | None
    reply: Callable[[dict[str, Any]], object]
    refuse: Callable[[str, str], object]


def _close_engine(engine: PrimaryEngine) -> None:
    """Wait for the engine's dump in progress, then close its replication link."""
    try:
        engine.close()
    except Exception:
        log.exception("unit %s: closing a replaced engine failed", engine.unit)
    close = getattr(engine.shipper, "close", None)
    if close is not None:
        with contextlib.suppress(Exception):
            close()


class LocalRunner:
    """One primary unit with a local standby, on its own thread (bounded by `stop`)."""

    def __init__(
        self,
        unit: str,
        *,
        dp: DataPlaneClient,
        backend: RuncBackend,
        nf: Container,
        engine: PrimaryEngine,
        protect: EngineFactory[Container],
        term_store: DbTermStore,
        rebuild: Callable[[DataPlaneClient, Container, int], PrimaryEngine],
        observed: Observed,
        hooks: FailoverHooks[Container],
        standby: str,
        commits_base: int = 0,
        failovers: int = 0,
        last_failover: dict[str, Any] | None = None,
        config: fo.FailoverConfig | None = None,
        committed: tuple[Path, int] | None = None,
    ) -> None:
        self.unit = unit
        self.dp = dp
        self.observed = observed
        self.standby = standby
        self.commits_base = commits_base
        self.rebuild = rebuild
        self.failovers = failovers
        self.last_failover = last_failover
        self.last_step = time.monotonic()
        self.error: str | None = None
        self.errors = 0
        self.failed = False
        self.failing_over: int | None = None  # the term of the failover in progress
        self.pending = 0  # operator requests queued, not yet carried out
        self._owner = hooks
        self._engine = engine
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._snapshot: dict[str, Any] = {}
        self._requests: queue.SimpleQueue[FailoverRequest] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"unit-{unit}", daemon=True)
        self._last_committed = engine.last_committed
        self._unit_stats: Any = None
        self._drain_s = 0.0
        self._next_rebuild = 0.0
        self._rebuilds = 0
        self.driver = LocalFailover(
            unit,
            dataplane=dp,
            backend=backend,
            nf=nf,
            engine=engine,
            protect=protect,
            term_file=term_store,
            standby=standby,
            config=config,
            hooks=FailoverHooks(
                report=self._on_report,
                restored=hooks.restored,
                destroyed=hooks.destroyed,
                protected=self._on_protected,
            ),
            committed=committed,
        )

    # -- what the agent reads ------------------------------------------------------------

    @property
    def nf(self) -> Container:
        """The container of the watched incarnation."""
        return self.driver.nf

    @property
    def term(self) -> int:
        return self.driver.machine.term

    def alive(self) -> bool:
        return self._thread.is_alive()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._snapshot)

    def handles(self) -> list[Container]:
        """Every container handle the runner holds, for the agent's teardown."""
        return self.driver.containers

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        self._publish()
        self._thread.start()

    def stop(self, drain_seconds: float = 0.0, timeout: float = 60.0) -> None:
        """Stop stepping (a failover in progress finishes first); first let in-flight epochs
        commit for up to `drain_seconds`. Requests still queued are refused."""
        self._drain_s = drain_seconds
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("unit %s: the unit loop did not stop within %s s", self.unit, timeout)
        else:
            # The current engine, and the replaced copy's if a failover failed after dropping it.
            for engine in {id(e): e for e in (self.driver.engine, self._engine) if e}.values():
                _close_engine(engine)
        self._refuse_queued("busy", f"unit {self.unit} is being stopped or unprotected")
        self.driver.close()
        self.dp.close()

    def request_failover(self, request: FailoverRequest) -> None:
        """Queue an operator's failover for the runner's thread (any thread may call this)."""
        if self._stop.is_set() or not self.alive():
            request.refuse("busy", f"unit {self.unit}: its loop is stopping")
            return
        with self._lock:
            self.pending += 1
        self._requests.put(request)

    # -- the loop ------------------------------------------------------------------------

    def _run(self) -> None:
        last_stats = 0.0
        failures = 0
        good_steps = 0
        while not self._stop.is_set():
            self._serve_requests()
            try:
                self.driver.step(wait=self._poll_seconds())
                self.last_step = time.monotonic()
                good_steps += 1
                if good_steps >= GOOD_STEPS_RESET and failures:
                    failures, self.error = 0, None
            except Exception as exc:
                failures += 1
                good_steps = 0
                self.errors += 1
                self.error = f"epoch step failed: {type(exc).__name__}: {exc}"
                log.exception("unit %s: epoch step failed", self.unit, extra={"unit": self.unit})
                self.last_step = time.monotonic()
                if not self._recover(failures):
                    break
                continue
            self._observe()
            self._reprotect_if_needed()
            now = time.monotonic()
            if now - last_stats >= STATS_EVERY_S:
                last_stats = now
                self._refresh()
        engine = self.driver.engine
        if self._drain_s > 0 and not self.failed and engine is not None:
            try:
                engine.drain(self._drain_s)
                self._observe()
            except Exception:
                log.exception("unit %s: drain failed", self.unit)
        self._refresh()

    def _poll_seconds(self) -> float:
        engine = self.driver.engine
        return IDLE_POLL_S if engine is None else poll_seconds(engine.machine)

    def _take_request(self) -> FailoverRequest | None:
        try:
            req = self._requests.get_nowait()
        except queue.Empty:
            return None
        with self._lock:
            self.pending -= 1
        return req

    def _serve_requests(self) -> None:
        while (req := self._take_request()) is not None:
            try:
                outcome = self.driver.request(req.reason, planned=req.planned, term=req.term)
            except Exception as exc:
                log.exception("unit %s: the failover request failed", self.unit)
                req.refuse("internal", f"{type(exc).__name__}: {exc}")
                continue
            self.last_step = time.monotonic()
            if isinstance(outcome, str):
                req.refuse("busy", f"unit {self.unit}: the request was ignored: {outcome}")
            else:
                req.reply({"unit": self.unit, **self._record_json(outcome)})
            self._observe()
            self._refresh()

    def _refuse_queued(self, code: str, message: str) -> None:
        while (req := self._take_request()) is not None:
            req.refuse(code, message)

    def _recover(self, failures: int) -> bool:
        """After a failed step of a live NF: unwedge it, then rebuild its engine (module doc)."""
        nf = self.driver.nf
        term = self.driver.machine.term
        if nf.exited():
            return True  # the driver reports the death at its next step and restores the NF
        with contextlib.suppress(Exception):
            if Freezer.for_pid(nf.pid).is_frozen():
                nf.thaw()
        with contextlib.suppress(Exception):
            self.dp.resume_ingress(self.unit, term)
        if failures > MAX_RECOVERIES:
            return self._give_up()
        if self._stop.wait(0.2 * failures):
            return False
        old = self.driver.engine
        if old is not None:
            _close_engine(old)
        try:
            engine = self.rebuild(self.dp, nf, term)
        except Exception as exc:
            self.error = f"recovery failed: {type(exc).__name__}: {exc}"
            log.exception("unit %s: recovery failed", self.unit, extra={"unit": self.unit})
            return self._recover(failures + 1) if failures < MAX_RECOVERIES else self._give_up()
        self.driver.replace_engine(engine)
        self._engine = engine
        self._last_committed = engine.last_committed
        log.info("unit %s: epoch engine restarted", self.unit, extra={"unit": self.unit})
        return True

    def _give_up(self) -> bool:
        self.failed = True
        self.observed.on_alarm(self.unit, f"epoch loop stopped: {self.error}")
        return False

    def _reprotect_if_needed(self) -> None:
        """A restored NF whose re-protection failed runs without an engine, so its output stays
        held: take it over again, once a second, `MAX_RECOVERIES` times at most."""
        d = self.driver
        if d.engine is not None or d.machine.state is not fo.State.WATCHING or self.failed:
            return
        now = time.monotonic()
        if now < self._next_rebuild or d.nf.exited():
            return
        self._next_rebuild = now + REBUILD_EVERY_S
        self._rebuilds += 1
        try:
            engine = self.rebuild(self.dp, d.nf, d.machine.term)
        except Exception as exc:
            self.error = f"re-protection failed: {type(exc).__name__}: {exc}"
            log.warning("unit %s: %s", self.unit, self.error)
            if self._rebuilds >= MAX_RECOVERIES:
                self._give_up()
            return
        d.replace_engine(engine)
        self._on_protected(d.machine.term, d.nf, engine)
        self._rebuilds, self.error = 0, None

    # -- hooks from the driver (this thread) ---------------------------------------------

    def _on_protected(self, term: int, nf: Container, engine: PrimaryEngine) -> None:
        old, self._engine = self._engine, engine
        if old is not engine:
            _close_engine(old)
        self._last_committed = engine.last_committed
        self._owner.protected(term, nf, engine)

    def _on_report(self, report: fo.Report, rec: FailoverRecord | None) -> None:
        if report.status is fo.Status.RUNNING:
            self.failing_over = report.term
        else:
            self.failing_over = None
            if rec is not None:
                if report.status is fo.Status.FINISHED:
                    self.failovers += 1
                self.last_failover = self._record_json(rec)
        for alarm in self.driver.alarms:
            self.observed.on_alarm(self.unit, alarm)
        self.driver.alarms.clear()
        self._owner.report(report, rec)
        self._publish()

    @staticmethod
    def _record_json(rec: FailoverRecord) -> dict[str, Any]:
        data = rec.to_json()
        data["status"] = STATUS_NAMES[rec.status]
        data["at"] = round(time.time(), 3)
        return data

    # -- observation ---------------------------------------------------------------------

    def _observe(self) -> None:
        engine = self.driver.engine
        if engine is not None:
            self._last_committed = report_engine(
                engine, self.observed, self.unit, self._last_committed
            )

    def _refresh(self) -> None:
        try:
            self._unit_stats = self.dp.stats(self.unit).units.get(self.unit)
        except Exception as exc:
            self.error = f"data plane stats: {exc}"
        self._publish()

    def _publish(self) -> None:
        d = self.driver
        engine = d.engine
        u = self._unit_stats
        down = d.machine.state is fo.State.FAILED
        if self.failed or down:
            state = "error"
        elif self.failing_over is not None:
            state = "failover"
        else:
            state = "running"
        stalled = self.failed or down or self.failing_over is not None
        if engine is None or stalled or engine.machine.state is ep.State.FENCED:
            protection = "stalled"
        else:
            protection = engine.machine.protection.value
        error = self.error
        if down:
            error = f"the unit is down: the failover to term {d.machine.highest_term} failed: "
            error += d.machine.failure or "?"
        snap = {
            "unit": self.unit,
            "role": "primary",
            "peer": self.standby,
            "term": d.machine.term,
            "state": state,
            "protection": protection,
            "machine": engine.machine.state.value if engine is not None else None,
            "failover_machine": d.machine.state.value,
            "open_epoch": engine.machine.open_epoch if engine is not None else None,
            "last_committed": engine.last_committed if engine is not None else None,
            "epochs_total": int(u.epochs_closed) if u is not None else None,
            # Counted by the data plane, so exact across agent restarts and failovers.
            "commits_total": int(u.epochs_released) if u is not None else self.commits_base,
            "buffered_pkts": int(u.buffered_pkts) - int(u.releasable_pkts)
            if u is not None
            else None,
            "buffered_bytes": int(u.buffered_bytes) if u is not None else None,
            "released_pkts": int(u.released_pkts) if u is not None else None,
            "epoch_ms": engine.machine.epoch_length_us / 1000 if engine is not None else None,
            "nf_pid": d.machine.pid,
            "failovers": self.failovers,
            "last_failover": self.last_failover,
            "error": error,
        }
        with self._lock:
            self._snapshot = snap
