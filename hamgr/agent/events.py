"""The agent's event stream: what `hamgr events` shows live.

Events are small JSON objects ``{"ts": unix seconds, "kind": KIND, ...}``. Kinds: ``agent_start``,
``agent_stop``, ``protect``, ``unprotect``, ``adopt``, ``rollback``, ``commit``, ``alarm``,
``failover`` (status running, then finished, failed or aborted), ``error``, ``auth_refused``,
``bad_request``. Subscribers are `hamgr.control` responders; each subscription ends after its
`seconds` with an ``end`` message.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Mapping
from typing import Any

import attrs

from hamgr.control import Responder

__all__ = ["EventBus"]


@attrs.define
class _Subscriber:
    responder: Responder
    deadline: float
    kinds: frozenset[str] | None
    sent: int = 0


class EventBus:
    def __init__(self, history: int = 256) -> None:
        self._lock = threading.Lock()
        self._subs: list[_Subscriber] = []
        self.recent: collections.deque[Mapping[str, Any]] = collections.deque(maxlen=history)

    def publish(self, kind: str, **fields: Any) -> None:
        event = {"ts": round(time.time(), 6), "kind": kind, **fields}
        with self._lock:
            self.recent.append(event)
            subs = list(self._subs)
        for sub in subs:
            if sub.kinds is None or kind in sub.kinds:
                sub.responder.event(event)
                sub.sent += 1

    def subscribe(
        self, responder: Responder, seconds: float, kinds: tuple[str, ...] | None
    ) -> None:
        sub = _Subscriber(
            responder, time.monotonic() + seconds, None if kinds is None else frozenset(kinds)
        )
        with self._lock:
            self._subs.append(sub)

    def expire(self, now: float | None = None, *, everyone: bool = False) -> None:
        """End every subscription whose time is up (all of them with `everyone`)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            done = [s for s in self._subs if everyone or s.deadline <= now]
            self._subs = [s for s in self._subs if s not in done]
        for sub in done:
            sub.responder.end({"events": sub.sent})

    @property
    def subscribers(self) -> int:
        with self._lock:
            return len(self._subs)
