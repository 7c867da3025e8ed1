"""The primary side of a unit inside the agent: its epoch engine, stepped by a thread of its own.

Each protected unit gets one `UnitRunner` thread that loops `PrimaryEngine.step()`. The engine's
cut (pause, freeze, close, dump, thaw, resume) runs inside one step, so a unit's loop blocks for
its own pause and nothing else; other units, the control channel and the watchdog run on other
threads. Everything the agent reads about a unit (status, metrics) is a snapshot the runner
publishes between steps.

**Taking over a running unit** (`take_over`). After an agent restart the data plane and the NF
still run, and the data plane may hold epochs the dead agent closed but never released. The new
engine must neither release output that no checkpoint covers nor leave it held forever:

1. If the old agent died inside a cut, the NF is thawed and ingress resumed.
2. Closed epochs up to the standby's committed epoch are released: they are committed.
3. If closed epochs are still held, one recovery cut commits them: pause, freeze, close the
   open epoch E, dump, thaw, resume, ship in full, and release up to E on the ack (cumulative:
   checkpoint E covers every earlier epoch). This is the epoch protocol run once by hand; the
   NF pauses for one cut, as at any epoch boundary. With release at the standby (``outputs``,
   the engine's saved-output folder: a remote standby's re-protection), the cut saves E's
   output too, the image carries the saved output of every held epoch, and the standby sends
   what it has not sent yet on this primary's confirm of the commit (it remembers what it
   sent, per term): its released answer only retires the buffers here. So a re-protection onto
   a standby this primary wrongly took for lost (it committed and sent epochs whose answers
   never arrived: ``sent``, what its hello reports as released) sends nothing twice. Either
   way nothing leaves before the commit: if the old standby took the unit over meanwhile and
   claimed its term at this spare first, the ship is refused (``NackedError``, stale_term, the
   higher term) and nothing is released; the caller fences.
4. The new machine starts at the data plane's open epoch with the unit's term, and the engine's
   count of closed packets starts from the data plane's counters, so it sees exactly the output
   of the open epoch as waiting (I5: an idle unit still takes no checkpoints).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs

from dpdk_vhost.client import DataPlaneClient
from hamgr.agent import procs
from hamgr.unitspec import UnitSpec
from policies.epoch import AdaptiveEpoch, FixedEpoch
from policies.inflight import InflightPolicy
from policies.standby_loss import StandbyLossAction, StandbyLossPolicy
from shim import epoch as ep
from shim.container import Freezer
from shim.engine import PrimaryEngine
from shim.local_failover import ProtectedNf
from shim.replication import ReplicationClient
from shim.standby import output_name

__all__ = [
    "Observed",
    "TakeOver",
    "TakeOverError",
    "UnitRunner",
    "counters",
    "poll_seconds",
    "primary_config",
    "report_engine",
    "take_over",
]

log = logging.getLogger(__name__)

POLL_S = 0.001
MAX_RECOVERIES = 3
GOOD_STEPS_RESET = 1000
IDLE_POLL_S = 0.005
STATS_EVERY_S = 0.1
RECOVERY_SHIP_TIMEOUT_S = 20.0


def primary_config(spec: UnitSpec) -> ep.PrimaryConfig:
    e = spec.epoch
    policy: FixedEpoch | AdaptiveEpoch
    if e.policy == "fixed":
        policy = FixedEpoch(e.length_ms_or_default * 1000)
    else:
        assert e.target_added_latency_ms is not None
        policy = AdaptiveEpoch(
            target_added_latency_us=e.target_added_latency_ms * 1000,
            min_us=e.min_ms_or_default * 1000,
            max_us=e.max_ms_or_default * 1000,
        )
    return ep.PrimaryConfig(
        epoch=policy,
        inflight=InflightPolicy(
            max_inflight=spec.protection.max_inflight,
            budget_bytes=spec.protection.memory_budget_bytes,
        ),
        standby_loss=StandbyLossPolicy(StandbyLossAction(spec.protection.on_standby_loss)),
    )


class TakeOverError(Exception):
    pass


@attrs.frozen
class TakeOver:
    first_epoch: int
    closed_total: int
    released_committed: bool
    recovery_epoch: int | None


def _held(unit: Any) -> int:
    # buffered_pkts also counts released packets still waiting for the wire.
    return int(unit.buffered_pkts) - int(unit.releasable_pkts)


def _wait_for_orphan_dumps(pid: int, timeout: float = 35.0) -> None:
    """Wait for a CRIU dump of `pid` that the dead agent started to end (it froze the NF)."""
    deadline = time.monotonic() + timeout
    while True:
        dumps = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            argv = procs.cmdline(int(entry.name))
            if argv and argv[0].endswith("criu") and "dump" in argv and str(pid) in argv:
                dumps.append(int(entry.name))
        if not dumps:
            return
        if time.monotonic() > deadline:
            raise TakeOverError(f"CRIU dumps {dumps} of pid {pid} did not end in {timeout} s")
        log.info("waiting for the dead agent's CRIU dump of pid %d to end", pid)
        time.sleep(0.05)


def take_over(
    dp: DataPlaneClient,
    nf: ProtectedNf,
    shipper: ReplicationClient,
    *,
    unit: str,
    term: int,
    committed: int | None,
    image_dir: Callable[[int], Path],
    sent: int | None = None,
    outputs: Path | None = None,
) -> TakeOver:
    """Make the data plane's state of `unit` one a fresh machine can start from (module doc).

    `committed`: the standby's committed epoch at this term, whose output this primary releases
    (a local standby). `sent`: for a standby that releases output itself (a remote one), the
    epoch up to which it has really sent it at this term (its hello's ``released``, not its
    committed epoch: a commit's output leaves only on the confirm), so those epochs are
    retired here, never sent.
    `outputs`: release at the standby; the folder where the engine saved each closed epoch's
    output (`PrimaryEngine.output_path`): the recovery cut carries the held output, and the
    standby sends what it has not sent. None: the recovery cut is released here.
    """
    _wait_for_orphan_dumps(nf.pid)
    stats = dp.stats(unit).units.get(unit)
    if stats is None:
        raise TakeOverError(f"the data plane has no unit {unit} (it was restarted)")
    if stats.term != term:
        raise TakeOverError(f"the data plane has term {stats.term} for {unit}, the agent {term}")
    if stats.mode != "ha":
        raise TakeOverError(f"unit {unit} is in mode {stats.mode}; only ha units are taken over")
    if Freezer.for_pid(nf.pid).is_frozen():
        log.warning("unit %s: the NF was left frozen mid-cut; thawing it", unit)
        nf.thaw()
    if stats.paused:
        log.warning("unit %s: ingress was left paused mid-cut; resuming it", unit)
        dp.resume_ingress(unit, term)
    released = False
    if stats.epochs_in_flight and sent is not None and sent < stats.epoch:
        retired = dp.retire(unit, sent, term)
        log.info("unit %s: %d epochs up to %d were sent by the standby", unit, retired, sent)
    if stats.epochs_in_flight and committed is not None and committed < stats.epoch:
        dp.release(unit, committed, term)
        released = True
    stats = dp.stats(unit).units[unit]
    if not stats.epochs_in_flight:
        # Everything held is in the open epoch, and this one reply counts both.
        return TakeOver(stats.epoch, int(stats.nf_rx) - _held(stats), released, None)
    # Held epochs no checkpoint covers: commit them with one recovery cut.
    epoch = stats.epoch
    # Closed epochs are consecutive and end just below the open one.
    held = range(epoch - int(stats.epochs_in_flight), epoch + 1)
    if outputs is not None:
        missing = [e for e in held[:-1] if not (outputs / output_name(e)).exists()]
        if missing:
            raise TakeOverError(
                f"unit {unit}: the saved output of held epochs {missing} is not in {outputs}; "
                "a recovery cut without it would lose that output"
            )
    k = int(stats.k)
    full = int(stats.epochs_in_flight) >= k
    if full:
        # Back-pressure took every slot (a standby lost for a while): the cut needs one more,
        # until its release frees them all.
        dp.configure_unit(unit, k=k + 1)
    try:
        save = None if outputs is None else outputs / output_name(epoch)
        closed_total, dest, cut_seq = _recovery_cut(
            dp, nf, unit=unit, term=term, epoch=epoch, image_dir=image_dir, save=save
        )
        if outputs is not None:
            for e in held:
                os.link(outputs / output_name(e), dest / output_name(e))
        shipper.ship(
            unit,
            epoch,
            term,
            dest,
            full=True,
            meta={"recovery": 1, "cut_seq": cut_seq},
            timeout=RECOVERY_SHIP_TIMEOUT_S,
        )
        if outputs is None:
            dp.release(unit, epoch, term)
        else:
            # The standby sent it (or had sent it) on the confirm, before its released answer.
            dp.retire(unit, epoch, term)
            for e in held:
                (outputs / output_name(e)).unlink(missing_ok=True)
    finally:
        if full:
            try:
                dp.configure_unit(unit, k=k)
            except Exception:
                log.exception("unit %s: setting k back to %d failed", unit, k)
    log.info("unit %s: recovery cut committed epoch %d", unit, epoch, extra={"unit": unit})
    return TakeOver(epoch + 1, closed_total, released, epoch)


def _recovery_cut(
    dp: DataPlaneClient,
    nf: ProtectedNf,
    *,
    unit: str,
    term: int,
    epoch: int,
    image_dir: Callable[[int], Path],
    save: Path | None,
) -> tuple[int, Path, int]:
    """Pause, freeze, close `epoch` (its output saved to `save`), dump, thaw, resume:
    (closed packets, image, cut_seq)."""
    # The cut goes with the image, as the engine's do: a lossless standby trims its input log
    # to it and replays after it.
    cut_seq = int(dp.pause_ingress(unit, term).cut)
    try:
        # CRIU drops UDP receive queues: let the NF read what it was given before the freeze.
        try:
            nf.wait_rx_drained(timeout=0.02)
        except Exception as exc:  # a dead NF fails the freeze below, with its own error
            log.warning("unit %s: could not check the NF's receive queues: %s", unit, exc)
        nf.freeze()
        try:
            dp.close_epoch(unit, epoch, term, save=None if save is None else str(save))
            # The NF is frozen and its port drained: the new open epoch is empty.
            closed_total = int(dp.stats(unit).units[unit].nf_rx)
            dest = image_dir(epoch)
            shutil.rmtree(dest, ignore_errors=True)
            nf.checkpoint(epoch, dest)
        finally:
            nf.thaw()
    finally:
        dp.resume_ingress(unit, term)
    return closed_total, dest, cut_seq


def _not_watched(_unit: str) -> None:
    return None


def _death_not_watched(_unit: str, _pid: int) -> None:
    return None


@attrs.define
class Observed:
    """What a runner reports to the agent, beyond its snapshot.

    `on_fenced` is called once, from the runner's thread, when the epoch machine became FENCED
    (a standby answered with a higher term: this primary is deposed). The machine has commanded
    Discard of everything unreleased by then and ignores everything from now on; the agent
    decides what happens to the unit (hamgr.agent.remote: ``on_fenced``). The callback runs on
    the runner's thread, so it must not stop the runner itself.

    `on_nf_died(unit, pid)` is called once, from the runner's thread, when the NF's pidfd polls
    readable (or a step failed because the NF died). The runner has stopped stepping the engine
    by then: no cut of the dead NF, no new ship; what it holds stays held (a ship already in
    flight may finish until the runner is stopped). The agent decides what happens next
    (hamgr.agent.remote: the standby is asked to take the unit over).
    """

    on_commit: Callable[[str, int, float], None]
    on_alarm: Callable[[str, str], None]
    on_pause: Callable[[str, float], None]
    on_fenced: Callable[[str], None] = _not_watched
    on_nf_died: Callable[[str, int], None] = _death_not_watched


def poll_seconds(m: ep.PrimaryMachine) -> float:
    """1 ms while a cut, a ship or an epoch close is pending; slower when the unit is idle.

    Idle means no output waits and nothing is in flight: new output is then noticed within a
    tenth of an epoch (at most 5 ms), which delays its cut by no more than that.
    """
    if m.state is ep.State.RUNNING and m.inflight == 0 and m.next_wakeup_us is None:
        return max(POLL_S, min(IDLE_POLL_S, m.epoch_length_us / 1e7))
    return POLL_S


def report_engine(
    engine: PrimaryEngine, observed: Observed, unit: str, last_committed: int | None
) -> int | None:
    """Hand the engine's new epoch records, alarms and commit to `observed`.

    The engine keeps every record; an agent runs for months, so they are taken out here.
    Returns the last committed epoch, to pass back in next time.
    """
    stats = engine.stats
    records, stats.epochs[:] = list(stats.epochs), []
    for record in records:
        observed.on_pause(unit, record.pause_us / 1e6)
    alarms, stats.alarms[:] = list(stats.alarms), []
    for alarm in alarms:
        observed.on_alarm(unit, alarm)
    committed = engine.last_committed
    if committed is not None and committed != last_committed:
        commit_ms = records[-1].commit_us / 1000 if records else 0.0
        observed.on_commit(unit, committed, commit_ms)
        return committed
    return last_committed


class UnitRunner:
    """One primary unit's epoch loop on its own thread (bounded by `stop`).

    Between steps the loop waits on the NF's pidfd (`poll`), not on a timer: an NF that dies is
    seen within the wait, a few milliseconds, and the loop then ends (`Observed.on_nf_died`)
    instead of cutting a dead NF until its recoveries run out.
    """

    def __init__(
        self,
        unit: str,
        engine: PrimaryEngine,
        dp: DataPlaneClient,
        nf: ProtectedNf,
        shipper: ReplicationClient,
        *,
        commits_base: int,
        observed: Observed,
        standby: str,
        rebuild: Callable[[DataPlaneClient], PrimaryEngine] | None = None,
    ) -> None:
        self.unit = unit
        self.engine = engine
        self.dp = dp
        self.nf = nf
        self.shipper = shipper
        self.commits_base = commits_base
        self.observed = observed
        self.standby = standby
        self.rebuild = rebuild
        self.last_step = time.monotonic()
        self.error: str | None = None
        self.errors = 0
        self.nf_died = False
        self.failed = False
        self.fenced = False
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._snapshot: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._run, name=f"unit-{unit}", daemon=True)
        self._last_committed = engine.last_committed
        self._unit_stats: Any = None
        self._drain_s = 0.0
        self._death: select.poll | None = select.poll()
        try:
            self._death.register(nf.pidfd, select.POLLIN)
        except Exception:  # no pidfd (a handle already destroyed): `exited` says it is dead
            self._death = None

    def start(self) -> None:
        self._publish()
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, drain_seconds: float = 0.0, timeout: float = 60.0) -> None:
        """Stop stepping; first let in-flight epochs commit for up to `drain_seconds`."""
        self._drain_s = drain_seconds
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("unit %s: the epoch loop did not stop within %s s", self.unit, timeout)
        else:
            # The engine dumps on a thread of its own: wait for a dump in progress, so that
            # nothing else (a take-over's recovery cut) checkpoints the NF at the same time. A
            # CRIU service worker does not show up in `_wait_for_orphan_dumps`.
            try:
                self.engine.close()
            except Exception:
                log.exception("unit %s: waiting for the engine's dump failed", self.unit)
        self.shipper.close()
        self.dp.close()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._snapshot)

    def _run(self) -> None:
        last_stats = 0.0
        failures = 0
        good_steps = 0
        while not self._stop.is_set():
            if self._nf_exited(0.0):
                self._on_death()
                break
            try:
                self.engine.step()
                self.last_step = time.monotonic()
                good_steps += 1
                if good_steps >= GOOD_STEPS_RESET:
                    failures, self.error = 0, None
            except Exception as exc:
                failures += 1
                good_steps = 0
                self.errors += 1
                self.error = f"epoch step failed: {type(exc).__name__}: {exc}"
                self.last_step = time.monotonic()
                if self._nf_exited(0.0):
                    # A cut that meets a dead NF fails in the freezer or in CRIU: a death,
                    # not an engine error to recover from.
                    log.info("unit %s: epoch step failed because the NF died", self.unit)
                    self._on_death()
                    break
                log.exception("unit %s: epoch step failed", self.unit, extra={"unit": self.unit})
                if not self._recover(failures):
                    break
                continue
            self._observe()
            if not self.fenced and self.engine.machine.state is ep.State.FENCED:
                # Deposed; the machine discarded what it held and ignores everything from now on.
                self.fenced = True
                self._refresh()
                self.observed.on_fenced(self.unit)
            now = time.monotonic()
            if now - last_stats >= STATS_EVERY_S:
                last_stats = now
                self._refresh()
            if self._nf_exited(self._poll_seconds()):
                self._on_death()
                break
        if self._drain_s > 0 and not self.failed and not self.nf_died:
            try:
                self.engine.drain(self._drain_s)
                self._observe()
            except Exception:
                log.exception("unit %s: drain failed", self.unit)
        self._refresh()

    def _nf_exited(self, wait: float) -> bool:
        """Wait up to `wait` seconds on the NF's pidfd: True once it died."""
        if self._death is None:
            self._stop.wait(wait)
            return self.nf.exited()
        return bool(self._death.poll(wait * 1000))

    def _on_death(self) -> None:
        """The NF died: the loop ends here (nothing of the dead NF is cut, shipped or
        confirmed any more), and the agent is told once."""
        self.nf_died = True
        self.error = f"the NF (pid {self.nf.pid}) died"
        self.last_step = time.monotonic()
        log.warning("unit %s: %s", self.unit, self.error, extra={"unit": self.unit})
        self._refresh()
        try:
            self.observed.on_nf_died(self.unit, self.nf.pid)
        except Exception:
            log.exception("unit %s: reporting the NF's death failed", self.unit)
        self.observed.on_alarm(self.unit, self.error)

    def _recover(self, failures: int) -> bool:
        """After a failed step: unwedge the unit, then start a fresh engine (`take_over`).

        A step that fails inside a cut leaves the machine waiting for a completion that will
        never come, possibly with the NF frozen and ingress paused. The NF is thawed and ingress
        resumed at once; then a new engine takes the unit over as after an agent restart. After
        `MAX_RECOVERIES` failures in a row the loop gives up and the unit shows as failed.
        """
        term = self.engine.machine.term
        with contextlib.suppress(Exception):
            if Freezer.for_pid(self.nf.pid).is_frozen():
                self.nf.thaw()
        with contextlib.suppress(Exception):
            self.dp.resume_ingress(self.unit, term)
        if failures > MAX_RECOVERIES or self.rebuild is None or self.nf.exited():
            self.failed = True
            if self.nf.exited():
                self.nf_died = True
                self.observed.on_alarm(self.unit, f"the NF (pid {self.nf.pid}) died")
            self.observed.on_alarm(self.unit, f"epoch loop stopped: {self.error}")
            return False
        if self._stop.wait(0.2 * failures):
            return False
        try:
            engine = self.rebuild(self.dp)
        except Exception as exc:
            self.error = f"recovery failed: {type(exc).__name__}: {exc}"
            log.exception("unit %s: recovery failed", self.unit, extra={"unit": self.unit})
            return self._recover(failures + 1) if failures < MAX_RECOVERIES else self._give_up()
        old, self.engine = self.engine, engine
        if engine.shipper is not old.shipper:
            with contextlib.suppress(Exception):
                self.shipper.close()
            self.shipper = engine.shipper  # type: ignore[assignment]
        self._last_committed = engine.last_committed
        log.info("unit %s: epoch engine restarted", self.unit, extra={"unit": self.unit})
        return True

    def _give_up(self) -> bool:
        self.failed = True
        self.observed.on_alarm(self.unit, f"epoch loop stopped: {self.error}")
        return False

    def _poll_seconds(self) -> float:
        return poll_seconds(self.engine.machine)

    def _observe(self) -> None:
        self._last_committed = report_engine(
            self.engine, self.observed, self.unit, self._last_committed
        )

    def _refresh(self) -> None:
        try:
            self._unit_stats = self.dp.stats(self.unit).units.get(self.unit)
        except Exception as exc:
            self.error = f"data plane stats: {exc}"
        if not self.nf_died and self.nf.exited():
            self.nf_died = True
            self.observed.on_alarm(self.unit, f"the NF (pid {self.nf.pid}) died")
        self._publish()

    def _publish(self) -> None:
        m = self.engine.machine
        u = self._unit_stats
        protection = m.protection.value
        if self.nf_died or self.failed or m.state is ep.State.FENCED:
            protection = "stalled"
        snap = {
            "unit": self.unit,
            "role": "primary",
            "peer": self.standby,
            "term": m.term,
            "state": "error" if self.failed or self.nf_died else "running",
            "protection": protection,
            "machine": m.state.value,
            "open_epoch": m.open_epoch,
            "last_committed": self.engine.last_committed,
            "epochs_total": int(u.epochs_closed) if u is not None else None,
            # Epochs released after their commit: counted by the data plane, so exact across
            # agent restarts (a counter of acks here would lose those since the last persist).
            "commits_total": int(u.epochs_released) if u is not None else self.commits_base,
            "buffered_pkts": _held(u) if u is not None else None,
            "buffered_bytes": int(u.buffered_bytes) if u is not None else None,
            "released_pkts": int(u.released_pkts) if u is not None else None,
            "epoch_ms": m.epoch_length_us / 1000,
            "nf_pid": self.nf.pid,
            "error": self.error or ("the NF died" if self.nf_died else None),
        }
        with self._lock:
            self._snapshot = snap


def counters(snapshot: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a snapshot that is persisted."""
    return {
        "protection": snapshot.get("protection"),
        "last_committed": snapshot.get("last_committed"),
        "commits_total": snapshot.get("commits_total"),
    }
