"""The agent's own data plane process: started once, found again after an agent restart.

The process runs in a session of its own, so neither a signal to the agent's process group nor
the agent's death reaches it; an agent that restarts re-adopts it by PID and start time and its
control socket, and never restarts it (that would drop every unit's held output).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import subprocess
import time
from pathlib import Path

from dpdk_vhost.client import DataPlaneClient, DataPlaneError
from dpdk_vhost.process import (
    DataPlaneConfig,
    DataPlaneProcess,
    ensure_hugepages,
    remove_dpdk_files,
)
from hamgr.agent import procs
from hamgr.agent.state import DataPlaneRow

__all__ = ["OwnedDataPlane"]

log = logging.getLogger(__name__)

START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0


class OwnedDataPlane:
    """One data plane process; `client()` opens a new control connection (one per thread)."""

    def __init__(self, row: DataPlaneRow, *, adopted: bool) -> None:
        self.row = row
        self.adopted = adopted
        self._pidfd: int | None = None
        with contextlib.suppress(ProcessLookupError):
            self._pidfd = os.pidfd_open(row.pid)

    @property
    def pid(self) -> int:
        return self.row.pid

    @property
    def ctl_path(self) -> str:
        return self.row.ctl_path

    def alive(self) -> bool:
        if self._pidfd is None:
            return False
        ready, _, _ = select.select([self._pidfd], [], [], 0)
        return not ready and procs.process_alive(self.row.pid, self.row.start_ticks)

    def client(self, timeout: float = 5.0) -> DataPlaneClient:
        return DataPlaneClient(self.row.ctl_path, timeout=timeout)

    @staticmethod
    def start(*, host: str, work: Path, cpu: int, rt_priority: int | None = None) -> OwnedDataPlane:
        """Start a data plane in the caller's netns; its socket and log live under `work`."""
        work.mkdir(parents=True, exist_ok=True)
        config = DataPlaneConfig(
            name=host,
            ctl_path=str(work / "dp.sock"),
            cpu=cpu,
            log_path=str(work / "dp.log"),
            rt_priority=rt_priority or None,
        )
        if not config.binary.exists():
            raise DataPlaneError("no_binary", f"{config.binary} does not exist; run `make build`")
        ensure_hugepages()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(config.ctl_path)
        argv = DataPlaneProcess(config).argv()
        assert config.log_path is not None
        with open(config.log_path, "ab") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,  # outlives the agent, and its signals
            )
        ticks = None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if ticks is None:
                ticks = procs.start_ticks(proc.pid)
            if proc.poll() is not None:
                remove_dpdk_files(config.file_prefix)
                tail = Path(config.log_path).read_text(errors="replace")[-1500:]
                raise DataPlaneError(
                    "start_failed", f"the data plane exited with {proc.returncode}: {tail}"
                )
            if os.path.exists(config.ctl_path):
                try:
                    with DataPlaneClient(config.ctl_path, timeout=2.0) as c:
                        c.ping()
                    break
                except DataPlaneError:
                    pass
            time.sleep(0.05)
        else:
            proc.kill()
            proc.wait(5)
            remove_dpdk_files(config.file_prefix)
            raise DataPlaneError("start_timeout", f"no answer on {config.ctl_path}")
        assert ticks is not None
        row = DataPlaneRow(proc.pid, ticks, config.ctl_path, config.file_prefix, config.log_path)
        log.info("data plane started", extra={"dp_pid": proc.pid, "ctl": config.ctl_path})
        # The Popen object is dropped on purpose: the process is not waited for by this agent
        # (a restarted agent could not), only watched through its pidfd.
        proc.returncode = 0
        return OwnedDataPlane(row, adopted=False)

    @staticmethod
    def adopt(row: DataPlaneRow) -> OwnedDataPlane | None:
        """The data plane a previous agent started, if it is still that process and answers."""
        if not procs.process_alive(row.pid, row.start_ticks):
            return None
        if row.ctl_path not in procs.cmdline(row.pid):
            return None
        dp = OwnedDataPlane(row, adopted=True)
        try:
            with dp.client(timeout=2.0) as c:
                c.ping()
        except DataPlaneError as exc:
            log.warning("data plane pid %d does not answer: %s", row.pid, exc)
            return None
        log.info("data plane adopted", extra={"dp_pid": row.pid, "ctl": row.ctl_path})
        return dp

    def _wait_exit(self, timeout: float) -> bool:
        if self._pidfd is None:
            return True
        ready, _, _ = select.select([self._pidfd], [], [], timeout)
        if ready:
            # Reap it if it is our child; a process adopted from an earlier agent is not.
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.row.pid, os.WNOHANG)
        return bool(ready)

    def stop(self) -> None:
        """quit, then SIGTERM, then SIGKILL, through the pidfd; then remove its files."""
        if self._pidfd is not None and not self._wait_exit(0):
            with contextlib.suppress(DataPlaneError, OSError), self.client(timeout=1.0) as c:
                c.quit()
            for sig in (None, signal.SIGTERM, signal.SIGKILL):
                if sig is not None:
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(self._pidfd, sig)
                if self._wait_exit(STOP_TIMEOUT_S):
                    break
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.row.ctl_path)
        remove_dpdk_files(self.row.file_prefix)
        log.info("data plane stopped", extra={"dp_pid": self.row.pid})

    def close(self) -> None:
        """Forget the process without stopping it (the agent is going away, the data plane not)."""
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
