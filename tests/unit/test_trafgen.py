"""The sink-side checks that decide whether a failover was visible from outside."""

from __future__ import annotations

from hamgr.trafgen import Record, check_sequence, missing_outside_takeover

KILL = 1_000


def records(*pairs: tuple[int, int]) -> list[Record]:
    """(counter, receive time) pairs; the sender's fields do not matter here."""
    return [Record(counter, counter, 0, recv) for counter, recv in pairs]


def test_duplicates_and_gaps_are_counted() -> None:
    check = check_sequence(records((1, 1), (2, 2), (2, 3), (5, 4), (4, 5)))
    assert (check.duplicates, check.gaps, check.reordered) == (1, 1, 1)


def test_a_gap_at_the_takeover_is_the_known_limit() -> None:
    seen = records((1, 10), (2, 20), (6, KILL + 5), (7, KILL + 6))
    assert missing_outside_takeover(seen, KILL) == set()


def test_a_gap_anywhere_else_is_reported() -> None:
    before = records((1, 10), (3, 20), (4, 30), (6, KILL + 5), (7, KILL + 6), (9, KILL + 7))
    assert missing_outside_takeover(before, KILL) == {2, 8}


def test_without_output_on_both_sides_every_gap_counts() -> None:
    assert missing_outside_takeover(records((1, 10), (3, 20)), KILL) == {2}
