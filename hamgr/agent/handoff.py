"""A primary whose NF died hands its unit to its remote standby (docs/failover.md, "NF death
with a remote standby").

With a remote standby, output is released at the standby: only the standby knows exactly which of
the primary's output left, and its promotion sends exactly once what it committed and the primary
never confirmed. So the primary does not restore the NF itself: it asks the standby for the same
failover an operator would (``failover {unit, term}``, unplanned), and learns that the standby took
over from the higher term its store answers with; then the unit's ``on_fenced`` policy ends the
primary's role.

`Handoff` is that exchange as a machine without I/O: the driver (`HandoffDriver`) asks, reports
each answer, polls the standby's term and the clock, and carries out the two ends:

- `Fence(term)`: the standby answered with a term above the primary's; the role ends.
- `GiveUp(reason)`: no takeover after `HandoffConfig.attempts` requests; the unit stays down on the
  primary (its NF dead, its output held, its engine stopped), with an alarm saying why. Nothing is
  half-started: the primary restored nothing, and a standby that did not promote holds the image.

Each request carries the primary's term, so the standby's failover machine counts it once however
often it comes, and ignores it once the unit runs at a higher term (a probe loss, or an operator,
may have started the same takeover).
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from shim.replication import NackedError, ReplicationClient

__all__ = [
    "Answer",
    "Ask",
    "Fence",
    "GiveUp",
    "Handoff",
    "HandoffConfig",
    "HandoffDriver",
    "Phase",
    "answer_of",
]

log = logging.getLogger(__name__)


@attrs.frozen
class HandoffConfig:
    attempts: int = 3  # requests at most
    answer_timeout_s: float = 0.5  # each request waits this long for the standby's answer
    takeover_timeout_s: float = 5.0  # an accepted request waits this long for the higher term
    retry_after_s: float = 0.2  # after a refusal or no answer
    poll_s: float = 0.02  # how often the driver asks the standby's store for its term


class Phase(enum.Enum):
    ASKING = "asking"  # a request is due or on its way
    WAITING = "waiting"  # the standby accepted; waiting for its higher term
    TAKEN_OVER = "taken_over"
    FAILED = "failed"


class Answer(enum.Enum):
    ACCEPTED = "accepted"
    REFUSED = "refused"
    NONE = "none"  # no answer within the timeout


@attrs.frozen
class Ask:
    attempt: int


@attrs.frozen
class Fence:
    term: int


@attrs.frozen
class GiveUp:
    reason: str


Command = Ask | Fence | GiveUp


def answer_of(reply: Mapping[str, Any] | None) -> tuple[Answer, str]:
    """The kind of a standby's reply to a ``failover`` request, and its detail."""
    if reply is None:
        return Answer.NONE, "no answer"
    if "error" in reply:
        code = reply.get("code")
        return Answer.REFUSED, f"{code}: {reply['error']}" if code else str(reply["error"])
    if reply.get("queued"):
        return Answer.ACCEPTED, "accepted"
    return Answer.REFUSED, f"unexpected answer {dict(reply)!r}"


@attrs.define
class Handoff:
    """The primary's side of handing `unit` (running at `term`) to `standby` (module doc)."""

    unit: str
    term: int
    standby: str
    config: HandoffConfig = attrs.field(factory=HandoffConfig)
    phase: Phase = Phase.ASKING
    attempt: int = 0
    due: float = 0.0  # when the next request goes (ASKING) or the wait ends (WAITING)
    awaiting: bool = False  # a request is on its way and its answer not reported yet
    outcomes: list[str] = attrs.field(factory=list)
    new_term: int | None = None

    def start(self, now: float) -> list[Command]:
        return self._ask(now)

    def answered(self, answer: Answer, detail: str, now: float) -> list[Command]:
        """The standby's answer to the last request (`answer_of`)."""
        if self.phase is not Phase.ASKING or not self.awaiting:
            return []
        self.awaiting = False
        self.outcomes.append(f"request {self.attempt}: {detail}")
        if answer is Answer.ACCEPTED:
            self.phase = Phase.WAITING
            self.due = now + self.config.takeover_timeout_s
            return []
        if self.attempt >= self.config.attempts:
            return self._give_up()
        self.due = now + self.config.retry_after_s
        return []

    def term_seen(self, term: int) -> list[Command]:
        """The standby's store answered with `term`: above ours, the standby took over."""
        if term <= self.term or self.done:
            return []
        self.phase, self.new_term, self.awaiting = Phase.TAKEN_OVER, term, False
        return [Fence(term)]

    def tick(self, now: float) -> list[Command]:
        if self.phase is Phase.ASKING and not self.awaiting and now >= self.due:
            return self._ask(now)
        if self.phase is Phase.WAITING and now >= self.due:
            wait = self.config.takeover_timeout_s
            self.outcomes.append(f"request {self.attempt}: no higher term within {wait:g} s")
            if self.attempt >= self.config.attempts:
                return self._give_up()
            self.phase = Phase.ASKING
            return self._ask(now)
        return []

    @property
    def done(self) -> bool:
        return self.phase in (Phase.TAKEN_OVER, Phase.FAILED)

    def _ask(self, now: float) -> list[Command]:
        self.attempt += 1
        self.awaiting = True
        return [Ask(self.attempt)]

    def _give_up(self) -> list[Command]:
        self.phase = Phase.FAILED
        return [
            GiveUp(
                f"{self.standby} did not take unit {self.unit} over from term {self.term} "
                f"after {self.attempt} requests ({'; '.join(self.outcomes)})"
            )
        ]


class HandoffDriver:
    """Carries a `Handoff` out on a thread of its own (bounded: every wait has a deadline).

    `request(body, timeout_s)` sends the ``failover`` request to the standby's agent (the agent's
    peer links); `store` is a replication link to the standby, whose heartbeat at the old term is
    refused with the higher term once the standby promoted its store. `done(command)` gets the
    final `Fence` or `GiveUp`, on this thread. `stop` ends it early (the agent stops).
    """

    def __init__(
        self,
        handoff: Handoff,
        *,
        request: Callable[[dict[str, Any], float], Mapping[str, Any] | None],
        store: ReplicationClient,
        reason: str,
        done: Callable[[Fence | GiveUp], None],
        on_answer: Callable[[int, Answer, str], None] = lambda _a, _b, _c: None,
    ) -> None:
        self.handoff = handoff
        self._request = request
        self._store = store
        self._reason = reason
        self._done = done
        self._on_answer = on_answer
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"handoff-{handoff.unit}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        h = self.handoff
        try:
            commands = h.start(time.monotonic())
            while not self._stop.is_set():
                for command in commands:
                    if isinstance(command, Ask):
                        commands = self._ask(command)
                        break
                    self._done(command)
                    return
                else:
                    commands = self._poll_term() or h.tick(time.monotonic())
                    if not commands:
                        self._stop.wait(h.config.poll_s)
        except Exception as exc:
            log.exception("unit %s: handing the unit to %s failed", h.unit, h.standby)
            self._done(GiveUp(f"handing unit {h.unit} to {h.standby} failed: {exc}"))
        finally:
            self._store.close()

    def _ask(self, ask: Ask) -> list[Command]:
        h = self.handoff
        body = {
            "type": "failover",
            "unit": h.unit,
            "term": h.term,
            "planned": False,
            "reason": self._reason,
        }
        reply = self._request(body, h.config.answer_timeout_s)
        answer, detail = answer_of(reply)
        self._on_answer(ask.attempt, answer, detail)
        # A takeover another trigger started shows as the higher term, whatever the answer.
        return self._poll_term() or h.answered(answer, detail, time.monotonic())

    def _poll_term(self) -> list[Command]:
        h = self.handoff
        try:
            self._store.heartbeat(h.unit, h.term, timeout=h.config.answer_timeout_s)
        except NackedError as exc:
            return h.term_seen(exc.nack.term)
        except Exception as exc:
            log.debug("unit %s: %s's store did not answer: %s", h.unit, h.standby, exc)
        return []
