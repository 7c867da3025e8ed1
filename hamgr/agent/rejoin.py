"""A deposed primary offers itself to the unit's new primary as a spare (``on_fenced =
"standby"``; docs/failover.md, "A deposed primary rejoins").

A primary that learns of a higher term stops the unit (its held output discarded, its NF
stopped: the new primary restored from a commit that does not include them). With the policy
"standby" it then keeps an empty store of the unit, as a spare does, and tells the new primary so
(``spare_join {unit, host, term}``). The new primary adds it to the unit's spares: its next
re-protection (its standby is lost, or it has none) may choose this host, which then becomes the
standby through the ordinary ``watch``, with a full image.

`Rejoin` is that exchange as a machine without I/O; `RejoinDriver` carries it out on a thread of
its own. The offer is repeated every `RejoinConfig.retry_s` until the new primary answers: after a
partition, the fence may come long before the link heals. An answer ends it:

- `Joined(term)`: the new primary runs the unit at `term` and took this host as a spare.
- `Refused(code, detail)`: the peer is not the unit's primary (``no_such_unit``), or runs it at a
  lower term than the one that deposed this host (``stale_term``: a newer primary exists
  elsewhere). The host stays a spare that nobody knows of; the event says why.

A peer that is taking the unit over right now answers ``not_yet``, and the offer is repeated.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import attrs

__all__ = [
    "Joined",
    "Refused",
    "Rejoin",
    "RejoinConfig",
    "RejoinDriver",
    "spare_join_answer",
]

log = logging.getLogger(__name__)


@attrs.frozen
class RejoinConfig:
    retry_s: float = 1.0  # after no answer, or a "not yet"
    answer_timeout_s: float = 0.5  # each offer waits this long


@attrs.frozen
class Joined:
    term: int


@attrs.frozen
class Refused:
    code: str
    detail: str


Outcome = Joined | Refused


class Phase(enum.Enum):
    OFFERING = "offering"
    JOINED = "joined"
    REFUSED = "refused"


@attrs.define
class Rejoin:
    """The spare `host`'s offer of itself to `primary` for `unit`, deposed at `term`."""

    unit: str
    host: str
    primary: str
    term: int
    config: RejoinConfig = attrs.field(factory=RejoinConfig)
    phase: Phase = Phase.OFFERING
    offers: int = 0
    due: float = 0.0
    last: str = ""  # the last answer, for status

    def request(self) -> dict[str, Any]:
        return {"type": "spare_join", "unit": self.unit, "host": self.host, "term": self.term}

    def offer_due(self, now: float) -> bool:
        return self.phase is Phase.OFFERING and now >= self.due

    def answered(self, reply: Mapping[str, Any] | None, now: float) -> Outcome | None:
        """The primary's reply to an offer (None: no answer within the timeout)."""
        if self.phase is not Phase.OFFERING:
            return None
        self.offers += 1
        if reply is None:
            self.last = "no answer"
        elif "error" in reply:
            code = str(reply.get("code") or "failed")
            self.last = f"{code}: {reply['error']}"
            if code != "not_yet":
                self.phase = Phase.REFUSED
                return Refused(code, str(reply["error"]))
        elif reply.get("joined"):
            self.phase = Phase.JOINED
            self.last = "joined"
            return Joined(int(reply.get("term", self.term)))
        else:
            self.phase = Phase.REFUSED
            return Refused("failed", f"unexpected answer {dict(reply)!r}")
        self.due = now + self.config.retry_s
        return None

    def status(self) -> dict[str, Any]:
        return {
            "primary": self.primary,
            "term": self.term,
            "state": self.phase.value,
            "offers": self.offers,
            "last": self.last,
        }


def spare_join_answer(
    *,
    unit: str,
    here: str,
    host: str,
    term: int,
    peers: frozenset[str] | set[str],
    primary_term: int | None,
    taking_over: bool,
) -> dict[str, Any]:
    """What the primary `here` answers to `host`'s offer to be a spare of `unit`, deposed at
    `term`. `primary_term`: the term `here` runs the unit at as its primary (None: it is not
    its primary); `taking_over`: `here` is taking the unit over right now."""
    if host not in peers:
        return {"error": f"{host!r} is not a peer of {here}", "code": "bad_request"}
    if primary_term is None:
        if taking_over:
            return {"error": f"{here} is taking unit {unit} over; ask again", "code": "not_yet"}
        return {"error": f"{here} is not the primary of unit {unit}", "code": "no_such_unit"}
    if term > primary_term:
        return {
            "error": f"{here} runs unit {unit} at term {primary_term}, below the term {term} "
            f"that deposed {host}: a newer primary exists",
            "code": "stale_term",
        }
    return {"joined": True, "term": primary_term}


class RejoinDriver:
    """Carries a `Rejoin` out on a thread of its own, until an answer or `stop`.

    `request(body, timeout_s)` sends the offer to the new primary's agent; `done(outcome)` gets
    the `Joined` or `Refused`, on this thread."""

    def __init__(
        self,
        rejoin: Rejoin,
        *,
        request: Callable[[dict[str, Any], float], Mapping[str, Any] | None],
        done: Callable[[Outcome], None],
    ) -> None:
        self.rejoin = rejoin
        self._request = request
        self._done = done
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rejoin-{rejoin.unit}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        r = self.rejoin
        while not self._stop.is_set():
            if not r.offer_due(time.monotonic()):
                self._stop.wait(max(0.0, r.due - time.monotonic()))
                continue
            try:
                reply = self._request(r.request(), r.config.answer_timeout_s)
            except Exception as exc:
                log.debug("unit %s: offering %s as a spare failed: %s", r.unit, r.host, exc)
                reply = None
            outcome = r.answered(reply, time.monotonic())
            if outcome is not None:
                self._done(outcome)
                return
