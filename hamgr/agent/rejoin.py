"""A deposed primary offers itself to the unit's new primary as a spare (``on_fenced =
"standby"``; docs/failover.md, "A deposed primary rejoins").

A primary that learns of a higher term stops the unit (its held output discarded, its NF
stopped: the new primary restored from a commit that does not include them). With the policy
"standby" it then keeps an empty store of the unit, as a spare does, and tells the new primary so
(``spare_join {unit, host, term}``; which peer that is, it learns from the answers: `Rejoin`).
The new primary adds it to the unit's spares: its next re-protection (its standby is lost, or it
has none) may choose this host, which then becomes the standby through the ordinary ``watch``,
with a full image.

`Rejoin` is that exchange as a machine without I/O; `RejoinDriver` carries it out on a thread of
its own. The offer is repeated every `RejoinConfig.retry_s` until the new primary answers: after a
partition, the fence may come long before the link heals. An answer ends it:

- `Joined(primary, term)`: `primary` runs the unit at `term` and took this host as a spare.
- `Refused(detail)`: every candidate refused in one round: none is the unit's primary
  (``no_such_unit``) at the deposing term or above (``stale_term``). The host stays a
  spare that nobody knows of; the event says why.

A peer that is taking the unit over right now answers ``not_yet``; it, and a peer that did not
answer, make the round end without a verdict, and the offer is repeated.
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
    primary: str
    term: int


@attrs.frozen
class Refused:
    detail: str


Outcome = Joined | Refused

# Answers that say "not the one": the peer is not the unit's primary, runs it below the
# deposing term, or cannot take the offer. Only `not_yet` (a takeover running) is asked again.
_NOT_YET = "not_yet"


class Phase(enum.Enum):
    OFFERING = "offering"
    JOINED = "joined"
    REFUSED = "refused"


@attrs.define
class Rejoin:
    """The spare `host`'s offer of itself for `unit`, deposed at `term`, to whichever of
    `candidates` is the unit's primary now.

    The deposed host cannot tell for sure which peer deposed it (a re-protection may have
    moved its standby just before a takeover by the one it lost), so each round offers itself to
    every candidate in turn, the likeliest first, and the first acceptance ends it. A round in
    which every candidate refused ends it too; one with a candidate that did not answer (cut
    off) or answered `not_yet` is repeated after `RejoinConfig.retry_s`."""

    unit: str
    host: str
    candidates: tuple[str, ...]
    term: int
    config: RejoinConfig = attrs.field(factory=RejoinConfig)
    phase: Phase = Phase.OFFERING
    offers: int = 0
    due: float = 0.0
    primary: str | None = None
    last: dict[str, str] = attrs.field(factory=dict)  # each candidate's last answer, for status
    _round: list[str] = attrs.field(factory=list)
    _refused: dict[str, str] = attrs.field(factory=dict)

    def request(self) -> dict[str, Any]:
        return {"type": "spare_join", "unit": self.unit, "host": self.host, "term": self.term}

    def target(self, now: float) -> str | None:
        """The candidate to offer this host to now; None while nothing is due."""
        if self.phase is not Phase.OFFERING or now < self.due or not self.candidates:
            return None
        if not self._round:
            self._round, self._refused = list(self.candidates), {}
        return self._round[0]

    def answered(self, peer: str, reply: Mapping[str, Any] | None, now: float) -> Outcome | None:
        """`peer`'s reply to the offer `target` named (None: no answer within the timeout)."""
        if self.phase is not Phase.OFFERING or not self._round or self._round[0] != peer:
            return None
        self._round.pop(0)
        self.offers += 1
        if reply is None:
            self.last[peer] = "no answer"
        elif "error" in reply:
            code = str(reply.get("code") or "failed")
            self.last[peer] = f"{code}: {reply['error']}"
            if code != _NOT_YET:
                self._refused[peer] = self.last[peer]
        elif reply.get("joined"):
            self.phase, self.primary, self.last[peer] = Phase.JOINED, peer, "joined"
            return Joined(peer, int(reply.get("term", self.term)))
        else:
            self.last[peer] = f"unexpected answer {dict(reply)!r}"
            self._refused[peer] = self.last[peer]
        if self._round:
            return None  # the next candidate at once
        if len(self._refused) == len(self.candidates):
            self.phase = Phase.REFUSED
            return Refused("; ".join(f"{p}: {why}" for p, why in self._refused.items()))
        self.due = now + self.config.retry_s
        return None

    def status(self) -> dict[str, Any]:
        return {
            "candidates": list(self.candidates),
            "term": self.term,
            "state": self.phase.value,
            "offers": self.offers,
            "primary": self.primary,
            "last": dict(self.last),
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
            return {"error": f"{here} is taking unit {unit} over; ask again", "code": _NOT_YET}
        return {"error": f"{here} is not the primary of unit {unit}", "code": "no_such_unit"}
    if term > primary_term:
        return {
            "error": f"{here} runs unit {unit} at term {primary_term}, below the term {term} "
            f"that deposed {host}: a newer primary exists",
            "code": "stale_term",
        }
    return {"joined": True, "term": primary_term}


class RejoinDriver:
    """Carries a `Rejoin` out on a thread of its own, until it ends or `stop`.

    `request(peer, body, timeout_s)` sends the offer to a candidate's agent; `done(outcome)` gets
    the `Joined` or `Refused`, on this thread."""

    def __init__(
        self,
        rejoin: Rejoin,
        *,
        request: Callable[[str, dict[str, Any], float], Mapping[str, Any] | None],
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
        while not self._stop.is_set() and r.phase is Phase.OFFERING:
            peer = r.target(time.monotonic())
            if peer is None:
                self._stop.wait(max(0.001, r.due - time.monotonic()))
                continue
            try:
                reply = self._request(peer, r.request(), r.config.answer_timeout_s)
            except Exception as exc:
                log.debug("unit %s: the offer to %s failed: %s", r.unit, peer, exc)
                reply = None
            outcome = r.answered(peer, reply, time.monotonic())
            if outcome is not None:
                self._done(outcome)
                return
