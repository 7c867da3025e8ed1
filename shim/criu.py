"""A small typed handle on a CRIU executable: version, kernel check, and a real TCP dump probe.

hamgr runs a private CRIU (see scripts/provision-criu.sh) because the distribution's CRIU does
not work on the kernels it targets, so callers need a cheap way to prove that a given binary can
actually checkpoint a process with live TCP state before trusting it with a unit.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import attrs

__all__ = [
    "CheckResult",
    "CriuError",
    "CriuRuntime",
    "ProbeResult",
    "log_tail",
    "parse_version",
]

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
