"""The container checkpoint backend: runc containers, the cgroup freezer, and CRIU.

The epoch engine drives one unit through freeze -> checkpoint -> thaw with these calls::

    backend = RuncBackend()
    nf = backend.start(spec)                 # a Container handle
    nf.freeze(); image = nf.checkpoint(e, dest); nf.thaw()
    ...
    nf2 = backend.restore(image.path, netns="standby-netns")

`UnitBackend` and `UnitHandle` are the backend-neutral shape; a VM backend offers the same calls.

Why it is built this way (measurements and the alternatives are in docs/containers.md):

- Freeze and thaw write the cgroup freezer file directly instead of running ``runc pause``,
  which forks a Go binary. On a host where the freezer controller sits on a cgroup-v1 hierarchy
  (hybrid mode) that is ``freezer.state``; runc and CRIU use that freezer there, and mixing it with
  the cgroup-v2 ``cgroup.freeze`` would let the two fight. On a pure v2 host it is
  ``cgroup.freeze`` plus ``cgroup.events``.
- A checkpoint is a CRIU dump with the tree left running; CRIU finds the cgroup frozen, seizes the
  tasks, and freezes it again before returning, so the NF does not run between freeze() and thaw().
- By default CRIU is driven directly with the options runc's checkpoint would pass (the dump time
  is the NF's pause). The image is one ``runc restore`` accepts, and restores always go through
  runc, which owns the container's mounts, cgroups and state; the CRIU config runc hands on
  tells their CRIU to open the host's cgroup hierarchies too (``cgroup-yard``).
  ``engine="runc"`` uses ``runc checkpoint`` instead.
- Everything CRIU can do before the freeze happens before it: a ``criu swrk`` worker is started
  after each dump for the next one (``criu_mode="swrk"``, the default; ``"exec"`` runs
  ``criu dump``), CRIU's kernel-feature cache is kept on a tmpfs (`shim.criu.ensure_kdat_cache`),
  and CRIU opens the host's cgroup hierarchies instead of mounting its own (``--cgroup-yard``).
- CRIU does not archive the container's ``/dev`` and ``/dev/shm`` (a ``tar --gzip`` per mount,
  ~4 ms each): dumps declare them external and hamgr writes their contents into the image while
  CRIU dumps; a restore mounts a tmpfs per mount with those contents (`shim.devmounts`).
- `Container.wait_rx_drained` is for the epoch engine, between pausing ingress and the freeze:
  CRIU does not save UDP receive queues, so a datagram delivered but not yet read at the freeze
  would be lost on failover.
- The restore netns must route to the NF's TCP peers (CRIU reconnects sockets in repair mode)
  but receive nothing until restore returns, or a retransmission meets no socket and gets a RST.
- Images are written into a hidden sibling directory and renamed to their final name only after
  CRIU succeeded and the metadata file was written and synced, so a failed dump never leaves a
  directory that looks like a good image.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import logging
import math
import os
import secrets
import select
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import attrs

from shim import netns as netns_mod
from shim.criu import (
    CriuError,
    CriuRuntime,
    SwrkWorker,
    ensure_kdat_cache,
    is_tmpfs,
    rpc_messages,
)
from shim.devmounts import (
    CARRIED_MOUNTS,
    CarriedMount,
    DevMountError,
    archive_tree,
    carried_mount,
    carried_mounts,
    detach_mounts_under,
    mount_tmpfs,
    oci_mount_options,
)
from shim.oci import (
    Bundle,
    ContainerSpec,
    OciError,
    prepare_bundle,
    remove_bundle,
    runc_spec_base,
    unpack_image,
)

DEFAULT_STATE_DIR = Path("/run/hamgr/containers")
DEFAULT_CRIU_CANDIDATES = ("/opt/hamgr/criu/bin/criu",)
IMAGE_META = "hamgr-checkpoint.json"
IMAGE_FORMAT = 1

START_TIMEOUT_S = 30.0
CHECKPOINT_TIMEOUT_S = 30.0
RESTORE_TIMEOUT_S = 30.0
CONTROL_TIMEOUT_S = 10.0
# How long the next criu swrk worker waits for the NF's thaw before it starts anyway.
SPAWN_AFTER_THAW_WAIT_S = 1.0
MIN_CRIU = (4, 2, 0)

NetworkLock = Literal["nftables", "iptables", "skip"]
CheckpointEngine = Literal["runc", "criu"]
CriuMode = Literal["swrk", "exec"]
# runc restores stdio from this file in the image; a dump made without runc must write it too.
RUNC_DESCRIPTORS = "descriptors.json"
# The key runc uses for the external netns on dump and looks up on restore.
RUNC_NETNS_KEY = "extRootNetNS"
# Where CRIU may open the host's cgroup hierarchies instead of mounting each one itself (~2 ms
# per hierarchy per dump); used only when it really holds every hierarchy of the NF.
CGROUP_YARD = Path("/sys/fs/cgroup")
# The key under which dumps declare runc's masked directories external (see `_masked_dirs`), and
# the empty read-only directory a restore binds there instead.
MASKED_DIR_KEY = "hamgr-masked-dir"
# Where, inside a restored container's bundle, the tmpfs mounts for the carried /dev and
# /dev/shm are prepared (shim.devmounts); they are detached once runc restore returns.
CARRIED_DIR = "hamgr-mounts"
# Where, under the state directory, OCI archives are unpacked once and shared read-only
# (RuncBackend.prepare_image).
ROOTFS_CACHE = "rootfs"
# Socket tables whose receive queues CRIU does not save (TCP queues it does save).
RX_TABLES = ("udp", "udp6", "udplite", "udplite6", "raw", "raw6", "packet")

log = logging.getLogger(__name__)


class ContainerError(Exception):
    """A container operation failed; the message names the problem and how to fix it."""


class FreezeError(ContainerError):
    pass


class CheckpointError(ContainerError):
    pass


class RestoreError(ContainerError):
    pass


class RestoreAbortedError(RestoreError):
    """A restore given up on its caller's word (`ChainBackend.restore`'s ``abort``); nothing
    of it is left."""


# --------------------------------------------------------------------------- backend-neutral shape


class UnitImage(Protocol):
    """A complete checkpoint on disk: one container's (`CheckpointImage`) or a chain's."""

    @property
    def path(self) -> Path: ...

    @property
    def epoch(self) -> int: ...

    @property
    def size_bytes(self) -> int: ...


class UnitHandle(Protocol):
    """One running NF instance (a container here, a chain of them in `shim.chain`, a VM in the
    libvirt backend)."""

    @property
    def name(self) -> str: ...

    @property
    def pid(self) -> int: ...

    @property
    def pidfd(self) -> int: ...

    def freeze(self, timeout: float = ...) -> None: ...

    def thaw(self, timeout: float = ...) -> None: ...

    def checkpoint(self, epoch: int, dest_dir: Path) -> UnitImage: ...

    def wait_rx_drained(self, timeout: float = ..., *, settle: float = ...) -> RxDrain: ...

    def prepare_checkpoint(self, *, wait: bool = ...) -> None:
        """Get the next checkpoint's tools ready ahead, off its pause (a no-op where none
        are needed); ``wait=False`` returns at once."""

    def stop(self, timeout: float = ...) -> None: ...

    def kill(self) -> None: ...


class UnitBackend(Protocol):
    def start(self, spec: ContainerSpec) -> UnitHandle: ...

    def restore(self, image_dir: Path, netns: str, *, name: str | None = None) -> UnitHandle: ...


# --------------------------------------------------------------------------- checkpoint images


@attrs.frozen
class CheckpointImage:
    """A complete checkpoint on disk. Only `load` and `Container.checkpoint` make these."""

    path: Path
    epoch: int
    spec: ContainerSpec
    engine: str
    dump_seconds: float
    files: tuple[tuple[str, int], ...]

    @property
    def size_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": IMAGE_FORMAT,
            "epoch": self.epoch,
            "spec": self.spec.to_json(),
            "engine": self.engine,
            "dump_seconds": self.dump_seconds,
            "files": dict(self.files),
        }

    @staticmethod
    def load(path: Path) -> CheckpointImage:
        """Read an image's metadata and check every file is there at its recorded size."""
        data = read_image_meta(path, IMAGE_META, IMAGE_FORMAT, what="hamgr checkpoint")
        files = tuple(sorted((str(k), int(v)) for k, v in data["files"].items()))
        for fname, size in files:
            try:
                actual = (path / fname).stat().st_size
            except FileNotFoundError as exc:
                raise RestoreError(f"{path}: image file {fname} is missing") from exc
            if actual != size:
                raise RestoreError(f"{path}: {fname} is {actual} bytes, metadata says {size}")
        return CheckpointImage(
            path=path,
            epoch=int(data["epoch"]),
            spec=ContainerSpec.from_json(data["spec"]),
            engine=str(data["engine"]),
            dump_seconds=float(data["dump_seconds"]),
            files=files,
        )


def read_image_meta(path: Path, name: str, fmt: int, *, what: str) -> dict[str, Any]:
    """The metadata file `name` of the image at `path`, which must be of format `fmt`.

    Written last, after every other file of the image, it is what makes a directory a complete
    image; without it, or unreadable, the image is refused.
    """
    meta_path = path / name
    try:
        data = json.loads(meta_path.read_text())
    except FileNotFoundError as exc:
        raise RestoreError(
            f"{path} is not a complete {what} ({name} missing); a dump that failed or is "
            "still running leaves no metadata, so use an older epoch"
        ) from exc
    except ValueError as exc:
        raise RestoreError(f"{meta_path}: unreadable ({exc}); use an older epoch") from exc
    if not isinstance(data, dict) or data.get("format") != fmt:
        found = data.get("format") if isinstance(data, dict) else data
        raise RestoreError(f"{meta_path}: format {found!r}, this hamgr reads {fmt}")
    return data


@attrs.frozen
class RxDrain:
    """What `Container.wait_rx_drained` found: whether the NF read everything it was given."""

    drained: bool
    waited_s: float
    # Bytes and sockets still holding received data when it returned (0 when drained).
    pending_bytes: int = 0
    pending_sockets: int = 0


def _fsync_path(path: Path, *, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- cgroup freezer


def _cgroup_mounts() -> dict[str, Path]:
    """Map 'freezer' (v1) and '' (v2) to their mount points, from /proc/self/mountinfo."""
    mounts: dict[str, Path] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fstype, _src, opts = [*right.split(), "", "", ""][:3]
            mount_point = Path(left.split()[4])
            if fstype == "cgroup2":
                mounts.setdefault("", mount_point)
            elif fstype == "cgroup" and "freezer" in opts.split(","):
                mounts.setdefault("freezer", mount_point)
    return mounts


@attrs.frozen
class Freezer:
    """The freezer of one cgroup. ``version`` 1 = freezer.state, 2 = cgroup.freeze."""

    path: Path
    version: int

    @staticmethod
    def for_pid(pid: int) -> Freezer:
        """The freezer runc and CRIU use for `pid`: v1 if a v1 hierarchy has the controller."""
        v1_path: str | None = None
        v2_path: str | None = None
        try:
            with open(f"/proc/{pid}/cgroup") as f:
                for line in f:
                    _hid, controllers, cg_path = line.rstrip("\n").split(":", 2)
                    if "freezer" in controllers.split(","):
                        v1_path = cg_path
                    elif controllers == "":
                        v2_path = cg_path
        except FileNotFoundError as exc:
            raise FreezeError(f"process {pid} is gone; the NF died (check its pidfd)") from exc
        mounts = _cgroup_mounts()
        if v1_path is not None and "freezer" in mounts:
            return Freezer(mounts["freezer"] / v1_path.lstrip("/"), 1)
        if v2_path is not None and "" in mounts:
            return Freezer(mounts[""] / v2_path.lstrip("/"), 2)
        raise FreezeError(
            f"no cgroup freezer found for pid {pid}: mount cgroup2 on /sys/fs/cgroup or the v1 "
            "freezer controller"
        )

    def _write(self, frozen: bool) -> None:
        if self.version == 1:
            target, value = self.path / "freezer.state", "FROZEN" if frozen else "THAWED"
        else:
            target, value = self.path / "cgroup.freeze", "1" if frozen else "0"
        try:
            with open(target, "w") as f:
                f.write(value)
        except OSError as exc:
            raise FreezeError(
                f"cannot write {value} to {target}: {exc}; is the container still running?"
            ) from exc

    def is_frozen(self) -> bool:
        if self.version == 1:
            return (self.path / "freezer.state").read_text().strip() == "FROZEN"
        for line in (self.path / "cgroup.events").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "frozen":
                return value.strip() == "1"
        return False

    def _wait(self, frozen: bool, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        delay = 0.0
        while True:
            if self.is_frozen() == frozen:
                return True
            if time.monotonic() >= deadline:
                return False
            # Freezing a small tree takes tens of microseconds; spin briefly before sleeping.
            time.sleep(delay)
            delay = min(0.001, delay * 2 + 0.00005)

    def freeze(self, timeout: float = 2.0) -> None:
        self._write(True)
        if self._wait(True, timeout):
            return
        if self.version == 1:
            # A v1 freezer can stall in FREEZING; asking again is the documented remedy.
            self._write(True)
            if self._wait(True, timeout / 2):
                return
        self._write(False)
        raise FreezeError(
            f"{self.path} did not reach frozen within {timeout}s (a task may be stuck in an "
            "uninterruptible wait); the cgroup was thawed again"
        )

    def thaw(self, timeout: float = 2.0) -> None:
        self._write(False)
        if not self._wait(False, timeout):
            raise FreezeError(f"{self.path} did not thaw within {timeout}s")


# --------------------------------------------------------------------------- runc


def find_criu(explicit: str | None = None) -> str:
    """The CRIU binary: `explicit`, $HAMGR_CRIU, hamgr's private build, then $PATH."""
    candidates = [explicit, os.environ.get("HAMGR_CRIU"), *DEFAULT_CRIU_CANDIDATES]
    for cand in candidates:
        if cand and os.access(cand, os.X_OK):
            return cand
    found = shutil.which("criu")
    if found:
        return found
    raise ContainerError(
        "criu not found: run `make setup` (installs CRIU 4.2 into /opt/hamgr/criu) or set "
        "HAMGR_CRIU to a criu >= 4.2 binary"
    )


def _tail(path: Path, limit: int = 1500) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return text[-limit:].strip()


def _criu_log_errors(path: Path, limit: int = 8) -> str:
    """The 'Error' lines of a CRIU log, which name the real cause far better than its tail."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no CRIU log)"
    errors = [ln for ln in lines if "Error" in ln or "rror (" in ln]
    return "\n".join(errors[-limit:]) if errors else "\n".join(lines[-limit:])


@attrs.frozen
class _Runc:
    runc: str
    root: Path
    criu: str

    def run(
        self,
        args: Sequence[str],
        *,
        timeout: float,
        log: Path,
        what: str,
        fix: str | Callable[[], str],
        detached_stdio: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        cmd = [self.runc, "--root", str(self.root), "--log", str(log), "--criu", self.criu, *args]
        try:
            if detached_stdio:
                # The container inherits runc's stdio. /dev/null everywhere: a pipe would keep
                # us waiting for EOF, and a log file the NF writes breaks --leave-running restores.
                with open(os.devnull, "r+b") as null:
                    proc = _run_to_exit(cmd, stdio=null, timeout=timeout)
            else:
                proc = subprocess.run(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    timeout=timeout,
                    text=True,
                    check=False,
                )
        except FileNotFoundError as exc:
            raise ContainerError(f"{what}: `{self.runc}` not found; install runc") from exc
        except subprocess.TimeoutExpired as exc:
            raise ContainerError(
                f"{what}: `{' '.join(cmd)}` took over {timeout:.0f}s; runc log: {_tail(log)}"
            ) from exc
        if proc.returncode != 0:
            detail = (proc.stderr or "").strip() or _tail(log)
            # Called only now: a fix that quotes a log must read it after the failure.
            hint = fix() if callable(fix) else fix
            raise ContainerError(f"{what} failed: {detail}; {hint}")
        return proc

    def state(self, name: str) -> dict[str, Any] | None:
        if not (self.root / name).exists():
            # runc keeps a container's state in <root>/<name>; without it `runc state` only
            # fails, after ~4 ms of starting a Go binary (on every restore under a new name).
            return None
        try:
            proc = subprocess.run(
                [self.runc, "--root", str(self.root), "state", name],
                capture_output=True,
                text=True,
                timeout=CONTROL_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise ContainerError(f"`runc state {name}` hung for {CONTROL_TIMEOUT_S}s") from exc
        if proc.returncode != 0:
            return None
        state: dict[str, Any] = json.loads(proc.stdout)
        return state


def _run_to_exit(
    cmd: Sequence[str], *, stdio: Any, timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run `cmd` with `stdio` on fds 0-2 and return as soon as it exits.

    `subprocess.run(timeout=...)` without pipes waits by polling with sleeps that double up to
    50 ms, so it noticed a `runc restore` that had exited 0-50 ms late (42 ms on a typical
    restore here). A pidfd is readable the moment the process exits.
    """
    proc = subprocess.Popen(cmd, stdin=stdio, stdout=stdio, stderr=stdio)
    with proc:
        try:
            pidfd = os.pidfd_open(proc.pid)
        except OSError:  # no pidfd (kernel < 5.3): subprocess's own wait
            pidfd = None
        try:
            if pidfd is not None:
                poller = select.poll()
                poller.register(pidfd, select.POLLIN)
                if not poller.poll(max(0, math.ceil(timeout * 1000))):
                    raise subprocess.TimeoutExpired(cmd, timeout)
            returncode = proc.wait(timeout=None if pidfd is not None else timeout)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            if pidfd is not None:
                os.close(pidfd)
    return subprocess.CompletedProcess(list(cmd), returncode, None, None)


@attrs.define(eq=False)
class Container:
    """A running (or dead) runc container: the handle the epoch engine holds."""

    name: str
    pid: int
    spec: ContainerSpec
    bundle: Bundle
    work_dir: Path
    _runc: _Runc
    _backend: RuncBackend
    _freezer: Freezer | None = None
    _pidfd: int | None = None
    _gone: bool = False
    # The criu swrk worker for the next dump, and the job that starts it (swrk mode).
    _worker: SwrkWorker | None = None
    _spawner: concurrent.futures.Future[None] | None = None
    # One thread per container, kept for its life, for the work around a dump that must not
    # be in the pause or that can overlap CRIU (starting one costs ~0.1-0.2 ms, in the pause).
    _helper_pool: concurrent.futures.ThreadPoolExecutor | None = None
    _worker_lock: threading.Lock = attrs.Factory(threading.Lock)
    _retired: SwrkWorker | None = None  # the worker that served the dump in progress
    # Set while not frozen by freeze(): the next worker is started only then (see _spawn_worker).
    _running: threading.Event = attrs.Factory(threading.Event)
    # What every dump of this container passes to CRIU and that cannot change while it lives.
    _dump_fixed: DumpFacts | None = None
    # CRIU's work directory for the next dump, made ahead by the thread that starts the next
    # worker: a mkdir on a disk-backed state directory costs 0.2-0.5 ms, in the pause.
    _spare_dump_dir: Path | None = None

    def __attrs_post_init__(self) -> None:
        self._running.set()
        if self._gone:
            # A handle on what a dead container left (``gone=True``): its PID may name an
            # unrelated process by now, so none is opened, and kill() signals nothing.
            return
        # Opened at once: a pidfd taken later could name an unrelated process reusing the PID.
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            self._gone = True

    @property
    def pidfd(self) -> int:
        """A pidfd for the NF's init; it polls readable once the NF has died."""
        if self._pidfd is None:
            raise ContainerError(
                f"container {self.name} (pid {self.pid}) is gone and its handle destroyed"
            )
        return self._pidfd

    @property
    def freezer(self) -> Freezer:
        if self._freezer is None:
            self._freezer = Freezer.for_pid(self.pid)
        return self._freezer

    def exited(self, timeout: float = 0.0) -> bool:
        """True once the NF's init has died; waits up to `timeout` seconds for that."""
        if self._gone or self._pidfd is None:
            return True
        poller = select.poll()
        poller.register(self._pidfd, select.POLLIN)
        return bool(poller.poll(timeout * 1000))

    def freeze(self, timeout: float = 2.0) -> None:
        self._running.clear()
        try:
            self.freezer.freeze(timeout)
        except BaseException:
            self._running.set()  # Freezer.freeze thaws again when it fails
            raise

    def thaw(self, timeout: float = 2.0) -> None:
        self.freezer.thaw(timeout)
        self._running.set()

    def checkpoint(self, epoch: int, dest_dir: Path) -> CheckpointImage:
        """Dump the container with CRIU, leaving it running (and frozen, if it was).

        `dest_dir` must not exist; it appears, complete, only when the dump succeeded.
        """
        return self._backend._checkpoint(self, epoch, dest_dir)

    def dump_facts(self) -> DumpFacts:
        """What this container's dumps pass to CRIU (found once, on first use)."""
        return self._backend._dump_fixed(self)

    def prepare_checkpoint(self, *, wait: bool = True) -> None:
        """Get the next dump's CRIU ready now, while the NF runs (swrk mode; else a no-op).

        Every checkpoint does this for the next one by itself; call it once after `start` or
        `restore` so that the first checkpoint is as short as the others: it also reads, once,
        what every dump of this container passes to CRIU (`dump_facts`). Waits until the
        worker process exists (a few ms); CRIU then finishes starting on its own. With
        ``wait=False`` the worker is started on the container's helper thread and this returns
        at once (a restored copy on a failover's critical path); the first dump, or a later
        `prepare_checkpoint`, waits for it.
        """
        if self.exited():
            return
        if self._backend.criu_mode != "swrk":
            self.dump_facts()  # /proc reads that the first dump would make in its pause
            return
        if not wait:
            if self._spawner is None and self._worker is None:
                self._spawner = self._helper().submit(self._prepare_ahead)
            return
        self.dump_facts()
        self._wait_spawner()
        with self._worker_lock:
            if self._worker is not None and self._worker.usable():
                return
        self._spawn_worker(None)

    def _prepare_ahead(self) -> None:
        self.dump_facts()
        self._spawn_worker(None)

    def wait_rx_drained(
        self, timeout: float = 0.02, *, settle: float = 0.0002, own: bool = False
    ) -> RxDrain:
        """Wait, at most `timeout` seconds, until the NF has read every datagram given to it.

        Call it after the data plane paused the unit's ingress and before `freeze`: CRIU does
        not save the receive queues of UDP, raw and packet sockets, so data that was delivered
        into the NF's netns before the cut but not yet read would be missing from the image.
        It reads the receive queue of every such socket in the NF's netns
        (``/proc/PID/net/{udp,udp6,raw,raw6,packet,...}``; the netns is the NF's, so no setns
        is needed) and returns once all have been empty for `settle` seconds, so that a packet
        the data plane handed over just before the pause, and which is still on its way from
        the veth to the socket (the backlog, processed in softirq), is waited for too. TCP is
        not waited for: CRIU saves TCP queues. The NF must be running (not frozen) for its
        queues to drain.

        Bounded: after `timeout` it returns ``drained=False`` with what is still queued; the
        engine then checkpoints anyway (those datagrams are lost on a failover, as before).

        `own`: only the sockets this container's processes hold, not every socket of the netns
        (a chain's members share one; each waits for what was sent to it).
        """
        start = time.monotonic()
        empty_since: float | None = None
        delay = 0.00005
        inodes = socket_inodes(self._pids()) if own else None
        while True:
            try:
                pending, sockets = _rx_pending(self.pid, inodes)
            except OSError as exc:
                raise ContainerError(
                    f"cannot read the sockets of container {self.name} (pid {self.pid}): "
                    f"{exc}; has it died?"
                ) from exc
            now = time.monotonic()
            if pending:
                empty_since = None
            elif empty_since is None:
                empty_since = now
            if empty_since is not None and now - empty_since >= settle:
                return RxDrain(True, now - start)
            if now - start >= timeout:
                return RxDrain(False, now - start, pending, sockets)
            time.sleep(delay)
            delay = min(0.0005, delay * 2)

    def _pids(self) -> list[int]:
        """The container's processes: its cgroup's, or its init alone if that cannot be read."""
        try:
            text = (self.freezer.path / "cgroup.procs").read_text()
        except (OSError, ContainerError):
            return [self.pid]
        return [int(line) for line in text.split()] or [self.pid]

    def _helper(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._helper_pool is None:
            self._helper_pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"hamgr-{self.name}"
            )
        return self._helper_pool

    def _wait_spawner(self) -> None:
        spawner = self._spawner
        if spawner is not None:
            if not spawner.done() and not self._running.is_set():
                # Dumped and not thawed since: start the worker now rather than wait for it.
                self._running.set()
                concurrent.futures.wait([spawner])
                self._running.clear()
            error = spawner.exception()
            self._spawner = None
            if error is not None:
                log.warning("container %s: preparing the next dump failed: %s", self.name, error)

    def _spawn_after_thaw(self, retire: SwrkWorker | None, trash: Path | None) -> None:
        """The job queued after a dump. It first waits for the thaw: starting a process holds
        the GIL during the child's exec (vfork), which would hold up the thread that is about
        to thaw the NF."""
        self._running.wait(SPAWN_AFTER_THAW_WAIT_S)
        self._spawn_worker(retire, trash)

    def _spawn_worker(self, retire: SwrkWorker | None, trash: Path | None = None) -> None:
        """Start the next dump's worker; then reap `retire` (the last one), delete `trash`."""
        try:
            self._backend._ensure_kdat()
            worker: SwrkWorker | None = SwrkWorker(self._runc.criu, nice=self._backend.criu_nice)
        except CriuError as exc:
            log.warning("container %s: cannot start a criu swrk worker ahead: %s", self.name, exc)
            worker = None
        with self._worker_lock:
            old, self._worker = self._worker, worker
        self._make_spare_dump_dir()
        for done in (old, retire):
            if done is not None:
                done.close()
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)

    def _make_spare_dump_dir(self) -> None:
        with self._worker_lock:
            if self._spare_dump_dir is not None or self._gone:
                return
            path = self.work_dir / f"dump-next-{secrets.token_hex(4)}"
            try:
                path.mkdir(mode=0o700)
            except OSError as exc:
                log.warning("container %s: cannot make a CRIU work dir ahead: %s", self.name, exc)
                return
            self._spare_dump_dir = path

    def _take_dump_dir(self, epoch: int) -> Path:
        """An empty directory for CRIU's work files (its log): the one made ahead, or a new one.

        Call after `_wait_spawner`, which may still be making the one ahead.
        """
        with self._worker_lock:
            spare, self._spare_dump_dir = self._spare_dump_dir, None
        if spare is not None:
            return spare
        path = self.work_dir / f"dump-{epoch}"
        if path.exists():  # the log of an earlier failed try of this epoch, kept
            path = path.with_name(f"dump-{epoch}-{secrets.token_hex(4)}")
        path.mkdir(mode=0o700)
        return path

    def _prepare_next_worker(self, retire: SwrkWorker | None, trash: Path | None = None) -> None:
        """After a dump: start the next worker and reap this one, off the NF's pause."""
        if self._gone or self.exited():
            if retire is not None:
                retire.close()
            if trash is not None:
                shutil.rmtree(trash, ignore_errors=True)
            return
        self._spawner = self._helper().submit(self._spawn_after_thaw, retire, trash)

    def _take_worker(self) -> SwrkWorker:
        self._wait_spawner()
        with self._worker_lock:
            worker, self._worker = self._worker, None
        if worker is not None and worker.usable():
            return worker
        if worker is not None:
            worker.close()
        # None ready (first dump, or the last one failed to start): start one now, in the pause.
        self._backend._ensure_kdat()
        return SwrkWorker(self._runc.criu, nice=self._backend.criu_nice)

    def _close_worker(self) -> None:
        self._wait_spawner()
        with self._worker_lock:
            worker, self._worker = self._worker, None
        if worker is not None:
            worker.close()

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`; then remove runc's state and the bundle."""
        if not self.exited():
            # Thawed first: a frozen task cannot act on SIGTERM.
            with contextlib.suppress(ContainerError, OSError):
                if self.freezer.is_frozen():
                    self.freezer.thaw()
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGTERM)
            if not self.exited(timeout):
                self.kill()
        self.destroy()

    def kill(self) -> None:
        """SIGKILL the NF's init (the kernel then kills the whole PID namespace)."""
        if self.exited():
            return
        # pidfd_send_signal cannot hit a recycled PID, unlike kill(2).
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        # A task frozen by the v1 freezer does not die until it is thawed.
        with contextlib.suppress(ContainerError, OSError):
            if not self.exited(0.05) and self.freezer.is_frozen():
                self.freezer.thaw()
        if not self.exited(CONTROL_TIMEOUT_S):
            raise ContainerError(
                f"container {self.name} (pid {self.pid}) survived SIGKILL for "
                f"{CONTROL_TIMEOUT_S}s; it is probably stuck in the kernel (check "
                f"/proc/{self.pid}/stack)"
            )

    def destroy(self) -> None:
        """Kill if needed, then remove runc state, cgroups, bundle and work dir. Idempotent."""
        try:
            self.kill()
        finally:
            self._gone = True
            self._close_worker()
            if self._helper_pool is not None:
                self._helper_pool.shutdown(wait=False)
                self._helper_pool = None
            self._backend._delete(self)
            if self._pidfd is not None:
                os.close(self._pidfd)
                self._pidfd = None


@attrs.define(eq=False)
class RuncBackend:
    """Starts, checkpoints and restores runc containers.

    ``network_lock`` is CRIU's method to block the netns while it dumps TCP state. ``skip`` is
    only safe when the NF's netns is fronted by the data plane and the engine pauses ingress
    before it freezes (epoch step 1), as hamgr does: then nothing reaches the netns during the
    dump, and what the kernel sends from it during the dump (ACKs, retransmissions) goes into
    the next epoch's buffer, which leaves only after a later checkpoint committed. A NF wired
    straight to its peers (as in some tests) needs ``nftables``.

    ``criu_mode`` (with ``engine="criu"``): ``swrk`` drives a CRIU service worker started ahead
    of each dump; ``exec`` runs ``criu dump``. ``cgroup_yard``: let CRIU open the hierarchies
    under /sys/fs/cgroup instead of mounting them, when that directory holds all of them, on
    dumps and on restores.
    ``criu_nice``: the dump runs while the NF is frozen, so every millisecond CRIU waits for a
    CPU is pause; CRIU (and what it forks) runs at this nice value.
    """

    state_dir: Path = DEFAULT_STATE_DIR
    runc: str = "runc"
    criu: str | None = None
    network_lock: NetworkLock = "nftables"
    tcp_established: bool = True
    file_locks: bool = True
    engine: CheckpointEngine = "criu"
    criu_mode: CriuMode = "swrk"
    cgroup_yard: bool = True
    criu_log_level: int = 2
    criu_nice: int = -10
    carry_dev_mounts: bool = True
    _base: dict[str, Any] | None = None
    _yard: Path | Literal[False] | None = None  # `_restore_yard`: None until found, False: none
    _criu_path: str | None = None
    _warned_no_rpc: bool = False

    def __attrs_post_init__(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for sub in ("runc", "bundles", "work"):
            (self.state_dir / sub).mkdir(exist_ok=True, mode=0o700)

    @property
    def masked_empty_dir(self) -> Path:
        """The empty, read-only directory restores bind over runc's masked directories."""
        path = self.state_dir / "masked-empty"
        if not path.is_dir():
            path.mkdir(mode=0o555)
        return path

    @property
    def criu_config(self) -> Path:
        """CRIU options runc cannot pass on its command line; runc reads it per container.

        Besides the network lock, it tells a restore where the masked directories that dumps
        declared external come from (`_masked_dirs`), which a dump ignores, and, with
        ``cgroup_yard``, to open the host's cgroup hierarchies instead of mounting its own
        (`_restore_yard`).
        """
        path = self.state_dir / f"criu-{self.network_lock}.conf"
        text = self._criu_config_text()
        with contextlib.suppress(FileNotFoundError):
            if path.read_text() == text:
                return path
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        tmp.write_text(text)
        os.replace(tmp, path)
        return path

    def _criu_config_text(self) -> str:
        yard = self._restore_yard()
        return (
            f"network-lock {self.network_lock}\n"
            f"external mnt[{MASKED_DIR_KEY}]:{self.masked_empty_dir}\n"
            + (f"cgroup-yard {yard}\n" if yard is not None else "")
        )

    def _restore_yard(self) -> Path | None:
        """The cgroup yard a restore's CRIU opens, if ``cgroup_yard`` and every hierarchy of
        this host is mounted there (found once). Without it CRIU mounts each hierarchy in a
        scratch directory before it restores: 11-16 ms of every restore on the testbed."""
        if not self.cgroup_yard:
            return None
        if self._yard is None:
            self._yard = find_cgroup_yard(os.getpid()) or False
        return self._yard if isinstance(self._yard, Path) else None

    def _runner(self) -> _Runc:
        if self._criu_path is None:
            path = find_criu(self.criu)
            try:
                version = CriuRuntime(path).version()
            except (CriuError, ValueError) as exc:
                raise ContainerError(f"cannot use {path}: {exc}") from exc
            if version < MIN_CRIU:
                raise ContainerError(
                    f"{path} is CRIU {'.'.join(map(str, version))}; hamgr needs "
                    f"{'.'.join(map(str, MIN_CRIU))} or newer on kernels >= 6.13 (run `make setup`)"
                )
            self._criu_path = path
            ensure_kdat_cache(path)
        return _Runc(self.runc, self.state_dir / "runc", self._criu_path)

    @property
    def criu_path(self) -> str:
        """The CRIU executable this backend runs (found and version-checked on first use)."""
        return self._runner().criu

    def _ensure_kdat(self) -> None:
        """Keep CRIU's kernel-feature cache usable (cheap when it is; see ensure_kdat_cache)."""
        if self._criu_path is not None:
            ensure_kdat_cache(self._criu_path)

    def warm_up(self) -> None:
        """Do now the one-time work of this backend's first start or restore: CRIU's version
        check and kdat cache, runc's base spec, the CRIU config file. A standby calls it when it
        is prepared: its takeover's restore, this backend's first, paid ~16 ms for them."""
        self._runner()
        self._base_config()
        _ = self.criu_config

    def _base_config(self) -> dict[str, Any]:
        if self._base is None:
            try:
                self._base = runc_spec_base(self.runc)
            except OciError as exc:
                raise ContainerError(str(exc)) from exc
        return self._base

    def _new_dirs(self, name: str) -> tuple[Path, Path]:
        tag = f"{name}-{secrets.token_hex(4)}"
        work = self.state_dir / "work" / tag
        work.mkdir(mode=0o700)
        return self.state_dir / "bundles" / tag, work

    def prepare_image(self, spec: ContainerSpec) -> Path | None:
        """Unpack `spec`'s OCI archive into the backend's shared rootfs cache, once per archive.

        Returns the rootfs directory, or None when `spec` gets a rootfs of its own (a writable
        rootfs, or an image that is already a directory). `start` and `restore` call it; a
        standby can call it ahead, when it is prepared, so that its first restore does not
        unpack the archive (~35 ms for the sequencer) during a failover. Idempotent, and safe
        to call from several threads or processes.

        Sharing is what a directory image already does: the rootfs is mounted read-only in
        every container, so no container can change what another one sees. The cache is keyed
        by the archive's path, size, mtime, inode and tag, so a rebuilt archive gets a new
        directory; old ones stay until the state directory is removed.
        """
        if not spec.readonly_rootfs or spec.image.is_dir():
            return None
        try:
            st = spec.image.stat()
        except FileNotFoundError as exc:
            raise ContainerError(
                f"image {spec.image} does not exist; build it (hamgr.nfs.images)"
            ) from exc
        ident = f"{spec.image.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0"
        ident += spec.image_ref or ""
        key = hashlib.sha256(ident.encode()).hexdigest()[:20]
        cache = self.state_dir / ROOTFS_CACHE
        rootfs = cache / key
        if rootfs.is_dir():
            return rootfs
        cache.mkdir(mode=0o700, exist_ok=True)
        tmp = cache / f".{key}.{secrets.token_hex(4)}"
        tmp.mkdir(mode=0o700)
        try:
            unpack_image(spec.image, spec.image_ref, tmp / "rootfs")
            # The rename publishes a complete tree; a concurrent unpack that lost the race
            # finds the name taken and discards its own copy.
            with contextlib.suppress(FileExistsError, OSError):
                os.rename(tmp / "rootfs", rootfs)
        except OciError as exc:
            raise ContainerError(str(exc)) from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if not rootfs.is_dir():
            raise ContainerError(f"unpacking {spec.image} into {rootfs} left no directory")
        return rootfs

    def _make_bundle(
        self, spec: ContainerSpec, bundle_dir: Path, *, criu_config: Path | None = None
    ) -> Bundle:
        if not netns_mod.netns_exists(spec.netns):
            raise ContainerError(
                f"netns {spec.netns} does not exist; create it first (shim.netns.create_netns)"
            )
        rootfs = self.prepare_image(spec)
        if rootfs is not None:
            # The bundle uses the shared, unpacked rootfs as a directory image; the container
            # keeps `spec` (and its images name the archive) as before.
            spec = attrs.evolve(spec, image=rootfs, image_ref=None)
        try:
            return prepare_bundle(
                spec,
                bundle_dir,
                base=self._base_config(),
                criu_config=criu_config or self.criu_config,
            )
        except OciError as exc:
            raise ContainerError(str(exc)) from exc

    def _claim_name(self, runner: _Runc, name: str) -> None:
        state = runner.state(name)
        if state is None:
            return
        if state.get("status") != "stopped":
            raise ContainerError(
                f"a container named {name} is {state.get('status')}; stop it or restore under "
                "another name"
            )
        # A dead instance of the same NF (local failover): its runc state only blocks the name.
        self._runc_delete(runner, name, self.state_dir / "work")

    def start(self, spec: ContainerSpec) -> Container:
        runner = self._runner()
        self._claim_name(runner, spec.name)
        bundle_dir, work = self._new_dirs(spec.name)
        bundle: Bundle | None = None
        try:
            bundle = self._make_bundle(spec, bundle_dir)
            pid_file = work / "pid"
            runner.run(
                [
                    "run",
                    "--detach",
                    "--pid-file",
                    str(pid_file),
                    "--bundle",
                    str(bundle.path),
                    spec.name,
                ],
                timeout=START_TIMEOUT_S,
                log=work / "runc.log",
                what=f"starting container {spec.name}",
                fix=f"see the runc log above; `runc --root {runner.root} list` shows what exists",
                detached_stdio=True,
            )
            pid = int(pid_file.read_text())
        except BaseException:
            self._undo(runner, spec, bundle_dir, work)
            raise
        return Container(spec.name, pid, spec, bundle, work, runner, self)

    def _checkpoint(self, c: Container, epoch: int, dest_dir: Path) -> CheckpointImage:
        if dest_dir.exists():
            raise CheckpointError(
                f"{dest_dir} already exists; checkpoints are never overwritten, pick a new "
                "directory per epoch"
            )
        if c.exited():
            raise CheckpointError(f"container {c.name} (pid {c.pid}) has died; restore it")
        # hamgr copies /dev and /dev/shm while CRIU dumps (`_dump_and_carry`); both must see
        # the NF as it was at one instant, so a checkpoint of a running NF freezes it meanwhile.
        try:
            hold = self.engine == "criu" and not c.freezer.is_frozen()
        except OSError as exc:
            raise CheckpointError(f"container {c.name} (pid {c.pid}) has died: {exc}") from exc
        dest_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest_dir.parent / f".{dest_dir.name}.partial-{secrets.token_hex(4)}"
        c._wait_spawner()
        dump_work = c._take_dump_dir(epoch)
        tmp.mkdir(mode=0o700)
        ok = False
        try:
            t0 = time.monotonic()
            if hold:
                c.freeze()
            try:
                if self.engine == "runc":
                    self._dump_with_runc(c, tmp, dump_work, epoch)
                else:
                    self._dump_and_carry(c, tmp, dump_work, epoch)
            finally:
                if hold:
                    c.thaw()
            elapsed = time.monotonic() - t0
            image = self._seal(
                tmp, dest_dir, epoch=epoch, spec=c.spec, engine=self.engine, elapsed=elapsed
            )
            ok = True
            return image
        finally:
            if not ok:
                # The work directory (CRIU's log) stays for the post-mortem, named by epoch.
                shutil.rmtree(tmp, ignore_errors=True)
                drop_stale_criu_locks(c.spec.netns_path)
                if dump_work.name.startswith("dump-next-"):
                    with contextlib.suppress(OSError):
                        dump_work.rename(dump_work.with_name(f"dump-{epoch}"))
            retired, c._retired = c._retired, None
            trash = dump_work if ok else None
            if retired is not None:
                # Reap the worker, start the next one and delete the log, all off the pause.
                c._prepare_next_worker(retired, trash)
            elif trash is not None:
                shutil.rmtree(trash, ignore_errors=True)

    def _dump_and_carry(self, c: Container, tmp: Path, dump_work: Path, epoch: int) -> None:
        """CRIU's dump and, at the same time on the container's helper thread, the files hamgr
        adds to the image (`_side_files`: runc's descriptors.json, and the contents of /dev and
        /dev/shm, which the dump declares external; see shim.devmounts).

        Both see the NF as it was at the cut: it is frozen before either starts, and CRIU
        keeps it stopped (ptrace, then the freezer again) until it returns. Overlapped, hamgr's
        part costs the pause nothing as long as CRIU runs longer, which it does by far, even
        for an NF that keeps tens of MiB in /dev/shm.
        """
        side: list[concurrent.futures.Future[None]] = []

        def start_side() -> None:
            # Called once CRIU has its request: queued earlier, the job could take the GIL
            # from this thread (at its next system call) before CRIU even started. The
            # container's helper is idle: `_checkpoint` waited for its previous job.
            side.append(c._helper().submit(self._side_files, c, tmp, epoch))

        error: BaseException | None = None
        try:
            if self.criu_mode == "swrk":
                self._dump_with_swrk(c, tmp, dump_work, epoch, started=start_side)
            else:
                self._dump_with_criu(c, tmp, dump_work, epoch, started=start_side)
        finally:
            # Waited for even when CRIU failed: it writes into `tmp`, which the caller removes
            # then. CRIU's error, if any, is the one that propagates.
            if side:
                error = side[0].exception()
        if error is not None:
            raise error
        if not side:  # CRIU succeeded without saying it started: never, but stay correct
            self._side_files(c, tmp, epoch)

    def _side_files(self, c: Container, tmp: Path, epoch: int) -> None:
        """What a direct CRIU dump adds to CRIU's images: runc's descriptors.json (so that
        `runc restore` accepts the image), and the contents of the mounts the dump declared
        external (/dev, /dev/shm; shim.devmounts).

        The NF must be stopped (frozen, or held by CRIU), so that what is read is what it had
        at the cut.
        """
        try:
            _write_descriptors(c.pid, tmp)
        except OSError as exc:
            raise CheckpointError(
                f"checkpoint of {c.name} epoch {epoch}: cannot read its stdio: {exc}"
            ) from exc
        for point in self._dump_fixed(c).carried:
            mount = carried_mount(point)
            try:
                archive_tree(f"/proc/{c.pid}/root{point}", tmp / mount.archive)
            except (OSError, DevMountError) as exc:
                raise CheckpointError(
                    f"checkpoint of {c.name} epoch {epoch}: cannot save the contents of "
                    f"{point}: {exc}"
                ) from exc

    def _dump_with_runc(self, c: Container, tmp: Path, dump_work: Path, epoch: int) -> None:
        args = [
            "checkpoint",
            "--leave-running",
            "--image-path",
            str(tmp),
            "--work-path",
            str(dump_work),
        ]
        if self.tcp_established:
            args.append("--tcp-established")
        if self.file_locks:
            args.append("--file-locks")
        try:
            c._runc.run(
                [*args, c.name],
                timeout=CHECKPOINT_TIMEOUT_S,
                log=c.work_dir / "runc.log",
                what=f"checkpoint of {c.name} epoch {epoch}",
                fix=lambda: f"CRIU's errors: {_criu_log_errors(dump_work / 'dump.log')}",
            )
        except ContainerError as exc:
            raise CheckpointError(str(exc)) from exc

    def _dump_with_criu(
        self,
        c: Container,
        tmp: Path,
        dump_work: Path,
        epoch: int,
        *,
        started: Callable[[], object] | None = None,
    ) -> None:
        """The dump runc would ask CRIU for, without runc's process start and CRIU version call.

        The image is what runc writes (with the descriptors.json `_side_files` adds), so
        `runc restore` can restore it like one of its own. `started` runs once CRIU runs.
        """
        cmd = criu_dump_command(
            criu=c._runc.criu,
            pid=c.pid,
            images=tmp,
            work=dump_work,
            options=self._dump_options(c),
        )
        with subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ) as proc:
            if self.criu_nice:
                with contextlib.suppress(OSError):
                    os.setpriority(os.PRIO_PROCESS, proc.pid, self.criu_nice)
            # Woken by the exit itself: Popen.wait(timeout) polls with sleeps of up to 50 ms.
            exited = os.pidfd_open(proc.pid)
            try:
                if started is not None:
                    started()
                done, _, _ = select.select([exited], [], [], CHECKPOINT_TIMEOUT_S)
            finally:
                os.close(exited)
            if not done:
                proc.kill()
                proc.wait()
                raise CheckpointError(
                    f"checkpoint of {c.name} epoch {epoch}: criu dump took over "
                    f"{CHECKPOINT_TIMEOUT_S:.0f}s; CRIU's errors: "
                    f"{_criu_log_errors(dump_work / 'dump.log')}"
                )
            proc.wait()
        if proc.returncode != 0:
            raise CheckpointError(
                f"checkpoint of {c.name} epoch {epoch}: criu dump exited {proc.returncode}; "
                f"CRIU's errors: {_criu_log_errors(dump_work / 'dump.log')}"
            )

    def _dump_fixed(self, c: Container) -> DumpFacts:
        if c._dump_fixed is None:
            masked_files = tuple(_masked_files(c.pid, c.bundle))
            c._dump_fixed = DumpFacts(
                rootfs=c.bundle.rootfs,
                freezer=c.freezer.path,
                netns_inode=os.stat(c.spec.netns_path).st_ino,
                masked_files=masked_files,
                masked_dirs=tuple(_masked_dirs(c.pid, c.bundle)),
                cgroup_yard=find_cgroup_yard(c.pid) if self.cgroup_yard else None,
                carried=_carried(c.pid, masked_files) if self.carry_dev_mounts else (),
            )
        return c._dump_fixed

    def _dump_options(self, c: Container) -> DumpOptions:
        return DumpOptions(
            facts=self._dump_fixed(c),
            network_lock=self.network_lock,
            tcp_established=self.tcp_established,
            file_locks=self.file_locks,
            log_level=self.criu_log_level,
        )

    def _dump_with_swrk(
        self,
        c: Container,
        tmp: Path,
        dump_work: Path,
        epoch: int,
        *,
        started: Callable[[], object] | None = None,
    ) -> None:
        """The same dump as `_dump_with_criu`, asked of a criu swrk worker started earlier."""
        try:
            rpc = rpc_messages()
        except CriuError as exc:
            if not self._warned_no_rpc:
                log.warning("%s; falling back to `criu dump` per checkpoint", exc)
                self._warned_no_rpc = True
            self._dump_with_criu(c, tmp, dump_work, epoch, started=started)
            return
        options = self._dump_options(c)
        try:
            worker = c._take_worker()
        except CriuError as exc:
            raise CheckpointError(f"checkpoint of {c.name} epoch {epoch}: {exc}") from exc
        what = f"checkpoint of {c.name} epoch {epoch}"
        try:
            # CRIU opens these as /proc/<our pid>/fd/<n> (its socket peer), so they stay open
            # here until it answered.
            images_fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
            try:
                work_fd = os.open(dump_work, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    request = criu_dump_request(
                        rpc,
                        pid=c.pid,
                        images_fd=images_fd,
                        work_fd=work_fd,
                        options=options,
                    )
                    resp = worker.call(request, CHECKPOINT_TIMEOUT_S, on_sent=started)
                finally:
                    os.close(work_fd)
            finally:
                os.close(images_fd)
        except TimeoutError as exc:
            raise CheckpointError(
                f"{what}: criu took over {CHECKPOINT_TIMEOUT_S:.0f}s; CRIU's errors: "
                f"{_criu_log_errors(dump_work / 'dump.log')}"
            ) from exc
        except CriuError as exc:
            raise CheckpointError(
                f"{what}: {exc}; CRIU's errors: {_criu_log_errors(dump_work / 'dump.log')}"
            ) from exc
        finally:
            c._retired = worker  # `_checkpoint` replaces it once the image is sealed
        if not resp.success:
            detail = f"errno {resp.cr_errno}" if resp.cr_errno else "no errno"
            if resp.cr_errmsg:
                detail += f": {resp.cr_errmsg}"
            raise CheckpointError(
                f"{what}: criu dump failed ({detail}); CRIU's errors: "
                f"{_criu_log_errors(dump_work / 'dump.log')}"
            )

    @staticmethod
    def _seal(
        tmp: Path, dest_dir: Path, *, epoch: int, spec: ContainerSpec, engine: str, elapsed: float
    ) -> CheckpointImage:
        # fsync only where it means something. On tmpfs (where the primary's images live) it is
        # a no-op: the data cannot outlive the host either way, and what must survive a crash is
        # the standby's copy, which the standby's store makes durable before it acks.
        durable = not is_tmpfs(tmp)
        files = []
        with os.scandir(tmp) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                if entry.is_file(follow_symlinks=False):
                    if durable:
                        _fsync_path(Path(entry.path))
                    files.append((entry.name, entry.stat(follow_symlinks=False).st_size))
        image = CheckpointImage(
            path=dest_dir,
            epoch=epoch,
            spec=spec,
            engine=engine,
            dump_seconds=elapsed,
            files=tuple(files),
        )
        meta = tmp / IMAGE_META
        # One line: with `indent`, json falls back to its pure-Python encoder, ~0.1 ms more
        # in the pause (`python -m json.tool` shows it indented).
        meta.write_text(json.dumps(image.to_json()))
        if durable:
            _fsync_path(meta)
            _fsync_path(tmp, directory=True)
        os.rename(tmp, dest_dir)
        if durable:
            _fsync_path(dest_dir.parent, directory=True)
        return image

    def restore(self, image_dir: Path, netns: str, *, name: str | None = None) -> Container:
        """Start a new container from a checkpoint, joined to `netns` (prepared by the caller).

        `netns` must already have the NF's addresses and a route to its TCP peers, and must not
        receive the NF's traffic until this returns (attach its ports afterwards). The container
        gets a fresh PID namespace from runc, so the PIDs CRIU must recreate are free even while
        the dead original is not yet reaped.
        """
        image = CheckpointImage.load(image_dir)
        spec = attrs.evolve(image.spec, netns=netns, name=name or image.spec.name)
        names = {fname for fname, _ in image.files}
        carried = [m for m in CARRIED_MOUNTS if m.archive in names]
        runner = self._runner()
        self._claim_name(runner, spec.name)
        bundle_dir, work = self._new_dirs(spec.name)
        bundle: Bundle | None = None
        try:
            mounts = bundle_dir / CARRIED_DIR
            criu_config = self.criu_config
            if carried:
                criu_config = self._restore_criu_config(work, mounts, carried)
            bundle = self._make_bundle(spec, bundle_dir, criu_config=criu_config)
            if carried:
                self._mount_carried(bundle, mounts, image_dir, carried)
            pid_file = work / "pid"
            args = [
                "restore",
                "--detach",
                "--image-path",
                str(image_dir),
                "--work-path",
                str(work),
                "--bundle",
                str(bundle.path),
                "--pid-file",
                str(pid_file),
            ]
            if self.tcp_established:
                args.append("--tcp-established")
            if self.file_locks:
                args.append("--file-locks")
            try:
                runner.run(
                    [*args, spec.name],
                    timeout=RESTORE_TIMEOUT_S,
                    log=work / "runc.log",
                    what=f"restore of {spec.name} from {image_dir}",
                    fix=lambda: f"CRIU's errors: {_criu_log_errors(work / 'restore.log')}",
                    detached_stdio=True,
                )
            except ContainerError as exc:
                drop_stale_criu_locks(spec.netns_path)
                raise RestoreError(str(exc)) from exc
            finally:
                if carried:
                    # CRIU bound each tmpfs into the container's own mount namespace, which
                    # keeps it alive as long as the container lives. The host's mount is no
                    # longer needed, and detached now it cannot outlive an agent that dies
                    # without cleaning up.
                    detach_mounts_under(mounts)
            pid = int(pid_file.read_text())
        except BaseException:
            self._undo(runner, spec, bundle_dir, work)
            raise
        return Container(spec.name, pid, spec, bundle, work, runner, self)

    def _restore_criu_config(
        self, work: Path, mounts: Path, carried: Sequence[CarriedMount]
    ) -> Path:
        """The backend's CRIU options plus, per carried mount, where its tmpfs is: a restore
        of this one container reads it (through its bundle's annotation)."""
        text = self._criu_config_text()
        for m in carried:
            text += f"external mnt[{m.key}]:{mounts / m.host_name}\n"
        path = work / "criu.conf"
        path.write_text(text)
        return path

    @staticmethod
    def _mount_carried(
        bundle: Bundle, mounts: Path, image_dir: Path, carried: Sequence[CarriedMount]
    ) -> None:
        """A fresh tmpfs per carried mount, with the options the OCI config gives that mount
        (runc's own defaults if it names none), holding what the image carried."""
        config = json.loads(bundle.config_path.read_text())
        mounts.mkdir(mode=0o700)
        for m in carried:
            target = mounts / m.host_name
            target.mkdir(mode=0o700)
            options = oci_mount_options(config, m.mountpoint) or m.default_options
            try:
                mount_tmpfs(target, options, source=m.key, contents=image_dir / m.archive)
            except DevMountError as exc:
                raise RestoreError(f"cannot prepare {m.mountpoint} for the restore: {exc}") from exc

    def _undo(self, runner: _Runc, spec: ContainerSpec, bundle_dir: Path, work: Path) -> None:
        """Remove what a failed start or restore left; the original error is what matters."""
        with contextlib.suppress(ContainerError):
            self._runc_delete(runner, spec.name, work, bundle=bundle_dir)
        # A failed CRIU restore can leave the container's cgroups behind with tasks still
        # exiting in them, and runc gives up on those after one retry.
        remove_cgroup(spec.cgroups_path)
        remove_bundle(bundle_dir)  # also detaches the tmpfs mounts of a restore
        shutil.rmtree(work, ignore_errors=True)

    def _runc_delete(
        self, runner: _Runc, name: str, work: Path, *, bundle: Path | None = None
    ) -> None:
        state = runner.state(name)
        if state is None:
            return
        if bundle is not None and state.get("bundle") != str(bundle):
            # The name now belongs to a newer instance (restored after this one died).
            return
        log = work / "delete.log" if work.exists() else self.state_dir / "delete.log"
        runner.run(
            ["delete", "--force", name],
            timeout=CONTROL_TIMEOUT_S,
            log=log,
            what=f"deleting container {name}",
            fix=f"kill its processes and run `runc --root {runner.root} delete --force {name}`",
        )

    def remove_stale(self, name: str) -> bool:
        """Remove the container under `name`, running or not, if runc has one: what an agent
        that died left behind (a copy it restored ahead and never dropped). True if there was
        one. Costs nothing when runc has no state for `name`."""
        runner = self._runner()
        state = runner.state(name)
        if state is None:
            return False
        self._runc_delete(runner, name, self.state_dir / "work")
        if state.get("bundle"):
            remove_bundle(Path(state["bundle"]))
        return True

    def _delete(self, c: Container) -> None:
        try:
            self._runc_delete(c._runc, c.name, c.work_dir, bundle=c.bundle.path)
        finally:
            remove_bundle(c.bundle)
            shutil.rmtree(c.work_dir, ignore_errors=True)


def _cgroup_hierarchies() -> list[Path]:
    roots = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split()[:1] in (["cgroup"], ["cgroup2"]):
                roots.append(Path(left.split()[4]))
    return roots


def drop_stale_criu_locks(netns_path: str) -> list[str]:
    """Delete CRIU's network-lock tables left in a netns by a CRIU that died mid-way.

    CRIU's nftables lock drops every packet in the netns; it normally removes it itself, but not
    when it is killed (e.g. by our timeout). Only one CRIU runs per unit netns at a time, so any
    ``CRIU-*`` table found after a failure is stale. Returns the tables removed.
    """
    nsenter = ["nsenter", f"--net={netns_path}", "nft"]
    try:
        listing = subprocess.run(
            [*nsenter, "list", "tables"],
            capture_output=True,
            text=True,
            timeout=CONTROL_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    removed = []
    for line in listing.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "table" and parts[2].startswith("CRIU-"):
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                subprocess.run(
                    [*nsenter, "delete", "table", parts[1], parts[2]],
                    capture_output=True,
                    timeout=CONTROL_TIMEOUT_S,
                    check=False,
                )
                removed.append(f"{parts[1]} {parts[2]}")
    return removed


@attrs.frozen
class DumpFacts:
    """What every dump of one container passes to CRIU, fixed while the container lives."""

    rootfs: Path
    freezer: Path
    netns_inode: int
    masked_files: tuple[str, ...]
    masked_dirs: tuple[str, ...]
    cgroup_yard: Path | None
    # /dev and /dev/shm when hamgr carries them (shim.devmounts): external to CRIU.
    carried: tuple[str, ...] = ()


@attrs.frozen
class DumpOptions:
    """Everything a dump asks of CRIU beyond where the images go: one value for both the
    command line and the RPC request, so the two paths cannot drift apart."""

    facts: DumpFacts
    network_lock: NetworkLock
    tcp_established: bool
    file_locks: bool
    log_level: int = 4


def _write_descriptors(pid: int, images: Path) -> None:
    """runc's descriptors.json: what the NF's stdio were, which `runc restore` reads."""
    descriptors = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in range(3)]
    (images / RUNC_DESCRIPTORS).write_text(json.dumps(descriptors))


def parse_rx_queues(table: str, text: str, inodes: frozenset[int] | None = None) -> tuple[int, int]:
    """(bytes, sockets) of received data still queued, from one ``/proc/net/<table>`` listing;
    with `inodes`, of those sockets only.

    The inet tables (udp, raw, ...) have a ``tx_queue:rx_queue`` hex column and the inode in
    the tenth; ``packet`` has decimal ``Rmem`` and ``Inode`` columns.
    """
    lines = text.splitlines()
    if len(lines) < 2:
        return 0, 0
    rows = [line.split() for line in lines[1:] if line.strip()]
    if table == "packet":
        header = lines[0].split()
        column, inode_at = header.index("Rmem"), header.index("Inode")
        queued = [(int(r[column]), int(r[inode_at])) for r in rows]
    else:
        queued = [(int(r[4].split(":")[1], 16), int(r[9])) for r in rows]
    busy = [q for q, ino in queued if q > 0 and (inodes is None or ino in inodes)]
    return sum(busy), len(busy)


def socket_inodes(pids: Iterable[int]) -> frozenset[int]:
    """The inodes of the sockets the processes `pids` hold open (gone processes: none)."""
    found = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    found.add(int(target[8:-1]))
    return frozenset(found)


def _rx_pending(pid: int, inodes: frozenset[int] | None = None) -> tuple[int, int]:
    total = sockets = 0
    for table in RX_TABLES:
        try:
            text = Path(f"/proc/{pid}/net/{table}").read_text()
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{pid}"):
                raise
            continue  # that protocol is not built in or not enabled in this netns
        queued, n = parse_rx_queues(table, text, inodes)
        total += queued
        sockets += n
    return total, sockets


def find_cgroup_yard(pid: int, yard: Path = CGROUP_YARD) -> Path | None:
    """`yard` if it holds the root of every cgroup hierarchy `pid` is in; see `cgroup_yard_for`."""
    try:
        with open("/proc/self/mountinfo") as f:
            mountinfo = f.read()
        with open(f"/proc/{pid}/cgroup") as f:
            proc_cgroup = f.read()
    except FileNotFoundError:
        return None
    return cgroup_yard_for(mountinfo, proc_cgroup, yard)


def cgroup_yard_for(mountinfo: str, proc_cgroup: str, yard: Path = CGROUP_YARD) -> Path | None:
    """`yard` if, per `mountinfo`, it holds the root of every hierarchy in `proc_cgroup`.

    CRIU names a hierarchy by its controllers (``cpu,cpuacct``), ``name=X`` as ``X``, and the
    unified (v2) one ``unified``; given ``--cgroup-yard`` it opens ``<yard>/<name>`` instead of
    mounting each hierarchy in a scratch directory. Anything else (a hierarchy mounted
    elsewhere, or only a sub-tree mounted there) gives None, and CRIU mounts its own.
    """
    roots: dict[str, set[str]] = {}  # mount point -> its controllers ({""} for cgroup2)
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if len(fields) < 5 or len(rest) < 3 or fields[3] != "/":
            continue
        if rest[0] == "cgroup2":
            roots[fields[4]] = {""}
        elif rest[0] == "cgroup":
            roots[fields[4]] = {o for o in rest[2].split(",") if o not in ("rw", "ro")}
    lines = [line for line in proc_cgroup.splitlines() if line.strip()]
    if not lines:
        return None
    for line in lines:
        _hid, controllers, _path = line.split(":", 2)
        if controllers == "":
            name, want = "unified", {""}
        else:
            name = controllers.removeprefix("name=")
            want = set(controllers.split(","))
        have = roots.get(str(yard / name))
        if have is None or not want <= have:
            return None
    return yard


def _masked_files(pid: int, bundle: Bundle) -> list[str]:
    """Masked paths that are files: runc bind-mounts /dev/null over them, CRIU must map them."""
    config = json.loads(bundle.config_path.read_text())
    masked = config.get("linux", {}).get("maskedPaths", [])
    out = []
    for path in masked:
        with contextlib.suppress(OSError):
            if not os.path.isdir(f"/proc/{pid}/root{path}") and os.path.exists(
                f"/proc/{pid}/root{path}"
            ):
                out.append(path)
    return out


def criu_dump_command(
    *, criu: str, pid: int, images: Path, work: Path, options: DumpOptions
) -> list[str]:
    """The criu command line equivalent to runc's checkpoint RPC, with the tree left running."""
    facts = options.facts
    cmd = [
        criu, "dump",
        "--tree", str(pid),
        "--images-dir", str(images),
        "--work-dir", str(work),
        "--log-file", "dump.log",
        f"-v{options.log_level}",
        "--leave-running",
        "--root", str(facts.rootfs),
        "--freeze-cgroup", str(facts.freezer),
        "--manage-cgroups=soft",
        "--external", f"net[{facts.netns_inode}]:{RUNC_NETNS_KEY}",
        "--network-lock", options.network_lock,
    ]  # fmt: skip
    if options.tcp_established:
        cmd.append("--tcp-established")
    if options.file_locks:
        cmd.append("--file-locks")
    for path in facts.masked_files:
        cmd += ["--ext-mount-map", f"{path}:/dev/null"]
    for path in facts.masked_dirs:
        cmd += ["--external", f"mnt[{path}]:{MASKED_DIR_KEY}"]
    for path in facts.carried:
        cmd += ["--external", f"mnt[{path}]:{carried_mount(path).key}"]
    if facts.cgroup_yard is not None:
        cmd += ["--cgroup-yard", str(facts.cgroup_yard)]
    return cmd


_RPC_LOCKS = {"iptables": "IPTABLES", "nftables": "NFTABLES", "skip": "SKIP"}


def criu_dump_request(
    rpc: Any, *, pid: int, images_fd: int, work_fd: int, options: DumpOptions
) -> Any:
    """The RPC twin of `criu_dump_command`: a ``criu_req`` of type DUMP (`rpc` is pycriu's
    ``rpc_pb2``). `images_fd` and `work_fd` are directory fds of the calling process."""
    facts = options.facts
    req = rpc.criu_req(type=rpc.DUMP)
    opts = req.opts
    opts.pid = pid
    opts.images_dir_fd = images_fd
    opts.work_dir_fd = work_fd
    opts.log_file = "dump.log"
    opts.log_level = options.log_level
    opts.leave_running = True
    opts.root = str(facts.rootfs)
    opts.freeze_cgroup = str(facts.freezer)
    opts.manage_cgroups = True
    opts.manage_cgroups_mode = rpc.SOFT
    opts.external.append(f"net[{facts.netns_inode}]:{RUNC_NETNS_KEY}")
    opts.network_lock = getattr(rpc, _RPC_LOCKS[options.network_lock])
    opts.tcp_established = options.tcp_established
    opts.file_locks = options.file_locks
    for path in facts.masked_files:
        opts.ext_mnt.add(key=path, val="/dev/null")
    for path in facts.masked_dirs:
        opts.external.append(f"mnt[{path}]:{MASKED_DIR_KEY}")
    for path in facts.carried:
        opts.external.append(f"mnt[{path}]:{carried_mount(path).key}")
    if facts.cgroup_yard is not None:
        opts.cgroup_yard = str(facts.cgroup_yard)
    return req


def _carried(pid: int, masked_files: Sequence[str]) -> tuple[str, ...]:
    """/dev and /dev/shm, when hamgr can carry them past CRIU (`shim.devmounts`)."""
    try:
        with open(f"/proc/{pid}/mountinfo") as f:
            mountinfo = f.read()
    except FileNotFoundError:
        return ()
    return carried_mounts(mountinfo, masked_files)


def _masked_dirs(pid: int, bundle: Bundle) -> list[str]:
    """Masked paths that are empty directories on a read-only mount, as runc masks them.

    runc masks a directory with an empty read-only tmpfs. CRIU would archive each such tmpfs
    with tar and gzip on every dump (a few ms of process starts each, inside the pause) to save
    a directory that is empty and read-only by construction. Dumps declare them external
    instead (key `MASKED_DIR_KEY`) and restores bind an empty read-only directory there (which
    is what a restored container then has, so the same test finds it again): what the NF can
    see is the same, an empty directory it cannot write to. Anything else is left to CRIU.
    """
    config = json.loads(bundle.config_path.read_text())
    masked = set(config.get("linux", {}).get("maskedPaths", []))
    out = []
    try:
        with open(f"/proc/{pid}/mountinfo") as f:
            mounts = f.read().splitlines()
    except FileNotFoundError:
        return []
    for line in mounts:
        left, _, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if len(fields) < 6 or not rest:
            continue
        point, options = fields[4], fields[5].split(",")
        if point not in masked or "ro" not in options:
            continue
        with contextlib.suppress(OSError):
            if not os.listdir(f"/proc/{pid}/root{point}"):
                out.append(point)
    return sorted(set(out))


def mount_image_tmpfs(path: Path, *, size_mb: int, huge: str = "within_size") -> bool:
    """Mount a tmpfs for checkpoint images at `path`, unless one is mounted there already.

    Returns True if it mounted one (the caller unmounts it when done). ``huge=within_size``
    lets the tmpfs use transparent huge pages for the large ``pages-*.img`` files: CRIU writes
    them about twice as fast as into 4 KiB pages (measured: 64 MiB in ~13 ms against ~27 ms;
    docs/containers.md), while the image's small files stay in small pages (``always`` costs a
    2 MiB page per file: 106 MiB of memory for a 64 MiB image). Images on tmpfs need no fsync
    (see `RuncBackend._seal`).
    """
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open("/proc/self/mountinfo") as f:
        points = {line.split()[4] for line in f}
    if str(path.resolve()) in points and is_tmpfs(path):
        return False
    opts = f"size={size_mb}m,mode=0700,huge={huge}"
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", opts, "hamgr-images", str(path)],
            check=True,
            capture_output=True,
            text=True,
            timeout=CONTROL_TIMEOUT_S,
        )
    except subprocess.CalledProcessError as exc:
        raise ContainerError(
            f"cannot mount a tmpfs for images at {path}: {exc.stderr.strip()}; run as root"
        ) from exc
    return True


def remove_cgroup(cgroup: str, timeout: float = 2.0) -> bool:
    """Remove a cgroup and its empty descendants from every hierarchy; True if all are gone.

    rmdir only succeeds on a cgroup without tasks, so this never disturbs a live container;
    tasks that are still exiting get `timeout` seconds to go.
    """
    rel = cgroup.strip("/")
    if not rel:
        return True
    deadline = time.monotonic() + timeout
    while True:
        left = []
        for hierarchy in _cgroup_hierarchies():
            top = hierarchy / rel
            if not top.is_dir():
                continue
            for dirpath, _dirs, _files in os.walk(top, topdown=False):
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)
            if top.is_dir():
                left.append(top)
        if not left or time.monotonic() >= deadline:
            return not left
        time.sleep(0.02)


def remove_cgroup_parent(parent: str) -> None:
    """Remove a hamgr cgroup parent once its containers are gone; a missing one is fine."""
    remove_cgroup(parent, timeout=0.5)
