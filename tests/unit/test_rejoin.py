"""A deposed primary's offer to be a spare of the new primary (`hamgr.agent.rejoin`): the
machine, the primary's answer, and the driver's thread against a scripted peer."""

from __future__ import annotations

import queue
import threading
from typing import Any

import pytest

from hamgr.agent.rejoin import (
    Joined,
    Phase,
    Refused,
    Rejoin,
    RejoinConfig,
    RejoinDriver,
    spare_join_answer,
)

PEERS = frozenset({"hostA", "hostB", "hostC"})


def _rejoin(**kw: Any) -> Rejoin:
    return Rejoin("seq0", "hostA", "hostB", 2, RejoinConfig(retry_s=1.0), **kw)


def test_the_offer_names_the_unit_the_host_and_the_term_that_deposed_it() -> None:
    assert _rejoin().request() == {"type": "spare_join", "unit": "seq0", "host": "hostA", "term": 2}


def test_no_answer_and_not_yet_are_asked_again_after_the_retry_interval() -> None:
    r = _rejoin()
    assert r.offer_due(0.0)
    assert r.answered(None, 10.0) is None
    assert not r.offer_due(10.5)
    assert r.offer_due(11.0)
    not_yet = {"error": "hostB is taking unit seq0 over; ask again", "code": "not_yet"}
    assert r.answered(not_yet, 11.0) is None
    assert r.phase is Phase.OFFERING
    assert r.status() == {
        "primary": "hostB",
        "term": 2,
        "state": "offering",
        "offers": 2,
        "last": "not_yet: hostB is taking unit seq0 over; ask again",
    }
    assert r.offer_due(12.0)


def test_an_acceptance_ends_it_with_the_primarys_term() -> None:
    r = _rejoin()
    assert r.answered({"joined": True, "term": 3}, 0.0) == Joined(3)
    assert r.phase is Phase.JOINED
    assert not r.offer_due(100.0)
    assert r.answered({"joined": True, "term": 3}, 1.0) is None  # ended: nothing more
    assert r.offers == 1


@pytest.mark.parametrize(
    ("reply", "outcome"),
    [
        ({"error": "hostB is not the primary of unit seq0", "code": "no_such_unit"},
         Refused("no_such_unit", "hostB is not the primary of unit seq0")),
        ({"error": "newer primary", "code": "stale_term"}, Refused("stale_term", "newer primary")),
        ({"error": "unknown type 'spare_join'"}, Refused("failed", "unknown type 'spare_join'")),
        ({"queued": True}, Refused("failed", "unexpected answer {'queued': True}")),
    ],
)  # fmt: skip
def test_a_refusal_ends_it_and_says_why(reply: dict[str, Any], outcome: Refused) -> None:
    r = _rejoin()
    assert r.answered(reply, 0.0) == outcome
    assert r.phase is Phase.REFUSED
    assert not r.offer_due(100.0)


def _answer(**kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "unit": "seq0",
        "here": "hostB",
        "host": "hostA",
        "term": 2,
        "peers": PEERS,
        "primary_term": 2,
        "taking_over": False,
    }
    args.update(kw)
    return spare_join_answer(**args)


def test_the_primary_takes_a_peer_deposed_at_its_term_or_below() -> None:
    assert _answer() == {"joined": True, "term": 2}
    assert _answer(term=2, primary_term=4) == {"joined": True, "term": 4}


def test_the_primary_refuses_what_it_cannot_take() -> None:
    assert _answer(host="hostZ")["code"] == "bad_request"
    assert _answer(primary_term=None) == {
        "error": "hostB is not the primary of unit seq0",
        "code": "no_such_unit",
    }
    assert _answer(primary_term=None, taking_over=True)["code"] == "not_yet"
    stale = _answer(term=3, primary_term=2)
    assert stale["code"] == "stale_term"
    assert "below the term 3 that deposed hostA" in stale["error"]


def test_the_driver_offers_until_the_primary_answers_then_stops() -> None:
    replies: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
    for reply in (None, {"error": "busy", "code": "not_yet"}, {"joined": True, "term": 2}):
        replies.put(reply)
    sent: list[tuple[dict[str, Any], float]] = []
    done: list[Joined | Refused] = []
    finished = threading.Event()

    def request(body: dict[str, Any], timeout_s: float) -> dict[str, Any] | None:
        sent.append((body, timeout_s))
        return replies.get_nowait()

    def on_done(outcome: Joined | Refused) -> None:
        done.append(outcome)
        finished.set()

    rejoin = Rejoin("seq0", "hostA", "hostB", 2, RejoinConfig(retry_s=0.01, answer_timeout_s=0.2))
    driver = RejoinDriver(rejoin, request=request, done=on_done)
    driver.start()
    assert finished.wait(5.0)
    driver.stop()
    assert done == [Joined(2)]
    assert [timeout for _b, timeout in sent] == [0.2, 0.2, 0.2]
    assert rejoin.offers == 3


def test_a_driver_stopped_before_any_answer_reports_nothing() -> None:
    started = threading.Event()
    done: list[Joined | Refused] = []

    def request(_body: dict[str, Any], _timeout_s: float) -> dict[str, Any] | None:
        started.set()
        return None

    driver = RejoinDriver(
        Rejoin("seq0", "hostA", "hostB", 2, RejoinConfig(retry_s=30.0)),
        request=request,
        done=done.append,
    )
    driver.start()
    assert started.wait(5.0)
    driver.stop(timeout=5.0)
    assert not driver._thread.is_alive()
    assert done == []
