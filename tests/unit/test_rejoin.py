"""A deposed primary's offer to be a spare of the new primary (`hamgr.agent.rejoin`): the
machine, the primary's answer, and the driver's thread against scripted peers."""

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
NOT_PRIMARY = {"error": "not the primary of unit seq0", "code": "no_such_unit"}


def _rejoin(*candidates: str) -> Rejoin:
    return Rejoin("seq0", "hostA", candidates or ("hostB",), 2, RejoinConfig(retry_s=1.0))


def test_the_offer_names_the_unit_the_host_and_the_term_that_deposed_it() -> None:
    assert _rejoin().request() == {"type": "spare_join", "unit": "seq0", "host": "hostA", "term": 2}


def test_each_round_asks_every_candidate_in_order_until_one_takes_it() -> None:
    """The standby the deposed host re-protected onto just before the takeover (hostC) is asked
    first and refuses; the one it had lost (hostB) took the unit over and accepts."""
    r = _rejoin("hostC", "hostB")
    assert r.target(0.0) == "hostC"
    assert r.answered("hostC", NOT_PRIMARY, 0.1) is None
    assert r.target(0.1) == "hostB"  # at once, in the same round
    assert r.answered("hostB", {"joined": True, "term": 2}, 0.2) == Joined("hostB", 2)
    assert (r.phase, r.primary, r.offers) == (Phase.JOINED, "hostB", 2)
    assert r.target(100.0) is None
    assert r.answered("hostB", {"joined": True, "term": 2}, 100.0) is None  # ended


def test_a_round_with_a_silent_or_busy_candidate_is_repeated_after_the_interval() -> None:
    r = _rejoin("hostB", "hostC")
    assert r.answered("hostB", None, 10.0) is None  # not asked yet: ignored
    assert r.target(10.0) == "hostB"
    assert r.answered("hostB", None, 10.5) is None  # cut off
    assert r.target(10.5) == "hostC"
    assert r.answered("hostC", NOT_PRIMARY, 10.6) is None
    assert r.target(11.0) is None  # the round is over: wait
    assert r.target(11.6) == "hostB"  # a new round, from the first
    busy = {"error": "hostB is taking unit seq0 over; ask again", "code": "not_yet"}
    assert r.answered("hostB", busy, 11.7) is None
    assert r.answered("hostC", NOT_PRIMARY, 11.8) is None
    assert r.phase is Phase.OFFERING
    assert r.status() == {
        "candidates": ["hostB", "hostC"],
        "term": 2,
        "state": "offering",
        "offers": 4,
        "primary": None,
        "last": {
            "hostB": "not_yet: hostB is taking unit seq0 over; ask again",
            "hostC": "no_such_unit: not the primary of unit seq0",
        },
    }
    assert r.target(12.8) == "hostB"


@pytest.mark.parametrize(
    ("replies", "detail"),
    [
        ([NOT_PRIMARY, NOT_PRIMARY],
         "hostB: no_such_unit: not the primary of unit seq0; "
         "hostC: no_such_unit: not the primary of unit seq0"),
        ([{"error": "newer primary", "code": "stale_term"}, {"error": "unknown type 'spare_join'"}],
         "hostB: stale_term: newer primary; hostC: failed: unknown type 'spare_join'"),
        ([{"queued": True}, NOT_PRIMARY],
         "hostB: unexpected answer {'queued': True}; "
         "hostC: no_such_unit: not the primary of unit seq0"),
    ],
)  # fmt: skip
def test_a_round_in_which_every_candidate_refused_ends_it(
    replies: list[dict[str, Any]], detail: str
) -> None:
    r = _rejoin("hostB", "hostC")
    assert r.answered(r.target(0.0) or "", replies[0], 0.0) is None
    assert r.answered(r.target(0.0) or "", replies[1], 0.0) == Refused(detail)
    assert r.phase is Phase.REFUSED
    assert r.target(100.0) is None


def test_a_refusal_counts_only_within_its_round() -> None:
    """hostB refused in the first round and was silent in the second: no verdict yet."""
    r = _rejoin("hostB", "hostC")
    r.answered("hostB", NOT_PRIMARY, 0.0)
    r.answered("hostC", None, 0.0)
    r.target(1.0)
    r.answered("hostB", None, 1.0)
    assert r.answered("hostC", NOT_PRIMARY, 1.0) is None
    assert r.phase is Phase.OFFERING


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


def test_the_driver_offers_until_a_candidate_takes_it_then_stops() -> None:
    script: dict[str, queue.SimpleQueue[dict[str, Any] | None]] = {
        "hostC": queue.SimpleQueue(),
        "hostB": queue.SimpleQueue(),
    }
    for reply in (NOT_PRIMARY, NOT_PRIMARY):
        script["hostC"].put(reply)
    for reply in (None, {"joined": True, "term": 2}):
        script["hostB"].put(reply)
    sent: list[tuple[str, float]] = []
    done: list[Joined | Refused] = []
    finished = threading.Event()

    def request(peer: str, body: dict[str, Any], timeout_s: float) -> dict[str, Any] | None:
        assert body["type"] == "spare_join"
        sent.append((peer, timeout_s))
        return script[peer].get_nowait()

    def on_done(outcome: Joined | Refused) -> None:
        done.append(outcome)
        finished.set()

    config = RejoinConfig(retry_s=0.01, answer_timeout_s=0.2)
    rejoin = Rejoin("seq0", "hostA", ("hostC", "hostB"), 2, config)
    driver = RejoinDriver(rejoin, request=request, done=on_done)
    driver.start()
    assert finished.wait(5.0)
    driver.stop()
    assert done == [Joined("hostB", 2)]
    assert sent == [("hostC", 0.2), ("hostB", 0.2), ("hostC", 0.2), ("hostB", 0.2)]


def test_a_driver_stopped_before_any_answer_reports_nothing() -> None:
    started = threading.Event()
    done: list[Joined | Refused] = []

    def request(_peer: str, _body: dict[str, Any], _timeout_s: float) -> dict[str, Any] | None:
        started.set()
        return None

    driver = RejoinDriver(
        Rejoin("seq0", "hostA", ("hostB",), 2, RejoinConfig(retry_s=30.0)),
        request=request,
        done=done.append,
    )
    driver.start()
    assert started.wait(5.0)
    driver.stop(timeout=5.0)
    assert not driver._thread.is_alive()
    assert done == []
