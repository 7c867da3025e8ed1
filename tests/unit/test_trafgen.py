"""The sink-side checks that decide whether a failover was visible from outside."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from pathlib import Path

from click.testing import CliRunner

from hamgr import trafgen
from hamgr.trafgen import (
    Record,
    check_sequence,
    inputs_twice,
    member_records,
    missing_outside_takeover,
    read_records,
)

KILL = 1_000


def records(*pairs: tuple[int, int]) -> list[Record]:
    """(counter, receive time) pairs; the sender's fields do not matter here."""
    return [Record(counter, counter, 0, recv) for counter, recv in pairs]


def test_duplicates_and_gaps_are_counted() -> None:
    check = check_sequence(records((1, 1), (2, 2), (2, 3), (5, 4), (4, 5)))
    assert (check.duplicates, check.gaps, check.reordered) == (1, 1, 1)


def test_an_input_counted_twice_is_seen_by_its_seq_not_by_the_counter() -> None:
    # Stop 13's lossless run: input 829 reflected as counters 829 and 830, then on by one.
    seen = [Record(c, s, 0, c) for c, s in ((828, 828), (829, 829), (830, 829), (831, 830))]
    assert check_sequence(seen).duplicates == check_sequence(seen).gaps == 0
    assert inputs_twice(seen) == 1
    # An output sent twice (the same counter) is a duplicate, not an input counted twice.
    again = [Record(c, c, 0, c) for c in (1, 2, 2, 3)]
    assert (check_sequence(again).duplicates, inputs_twice(again)) == (1, 0)


def test_a_gap_at_the_takeover_is_the_known_limit() -> None:
    seen = records((1, 10), (2, 20), (6, KILL + 5), (7, KILL + 6))
    assert missing_outside_takeover(seen, KILL) == set()


def test_a_gap_anywhere_else_is_reported() -> None:
    before = records((1, 10), (3, 20), (4, 30), (6, KILL + 5), (7, KILL + 6), (9, KILL + 7))
    assert missing_outside_takeover(before, KILL) == {2, 8}


def test_without_output_on_both_sides_every_gap_counts() -> None:
    assert missing_outside_takeover(records((1, 10), (3, 20)), KILL) == {2}


def test_behind_a_chain_the_sink_keeps_every_members_counter(tmp_path: Path) -> None:
    """`sink --stamps 2`: datagrams carry (last member's counter, first member's, sender seq,
    sent ns); each member's counters go to their own record file."""
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    port = receiver.getsockname()[1]
    receiver.close()
    out, ready = tmp_path / "sink.rec", tmp_path / "ready"
    args = ["sink", "--port", str(port), "--bind", "127.0.0.1", "--out", str(out)]
    args += ["--seconds", "10", "--idle-exit", "0.3", "--ready", str(ready), "--stamps", "2"]

    def send() -> None:
        deadline = time.monotonic() + 5
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for seq in range(1, 6):
                s.sendto(
                    struct.pack("!QQQQ", 100 + seq, seq * 2, seq, 7) + b"pad", ("127.0.0.1", port)
                )
            s.sendto(b"short", ("127.0.0.1", port))  # not a stamped datagram: skipped

    sender = threading.Thread(target=send)
    sender.start()
    result = CliRunner().invoke(trafgen.cli, args)
    sender.join()
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.splitlines()[-1]) == {"received": 5}
    last = read_records(out)
    first = read_records(member_records(out, 0))
    assert [(r.counter, r.seq, r.sent_ns) for r in last] == [(100 + s, s, 7) for s in range(1, 6)]
    assert [(r.counter, r.seq) for r in first] == [(2 * s, s) for s in range(1, 6)]
    assert [r.recv_ns for r in first] == [r.recv_ns for r in last]
