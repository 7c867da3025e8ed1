"""The per-host agent: `hamgr agent run` (or `python -m hamgr.agent run`).

Threads, and what each may block on:

- **main** (supervisor): the watchdog, persisting unit counters, ending event streams, signals.
  Sleeps 50 ms per round; never waits on a unit.
- **hamgr-control**: the control socket (`hamgr.control.ControlServer`). Answers ping, status and
  events at once from snapshots; hands protect and unprotect to the worker.
- **hamgr-worker**: protect and unprotect, one at a time (container start, netns and data-plane
  setup take hundreds of milliseconds; one at a time also means no two operations race on a unit).
- **unit-U**: one per primary unit, stepping its epoch engine and watching its NF's pidfd
  (`hamgr.agent.local.LocalRunner`): an NF that dies is restored from the last committed local
  image on this thread, and operator failovers (`hamgr failover`) are carried out here too.
- the replication servers (one per standby unit) and clients (one per primary unit).

systemd: READY=1 once every unit is re-adopted and the control socket listens; WATCHDOG=1 only
while the control loop and every unit loop made progress recently, so a wedged agent is restarted
instead of shown `active` (the Masakari lesson). With ``KillMode=process`` a restart leaves the
data plane and the NFs running, and the new agent adopts them (`hamgr.agent.primary.take_over`).

- **hamgr-remote** (with ``[remote]`` in agent.toml): the remote roles' loop
  (`hamgr.agent.remote.RemoteAgent` inside this agent): units whose standby is on another host,
  the standbys this host holds for other hosts' units, probes of those peers and the takeover
  of a unit whose primary host died. Every change of those roles runs on this thread
  (`RemoteAgent.call`); its epoch loops are `unit-U` threads too.
- **hamgr-peer**: ``standby_add``, ``standby_remove``, ``spare_add`` and ``spare_remove`` from
  peer agents, one at a time (a worker of its own: two agents protecting units onto each other
  never wait on each other).

A unit's standby is this same agent (a local standby, in the same process: it covers an agent
crash and an NF's death), or, with ``[standby] host`` naming a peer, that peer's agent (a remote
standby: it covers this host's failure). Lossless mode is refused.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import faulthandler
import fcntl
import importlib.metadata
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import IO, Any

import attrs

from dpdk_vhost.client import DataPlaneClient
from hamgr import control, keys
from hamgr.agent import local, peers, unitnet
from hamgr.agent.config import AgentConfig
from hamgr.agent.dataplane import OwnedDataPlane
from hamgr.agent.events import EventBus
from hamgr.agent.local import LocalRunner
from hamgr.agent.primary import (
    Observed,
    TakeOver,
    counters,
    primary_config,
    take_over,
)
from hamgr.agent.remote import FABRIC_PORT, RemoteAgent, RoleHooks
from hamgr.agent.sdnotify import Notifier
from hamgr.agent.state import Resource, RoleRow, StateDB, UnitRow
from hamgr.metrics import AgentMetrics
from hamgr.unitspec import SpecError, UnitSpec
from shim import epoch as ep
from shim import failover as fo
from shim import netns
from shim.container import Container, RuncBackend
from shim.engine import PrimaryEngine
from shim.local_failover import FailoverHooks, FailoverRecord, ProtectedNf
from shim.replication import ReplicationClient, ReplicationServer
from shim.store import Store

__all__ = ["Agent", "AgentError"]

log = logging.getLogger(__name__)

TICK_S = 0.05
PERSIST_EVERY_S = 0.5
CONTROL_STALL_S = 5.0
# A unit's step includes its checkpoint (CRIU may take up to 30 s before it times out).
UNIT_STALL_S = 45.0
# A failover runs inside one step; its steps' deadlines add up to about 80 s at worst.
FAILOVER_STALL_S = 120.0
UNPROTECT_DRAIN_S = 5.0
STOP_DRAIN_S = 2.0
# A peer's standby_add builds a netns, unpacks the image and joins its data plane: seconds.
STANDBY_ADD_TIMEOUT_S = 60.0
STANDBY_REMOVE_TIMEOUT_S = 30.0
# A peer's spare_add only opens a store.
SPARE_ADD_TIMEOUT_S = 30.0


STACKS_FILE = "stacks.txt"
# The resource of a deposed primary's offer to be a spare, until someone takes it (`offering`).
OFFER = "spare_offer"


def stacks_on_sigusr1(path: Path) -> IO[str]:
    """From now on ``kill -USR1 <agent pid>`` appends the stack of every thread to `path`
    (written by the interpreter's fault handler, so it works while every thread is stuck):
    what a unit whose loop stopped stepping waits on. Returns the open file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    f = path.open("a")
    faulthandler.register(signal.SIGUSR1, file=f, all_threads=True)
    return f


class AgentError(Exception):
    """The agent cannot start; the message says why and how to fix it."""


def _version() -> str:
    try:
        return importlib.metadata.version("hamgr")
    except importlib.metadata.PackageNotFoundError:
        return "0"


@attrs.define
class StandbyRole:
    unit: str
    store: Store
    server: ReplicationServer
    endpoint: str

    def snapshot(self, peer: str) -> dict[str, Any]:
        committed = self.server.committed(self.unit)
        return {
            "unit": self.unit,
            "role": "standby",
            "peer": peer,
            "term": self.store.term,
            "state": "running",
            "protection": None,
            "last_committed": None if committed is None else committed.epoch,
            "committed_term": None if committed is None else committed.term,
        }


@attrs.define
class UnitRuntime:
    spec: UnitSpec
    names: unitnet.UnitNames
    nf: Container | None = None  # the running incarnation (replaced by each failover)
    standby: StandbyRole | None = None
    runner: LocalRunner | None = None

    def stop(self, drain_seconds: float) -> None:
        if self.runner is not None:
            self.runner.stop(drain_seconds=drain_seconds)
            self.runner = None
        if self.standby is not None:
            self.standby.server.stop()
            self.standby = None


def _one_container(nf: ProtectedNf) -> Container:
    """The main agent runs one container per unit (it refuses chains): its records assume it."""
    if not isinstance(nf, Container):
        raise TypeError(f"the agent records one container per unit, not {type(nf).__name__}")
    return nf


class _RoleRecorder(RoleHooks):
    """The remote roles' changes, written to ``state.db`` and published as events."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    @property
    def db(self) -> StateDB:
        assert self.agent.db is not None
        return self.agent.db

    def event(self, kind: str, fields: Mapping[str, Any]) -> None:
        self.agent.bus.publish(kind, **fields)

    def restored(self, unit: str, term: int, nf: ProtectedNf) -> None:
        # Before it gets traffic: an agent that dies from here on removes it, or adopts it.
        local.record_container(self.db, unit, _one_container(nf))

    def destroyed(self, unit: str, nf: ProtectedNf) -> None:
        self.db.remove_resource(unit, "container", _one_container(nf).name)

    def attached(self, unit: str, term: int) -> None:
        self.db.add_resource(unit, "dp_unit", unit)

    def report(self, unit: str, report: fo.Report, record: Mapping[str, Any] | None) -> None:
        db = self.db
        status = local.STATUS_NAMES[report.status]
        if report.status is fo.Status.RUNNING:
            log.warning("takeover started: %s", report.detail, extra={"unit": unit})
            return
        data = {**(record or {}), "status": status, "term": report.term, "detail": report.detail}
        db.add_failover(unit, report.term, status, data)
        if report.status is fo.Status.FINISHED:
            remote = self.agent.remote
            role = remote.primaries.get(unit) if remote is not None else None
            # This host is the unit's primary now; its standby is the one it re-protected on.
            db.set_role(unit, "primary", role.standby if role is not None else "", report.term)
            db.remove_role(unit, "standby")
            db.set_unit_state(unit, "running")
            log.info("took the unit over", extra={"unit": unit, "term": report.term})
        elif report.status is fo.Status.ERROR:
            reason = f"takeover at term {report.term} failed, the unit is down: {report.detail}"
            db.set_unit_state(unit, "error", reason)
            log.error(reason, extra={"unit": unit})
        else:
            log.warning("takeover aborted: %s", report.detail, extra={"unit": unit})

    def add_standby(self, spec: UnitSpec, standby: str, term: int, spares: Sequence[str]) -> None:
        # The spec names its standby: the new one now, and the primary's spares now (where the
        # new standby claims its next term): not the spec's, which may name one that died
        # since, or miss a deposed primary that joined; never the new standby or this host.
        spares = tuple(s for s in spares if s not in (standby, self.agent.host))
        placed = attrs.evolve(spec, standby=attrs.evolve(spec.standby, host=standby, spares=spares))
        self.agent.standby_add(placed, standby, term)

    def standby_changed(self, unit: str, standby: str, term: int) -> None:
        self.db.set_role(unit, "primary", standby, term)

    def fenced(self, unit: str, term: int | None, cause: str) -> None:
        reason = f"deposed (a higher term {term} exists): {cause}; `hamgr unprotect` it"
        self.db.set_unit_state(unit, "error", reason)
        log.error(reason, extra={"unit": unit})

    def became_spare(self, unit: str, primary: str, term: int) -> None:
        # What the deposed primary had here goes (its dead NF's records, netns, veth, data
        # plane records); the records of its standby and spares are forgotten without asking
        # them: those roles are the new primary's now. What stays is a spare's: its store.
        db = self.db
        agent = self.agent
        assert agent.dp is not None
        forget = {"remote_standby", "remote_spare"}
        for res in db.resources(unit):
            if res.kind in forget:
                db.remove_resource(unit, res.kind, res.name)
        with agent.dp.client() as dp:
            problems = unitnet.teardown(db, unit, dp=dp, backend=agent.backend)
        if problems:
            log.warning("unit %s: the deposed primary left: %s", unit, "; ".join(problems))
        root = agent.standby_root(unit)
        db.add_resource(unit, "standby", unit, {"root": str(root), "remote": True})
        db.remove_role(unit, "primary")
        db.set_role(unit, "spare", primary, term)
        db.set_unit_state(unit, "running")
        log.warning("deposed at term %d; a spare of %s now", term, primary, extra={"unit": unit})

    def offering(self, unit: str, candidates: Sequence[str], term: int) -> None:
        self.db.add_resource(unit, OFFER, unit, {"candidates": list(candidates), "term": term})

    def offer_ended(self, unit: str) -> None:
        self.db.remove_resource(unit, OFFER, unit)

    def spare_of(self, unit: str, primary: str, term: int) -> None:
        # The primary that took the offer: the one whose spare_remove drops this role.
        if self.db.role(unit, "spare") is not None:
            self.db.set_role(unit, "spare", primary, term)

    def spare_joined(self, unit: str, spare: str, term: int) -> None:
        # As `spare_add` records a spare: an unprotect here asks it to drop its role.
        self.db.add_resource(unit, "remote_spare", spare, {"term": term})


class Agent:
    def __init__(self, config: AgentConfig, *, notifier: Notifier | None = None) -> None:
        self.config = config
        self.host = config.host
        self.notifier = notifier or Notifier()
        self.started = time.monotonic()
        self.bus = EventBus()
        self.units: dict[str, UnitRuntime] = {}
        self._units_lock = threading.Lock()
        self._stop = threading.Event()
        self._teardown = False
        self._pid_lock: int | None = None
        self.db: StateDB | None = None
        self.dp: OwnedDataPlane | None = None
        self.control: control.ControlServer | None = None
        self.metrics: AgentMetrics | None = None
        self.worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="hamgr-worker")
        self.peer_worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="hamgr-peer")
        self.remote: RemoteAgent | None = None
        self.peer_caller: peers.PeerCaller | None = None
        self.backend = RuncBackend(state_dir=config.state_dir / "containers", network_lock="skip")
        self.keypair: keys.Keypair | None = None
        self.authorized = keys.AuthorizedKeys(config.state_dir / keys.AUTHORIZED_KEYS)
        self._unhealthy: str | None = None
        self._stacks: IO[str] | None = None

    # --- paths ---

    @property
    def images_root(self) -> Path:
        return self.config.runtime / "images"

    def standby_root(self, unit: str) -> Path:
        return self.config.runtime / "standby" / unit

    # --- lifecycle ---

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT or a shutdown request; returns the exit status."""
        # From the start: an adoption can hang too (a CRIU call, a data plane that stopped).
        try:
            self._stacks = stacks_on_sigusr1(self.config.log_dir / STACKS_FILE)
        except OSError as exc:
            log.warning("kill -USR1 will not write the threads' stacks: %s", exc)
        try:
            self._start()
        except AgentError as exc:
            log.error("agent cannot start: %s", exc)
            self._close(teardown=False)
            return 1
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        self.notifier.ready(self._status_line())
        self.bus.publish("agent_start", host=self.host, pid=os.getpid())
        log.info(
            "agent ready",
            extra={"host": self.host, "control": self.config.control, "units": len(self.units)},
        )
        try:
            self._supervise()
        finally:
            self.notifier.stopping()
            self._close(teardown=self._teardown)
        return 0

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        log.info("signal %s: stopping (units and the data plane keep running)", signum)
        self._stop.set()

    def request_stop(self, *, teardown: bool) -> None:
        self._teardown = teardown
        self._stop.set()

    def _lock_pid_file(self) -> None:
        path = self.config.pid_path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise AgentError(
                f"another agent (pid {other or '?'}) runs on {self.config.state_dir}; "
                "stop it first (`hamgr down`)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._pid_lock = fd

    def _start(self) -> None:
        cfg = self.config
        self._lock_pid_file()
        try:
            self.keypair = keys.load_keypair(keys.keys_dir(cfg.state_dir), keys.AGENT)
            self.authorized.load()
        except keys.KeysError as exc:
            raise AgentError(str(exc)) from None
        try:
            self.db = StateDB(cfg.db_path, host=self.host)
        except Exception as exc:
            raise AgentError(str(exc)) from None
        cfg.runtime.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.images_root.mkdir(exist_ok=True)
        self.metrics = AgentMetrics(self.snapshot)
        if cfg.metrics:
            try:
                addr = self.metrics.serve(cfg.metrics)
                log.info("metrics on http://%s/metrics", addr)
            except OSError as exc:
                raise AgentError(f"metrics: cannot listen on {cfg.metrics}: {exc}") from None
        self._start_dataplane()
        if cfg.remote is not None:
            self._start_remote()
        self._recover()
        assert self.keypair is not None
        self.control = control.ControlServer(
            cfg.control,
            secret_key=self.keypair.secret,
            authorized=self._authorized_keys,
            handler=self._handle,
            on_refused=self._on_refused,
        )
        try:
            self.control.start()
        except Exception as exc:
            raise AgentError(f"control: cannot listen on {cfg.control}: {exc}") from None
        if self.remote is not None:
            self.remote.start_loop()

    def _start_remote(self) -> None:
        """The remote roles: the data link in the data plane, the replication server for the
        standbys this host holds, the links to the peers (docs/agent.md, "Remote standby")."""
        assert self.keypair is not None
        cfg = self.config
        assert cfg.remote is not None
        if not netns.link_exists(cfg.remote.data_link):
            raise AgentError(
                f"remote.data_link: interface {cfg.remote.data_link} does not exist on {self.host}"
            )
        plan = peers.host_plan(cfg, self.keypair)
        links = peers.ControlLinks(plan.peers, self.keypair)
        self.remote = RemoteAgent(
            plan,
            dp=self.dp,
            backend=self.backend,
            links=links,
            hooks=_RoleRecorder(self),
            allowed_clients=self._authorized_keys,
        )
        try:
            self.remote.start()
        except Exception as exc:
            raise AgentError(f"remote: {type(exc).__name__}: {exc}") from None
        self.peer_caller = peers.PeerCaller(self.host, plan.peers, self.keypair)

    def _authorized_keys(self) -> frozenset[bytes]:
        return frozenset(self.authorized.load())

    def _on_refused(self, key: str, address: str) -> None:
        self.bus.publish("auth_refused", peer_key=key or None, peer_address=address or None)

    def _start_dataplane(self) -> None:
        assert self.db is not None
        row = self.db.dataplane()
        if row is not None:
            self.dp = OwnedDataPlane.adopt(row)
            if self.dp is None:
                log.warning(
                    "the data plane (pid %d) is gone; starting a new one: units it carried "
                    "lost their held output and must be protected again",
                    row.pid,
                )
        if self.dp is None:
            try:
                self.dp = OwnedDataPlane.start(
                    host=self.host,
                    work=self.config.state_dir / "dataplane",
                    cpu=self.config.dp_cpu,
                    rt_priority=self.config.dp_rt_priority,
                )
            except Exception as exc:
                raise AgentError(f"data plane: {exc}") from None
            self.db.set_dataplane(self.dp.row)

    def _close(self, *, teardown: bool) -> None:
        self.bus.expire(everyone=True)
        self.worker.shutdown(wait=True, cancel_futures=True)
        self.peer_worker.shutdown(wait=True, cancel_futures=True)
        with self._units_lock:
            runtimes = dict(self.units)
        for rt in runtimes.values():
            rt.stop(drain_seconds=UNPROTECT_DRAIN_S if teardown else STOP_DRAIN_S)
        self._persist()
        if teardown and self.db is not None:
            for name in list(runtimes) + [
                u.name for u in self.db.units() if u.name not in runtimes
            ]:
                self._teardown_unit(name, runtimes.get(name))
        if self.remote is not None:
            # Its epoch loops let in-flight epochs commit at their standbys before they stop.
            self.remote.close(drain_seconds=STOP_DRAIN_S)
        if self.dp is not None:
            if teardown:
                self.dp.stop()
                if self.db is not None:
                    self.db.set_dataplane(None)
                shutil.rmtree(self.config.runtime, ignore_errors=True)
            else:
                self.dp.close()
        if self.control is not None:
            # Let the last replies (the shutdown's) leave before the socket closes.
            time.sleep(0.05)
            self.control.stop()
        if self.metrics is not None:
            self.metrics.close()
        if self.db is not None:
            self.db.close()
        if self._stacks is not None:
            faulthandler.unregister(signal.SIGUSR1)
            self._stacks.close()
            self._stacks = None
        if self._pid_lock is not None:
            with contextlib.suppress(FileNotFoundError):
                self.config.pid_path.unlink()
            os.close(self._pid_lock)
            self._pid_lock = None
        log.info("agent stopped", extra={"teardown": teardown})

    # --- supervision ---

    def _supervise(self) -> None:
        last_persist = 0.0
        while not self._stop.wait(TICK_S):
            now = time.monotonic()
            self.bus.expire(now)
            problem = self._health(now)
            if problem is None:
                self.notifier.watchdog(now)
                if self._unhealthy is not None:
                    log.info("healthy again")
                    self._unhealthy = None
            elif problem != self._unhealthy:
                self._unhealthy = problem
                log.error("unhealthy, withholding the watchdog: %s%s", problem, self._dump_stacks())
            if now - last_persist >= PERSIST_EVERY_S:
                last_persist = now
                self._persist()
                self.notifier.status(self._status_line())

    def _dump_stacks(self) -> str:
        """Every thread's stack into the stacks file, as `kill -USR1` does: where a stuck loop
        waits. Returns a note for the log line that says where it went."""
        if self._stacks is None:
            return ""
        self._stacks.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} the agent is unhealthy\n")
        self._stacks.flush()
        faulthandler.dump_traceback(self._stacks, all_threads=True)
        return f" (every thread's stack: {self._stacks.name})"

    def _health(self, now: float) -> str | None:
        assert self.control is not None
        if not self.control.alive() or now - self.control.last_loop > CONTROL_STALL_S:
            return "the control loop is stuck"
        if self.remote is not None and not self.remote.loop_alive():
            return "the remote roles' loop died"
        with self._units_lock:
            runners: list[Any] = [rt.runner for rt in self.units.values() if rt.runner is not None]
        if self.remote is not None:
            runners += [r.runner for r in list(self.remote.primaries.values()) if r.runner]
        for runner in runners:
            if runner.failed or getattr(runner, "nf_died", False):
                # Reported as an error in status (a remote primary's dead NF is handed to its
                # standby: hamgr.agent.handoff); restarting the agent cannot fix it.
                continue
            if not runner.alive():
                return f"the epoch loop of {runner.unit} died"
            failing_over = getattr(runner, "failing_over", None)
            limit = UNIT_STALL_S if failing_over is None else FAILOVER_STALL_S
            if now - runner.last_step > limit:
                return (
                    f"the epoch loop of {runner.unit} is stuck for {now - runner.last_step:.0f} s"
                )
        return None

    def _status_line(self) -> str:
        snaps = self.snapshot()["units"]
        primaries = [u for u in snaps if u["role"] == "primary"]
        protected = sum(1 for u in primaries if u.get("protection") == "protected")
        return f"{len(primaries)} units, {protected} protected"

    def _persist(self) -> None:
        if self.db is None:
            return
        with self._units_lock:
            runtimes = list(self.units.values())
        for rt in runtimes:
            try:
                if rt.runner is not None:
                    c = counters(rt.runner.snapshot())
                    self.db.update_role(rt.spec.name, "primary", **c)
                if rt.standby is not None:
                    s = rt.standby.snapshot(self.host)
                    self.db.update_role(
                        rt.spec.name, "standby", last_committed=s["last_committed"], term=s["term"]
                    )
            except Exception:
                log.exception("persisting %s failed", rt.spec.name)
        if self.remote is None:
            return
        for entry in self.remote.snapshot():
            try:
                if entry["role"] == "primary":
                    self.db.update_role(entry["unit"], "primary", **counters(entry))
                else:
                    self.db.update_role(
                        entry["unit"],
                        "standby",
                        last_committed=entry.get("last_committed"),
                        term=entry.get("term"),
                    )
            except Exception:
                log.exception("persisting %s failed", entry["unit"])

    # --- snapshots ---

    def snapshot(self) -> dict[str, Any]:
        """Every unit role on this host, for status and metrics (never blocks on a unit)."""
        with self._units_lock:
            runtimes = dict(self.units)
        units: list[dict[str, Any]] = []
        seen = set()
        for name, rt in sorted(runtimes.items()):
            if rt.runner is not None:
                units.append(rt.runner.snapshot())
                seen.add((name, "primary"))
            if rt.standby is not None:
                units.append(rt.standby.snapshot(self.host))
                seen.add((name, "standby"))
        for remote_entry in self.remote.snapshot() if self.remote is not None else []:
            if remote_entry["role"] == "primary" and self.db is not None:
                count, last = self.db.failover_summary(remote_entry["unit"])
                remote_entry.update(failovers=count, last_failover=last)
            units.append(remote_entry)
            seen.add((remote_entry["unit"], remote_entry["role"]))
        if self.db is not None:
            rows = {u.name: u for u in self.db.units()}
            for role in self.db.roles():
                if (role.unit, role.role) in seen or role.unit not in rows:
                    continue
                row = rows[role.unit]
                entry: dict[str, Any] = {
                    "unit": role.unit,
                    "role": role.role,
                    "peer": role.peer,
                    "term": role.term,
                    "state": row.state,
                    "protection": "stalled" if role.role == "primary" else None,
                    "last_committed": role.last_committed,
                    "commits_total": role.commits_total,
                    "error": row.error,
                }
                if role.role == "primary":
                    count, last = self.db.failover_summary(role.unit)
                    entry.update(failovers=count, last_failover=last)
                units.append(entry)
        units.sort(key=lambda u: (u["unit"], u["role"]))
        c = self.control
        return {
            "host": self.host,
            "units": units,
            "control": {
                "requests": c.requests_total if c else 0,
                "refused": c.refused_total if c else 0,
                "bad": c.bad_total if c else 0,
            },
        }

    # --- control requests (on the control thread: nothing here may block) ---

    def _handle(self, request: control.Request, responder: control.Responder) -> None:
        match request:
            case control.Ping():
                responder.result(self._ping())
            case control.Status(unit=unit):
                snap = self.snapshot()
                if unit is not None:
                    snap["units"] = [u for u in snap["units"] if u["unit"] == unit]
                    if not snap["units"]:
                        responder.error("no_such_unit", f"no unit {unit} on {self.host}")
                        return
                responder.result({**self._ping(), **snap})
            case control.Events(seconds=seconds, kinds=kinds):
                self.bus.subscribe(responder, seconds, kinds)
            case control.Failover():
                self._failover(request, responder)
            case control.Protect() | control.Unprotect():
                if self._stop.is_set():
                    responder.error("busy", "the agent is stopping")
                    return
                work = self._protect if isinstance(request, control.Protect) else self._unprotect
                self.worker.submit(self._guarded, work, request, responder)
            case (
                control.StandbyAdd()
                | control.StandbyRemove()
                | control.SpareAdd()
                | control.SpareRemove()
            ):
                if self._stop.is_set():
                    responder.error("busy", "the agent is stopping")
                    return
                if self.remote is None:
                    responder.error(
                        "unsupported",
                        f"{self.host} holds no remote standbys: its agent.toml has no [remote]",
                    )
                    return
                peer_work = {
                    control.StandbyAdd: self._standby_add,
                    control.StandbyRemove: self._role_remove,
                    control.SpareAdd: self._spare_add,
                    control.SpareRemove: self._role_remove,
                }[type(request)]
                self.peer_worker.submit(self._guarded, peer_work, request, responder)
            case control.SpareJoin():
                self._spare_join(request, responder)
            case control.Shutdown(teardown=teardown):
                responder.result({"stopping": True, "teardown": teardown, "pid": os.getpid()})
                self.request_stop(teardown=teardown)
            case _:
                responder.error("unknown_type", type(request).__name__)

    def _ping(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "pid": os.getpid(),
            "version": _version(),
            "uptime_s": round(time.monotonic() - self.started, 3),
            "control": self.config.control,
            "metrics": self.metrics.address if self.metrics else None,
            "dataplane_pid": self.dp.pid if self.dp else None,
        }

    def _guarded(self, work: Any, request: Any, responder: control.Responder) -> None:
        try:
            work(request, responder)
        except Exception as exc:
            log.exception("%s failed", type(request).__name__)
            responder.error("internal", f"{type(exc).__name__}: {exc}")

    # --- protect / unprotect (worker thread) ---

    def _remote_standby(self, spec: UnitSpec) -> str | None:
        """The peer that holds `spec`'s standby, or None for a local standby."""
        return None if spec.standby.host in ("auto", self.host) else spec.standby.host

    def _refuse(self, spec: UnitSpec) -> tuple[str, str] | None:
        assert self.db is not None
        if self.db.unit(spec.name) is not None:
            return "exists", f"unit {spec.name} is already protected on {self.host}"
        if spec.chain:
            return (
                "unsupported",
                "chain: this agent protects single-NF units only for now (the remote roles' "
                "agent runs chains: docs/containers.md, Chains); remove the [[chain]] tables",
            )
        peer = self._remote_standby(spec)
        if spec.protection.lossless and peer is None:
            return (
                "unsupported",
                "protection.lossless: lossless mode logs the inputs on the standby's data plane "
                "and replays them at a takeover, so it needs a remote standby; set [standby] "
                "host to a peer, or lossless = false",
            )
        if peer is not None:
            return self._refuse_remote(spec, peer)
        if spec.standby.spares:
            return (
                "bad_spec",
                "standby.spares: spares serve a remote standby, and this unit's standby is local "
                f"({spec.standby.host!r}); set [standby] host to a peer, or remove spares",
            )
        for field, iface in [("ports.wire", w) for w in spec.ports.wire] + [
            ("ports.egress", spec.ports.egress)
        ]:
            if not netns.link_exists(iface):
                return "bad_spec", f"{field}: interface {iface} does not exist on {self.host}"
        used = {
            r.detail.get("iface"): r.unit
            for r in self.db.resources(kind="dp_port")
            if not r.detail.get("shared")
        }
        for iface in spec.ports.wire:
            if iface in used:
                return "busy", f"ports.wire: {iface} already feeds unit {used[iface]}"
        if spec.ports.egress in used:
            return (
                "busy",
                f"ports.egress: {spec.ports.egress} is a port of unit {used[spec.ports.egress]}",
            )
        return None

    def _refuse_remote(self, spec: UnitSpec, peer: str) -> tuple[str, str] | None:
        if self.remote is None:
            return (
                "unsupported",
                f"standby.host: {peer!r} is another host, and this agent has no [remote] in "
                f'{self.config.path}: it keeps local standbys only (use "auto" or '
                f'"{self.host}", or configure [remote] and [peers.{peer}])',
            )
        if peer not in self.config.peers:
            known = ", ".join(sorted(self.config.peers)) or "none"
            return (
                "bad_spec",
                f"standby.host: {peer!r} is not a peer of {self.host} (its peers: {known}); "
                f"add [peers.{peer}] to {self.config.path} and restart the agent",
            )
        for spare in spec.standby.spares:
            if spare == self.host:
                return (
                    "bad_spec",
                    f"standby.spares: {spare!r} is this host, the unit's primary; a spare is "
                    "another peer: remove it from spares",
                )
            if spare not in self.config.peers:
                known = ", ".join(sorted(self.config.peers)) or "none"
                return (
                    "bad_spec",
                    f"standby.spares: {spare!r} is not a peer of {self.host} (its peers: "
                    f"{known}); add [peers.{spare}] to {self.config.path} and restart the "
                    "agent, or remove it from spares",
                )
        if spec.protection.on_standby_loss == "run-unprotected":
            return (
                "unsupported",
                'protection.on_standby_loss: "run-unprotected" is refused with a remote '
                "standby: a primary cannot tell a dead standby from a partitioned one, and "
                'a partitioned standby takes the unit over; use "stall" (docs/failover.md)',
            )
        return None

    def _image(self, spec: UnitSpec) -> Path:
        if spec.nf.builtin:
            from hamgr.nfs import images

            return images.build_image(spec.nf.image)
        path = Path(spec.nf.image)
        if not path.exists():
            raise FileNotFoundError(f"nf.image: {path} does not exist on {self.host}")
        return path

    def _protect(self, request: control.Protect, responder: control.Responder) -> None:
        assert self.db is not None
        assert self.dp is not None
        try:
            spec = UnitSpec.from_json(request.spec, source=request.source)
        except SpecError as exc:
            responder.error("bad_spec", str(exc))
            return
        refusal = self._refuse(spec)
        if refusal is not None:
            responder.error(*refusal)
            return
        peer = self._remote_standby(spec)
        if peer is not None:
            self._protect_remote(spec, peer, responder)
            return
        unit, term = spec.name, 1
        names = unitnet.UnitNames(self.host, unit)
        started = time.monotonic()
        self.db.add_unit(unit, spec.to_json(), {"primary": self.host, "standby": self.host}, term)
        rt = UnitRuntime(spec, names)
        step = "build the image"
        dp: DataPlaneClient | None = None
        try:
            image = self._image(spec)
            dp = self.dp.client()
            step = "build the network"
            unitnet.build_network(self.db, dp, spec, names, term=term)
            step = "start the standby"
            rt.standby = self._start_standby(unit)
            step = "start the NF"
            self.db.add_resource(unit, "images", unit, {"root": str(self.images_root / unit)})
            rt.nf = unitnet.start_nf(self.db, self.backend, spec, names, image)
            step = "start the epoch engine"
            engine_dp = self.dp.client()
            try:
                first_epoch = engine_dp.stats(unit).units[unit].epoch
                # Nothing was closed yet: every packet the NF sent is in the open epoch.
                engine = self._new_engine(
                    rt,
                    engine_dp,
                    self._shipper(rt),
                    term=term,
                    first_epoch=first_epoch,
                    closed_total=0,
                )
            except BaseException:
                engine_dp.close()
                raise
            rt.runner = self._run_local(rt, engine, engine_dp, commits_base=0)
            self.db.set_unit_state(unit, "running")
        except Exception as exc:
            log.exception("protect %s failed at: %s", unit, step, extra={"unit": unit})
            rt.stop(drain_seconds=0)
            problems = unitnet.teardown(self.db, unit, dp=dp, backend=self.backend, nf=rt.nf)
            if problems:
                self.db.set_unit_state(unit, "error", "rollback left: " + "; ".join(problems))
            else:
                self.db.remove_unit(unit)
            if dp is not None:
                dp.close()
            responder.error("failed", f"protect {unit}: could not {step}: {exc}")
            return
        dp.close()
        with self._units_lock:
            self.units[unit] = rt
        assert rt.nf is not None
        seconds = round(time.monotonic() - started, 3)
        self.bus.publish("protect", unit=unit, term=term, nf_pid=rt.nf.pid, seconds=seconds)
        log.info("unit protected", extra={"unit": unit, "nf_pid": rt.nf.pid, "seconds": seconds})
        responder.result(
            {
                "unit": unit,
                "role": "primary",
                "standby": self.host,
                "term": term,
                "nf_pid": rt.nf.pid,
                "protection": "protected",
                "seconds": seconds,
            }
        )

    # --- remote standbys (worker threads; the roles themselves run on hamgr-remote) ---

    def _protect_remote(self, spec: UnitSpec, peer: str, responder: control.Responder) -> None:
        """Protect `spec` here with its standby on `peer` (docs/agent.md, "Remote standby").

        The standby comes first: `peer` prepares the unit's netns, image and store and starts
        watching this host, so that the first ship finds it. Then this host builds the NF's
        network (its wire and egress are the data link), starts the NF and its epoch engine.
        A step that fails undoes everything, here and at `peer`.
        """
        assert self.db is not None
        assert self.dp is not None
        assert self.remote is not None
        assert self.peer_caller is not None
        unit, term = spec.name, 1
        names = unitnet.UnitNames(self.host, unit)
        started = time.monotonic()
        self.db.add_unit(unit, spec.to_json(), {"primary": peer}, term)
        step = f"set up its standby on {peer}"
        dp: DataPlaneClient | None = None
        nf: Container | None = None
        try:
            self.standby_add(spec, peer, term)
            for spare in spec.standby.spares:
                step = f"set up its spare on {spare}"
                self.spare_add(spec, spare, term)
            step = "build the image"
            image = self._image(spec)
            dp = self.dp.client()
            step = "build the network"
            unitnet.build_remote_network(self.db, dp, spec, names, data_port=FABRIC_PORT, term=term)
            step = "start the NF"
            self.db.add_resource(unit, "images", unit, {"root": str(self.images_root / unit)})
            nf = unitnet.start_nf(self.db, self.backend, spec, names, image)
            step = f"start the epoch engine (its first hello to {peer})"
            started_nf = nf
            spares = spec.standby.spares
            self.remote.call(
                lambda: self._remote().add_primary(spec, started_nf, peer, term=term, spares=spares)
            )
            self.db.set_unit_state(unit, "running")
        except Exception as exc:
            log.exception("protect %s failed at: %s", unit, step, extra={"unit": unit})
            problems = self._teardown_unit(unit, None, nf=nf)
            if problems:
                log.error("rollback of %s left: %s", unit, "; ".join(problems))
            if dp is not None:
                dp.close()
            left = f"; the rollback left: {'; '.join(problems)}" if problems else ""
            responder.error("failed", f"protect {unit}: could not {step}: {exc}{left}")
            return
        if dp is not None:
            dp.close()
        assert nf is not None
        seconds = round(time.monotonic() - started, 3)
        self.bus.publish(
            "protect",
            unit=unit,
            term=term,
            nf_pid=nf.pid,
            standby=peer,
            spares=list(spec.standby.spares),
            seconds=seconds,
        )
        log.info(
            "unit protected",
            extra={"unit": unit, "nf_pid": nf.pid, "standby": peer, "seconds": seconds},
        )
        responder.result(
            {
                "unit": unit,
                "role": "primary",
                "standby": peer,
                "spares": list(spec.standby.spares),
                "term": term,
                "nf_pid": nf.pid,
                "protection": "protected",
                "seconds": seconds,
            }
        )

    def standby_add(self, spec: UnitSpec, peer: str, term: int) -> None:
        """Ask `peer` to hold `spec`'s standby at `term` (its `standby_add`, with the spec's
        spares), recorded as the unit's `remote_standby` resource; RuntimeError naming the
        peer's answer if it refused. A request it may have carried out without answering is
        recorded too: an unprotect then asks it to drop whatever it made. A spare that became
        the standby is one no more."""
        unit = spec.name
        self._ask_peer(
            unit,
            peer,
            "remote_standby",
            term,
            lambda c: c.standby_add(
                spec.to_json(),
                primary=self.host,
                term=term,
                spares=spec.standby.spares,
                source=f"{self.host}:{unit}",
                timeout=STANDBY_ADD_TIMEOUT_S,
            ),
            timeout=STANDBY_ADD_TIMEOUT_S,
        )
        assert self.db is not None
        self.db.remove_resource(unit, "remote_spare", peer)

    def spare_add(self, spec: UnitSpec, peer: str, term: int) -> None:
        """Ask `peer` to be a spare of `spec` (its `spare_add`), recorded as the unit's
        `remote_spare` resource, as `standby_add` records a standby."""
        unit = spec.name
        self._ask_peer(
            unit,
            peer,
            "remote_spare",
            term,
            lambda c: c.spare_add(
                spec.to_json(),
                primary=self.host,
                term=term,
                source=f"{self.host}:{unit}",
                timeout=SPARE_ADD_TIMEOUT_S,
            ),
            timeout=SPARE_ADD_TIMEOUT_S,
        )

    def _ask_peer(
        self, unit: str, peer: str, kind: str, term: int, fn: Any, *, timeout: float
    ) -> None:
        assert self.db is not None
        assert self.peer_caller is not None
        try:
            self.peer_caller.call(peer, fn, timeout=timeout)
        except peers.PeerError as exc:
            if exc.sent and exc.code in (None, "timeout"):
                self.db.add_resource(unit, kind, peer, {"term": term})
            raise RuntimeError(exc.message) from None
        self.db.add_resource(unit, kind, peer, {"term": term})

    def _remote(self) -> RemoteAgent:
        assert self.remote is not None
        return self.remote

    def _peer_key_of(self, host: str) -> str | None:
        peer = self.config.peers.get(host)
        return None if peer is None else peer.public_key

    def _sent_by(self, primary: str, responder: control.Responder) -> bool:
        """Whether the request came with `primary`'s configured key; if not, refuse it."""
        if responder.peer_key == self._peer_key_of(primary):
            return True
        responder.error(
            "unsupported",
            f"this request came with key {responder.peer_key}, which is not {primary}'s "
            f"public_key in {self.host}'s [peers.{primary}]",
        )
        return False

    def _peer_spec(
        self, request: control.StandbyAdd | control.SpareAdd, responder: control.Responder
    ) -> UnitSpec | None:
        """The spec of a peer's request, once the peer and its key are checked; None once
        refused."""
        primary = request.primary
        if primary not in self.config.peers:
            responder.error(
                "unsupported",
                f"{primary} is not a peer of {self.host}: add [peers.{primary}] to "
                f"{self.host}'s {self.config.path} and restart its agent",
            )
            return None
        if not self._sent_by(primary, responder):
            return None
        try:
            return UnitSpec.from_json(request.spec, source=request.source)
        except SpecError as exc:
            responder.error("bad_spec", str(exc))
            return None

    def _standby_add(self, request: control.StandbyAdd, responder: control.Responder) -> None:
        """A peer's request: hold the standby of its unit (peer_worker thread).

        A spare of the unit becomes its standby (a re-protection chose it): the store it holds
        stays, the rest is made; a failure removes only what was made and leaves the spare."""
        assert self.db is not None
        assert self.dp is not None
        remote = self._remote()
        primary = request.primary
        spec = self._peer_spec(request, responder)
        if spec is None:
            return
        unit = spec.name
        if spec.standby.host != self.host:
            responder.error(
                "bad_spec",
                f"standby.host: {spec.standby.host!r} names another host than {self.host}",
            )
            return
        unknown = [s for s in request.spares if s not in self.config.peers]
        if unknown:
            responder.error("unsupported", f"spares {unknown} are not peers of {self.host}")
            return
        spare = self.db.role(unit, "spare")
        if self.db.unit(unit) is not None and (spare is None or len(self.db.roles(unit)) > 1):
            responder.error("exists", f"unit {unit} already has a role on {self.host}")
            return
        names = unitnet.UnitNames(self.host, unit)
        started = time.monotonic()
        kept: set[tuple[str, str]] = set()
        if spare is None:
            self.db.add_unit(unit, spec.to_json(), {"standby": primary}, request.term)
        else:
            kept = {(r.kind, r.name) for r in self.db.resources(unit)}
        step = "prepare the NF's network"
        dp: DataPlaneClient | None = None
        try:
            dp = self.dp.client()
            unitnet.build_remote_network(self.db, dp, spec, names, data_port=FABRIC_PORT, term=None)
            step = "prepare the image and the store"
            if spare is None:
                root = self.standby_root(unit)
                self.db.add_resource(unit, "standby", unit, {"root": str(root), "remote": True})
            remote.prepare_standby(spec)
            step = f"watch {primary}"
            spares = list(request.spares)
            remote.call(lambda: remote.add_standby(spec, primary, request.term, spares))
            if spare is not None:
                self.db.set_spec(unit, spec.to_json())
                self.db.set_role(unit, "standby", primary, request.term)
                self.db.remove_role(unit, "spare")
            self.db.set_unit_state(unit, "running")
        except Exception as exc:
            log.exception("standby_add %s failed at: %s", unit, step, extra={"unit": unit})
            if spare is None:
                problems = self._teardown_unit(unit, None)
            else:
                problems = unitnet.teardown(
                    self.db,
                    unit,
                    dp=dp,
                    backend=self.backend,
                    keep=lambda r: (r.kind, r.name) in kept,
                )
            if dp is not None:
                dp.close()
            left = f"; the rollback left: {'; '.join(problems)}" if problems else ""
            responder.error(
                "failed", f"standby of {unit} on {self.host}: could not {step}: {exc}{left}"
            )
            return
        dp.close()
        seconds = round(time.monotonic() - started, 3)
        self.bus.publish("standby_add", unit=unit, primary=primary, term=request.term)
        log.info("standby set up", extra={"unit": unit, "primary": primary, "seconds": seconds})
        responder.result(
            {
                "unit": unit,
                "role": "standby",
                "primary": primary,
                "term": request.term,
                "replication": self.config.remote.replication if self.config.remote else "",
                "seconds": seconds,
            }
        )

    def _spare_join(self, request: control.SpareJoin, responder: control.Responder) -> None:
        """A deposed primary offers itself as a spare of a unit this host took over (control
        thread: it only reads the roles and queues the change for the remote roles' loop)."""
        if self.remote is None:
            responder.error(
                "unsupported", f"{self.host} holds no remote roles: its agent.toml has no [remote]"
            )
            return
        if request.host not in self.config.peers:
            responder.error("unsupported", f"{request.host} is not a peer of {self.host}")
            return
        if not self._sent_by(request.host, responder):
            return
        answer = self.remote.spare_join(request.unit, request.host, request.term)
        if "error" in answer:
            responder.error(str(answer.get("code", "failed")), str(answer["error"]))
            return
        responder.result({"unit": request.unit, **answer})

    def _spare_add(self, request: control.SpareAdd, responder: control.Responder) -> None:
        """A peer's request: be a spare of its unit, a store only (peer_worker thread)."""
        assert self.db is not None
        remote = self._remote()
        primary = request.primary
        spec = self._peer_spec(request, responder)
        if spec is None:
            return
        unit = spec.name
        if self.host not in spec.standby.spares:
            responder.error(
                "bad_spec",
                f"standby.spares: {list(spec.standby.spares)} does not name {self.host}",
            )
            return
        if self.db.unit(unit) is not None:
            responder.error("exists", f"unit {unit} already has a role on {self.host}")
            return
        self.db.add_unit(unit, spec.to_json(), {"spare": primary}, request.term)
        try:
            root = self.standby_root(unit)
            self.db.add_resource(unit, "standby", unit, {"root": str(root), "remote": True})
            remote.call(lambda: remote.add_spare(spec, primary, request.term))
            self.db.set_unit_state(unit, "running")
        except Exception as exc:
            log.exception("spare_add %s failed", unit, extra={"unit": unit})
            problems = self._teardown_unit(unit, None)
            left = f"; the rollback left: {'; '.join(problems)}" if problems else ""
            responder.error("failed", f"spare of {unit} on {self.host}: {exc}{left}")
            return
        self.bus.publish("spare_add", unit=unit, primary=primary, term=request.term)
        log.info("spare set up", extra={"unit": unit, "primary": primary})
        responder.result({"unit": unit, "role": "spare", "primary": primary, "term": request.term})

    def _role_remove(
        self, request: control.StandbyRemove | control.SpareRemove, responder: control.Responder
    ) -> None:
        """A peer's request: drop the standby or spare of its unit (peer_worker thread).

        Only the role that `primary` set up, asked with `primary`'s key: a unit this host
        took over (it is the primary now) or holds for another host is left alone, and the
        answer says so with ``removed: false``."""
        assert self.db is not None
        unit, primary = request.unit, request.primary
        kind = "standby" if isinstance(request, control.StandbyRemove) else "spare"
        if not self._sent_by(primary, responder):
            return
        row = self.db.unit(unit)
        held = self.db.role(unit, kind)
        if row is None or held is None or held.peer != primary:
            own = self.db.role(unit, "primary")
            other = [r for r in self.db.roles(unit) if r.role != "primary"]
            if own is not None:
                why = f"{self.host} is the primary of {unit} at term {own.term} now"
            elif row is None or not other:
                why = f"{self.host} holds no role of {unit}"
            else:
                why = f"{self.host} is {unit}'s {other[0].role} for {other[0].peer}"
            responder.result({"unit": unit, "removed": False, "detail": why})
            return
        problems = self._teardown_unit(unit, None)
        if problems:
            responder.error("failed", f"dropping the {kind} of {unit} left: " + "; ".join(problems))
            return
        self.bus.publish(f"{kind}_remove", unit=unit, primary=primary)
        log.info("%s dropped", kind, extra={"unit": unit, "primary": primary})
        responder.result({"unit": unit, "removed": True, "detail": ""})

    def _drop_remote(self, unit: str, kind: str) -> Any:
        """The teardown of a `remote_standby` or `remote_spare` resource: the peer drops what
        it holds."""

        def drop(res: Resource) -> None:
            assert self.peer_caller is not None

            def remove(c: control.ControlClient) -> Any:
                ask = c.standby_remove if kind == "standby" else c.spare_remove
                return ask(unit, primary=self.host, timeout=STANDBY_REMOVE_TIMEOUT_S)

            try:
                reply = self.peer_caller.call(res.name, remove, timeout=STANDBY_REMOVE_TIMEOUT_S)
            except peers.PeerError as exc:
                raise RuntimeError(
                    f"the {kind} on {res.name} could not be dropped: {exc.message}; "
                    f"`hamgr unprotect {unit}` tries again"
                ) from None
            if not reply.get("removed"):
                log.info("%s of %s on %s: %s", kind, unit, res.name, reply.get("detail"))

        return drop

    def _start_standby(self, unit: str) -> StandbyRole:
        assert self.db is not None
        assert self.keypair is not None
        root = self.standby_root(unit)
        root.mkdir(parents=True, exist_ok=True)
        self.db.add_resource(unit, "standby", unit, {"root": str(root)})
        store = Store(root)
        server = ReplicationServer(
            f"ipc://{self.config.runtime}/repl-{unit}.sock",
            {unit: store},
            secret_key=self.keypair.secret,
            allowed_clients=self._authorized_keys(),
        )
        endpoint = server.start()
        return StandbyRole(unit, store, server, endpoint)

    def _observed(self) -> Observed:
        def on_commit(unit: str, epoch: int, commit_ms: float) -> None:
            self.bus.publish("commit", unit=unit, epoch=epoch, commit_ms=round(commit_ms, 3))

        def on_alarm(unit: str, reason: str) -> None:
            log.warning("alarm: %s", reason, extra={"unit": unit})
            self.bus.publish("alarm", unit=unit, reason=reason)

        def on_pause(unit: str, seconds: float) -> None:
            if self.metrics is not None:
                self.metrics.pause.labels(unit).observe(seconds)

        return Observed(on_commit, on_alarm, on_pause)

    def _shipper(self, rt: UnitRuntime) -> ReplicationClient:
        assert self.keypair is not None
        assert rt.standby is not None
        kp = self.keypair
        return ReplicationClient(
            rt.standby.endpoint, server_key=kp.public, keypair=(kp.public, kp.secret)
        )

    def _new_engine(
        self,
        rt: UnitRuntime,
        dp: DataPlaneClient,
        shipper: ReplicationClient,
        *,
        term: int,
        first_epoch: int,
        closed_total: int,
        nf: Container | None = None,
        prompt_first_cut: bool = False,
    ) -> PrimaryEngine:
        nf = nf or rt.nf
        assert nf is not None
        unit = rt.spec.name
        machine = ep.PrimaryMachine(
            unit,
            term,
            primary_config(rt.spec),
            first_epoch=first_epoch,
            now_us=time.monotonic_ns() // 1000,
            prompt_first_cut=prompt_first_cut,
        )
        return PrimaryEngine(
            unit,
            machine,
            dp,
            nf,
            shipper,
            image_root=self.images_root,
            nf_rx_base=closed_total,
        )

    def _take_over(
        self, rt: UnitRuntime, dp: DataPlaneClient, term: int, nf: Container | None = None
    ) -> tuple[PrimaryEngine, TakeOver]:
        """A fresh engine for a unit whose data plane already ran epochs (primary.take_over)."""
        nf = nf or rt.nf
        assert nf is not None
        assert rt.standby is not None
        unit = rt.spec.name
        shipper = self._shipper(rt)
        try:
            committed = rt.standby.server.committed(unit)
            handover = take_over(
                dp,
                nf,
                shipper,
                unit=unit,
                term=term,
                committed=committed.epoch if committed and committed.term == term else None,
                image_dir=lambda e: self.images_root / unit / f"epoch-{e:08d}",
            )
            # A cut that was cut short leaves a hidden partial image.
            for partial in (self.images_root / unit).glob(".epoch-*"):
                shutil.rmtree(partial, ignore_errors=True)
            engine = self._new_engine(
                rt,
                dp,
                shipper,
                term=term,
                first_epoch=handover.first_epoch,
                closed_total=handover.closed_total,
                nf=nf,
            )
        except BaseException:
            shipper.close()
            raise
        return engine, handover

    def _engine_of_dead(
        self, rt: UnitRuntime, dp: DataPlaneClient, term: int, died: str
    ) -> tuple[PrimaryEngine, tuple[Path, int]]:
        """For a unit whose NF died while the agent was down: an engine that never steps (the
        failover replaces it), and the image its local standby committed last."""
        assert rt.standby is not None
        unit = rt.spec.name
        committed = rt.standby.server.committed(unit)
        if committed is None or committed.term != term:
            raise RuntimeError(
                f"{died} while the agent was down, and its standby holds no commit at term "
                f"{term}: nothing to restore; `hamgr unprotect` it and protect it again"
            )
        image = self.images_root / unit / f"epoch-{committed.epoch:08d}"
        if not image.is_dir():
            raise RuntimeError(
                f"{died} while the agent was down, and its committed image {image} is gone: "
                "nothing to restore; `hamgr unprotect` it and protect it again"
            )
        stats = dp.stats(unit).units[unit]
        shipper = self._shipper(rt)
        try:
            engine = self._new_engine(
                rt,
                dp,
                shipper,
                term=term,
                first_epoch=int(stats.epoch),
                closed_total=int(stats.nf_rx),
            )
        except BaseException:
            shipper.close()
            raise
        return engine, (image, committed.epoch)

    def _run_local(
        self,
        rt: UnitRuntime,
        engine: PrimaryEngine,
        dp: DataPlaneClient,
        *,
        commits_base: int,
        committed: tuple[Path, int] | None = None,
    ) -> LocalRunner:
        """The unit's loop: its engine, stepped through local failover (hamgr.agent.local)."""
        assert self.db is not None
        assert rt.nf is not None
        unit = rt.spec.name

        def protect(term: int, first_epoch: int, nf: Container, nf_rx_base: int) -> PrimaryEngine:
            # A fresh link that announces the term first: the standby then refuses late
            # transfers of the replaced incarnation (I3).
            shipper = self._shipper(rt)
            try:
                shipper.hello(unit, term, timeout=2.0)
                nf.prepare_checkpoint()
                # The restored copy's output is held until a commit covers it: its first cut
                # comes as soon as it has output, not an epoch later.
                return self._new_engine(
                    rt,
                    dp,
                    shipper,
                    term=term,
                    first_epoch=first_epoch,
                    closed_total=nf_rx_base,
                    nf=nf,
                    prompt_first_cut=True,
                )
            except BaseException:
                shipper.close()
                raise

        count, last = self.db.failover_summary(unit)
        runner = LocalRunner(
            unit,
            dp=dp,
            backend=self.backend,
            nf=rt.nf,
            engine=engine,
            protect=protect,
            term_store=local.DbTermStore(self.db, unit),
            rebuild=lambda client, nf, term: self._take_over(rt, client, term, nf)[0],
            observed=self._observed(),
            hooks=self._failover_hooks(rt),
            standby=self.host,
            commits_base=commits_base,
            failovers=count,
            last_failover=dict(last) if last is not None else None,
            committed=committed,
        )
        runner.start()
        return runner

    def _failover_hooks(self, rt: UnitRuntime) -> FailoverHooks[Container]:
        """What a unit's failover changes in the agent's records (on the unit's thread)."""
        assert self.db is not None
        db = self.db
        unit = rt.spec.name

        def restored(term: int, nf: Container) -> None:
            # Before it gets traffic: an agent that dies from here on removes it, or adopts it.
            local.record_container(db, unit, nf)

        def destroyed(nf: Container) -> None:
            db.remove_resource(unit, "container", nf.name)

        def protected(term: int, nf: Container, engine: PrimaryEngine) -> None:
            rt.nf = nf

        def report(rep: fo.Report, rec: FailoverRecord | None) -> None:
            status = local.STATUS_NAMES[rep.status]
            data = {} if rec is None else rec.to_json()
            data.update(status=status, term=rep.term, detail=rep.detail)
            self.bus.publish("failover", unit=unit, **data)
            if rep.status is fo.Status.RUNNING:
                log.warning("failover started: %s", rep.detail, extra={"unit": unit})
                return
            db.add_failover(unit, rep.term, status, data)
            if rep.status is fo.Status.FINISHED:
                db.set_unit_state(unit, "running")
                if self.metrics is not None and rec is not None and rec.outage_us is not None:
                    self.metrics.failover.labels(unit).observe(rec.outage_us / 1e6)
                log.info(
                    "failover finished",
                    extra={"unit": unit, "term": rep.term, "nf_pid": data.get("new_pid")},
                )
            elif rep.status is fo.Status.ERROR:
                reason = f"failover to term {rep.term} failed, the unit is down: {rep.detail}"
                db.set_unit_state(unit, "error", reason)
                self.bus.publish("error", unit=unit, reason=reason)
                log.error(reason, extra={"unit": unit})
            else:
                log.warning("failover aborted: %s", rep.detail, extra={"unit": unit})

        return FailoverHooks(
            report=report, restored=restored, destroyed=destroyed, protected=protected
        )

    def _failover(self, request: control.Failover, responder: control.Responder) -> None:
        """An operator's failover (control thread: hands it to the unit's own thread)."""
        assert self.db is not None
        unit = request.unit
        if self._stop.is_set():
            responder.error("busy", "the agent is stopping")
            return
        if request.lossless:
            responder.error(
                "unsupported",
                "failover.lossless: an unplanned failover without input loss needs the inputs "
                "since the last commit replayed (lossless mode, I7), which this agent does not "
                "do yet; a planned switchover (the default) already loses no input",
            )
            return
        with self._units_lock:
            rt = self.units.get(unit)
        runner = rt.runner if rt is not None else None
        if runner is None and self.remote is not None and self.remote.holds(unit):
            if not request.planned and unit in self.remote.drivers:
                # This host is the unit's standby: an unplanned takeover, as when its primary
                # dies (the primary itself asks for it when its NF dies: hamgr.agent.handoff).
                reply = self.remote.request_failover(
                    unit, request.term, request.reason or "operator"
                )
                if "error" in reply:
                    responder.error(str(reply.get("code", "failed")), str(reply["error"]))
                else:
                    responder.result(reply)
                return
            responder.error(
                "unsupported",
                f"unit {unit} has a remote role here: its standby takes it over when its "
                "primary's host fails, or at an unplanned request (`hamgr failover --now`) on "
                "the standby's host; a planned switchover of a remote unit is not implemented "
                "yet",
            )
            return
        if runner is None:
            row = self.db.unit(unit)
            if row is None:
                responder.error("no_such_unit", f"no unit {unit} on {self.host}")
            else:
                responder.error(
                    "failed",
                    f"unit {unit} is {row.state} ({row.error or 'no reason recorded'}) and has "
                    "no running copy to fail over; `hamgr unprotect` it",
                )
            return
        if runner.failed or not runner.alive():
            responder.error(
                "failed",
                f"unit {unit}: its loop stopped ({runner.error}); `hamgr unprotect` it",
            )
            return
        running = runner.failing_over
        if running is not None or runner.pending:
            what = f"to term {running} is already running" if running else "is already requested"
            responder.error(
                "busy",
                f"a failover of {unit} {what}; the unit fails over once at a time, so this "
                "request is ignored",
            )
            return
        kind = "planned switchover" if request.planned else "failover"
        reason = request.reason or f"operator's {kind} ({responder.peer_key or 'local'})"
        # The term the request is about is fixed now: a request that waits behind another one
        # (or a retry) then names a replaced incarnation, and the machine ignores it.
        term = request.term if request.term is not None else runner.term
        runner.request_failover(
            local.FailoverRequest(reason, request.planned, term, responder.result, responder.error)
        )

    def _unprotect(self, request: control.Unprotect, responder: control.Responder) -> None:
        assert self.db is not None
        unit = request.unit
        if self.db.unit(unit) is None:
            responder.error("no_such_unit", f"no unit {unit} on {self.host}")
            return
        with self._units_lock:
            rt = self.units.pop(unit, None)
        problems = self._teardown_unit(unit, rt)
        if problems:
            responder.error("failed", f"unprotect {unit} left: " + "; ".join(problems))
            return
        self.bus.publish("unprotect", unit=unit)
        log.info("unit unprotected", extra={"unit": unit})
        responder.result({"unit": unit, "removed": True})

    def _teardown_unit(
        self, unit: str, rt: UnitRuntime | None, *, nf: Container | None = None
    ) -> list[str]:
        assert self.db is not None
        assert self.dp is not None
        handles: list[Container] = [] if nf is None else [nf]
        # The peers this unit's remote roles probe: forgotten once it is all gone.
        probed = {r.peer for r in self.db.roles(unit) if r.peer and r.peer != self.host}
        if self.remote is not None and self.remote.holds(unit):
            remote = self.remote
            try:
                detached = remote.call(lambda: remote.remove(unit))
            except RuntimeError as exc:
                return [str(exc)]  # a takeover runs: nothing was touched
            if detached.runner is not None:
                # With release at the standby, what commits there meanwhile still goes out.
                detached.runner.stop(drain_seconds=UNPROTECT_DRAIN_S)
            handles += [_one_container(h) for h in detached.nfs]
            probed.update(detached.peers)
        self.db.set_unit_state(unit, "stopping")
        if rt is not None:
            runner = rt.runner
            rt.stop(drain_seconds=UNPROTECT_DRAIN_S)
            # After the stop: a failover that was running has finished, its reaping too.
            if runner is not None:
                handles = runner.handles()
            elif rt.nf is not None:
                handles = [rt.nf]
        # A unit that failed over has several containers recorded (the restored one, and a
        # replaced one whose reaping had not finished): each goes with its own handle.
        problems = local.destroy_containers(self.db, self.backend, unit, handles)
        dp: DataPlaneClient | None = None
        with contextlib.suppress(Exception):
            dp = self.dp.client()
        try:
            problems += unitnet.teardown(
                self.db,
                unit,
                dp=dp,
                backend=self.backend,
                others={
                    "remote_standby": self._drop_remote(unit, "standby"),
                    "remote_spare": self._drop_remote(unit, "spare"),
                    OFFER: lambda _res: None,  # a record only: the offer ends with the role
                },
            )
        finally:
            if dp is not None:
                dp.close()
        if problems:
            self.db.set_unit_state(unit, "error", "teardown left: " + "; ".join(problems))
            return problems
        if self.remote is not None and probed:
            remote = self.remote
            remote.call(lambda: remote.forget_probes(tuple(sorted(probed))))
        self.db.remove_unit(unit)
        if self.metrics is not None:
            self.metrics.forget(unit)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{self.config.runtime}/repl-{unit}.sock")
        return []

    # --- restart: find every unit again ---

    def _recover(self) -> None:
        assert self.db is not None
        for row in self.db.units():
            if row.state in ("starting", "stopping"):
                log.warning(
                    "unit %s was %s when the agent stopped; undoing it", row.name, row.state
                )
                problems = self._teardown_unit(row.name, None)
                self.bus.publish("rollback", unit=row.name, problems=problems)
                continue
            try:
                if self._is_remote(row.name):
                    self._adopt_remote(row)
                    continue
                rt = self._adopt(row)
            except Exception as exc:
                msg = f"{type(exc).__name__}: {exc}"
                log.error(
                    "unit %s could not be adopted: %s", row.name, msg, extra={"unit": row.name}
                )
                before = f" (it was in error before: {row.error})" if row.error else ""
                self.db.set_unit_state(row.name, "error", f"adoption failed: {msg}{before}")
                self.bus.publish("error", unit=row.name, reason=msg)
                continue
            with self._units_lock:
                self.units[row.name] = rt

    def _is_remote(self, unit: str) -> bool:
        """A unit whose other role is on another host (or that has none: taken over here)."""
        assert self.db is not None
        return any(r.peer != self.host for r in self.db.roles(unit))

    def _adopt_remote(self, row: UnitRow) -> None:
        """Find a remote role again after a restart (docs/agent.md, "Remote standby").

        A primary's NF is adopted as it runs, and its engine taken over with a recovery cut
        shipped in full to its standby; a unit this host took over and runs without a standby
        needs no engine; a standby reopens its store and watches its primary again.
        """
        assert self.db is not None
        if self.remote is None:
            raise RuntimeError(
                f"it has a remote role, and {self.config.path} has no [remote] any more"
            )
        remote = self.remote
        spec = UnitSpec.from_json(row.spec, source=f"state.db unit {row.name}")
        unit = spec.name
        primary: RoleRow | None = self.db.role(unit, "primary")
        standby: RoleRow | None = self.db.role(unit, "standby")
        spare: RoleRow | None = self.db.role(unit, "spare")
        # The spec's spares, and the ones that joined since (a deposed primary's spare_join,
        # recorded as a remote_spare like the spec's).
        recorded = [r.name for r in self.db.resources(unit, "remote_spare")]
        spares = tuple(
            s for s in dict.fromkeys([*spec.standby.spares, *recorded]) if s in self.config.peers
        )
        if primary is not None:
            newest = local.newest_container(self.db, unit)
            if newest is None:
                raise RuntimeError("no container was recorded for it")
            for stale in local.stale_containers(self.db, unit):
                log.info("unit %s: removing replaced container %s", unit, stale.name)
                unitnet.destroy_container(self.backend, stale, None)
                self.db.remove_resource(unit, "container", stale.name)
            try:
                nf = unitnet.adopt_container(self.backend, newest)
            except unitnet.AdoptError as exc:
                if not (exc.dead and primary.peer):
                    raise
                # The NF died while no agent watched it: its standby takes the unit over, as
                # when the pidfd reports a death (docs/failover.md, "NF death with a remote
                # standby"); how that ends replaces this state.
                dead = unitnet.dead_container(self.backend, newest)
                why = f"{exc} while the agent was down; {primary.peer} was asked to take it over"
                self.db.set_unit_state(unit, "error", why)
                remote.add_dead_primary(
                    spec, dead, primary.peer, term=primary.term, spares=spares, cause=str(exc)
                )
                self.bus.publish(
                    "adopt", unit=unit, role="primary", peer=primary.peer, term=primary.term
                )
                log.warning("unit %s: %s", unit, why, extra={"unit": unit})
                return
            if primary.peer:
                remote.add_primary(
                    spec, nf, primary.peer, term=primary.term, first=False, spares=spares
                )
            else:
                remote.add_unprotected(spec, nf, primary.term)
            term, peer, role = primary.term, primary.peer, "primary"
        elif standby is not None:
            if self.db.resources(unit, "container"):
                raise RuntimeError(
                    f"a takeover of {unit} was under way when the agent stopped (a restored "
                    "NF is recorded): the unit is down; `hamgr unprotect` it"
                )
            remote.prepare_standby(spec)
            remote.add_standby(spec, standby.peer, standby.term, list(spares))
            term, peer, role = standby.term, standby.peer, "standby"
        elif spare is not None:
            # A deposed primary whose offer to be a spare was not taken yet offers again.
            offer = self.db.resources(unit, OFFER)
            remote.add_spare(
                spec,
                spare.peer,
                spare.term,
                offer=offer[0].detail["candidates"] if offer else (),
            )
            term, peer, role = spare.term, spare.peer, "spare"
        else:
            raise RuntimeError("no role was recorded for it")
        self.db.set_unit_state(unit, "running")
        self.bus.publish("adopt", unit=unit, role=role, peer=peer, term=term)
        log.info("unit adopted", extra={"unit": unit, "role": role, "peer": peer, "term": term})

    def _adopt(self, row: UnitRow) -> UnitRuntime:
        """Take over a unit a previous agent protected, without restarting anything of it."""
        assert self.db is not None
        assert self.dp is not None
        spec = UnitSpec.from_json(row.spec, source=f"state.db unit {row.name}")
        unit = spec.name
        rt = UnitRuntime(spec, unitnet.UnitNames(self.host, unit))
        newest = local.newest_container(self.db, unit)
        if newest is None:
            raise RuntimeError("no container was recorded for it")
        role = self.db.role(unit, "primary")
        if role is None:
            raise RuntimeError("no primary role was recorded for it")
        # Replaced incarnations whose reaping the dead agent did not finish.
        for stale in local.stale_containers(self.db, unit):
            log.info("unit %s: removing replaced container %s", unit, stale.name)
            unitnet.destroy_container(self.backend, stale, None)
            self.db.remove_resource(unit, "container", stale.name)
        died: str | None = None
        try:
            rt.nf = unitnet.adopt_container(self.backend, newest)
        except unitnet.AdoptError as exc:
            if not exc.dead:
                raise
            # The NF died while no agent watched it: restored from the last committed image
            # by the unit's failover driver, at its first step (docs/failover.md).
            died = str(exc)
            rt.nf = unitnet.dead_container(self.backend, newest)
        rt.standby = self._start_standby(unit)
        dp = self.dp.client()
        try:
            if died is None:
                engine, handover = self._take_over(rt, dp, role.term)
                rt.runner = self._run_local(rt, engine, dp, commits_base=role.commits_total)
            else:
                engine, committed = self._engine_of_dead(rt, dp, role.term, died)
                rt.runner = self._run_local(
                    rt, engine, dp, commits_base=role.commits_total, committed=committed
                )
        except BaseException:
            dp.close()
            rt.stop(drain_seconds=0)
            raise
        if died is not None:
            log.warning(
                "unit %s: %s while the agent was down; restoring epoch %d",
                unit,
                died,
                committed[1],
                extra={"unit": unit},
            )
            self.bus.publish("nf_found_dead", unit=unit, pid=rt.nf.pid, term=role.term, cause=died)
            return rt
        self.db.set_unit_state(unit, "running")
        self.bus.publish(
            "adopt",
            unit=unit,
            term=role.term,
            nf_pid=rt.nf.pid,
            first_epoch=handover.first_epoch,
            recovery_epoch=handover.recovery_epoch,
        )
        log.info(
            "unit adopted",
            extra={
                "unit": unit,
                "nf_pid": rt.nf.pid,
                "term": role.term,
                "first_epoch": handover.first_epoch,
                "recovery_epoch": handover.recovery_epoch,
            },
        )
        return rt
