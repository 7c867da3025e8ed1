"""Starting and stopping a data-plane process."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path
from types import TracebackType

import attrs

from dpdk_vhost.client import DataPlaneClient, DataPlaneError

REPO = Path(__file__).resolve().parent.parent
HUGEPAGES_MIN = 512


def default_binary(name: str = "dpdk-vhost") -> Path:
    """$HAMGR_DPDK_VHOST for the data plane, else the in-tree build."""
    env = os.environ.get("HAMGR_DPDK_VHOST")
    if env and name == "dpdk-vhost":
        return Path(env)
    return REPO / "dpdk_vhost" / "build" / name


def ensure_hugepages(pages: int = HUGEPAGES_MIN) -> None:
    """Raises the 2 MiB hugepage reserve to ``pages``; never lowers it (others share it)."""
    nr = Path("/proc/sys/vm/nr_hugepages")
    if int(nr.read_text()) < pages:
        nr.write_text(f"{pages}\n")
    if int(nr.read_text()) < pages:
        raise DataPlaneError(
            "no_hugepages", f"only {nr.read_text().strip()} hugepages could be reserved"
        )


def remove_dpdk_files(prefix: str) -> None:
    """Removes what EAL leaves behind for ``prefix`` (hugepage files, runtime dir)."""
    for d in (Path("/dev/hugepages"), Path("/mnt/huge")):
        if d.is_dir():
            for f in d.glob(f"{prefix}map_*"):
                f.unlink(missing_ok=True)
            for f in d.glob(f"{prefix}mapseg_*"):
                f.unlink(missing_ok=True)
    shutil.rmtree(Path("/var/run/dpdk") / prefix, ignore_errors=True)


def eal_args(cpu: int, prefix: str, *, in_memory: bool = True) -> list[str]:
    args = [
        "--lcores",
        f"0@{cpu}",
        "--file-prefix",
        prefix,
        "--no-pci",
        "--no-telemetry",
        "--log-level",
        "*:notice",
    ]
    if in_memory:
        # No hugepage files at all, so a killed process leaves nothing behind.
        args.append("--in-memory")
    return args


@attrs.frozen
class DataPlaneConfig:
    name: str
    ctl_path: str
    cpu: int = 1
    file_prefix: str = attrs.field(factory=lambda: f"hvdp{uuid.uuid4().hex[:8]}")
    netns: str | None = None
    mbufs: int = 16383
    idle_sleep_max_us: int = 1000
    log_path: str | None = None
    binary: Path = attrs.field(factory=default_binary)
    extra_eal_args: tuple[str, ...] = ()
    # Ahead of ordinary tasks when both wake, so probe deadlines are met on a busy
    # host; the data plane sleeps when idle, so this does not starve anyone then.
    nice: int = -10
    # SCHED_FIFO priority, or None. Sub-millisecond probe deadlines on a shared host
    # need it: a woken RT task runs at once. The loop sleeps when idle, but under load
    # it spins, so only give it to a data plane that owns its CPU.
    rt_priority: int | None = None


class DataPlaneProcess:
    """A data plane started by this process; ``stop`` ends it and cleans up after it."""

    def __init__(self, config: DataPlaneConfig) -> None:
        self.config = config
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: int | None = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("data plane not started")
        return self.proc.pid

    def argv(self) -> list[str]:
        c = self.config
        argv = [
            str(c.binary),
            *eal_args(c.cpu, c.file_prefix),
            *c.extra_eal_args,
            "--",
            "--ctl",
            c.ctl_path,
            "--name",
            c.name,
            "--mbufs",
            str(c.mbufs),
            "--idle-sleep-max-us",
            str(c.idle_sleep_max_us),
        ]
        if c.rt_priority is not None:
            argv = ["chrt", "--fifo", str(c.rt_priority), *argv]
        elif c.nice:
            argv = ["nice", "-n", str(c.nice), *argv]
        if c.netns:
            argv = ["nsenter", f"--net=/run/netns/{c.netns}", "--", *argv]
        return argv

    def start(self, timeout: float = 20.0) -> DataPlaneClient:
        c = self.config
        if not c.binary.exists():
            raise DataPlaneError(
                "no_binary", f"{c.binary} does not exist; run `make -C dpdk_vhost`"
            )
        ensure_hugepages()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(c.ctl_path)
        out: int | None = subprocess.DEVNULL
        if c.log_path:
            self._log = os.open(c.log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            out = self._log
        self.proc = subprocess.Popen(
            self.argv(),
            stdout=out,
            stderr=out,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._cleanup()
                raise DataPlaneError(
                    "start_failed",
                    f"{c.name} exited with "
                    f"{self.proc.returncode}; see {c.log_path or 'its log'}:"
                    f" {self.log_tail()}",
                )
            if os.path.exists(c.ctl_path):
                try:
                    client = DataPlaneClient(c.ctl_path, timeout=5.0)
                    client.ping()
                    return client
                except DataPlaneError:
                    pass
            time.sleep(0.05)
        self.stop()
        raise DataPlaneError("start_timeout", f"{c.name} did not answer within {timeout}s")

    def log_tail(self, lines: int = 20) -> str:
        if not self.config.log_path or not os.path.exists(self.config.log_path):
            return ""
        with open(self.config.log_path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])

    def stop(self, timeout: float = 5.0) -> int | None:
        """Asks it to quit, then SIGTERM, then SIGKILL; returns the exit status."""
        p = self.proc
        if p is None:
            return None
        if p.poll() is None:
            with (
                contextlib.suppress(DataPlaneError, OSError),
                DataPlaneClient(self.config.ctl_path, timeout=1.0) as cl,
            ):
                cl.quit()
            for sig in (None, signal.SIGTERM, signal.SIGKILL):
                if sig is not None and p.poll() is None:
                    p.send_signal(sig)
                try:
                    p.wait(timeout)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self._cleanup()
        return p.returncode

    def kill(self) -> None:
        """SIGKILL, as a crash would; then cleans up."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._cleanup()

    def _cleanup(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.config.ctl_path)
        remove_dpdk_files(self.config.file_prefix)
        if self._log is not None:
            os.close(self._log)
            self._log = None

    def __enter__(self) -> DataPlaneProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
