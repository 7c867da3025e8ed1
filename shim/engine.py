"""The primary's epoch engine: the I/O driver of `shim.epoch.PrimaryMachine` for one unit.

The machine decides; this driver only carries its commands out against three ports and reports
what happened back as events:

- a data plane (`dpdk_vhost.client.DataPlaneClient` satisfies `DataPlaneOps`),
- a checkpoint backend handle (`shim.container.Container` satisfies `Checkpointable`; a VM backend
  will satisfy the same protocol),
- a shipper to the standby (`shim.replication.ReplicationClient` satisfies `Shipper`).

Steps 1-3 and 5 of the protocol run synchronously inside `step()`. The checkpoint itself (step 4)
and shipping (step 6) are asynchronous: each returns at once and completes as a future seen by a
later `step()`. Shipping that way lets epoch e+1 fill while e ships (I6). Checkpointing that way
keeps acks flowing while the unit is frozen: an ack for e-1 that arrives during the dump of e is
released at once instead of after the thaw. Releasing during the freeze is allowed: it moves
packets from the unit's buffer to the egress port and never touches the NF's own port (I2).

With release at the standby (`ep.ReleasePoint.STANDBY`, remote standbys) the data plane saves
each closed epoch's frames to ``<image_root>/<unit>/outputs/``; a Ship hard-links the saved
output of every epoch it names into the checkpoint's image directory, so it ships (and is
verified) with the image; the ship ends once the standby has sent that output (its released
answer to the replication client's confirm), and the Retire that follows frees the buffers
without sending them; the saved files go with the images they belong to.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import attrs

from shim import epoch as ep
from shim.replication import NackedError, Shipped
from shim.standby import output_epoch, output_name

log = logging.getLogger(__name__)


class DataPlaneOps(Protocol):
    def pause_ingress(self, unit: str, term: int | None = None) -> Any: ...
    def resume_ingress(self, unit: str, term: int | None = None) -> None: ...
    def close_epoch(
        self, unit: str, epoch: int, term: int | None = None, save: str | None = None
    ) -> Any: ...
    def release(self, unit: str, epoch: int, term: int) -> int: ...
    def retire(self, unit: str, epoch: int, term: int) -> int: ...
    def discard(self, unit: str, from_epoch: int, term: int | None = None) -> int: ...
    def set_mode(self, unit: str, mode: str) -> None: ...
    def stats(self, unit: str | None = None) -> Any: ...


class Image(Protocol):
    @property
    def size_bytes(self) -> int: ...


class Checkpointable(Protocol):
    def freeze(self, timeout: float = ...) -> None: ...
    def thaw(self, timeout: float = ...) -> None: ...
    def checkpoint(self, epoch: int, dest_dir: Path) -> Image: ...


class Shipper(Protocol):
    def ship_nowait(
        self,
        unit: str,
        epoch: int,
        term: int,
        source: Path,
        *,
        full: bool = ...,
        meta: dict[str, Any] | None = ...,
        timeout: float = ...,
    ) -> Future[Shipped]: ...


@attrs.frozen
class EpochRecord:
    """What one checkpointed epoch cost, for status, metrics and benchmarks."""

    epoch: int
    pause_us: int
    checkpoint_us: int
    image_bytes: int
    shipped_bytes: int = 0
    commit_us: int = 0


@attrs.define
class EngineStats:
    epochs: list[EpochRecord] = attrs.field(factory=list)
    alarms: list[str] = attrs.field(factory=list)
    ignored: int = 0
    released_epochs: int = 0
    discarded_pkts: int = 0


class EngineError(Exception):
    """The engine cannot continue; the message names the step and the cause."""


def _now_us() -> int:
    return time.monotonic_ns() // 1000


class PrimaryEngine:
    """Drives one protected unit on the primary. Single-threaded: call `step()` in a loop."""

    def __init__(
        self,
        unit: str,
        machine: ep.PrimaryMachine,
        dataplane: DataPlaneOps,
        nf: Checkpointable,
        shipper: Shipper,
        *,
        image_root: Path,
        ship_timeout: float = 5.0,
        nf_rx_base: int = 0,
        clock: Callable[[], int] = _now_us,
    ) -> None:
        self.unit = unit
        self.machine = machine
        self.dp = dataplane
        self.nf = nf
        self.shipper = shipper
        self.image_root = image_root / unit
        self.image_root.mkdir(parents=True, exist_ok=True)
        self.ship_timeout = ship_timeout
        self.clock = clock
        self.stats = EngineStats()
        self._inflight: dict[int, tuple[Future[Shipped], int]] = {}
        # NF output the data plane counted before this engine took over (a previous
        # incarnation of the unit); it is not output waiting for this engine's epochs.
        self._closed_total = nf_rx_base
        self._cut_started = 0
        self._frozen_at = 0
        self._ckpt: dict[int, tuple[int, int, int]] = {}  # epoch -> (pause_us, ckpt_us, bytes)
        self._committed: int | None = None
        self._cut_seqs: dict[int, int] = {}
        self._committed_cut_seq: int | None = None
        # One dump at a time, off the stepping thread; see the module docstring.
        self._dumper = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"dump-{unit}")
        self._dumping: Future[ep.Event] | None = None

    # -- public --------------------------------------------------------------------------

    @property
    def last_committed(self) -> int | None:
        return self._committed

    @property
    def last_committed_cut_seq(self) -> int | None:
        """The input cut of the last committed epoch: lossless replay starts after it."""
        return self._committed_cut_seq

    def image_dir(self, epoch: int) -> Path:
        return self.image_root / f"epoch-{epoch:08d}"

    def output_path(self, epoch: int) -> Path:
        """Where the data plane saves epoch `epoch`'s held output (release at the standby)."""
        return self.image_root / "outputs" / output_name(epoch)

    def step(self) -> None:
        """Tick, report output and finished ships, and run every command that follows."""
        events: deque[ep.Event] = deque([ep.Tick(self.clock())])
        events.append(self._output_waiting())
        events.extend(self._finished_ships())
        if self._dumping is not None and self._dumping.done():
            events.append(ep.Tick(self.clock()))
            events.append(self._dumping.result())
            self._dumping = None
        self._feed(events)

    def hold_cuts(self, hold: bool) -> None:
        """Start no new cut while `hold` (`ep.HoldCuts`); releasing it may start one at once."""
        self._feed(deque([ep.Tick(self.clock()), ep.HoldCuts(hold)]))

    def _feed(self, events: deque[ep.Event]) -> None:
        while events:
            event = events.popleft()
            for command in self.machine.handle(event):
                for result in self._execute(command):
                    # A command can take long (a checkpoint); the machine must see the time
                    # at which its completion happened, not the time the step began.
                    events.append(ep.Tick(self.clock()))
                    events.append(result)

    def run(self, seconds: float, idle_sleep: float = 0.0002) -> None:
        """Step for a bounded time; sleeps briefly between steps so an idle unit costs little."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.step()
            time.sleep(idle_sleep)

    def drain(self, timeout: float, *, hold_cuts: bool = False) -> bool:
        """Step until nothing is in flight (every shipped epoch answered) or the timeout.

        With `hold_cuts`, no new cut starts meanwhile, and none after: the caller releases the
        hold (`hold_cuts(False)`) when it steps the engine again. Without it, a unit that always
        has output waiting and commits slower than its epochs never settles.
        """
        if hold_cuts:
            self.hold_cuts(True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.step()
            if (
                not self._inflight
                and self._dumping is None
                and self.machine.state is ep.State.RUNNING
            ):
                return True
            time.sleep(0.001)
        return False

    # -- event sources -------------------------------------------------------------------

    def _output_waiting(self) -> ep.Event:
        unit = self.dp.stats(self.unit).units[self.unit]
        # Packets the NF emitted since the last close: everything it sent minus what closed
        # epochs took. The data plane counts NF output in nf_rx (it receives from the NF port).
        open_pkts = max(0, int(unit.nf_rx) - self._closed_total)
        return ep.OutputWaiting(int(unit.epoch), open_pkts, int(unit.buffered_bytes))

    def _finished_ships(self) -> list[ep.Event]:
        events: list[ep.Event] = []
        for epoch, (future, started) in sorted(self._inflight.items()):
            if not future.done():
                continue
            del self._inflight[epoch]
            exc = future.exception()
            if exc is None:
                shipped = future.result()
                self._note_commit(epoch, started, shipped.block_bytes + shipped.manifest_bytes)
                events.append(ep.Acked(self.unit, epoch, shipped.term))
            elif isinstance(exc, NackedError):
                events.append(ep.Nacked(self.unit, epoch, exc.nack.term, exc.nack.reason))
            else:
                events.append(ep.StandbyLost(f"epoch {epoch} not acked: {exc}"))
        return events

    def _note_commit(self, epoch: int, started: int, shipped_bytes: int) -> None:
        pause, ckpt, size = self._ckpt.pop(epoch, (0, 0, 0))
        self.stats.epochs.append(
            EpochRecord(epoch, pause, ckpt, size, shipped_bytes, self.clock() - started)
        )

    # -- commands ------------------------------------------------------------------------

    def _execute(self, command: ep.Command) -> list[ep.Event]:
        term = self.machine.term
        match command:
            case ep.PauseIngress():
                self._cut_started = self.clock()
                cut = int(self.dp.pause_ingress(self.unit, term).cut)
                self._wait_rx_drained()
                return [ep.IngressPaused(cut)]
            case ep.Freeze():
                self.nf.freeze()
                self._frozen_at = self.clock()
                return [ep.Frozen()]
            case ep.CloseEpoch(epoch=epoch, save_output=save_output):
                save = None
                if save_output:
                    save = self.output_path(epoch)
                    save.parent.mkdir(exist_ok=True)
                try:
                    closed = self.dp.close_epoch(
                        self.unit, epoch, term, save=None if save is None else str(save)
                    )
                except Exception as exc:
                    if save is None:
                        raise
                    # The epoch may be closed without its saved output, and nothing could ever
                    # release it at the standby: stop here rather than lose it silently.
                    raise EngineError(
                        f"unit {self.unit}: epoch {epoch}: could not save its output to {save} "
                        f"({exc}); free space there (it is on tmpfs) and restart the unit"
                    ) from exc
                self._closed_total += int(closed.pkts)
                return [ep.EpochClosed(epoch, int(closed.pkts))]
            case ep.Checkpoint(epoch=epoch):
                self._dumping = self._dumper.submit(self._checkpoint, epoch)
                return []
            case ep.Thaw():
                self.nf.thaw()
                return [ep.Thawed()]
            case ep.ResumeIngress():
                self.dp.resume_ingress(self.unit, term)
                return [ep.IngressResumed()]
            case ep.Ship(epoch=epoch, term=t, parent=parent, cut_seq=cut_seq, outputs=outputs):
                self._attach_outputs(epoch, outputs)
                future = self.shipper.ship_nowait(
                    self.unit,
                    epoch,
                    t,
                    self.image_dir(epoch),
                    full=parent is None,
                    meta={"cut_seq": cut_seq},
                    timeout=self.ship_timeout,
                )
                self._inflight[epoch] = (future, self.clock())
                self._cut_seqs[epoch] = cut_seq
                return []
            case ep.Release(epoch=epoch) | ep.Retire(epoch=epoch):
                if isinstance(command, ep.Retire):
                    self.dp.retire(self.unit, epoch, term)
                else:
                    self.dp.release(self.unit, epoch, term)
                self.stats.released_epochs += 1
                self._committed = epoch
                if epoch in self._cut_seqs:
                    self._committed_cut_seq = self._cut_seqs[epoch]
                self._cut_seqs = {e: c for e, c in self._cut_seqs.items() if e > epoch}
                self._forget_images_before(epoch)
                return []
            case ep.Discard(from_epoch=from_epoch):
                self.stats.discarded_pkts += self.dp.discard(self.unit, from_epoch, term)
                self._forget_outputs(lambda e: e >= from_epoch)
                return []
            case ep.SetOutputCommit(enabled=enabled):
                self.dp.set_mode(self.unit, "ha" if enabled else "plain")
                return []
            case ep.SetBackPressure():
                # The data plane applies back-pressure itself at K epochs or the byte budget;
                # the machine's view only gates new cuts.
                return []
            case ep.Alarm(reason=reason):
                log.warning("unit %s: %s", self.unit, reason)
                self.stats.alarms.append(reason)
                return []
            case ep.Ignored(event=event, reason=reason):
                log.debug("unit %s: ignored %r: %s", self.unit, event, reason)
                self.stats.ignored += 1
                return []
        raise EngineError(f"unit {self.unit}: no driver for command {command!r}")

    def _wait_rx_drained(self) -> None:
        # CRIU drops UDP receive queues: an input delivered to the NF's socket but not read at
        # the freeze would be neither in the image nor replayable. The data plane delivers
        # nothing more once paused, so give the NF a bounded moment to read what it has.
        drain = getattr(self.nf, "wait_rx_drained", None)
        if drain is None:
            return
        try:
            result = drain(timeout=0.02)
        except Exception as exc:
            # A dead NF is not this step's to report: the freeze that follows fails for it.
            log.warning("unit %s: could not check the NF's receive queues: %s", self.unit, exc)
            return
        if not result.drained:
            log.warning(
                "unit %s: %d bytes still queued in the NF's sockets at the cut",
                self.unit,
                result.pending_bytes,
            )

    def close(self) -> None:
        """Wait for a dump in progress (bounded by the backend's own timeouts) and stop."""
        self._dumper.shutdown(wait=True)

    def _checkpoint(self, epoch: int) -> ep.Event:
        dest = self.image_dir(epoch)
        started = self.clock()
        try:
            image = self.nf.checkpoint(epoch, dest)
        except Exception as exc:
            log.warning("unit %s: checkpoint of epoch %d failed: %s", self.unit, epoch, exc)
            shutil.rmtree(dest, ignore_errors=True)
            return ep.CheckpointFailed(epoch, str(exc))
        done = self.clock()
        size = image.size_bytes
        # The pause runs from the freeze to the thaw that follows at once; the checkpoint is
        # the bulk of it.
        self._ckpt[epoch] = (done - self._frozen_at, done - started, size)
        return ep.CheckpointTaken(epoch, "", size)

    def _attach_outputs(self, epoch: int, outputs: tuple[int, ...]) -> None:
        """Put the saved output of `outputs` into checkpoint `epoch`'s image, which ships it.

        Hard links on the same tmpfs: nothing is copied, and the content-addressed delta sends
        an output already shipped with an earlier checkpoint as block references only.
        """
        dest = self.image_dir(epoch)
        for e in outputs:
            src, link = self.output_path(e), dest / output_name(e)
            if link.exists():
                continue  # shipped again (a nack, a new standby): already in place
            try:
                link.hardlink_to(src)
            except FileNotFoundError as exc:
                raise EngineError(
                    f"unit {self.unit}: the saved output of epoch {e} ({src}) is gone; it cannot "
                    "be released at the standby"
                ) from exc

    def _forget_images_before(self, epoch: int) -> None:
        # Keep the newest committed image: local failover restores from it. Saved output up to
        # `epoch` has left (or was freed); the image keeps its own link while it is kept.
        for path in self.image_root.glob("epoch-*"):
            if int(path.name.removeprefix("epoch-")) < epoch:
                shutil.rmtree(path, ignore_errors=True)
        self._forget_outputs(lambda e: e <= epoch)

    def _forget_outputs(self, which: Callable[[int], bool]) -> None:
        """Delete the saved outputs of the epochs `which` selects (released or discarded)."""
        outputs = self.image_root / "outputs"
        if outputs.is_dir():
            for path in outputs.iterdir():
                e = output_epoch(path.name)
                if e is not None and which(e):
                    path.unlink(missing_ok=True)
