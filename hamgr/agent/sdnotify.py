"""systemd's notify protocol (sd_notify(3)) without a library: one datagram per message.

`Notifier` does nothing when the agent was not started by systemd (no ``NOTIFY_SOCKET``), so the
same code runs under systemd, under `hamgr up`, and in tests. The watchdog interval comes from
``WATCHDOG_USEC`` (set by systemd from ``WatchdogSec=``); `watchdog()` pings at most twice per
interval, as sd_watchdog_enabled(3) advises.
"""

from __future__ import annotations

import os
import socket
import time

__all__ = ["Notifier"]


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = dict(os.environ if environ is None else environ)
        address = env.get("NOTIFY_SOCKET", "")
        # An abstract socket is written with a leading '@'.
        self._address = "\0" + address[1:] if address.startswith("@") else address
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        for_us = not pid or (pid.isdigit() and int(pid) == os.getpid())
        self.watchdog_seconds = int(usec) / 1e6 if usec.isdigit() and for_us else None
        self._last_ping = 0.0

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def notify(self, *fields: str) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram; False when there is no socket."""
        if not self._address:
            return False
        payload = "\n".join(fields).encode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            try:
                sock.sendto(payload, self._address)
            except OSError:
                return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={status}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def watchdog(self, now: float | None = None) -> bool:
        """Ping the watchdog if half its interval has passed since the last ping."""
        if self.watchdog_seconds is None:
            return False
        now = time.monotonic() if now is None else now
        if now - self._last_ping < self.watchdog_seconds / 2:
            return False
        self._last_ping = now
        return self.notify("WATCHDOG=1")
