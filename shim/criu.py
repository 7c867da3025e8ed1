"""A small typed handle on a CRIU executable, and what makes CRIU fast enough to run in a pause.

- `CriuRuntime`: version, kernel check, and a real TCP dump probe. hamgr runs a private CRIU (see
  scripts/provision-criu.sh) because the distribution's CRIU does not work on the kernels it
  targets, so callers need a cheap way to prove that a given binary can actually checkpoint a
  process with live TCP state before trusting it with a unit.
- `ensure_kdat_cache`: CRIU probes about 30 kernel features (its "kerndat", ~30 ms) on every run
  unless it finds them cached in ``/run/criu.kdat``, and it only writes that cache when ``/run``
  is a tmpfs. Where it is not, hamgr keeps the cache on a tmpfs of its own and points
  ``/run/criu.kdat`` at it (see the function for why that is as safe as CRIU's own cache).
- `SwrkWorker`: a ``criu swrk`` process started *before* the request it will serve, so CRIU's
  exec, dynamic linking and start-up are not part of the NF's pause. hamgr speaks CRIU's RPC over
  the socketpair itself (with pycriu's generated messages): pycriu's own loop does a single
  ``recv`` and cannot answer notify messages, and it starts CRIU at request time.
- `conntrack_buckets` / `set_conntrack_buckets`: every dump of a netns lists its conntrack
  entries, and the kernel walks the whole (global) hash table to do it, twice per dump.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import importlib
import itertools
import logging
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import attrs

__all__ = [
    "CONNTRACK_BUCKETS_FOR_DUMPS",
    "KDAT_CACHE",
    "KDAT_DIR",
    "CheckResult",
    "CriuError",
    "CriuRuntime",
    "KdatStatus",
    "ProbeResult",
    "SwrkWorker",
    "conntrack_buckets",
    "ensure_kdat_cache",
    "log_tail",
    "parse_version",
    "rpc_messages",
    "set_conntrack_buckets",
]

log = logging.getLogger(__name__)

# The version must be followed by something that cannot continue it, so that "4.2.1abc" or
# "4.2.x" are rejected rather than silently read as 4.2.0.
_VERSION_RE = re.compile(r"^\s*Version:\s*(\d+)\.(\d+)(?:\.(\d+))?(?![\w.])", re.MULTILINE)

# 198.18.0.0/15 is reserved for benchmarking; the probe only ever uses it inside its own netns.
_PROBE_ADDR = "198.18.0.1"
_EXTERNAL_NET_KEY = "extnet"
_probe_seq = itertools.count()

# The probe payload: a listener plus both ends of one established connection, all in one
# process, so a single dump covers listening, established and accepted sockets. It reports
# readiness on an inherited pipe and closes it, leaving nothing CRIU would see as external.
_PROBE_PAYLOAD = """
import os, socket, sys, time
ready_fd, addr, lifetime = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((addr, 0))
srv.listen(4)
cli = socket.create_connection(srv.getsockname(), timeout=5)
conn, _ = srv.accept()
cli.sendall(b"ping")
conn.recv(4)
os.write(ready_fd, b"ready")
os.close(ready_fd)
time.sleep(lifetime)
"""


class CriuError(RuntimeError):
    """The CRIU executable could not be run or gave an answer that makes no sense."""


@attrs.frozen
class CheckResult:
    ok: bool
    detail: str


@attrs.frozen
class ProbeResult:
    ok: bool
    detail: str
    dump_seconds: float | None = None


def parse_version(text: str) -> tuple[int, int, int]:
    """Parse the output of ``criu --version`` into (major, minor, patch); patch defaults to 0."""
    match = _VERSION_RE.search(text)
    if match is None:
        shown = text.strip().splitlines()[0][:80] if text.strip() else "<empty>"
        raise ValueError(
            f"not a 'criu --version' output: expected a line 'Version: X.Y[.Z]', got {shown!r}"
        )
    major, minor, patch = match.group(1), match.group(2), match.group(3)
    return int(major), int(minor), int(patch) if patch is not None else 0


def log_tail(log: Path, lines: int = 8) -> str:
    """The last meaningful lines of a CRIU log: its errors if it has any, else its last lines."""
    try:
        text = log.read_text(errors="replace")
    except OSError as exc:
        return f"(no CRIU log at {log}: {exc.strerror})"
    body = [line for line in text.splitlines() if line.strip()]
    errors = [line for line in body if "Error (" in line]
    return "\n".join((errors or body)[-lines:])


def _remaining(deadline: float, what: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError(f"timed out before {what}")
    return left


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if res.returncode != 0:
        raise CriuError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
    return res


@attrs.frozen
class CriuRuntime:
    """A CRIU executable, e.g. the wrapper that scripts/provision-criu.sh prints."""

    path: str

    def version(self) -> tuple[int, int, int]:
        try:
            res = subprocess.run(
                [self.path, "--version"], capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise CriuError(f"cannot run {self.path} --version: {exc}") from exc
        if res.returncode != 0:
            raise CriuError(f"{self.path} --version exited {res.returncode}: {res.stderr.strip()}")
        return parse_version(res.stdout)

    def check(self) -> CheckResult:
        try:
            res = subprocess.run(
                [self.path, "check"], capture_output=True, text=True, timeout=60, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return CheckResult(ok=False, detail=f"cannot run {self.path} check: {exc}")
        detail = "\n".join(part.strip() for part in (res.stdout, res.stderr) if part.strip())
        return CheckResult(ok=res.returncode == 0, detail=detail)

    def probe_tcp_dump(self, workdir: Path, timeout: float = 20) -> ProbeResult:
        """Dump (leaving it running) a process holding a listening and an established TCP socket.

        The process lives in a throw-away netns that is declared external, which is how hamgr
        dumps its NFs. Everything created here is removed before returning, even on failure.
        """
        deadline = time.monotonic() + timeout
        netns = f"hamgr-probe-{os.getpid()}-{next(_probe_seq)}"
        try:
            workdir.mkdir(parents=True, exist_ok=True)
            images = Path(tempfile.mkdtemp(prefix="criu-probe-", dir=workdir))
        except OSError as exc:
            return ProbeResult(ok=False, detail=f"cannot use {workdir} for the probe images: {exc}")
        proc: subprocess.Popen[bytes] | None = None
        netns_made = False
        ready_r = -1
        try:
            _run(["ip", "netns", "add", netns], _remaining(deadline, "ip netns add"))
            netns_made = True
            _run(["ip", "-n", netns, "link", "set", "lo", "up"], _remaining(deadline, "lo up"))
            _run(
                ["ip", "-n", netns, "addr", "add", f"{_PROBE_ADDR}/32", "dev", "lo"],
                _remaining(deadline, "ip addr add"),
            )
            ready_r, ready_w = os.pipe()
            try:
                # nsenter --net only: "ip netns exec" would also make a mount namespace that
                # CRIU then has to dump. A new session lets CRIU dump without --shell-job.
                proc = subprocess.Popen(
                    [
                        "nsenter",
                        f"--net=/run/netns/{netns}",
                        sys.executable,
                        "-c",
                        _PROBE_PAYLOAD,
                        str(ready_w),
                        _PROBE_ADDR,
                        str(timeout * 3),
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    pass_fds=(ready_w,),
                    start_new_session=True,
                )
            finally:
                os.close(ready_w)
            readable, _, _ = select.select([ready_r], [], [], _remaining(deadline, "probe start"))
            if not readable or os.read(ready_r, 16) != b"ready":
                state = "still starting" if proc.poll() is None else f"exited {proc.returncode}"
                return ProbeResult(
                    ok=False, detail=f"the probe process did not become ready ({state})"
                )
            netns_ino = os.stat(f"/run/netns/{netns}").st_ino
            cmd = [
                self.path, "dump",
                "-t", str(proc.pid),
                "-D", str(images),
                "-o", "dump.log", "-v4",
                "--leave-running",
                "--tcp-established",
                "--external", f"net[{netns_ino}]:{_EXTERNAL_NET_KEY}",
                "--network-lock", "nftables",
            ]  # fmt: skip
            started = time.monotonic()
            res = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                timeout=_remaining(deadline, "criu dump"),
                check=False,
            )
            took = time.monotonic() - started
            if res.returncode != 0:
                return ProbeResult(
                    ok=False,
                    detail=f"criu dump exited {res.returncode}:\n{log_tail(images / 'dump.log')}",
                    dump_seconds=took,
                )
            missing = [
                name
                for name in ("inventory.img", "pstree.img", f"core-{proc.pid}.img")
                if not (images / name).is_file()
            ]
            if not any(images.glob("tcp-stream-*.img")):
                missing.append("tcp-stream-*.img")
            if missing:
                return ProbeResult(
                    ok=False,
                    detail=f"criu dump succeeded but wrote no {', '.join(missing)}",
                    dump_seconds=took,
                )
            if proc.poll() is not None:
                return ProbeResult(
                    ok=False,
                    detail=f"the probe exited ({proc.returncode}) during a --leave-running dump",
                    dump_seconds=took,
                )
            return ProbeResult(
                ok=True,
                detail=f"dumped pid {proc.pid} with TCP state in {took * 1000:.0f} ms",
                dump_seconds=took,
            )
        except (OSError, subprocess.SubprocessError, CriuError, TimeoutError) as exc:
            detail = f"probe failed: {exc}"
            if (images / "dump.log").exists():
                detail += "\n" + log_tail(images / "dump.log")
            return ProbeResult(ok=False, detail=detail)
        finally:
            if proc is not None:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
            if ready_r >= 0:
                os.close(ready_r)
            if netns_made:
                subprocess.run(
                    ["ip", "netns", "del", netns], capture_output=True, timeout=10, check=False
                )
            shutil.rmtree(images, ignore_errors=True)


# --------------------------------------------------------------------------- filesystem type

_TMPFS_MAGIC = 0x01021994
_RAMFS_MAGIC = 0x858458F6
_libc = ctypes.CDLL(None, use_errno=True)


def fs_magic(path: Path | str) -> int:
    """statfs(2)'s f_type of the filesystem holding `path` (Python's os.statvfs lacks it)."""
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on x86_64
    if _libc.statfs(os.fsencode(str(path)), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"statfs({path}): {os.strerror(err)}")
    return int.from_bytes(buf.raw[:8], sys.byteorder, signed=True)


def is_tmpfs(path: Path | str) -> bool:
    """True if `path` lives in memory (tmpfs or ramfs): its data cannot outlive the host."""
    return fs_magic(path) in (_TMPFS_MAGIC, _RAMFS_MAGIC)


# --------------------------------------------------------------------------- kerndat cache

# Where CRIU looks: it is built with RUNDIR=/run and reads KDAT_RUNDIR "/criu.kdat".
KDAT_CACHE = Path("/run/criu.kdat")
# hamgr's own tmpfs for the real file. It is gone after a reboot, like CRIU's /run would be.
KDAT_DIR = Path("/run/hamgr/criu-kdat")
_KDAT_STAMP = "stamp"

KdatStatus = Literal["native", "cached", "created", "unavailable"]


def _criu_stamp(criu: str) -> str:
    """Names the CRIU build: its file, and for a wrapper script, every file the script names.

    CRIU checks its cache against a magic number of its own build, and drops a stale one by
    unlinking /run/criu.kdat (our symlink); the stamp lets hamgr refresh the cache at once
    instead of after the first slow dump following an upgrade.
    """
    parts = []
    real = os.path.realpath(criu)
    paths = [real]
    with open(real, "rb") as f:
        head = f.read(4096)
    if head.startswith(b"#!"):
        for word in re.findall(rb"/[^\s\"']+", head):
            cand = os.fsdecode(word)
            if os.path.isfile(cand) and cand not in paths:
                paths.append(cand)
    for path in paths:
        st = os.stat(path)
        parts.append(f"{path}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}")
    return "\n".join(parts) + "\n"


def _kdat_ready(link: Path, target: Path, stamp: str) -> bool:
    try:
        return (
            os.readlink(link) == str(target)
            and target.stat().st_size > 0
            and (target.parent / _KDAT_STAMP).read_text() == stamp
        )
    except OSError:
        return False


def ensure_kdat_cache(
    criu: str,
    *,
    link: Path = KDAT_CACHE,
    directory: Path = KDAT_DIR,
    timeout: float = 30.0,
) -> KdatStatus:
    """Give CRIU a kernel-feature cache it can load, even where /run is not a tmpfs.

    Idempotent and cheap when the cache is in place (a readlink and two stats). Returns:

    - ``native``: /run is a tmpfs, so CRIU keeps its own cache there; nothing to do.
    - ``cached``: hamgr's cache is in place for this CRIU build.
    - ``created``: it was (re)made now (one ``criu check``, about 60 ms).
    - ``unavailable``: it could not be made (not root, no ``unshare``...); CRIU still works,
      it just probes the kernel on every run (~30 ms). The reason is logged.

    How: CRIU loads ``/run/criu.kdat`` from any filesystem, but writes it only onto a tmpfs,
    because a cache that survived a reboot could describe another kernel. So hamgr mounts a
    small tmpfs at `directory` (root-only), runs ``criu check`` once in a private mount
    namespace whose /run is that tmpfs (so CRIU itself probes and writes the file, in its own
    format), and makes ``/run/criu.kdat`` a symlink to it. After a reboot the tmpfs is gone and
    the link dangles, so CRIU probes afresh: exactly the lifetime CRIU intends. A cache from
    another CRIU build is refused by CRIU itself (it checks a build magic and unlinks the link);
    the stamp file makes hamgr notice an upgrade earlier.
    """
    try:
        if is_tmpfs(link.parent):
            return "native"
        target = directory / link.name
        stamp = _criu_stamp(criu)
        if _kdat_ready(link, target, stamp):
            return "cached"
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock_path = directory.parent / f".{directory.name}.lock"
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if _kdat_ready(link, target, stamp):
                return "cached"
            _make_kdat(criu, target, timeout)
            (directory / _KDAT_STAMP).write_text(stamp)
            tmp_link = link.with_name(f".{link.name}.hamgr-{os.getpid()}")
            with contextlib.suppress(FileNotFoundError):
                tmp_link.unlink()
            os.symlink(target, tmp_link)
            os.replace(tmp_link, link)
        return "created"
    except (OSError, CriuError, subprocess.SubprocessError) as exc:
        log.warning(
            "CRIU's kernel-feature cache is not available (%s); every CRIU run will probe the "
            "kernel again (~30 ms)",
            exc,
        )
        return "unavailable"


def _make_kdat(criu: str, target: Path, timeout: float) -> None:
    directory = target.parent
    if not is_tmpfs(directory):
        mount = ["mount", "-t", "tmpfs", "-o", "mode=0700,size=1m,nosuid,nodev,noexec"]
        subprocess.run(
            [*mount, "hamgr-criu-kdat", str(directory)],
            check=True,
            capture_output=True,
            timeout=timeout,
        )
    for entry in directory.iterdir():
        if entry.is_file() and entry.name != _KDAT_STAMP:
            entry.unlink()
    # CRIU writes <RUNDIR>/criu.kdat; in this private mount namespace RUNDIR is our tmpfs.
    # `criu check` exits non-zero on some optional features, but kerndat is saved first.
    unshare = ["unshare", "--mount", "--propagation", "private", "--"]
    script = 'mount --bind "$1" /run && exec "$2" check'
    res = subprocess.run(
        [*unshare, "sh", "-c", script, "sh", str(directory), criu],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    for entry in directory.iterdir():
        if entry.name not in (target.name, _KDAT_STAMP):
            with contextlib.suppress(OSError):
                entry.unlink()
    if not target.is_file() or target.stat().st_size == 0:
        detail = (res.stderr or res.stdout).strip()[-300:]
        raise CriuError(f"`criu check` wrote no {target.name} (exit {res.returncode}): {detail}")


# --------------------------------------------------------------------------- conntrack

_CT_BUCKETS = Path("/proc/sys/net/netfilter/nf_conntrack_buckets")
# Each bucket costs about 37 ns per walk here: 262144 (the default for 24 GiB) is ~10 ms per
# walk and a dump walks twice (entries, then expectations); 16384 is ~0.6 ms.
CONNTRACK_BUCKETS_FOR_DUMPS = 16384


def conntrack_buckets() -> int | None:
    """The size of the kernel's conntrack hash table, or None without conntrack."""
    try:
        return int(_CT_BUCKETS.read_text())
    except (OSError, ValueError):
        return None


def set_conntrack_buckets(buckets: int = CONNTRACK_BUCKETS_FOR_DUMPS) -> int | None:
    """Shrink the conntrack hash table to `buckets` if it is larger; returns the size now.

    A host-wide setting (root, initial netns), so it is a setup step, never done behind the
    caller's back: a smaller table makes CRIU's conntrack dump (two full walks of the global
    table per checkpoint, whatever the NF's netns holds) proportionally cheaper, at the price
    of longer hash chains once the host tracks far more than `buckets` connections.
    """
    now = conntrack_buckets()
    if now is None or now <= buckets:
        return now
    _CT_BUCKETS.write_text(f"{buckets}\n")
    return conntrack_buckets()


# --------------------------------------------------------------------------- swrk worker


def rpc_messages() -> Any:
    """pycriu's generated protobuf module for CRIU's RPC (criu_req, criu_opts, criu_resp...)."""
    try:
        return importlib.import_module("pycriu.rpc_pb2")
    except ImportError as exc:
        raise CriuError(
            "pycriu is not importable, so CRIU cannot be driven over RPC: run `make setup` "
            "(scripts/provision-criu.sh installs pycriu into the venv), or use exec mode"
        ) from exc


_MAX_RESPONSE = 1 << 20


class SwrkWorker:
    """One ``criu swrk`` process, started ahead of the one request it will serve.

    CRIU's start-up (the wrapper, the loader, the libraries, option set-up) then happens while
    the NF still runs; the request itself only parses options and loads the kdat cache before
    it starts dumping. CRIU's service worker exits after answering a request (unless asked to
    keep the socket open, which is meant for pre-dump series, not for repeated dumps), so a
    caller starts a fresh worker for every dump, right after the previous one.
    """

    def __init__(self, criu: str, *, nice: int = 0) -> None:
        self.criu = criu
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # Its own session: a Ctrl-C meant for the caller must not kill CRIU mid-dump;
            # the caller ends the worker itself (close).
            self._proc = subprocess.Popen(
                [criu, "swrk", str(child.fileno())],
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as exc:
            parent.close()
            raise CriuError(f"cannot start `{criu} swrk`: {exc}") from exc
        finally:
            child.close()
        self._sock = parent
        self._used = False
        if nice:
            # Inherited by what CRIU forks (tar for tmpfs contents...). Failing to raise the
            # priority only costs speed under contention, so it is not an error.
            try:
                os.setpriority(os.PRIO_PROCESS, self._proc.pid, nice)
            except OSError as exc:
                log.warning("cannot set nice %d on criu swrk %d: %s", nice, self._proc.pid, exc)

    @property
    def pid(self) -> int:
        return self._proc.pid

    def usable(self) -> bool:
        """Not used yet and still running (it waits for its request)."""
        return not self._used and self._proc.poll() is None

    def _exit_detail(self) -> str:
        rc = self._proc.poll()
        return "still running" if rc is None else f"exited {rc}"

    def call(
        self, request: Any, timeout: float, *, on_sent: Callable[[], object] | None = None
    ) -> Any:
        """Send one ``criu_req``; return its ``criu_resp``. Notify messages are acknowledged.

        `on_sent` runs once the request is on its way: work meant to overlap CRIU's starts
        there, not earlier, so that it cannot hold the GIL while the request is being sent.

        Raises `TimeoutError` (the worker is killed first) or `CriuError` if CRIU went away.
        """
        if self._used:
            raise CriuError("a criu swrk worker serves one request; start another")
        self._used = True
        rpc = rpc_messages()
        deadline = time.monotonic() + timeout
        try:
            self._sock.send(request.SerializeToString())
        except OSError as exc:
            raise CriuError(f"criu swrk {self.pid} is gone ({self._exit_detail()}): {exc}") from exc
        if on_sent is not None:
            on_sent()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise TimeoutError(f"criu swrk {self.pid} did not answer within {timeout:.0f}s")
            readable, _, _ = select.select([self._sock], [], [], left)
            if not readable:
                continue
            try:
                data = self._sock.recv(_MAX_RESPONSE)
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                raise CriuError(f"criu swrk {self.pid}: {exc}") from exc
            if not data:
                self._proc.wait(timeout=5)
                raise CriuError(
                    f"criu swrk {self.pid} closed the socket without answering "
                    f"({self._exit_detail()})"
                )
            resp = rpc.criu_resp()
            resp.ParseFromString(data)
            if resp.type == rpc.NOTIFY:
                ack = rpc.criu_req(type=rpc.NOTIFY, notify_success=True)
                self._sock.send(ack.SerializeToString())
                continue
            return resp

    def kill(self) -> None:
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=5)

    def close(self, timeout: float = 5.0) -> None:
        """Close the socket (an idle worker then exits on its own) and reap the process."""
        self._sock.close()
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
