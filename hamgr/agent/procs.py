"""Processes the agent finds again after a restart: identity by PID plus start time."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

__all__ = ["cmdline", "enter_netns", "process_alive", "start_ticks"]

_CLONE_NEWNET = 0x40000000


def start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), or None.

    A PID plus its start time names one process for good: a recycled PID starts later.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself contain spaces or ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    try:
        if fields[0] == "Z":
            return None
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def process_alive(pid: int, ticks: int) -> bool:
    return pid > 0 and start_ticks(pid) == ticks


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def enter_netns(name: str) -> None:
    """Move the calling thread into netns `name`; call it before starting any thread.

    Threads and child processes started afterwards inherit the netns.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into netns {name}: {os.strerror(err)}")
    finally:
        os.close(fd)
