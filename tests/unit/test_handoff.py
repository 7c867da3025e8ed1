"""`hamgr.agent.handoff`: a primary whose NF died hands its unit to the remote standby.

The machine is driven by hand (no sockets); the driver runs against a fake standby whose store
answers with the higher term once it has taken the unit over."""

from __future__ import annotations

import threading
from typing import Any

from hamgr.agent.handoff import (
    Answer,
    Ask,
    Fence,
    GiveUp,
    Handoff,
    HandoffConfig,
    HandoffDriver,
    Phase,
    answer_of,
)
from shim.replication import Code, Nack, NackedError

CONFIG = HandoffConfig(
    attempts=3, answer_timeout_s=0.5, takeover_timeout_s=2.0, retry_after_s=0.2, poll_s=0.001
)


def _handoff() -> Handoff:
    return Handoff("seq0", 1, "hostB", CONFIG)


def test_an_accepted_request_ends_in_a_fence_at_the_standby_s_term() -> None:
    h = _handoff()
    assert h.start(0.0) == [Ask(1)]
    assert h.answered(Answer.ACCEPTED, "accepted", 0.01) == []
    assert h.phase is Phase.WAITING
    assert h.tick(1.0) == []
    assert h.term_seen(1) == []  # its own term: not yet
    assert h.term_seen(2) == [Fence(2)]
    assert (h.phase, h.new_term, h.done) == (Phase.TAKEN_OVER, 2, True)
    # Once fenced, nothing more: no second fence, no request.
    assert h.term_seen(3) == []
    assert h.tick(100.0) == []


def test_no_answer_is_asked_again_after_the_pause_and_given_up_after_the_last() -> None:
    h = _handoff()
    assert h.start(0.0) == [Ask(1)]
    assert h.answered(Answer.NONE, "no answer", 0.5) == []
    assert h.tick(0.6) == []  # retry_after_s not over
    assert h.tick(0.7) == [Ask(2)]
    assert h.tick(5.0) == []  # its answer is awaited: no second request meanwhile
    assert h.answered(Answer.REFUSED, "failed: no commit", 5.1) == []
    assert h.tick(5.3) == [Ask(3)]
    (give_up,) = h.answered(Answer.NONE, "no answer", 5.8)
    assert isinstance(give_up, GiveUp)
    assert h.phase is Phase.FAILED
    assert "after 3 requests" in give_up.reason
    assert "request 2: failed: no commit" in give_up.reason
    assert h.tick(100.0) == []
    assert h.term_seen(2) == []  # given up: the caller alarmed already


def test_an_accepted_request_without_a_takeover_is_asked_again_then_given_up() -> None:
    h = _handoff()
    h.start(0.0)
    h.answered(Answer.ACCEPTED, "accepted", 0.0)
    assert h.tick(1.99) == []
    assert h.tick(2.0) == [Ask(2)]
    h.answered(Answer.ACCEPTED, "accepted", 2.0)
    assert h.tick(4.0) == [Ask(3)]
    h.answered(Answer.ACCEPTED, "accepted", 4.0)
    (give_up,) = h.tick(6.0)
    assert isinstance(give_up, GiveUp)
    assert "no higher term within 2 s" in give_up.reason


def test_a_takeover_another_trigger_started_fences_while_asking() -> None:
    h = _handoff()
    h.start(0.0)
    h.answered(Answer.REFUSED, "busy", 0.0)
    assert h.term_seen(2) == [Fence(2)]
    assert h.tick(1.0) == []


def test_answers() -> None:
    assert answer_of(None) == (Answer.NONE, "no answer")
    assert answer_of({"queued": True, "term": 1}) == (Answer.ACCEPTED, "accepted")
    assert answer_of({"error": "no commit", "code": "failed"}) == (
        Answer.REFUSED,
        "failed: no commit",
    )
    assert answer_of({"error": "x"}) == (Answer.REFUSED, "x")
    assert answer_of({"seq": 1})[0] is Answer.REFUSED


class FakeStandby:
    """A standby's agent and store: takes over (its store's term goes to 2) on the
    `takes_over_at`-th request; answers None to requests listed in `silent`."""

    def __init__(self, takes_over_at: int | None, silent: tuple[int, ...] = ()) -> None:
        self.takes_over_at = takes_over_at
        self.silent = silent
        self.requests: list[dict[str, Any]] = []
        self.term = 1
        self.closed = False

    def request(self, body: dict[str, Any], timeout_s: float) -> dict[str, Any] | None:
        self.requests.append(body)
        n = len(self.requests)
        if n in self.silent:
            return None
        if n == self.takes_over_at:
            self.term = 2
        return {"queued": True, "term": 1}

    def heartbeat(self, unit: str, term: int, *, timeout: float = 5.0) -> None:
        if term < self.term:
            raise NackedError(
                Nack(unit=unit, epoch=0, term=self.term, seq=0, code=Code.STALE_TERM, reason="p")
            )

    def close(self) -> None:
        self.closed = True


def _drive(standby: FakeStandby, config: HandoffConfig) -> tuple[Fence | GiveUp, list[Any]]:
    ended: list[Fence | GiveUp] = []
    answers: list[Any] = []
    done = threading.Event()

    def finish(command: Fence | GiveUp) -> None:
        ended.append(command)
        done.set()

    driver = HandoffDriver(
        Handoff("seq0", 1, "hostB", config),
        request=standby.request,
        store=standby,  # type: ignore[arg-type]
        reason="the NF of seq0 (pid 77) died on hostA",
        done=finish,
        on_answer=lambda attempt, answer, detail: answers.append((attempt, answer)),
    )
    driver.start()
    assert done.wait(10), "the handoff did not end"
    driver.stop()
    assert standby.closed
    assert len(ended) == 1
    return ended[0], answers


def test_driver_asks_once_and_fences_when_the_standby_took_over() -> None:
    standby = FakeStandby(takes_over_at=1)
    ended, answers = _drive(standby, CONFIG)
    assert ended == Fence(2)
    assert answers == [(1, Answer.ACCEPTED)]
    assert standby.requests == [
        {
            "type": "failover",
            "unit": "seq0",
            "term": 1,
            "planned": False,
            "reason": "the NF of seq0 (pid 77) died on hostA",
        }
    ]


def test_driver_retries_a_lost_request_and_gives_up_bounded() -> None:
    fast = HandoffConfig(
        attempts=3, answer_timeout_s=0.1, takeover_timeout_s=0.05, retry_after_s=0.01, poll_s=0.001
    )
    standby = FakeStandby(takes_over_at=2, silent=(1,))
    ended, answers = _drive(standby, fast)
    assert ended == Fence(2)
    assert answers == [(1, Answer.NONE), (2, Answer.ACCEPTED)]
    never = FakeStandby(takes_over_at=None)
    ended, answers = _drive(never, fast)
    assert isinstance(ended, GiveUp)
    assert len(never.requests) == 3
    assert "did not take unit seq0 over from term 1 after 3 requests" in ended.reason
