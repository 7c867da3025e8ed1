"""Lossless mode (DESIGN.md I7) on the three-host testbed: inputs mirrored to B, replayed there.

The sequencer runs on A (standby B, spare C) under a numbered UDP stream, and host A is killed
just after one of its cuts resumed ingress. At that moment A's open epoch holds inputs that no
commit covers, and nothing waits in A's wire port's queue (that is the pause of a cut; inputs
queued there at the kill were never delivered to the NF, so no mirror saw them either).

- With the unit lossless, B restores its last committed image and replays the inputs A mirrored
  after its cut: every input sent more than `MARGIN_MS` before the kill is reflected in an output
  at the sink, with no duplicate and no gap in the NF's counter (I4).
- The same kill without lossless mode loses the inputs A took after its last committed cut,
  which was more than an epoch before the kill: the assertion above fails without the replay.

"Reflected" is judged without guessing when a lost input was sent (the sink only knows the send
time of what it received): the inputs reflected among those sent before the kill must have no
hole, and the newest of them must have been sent less than `MARGIN_MS` before the kill. The
sender is paced, so no input sent before the kill less the margin is then missing, unless the
sender itself stalled that long.

Inputs sent from the kill until B attached the unit (the outage) reach nobody without lossless
mode. In lossless mode the bridge floods them to B, as it floods every input for the NF's MAC
(that MAC is never a source on the fabric), and B's shadow log keeps those no mirror frame
covered; B replays them after the mirrored ones, so no input at all is lost.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from hamgr.agent.lossless import mirror_tag
from hamgr.bench.failover import InputLoss, classify_lost, finish_traffic, start_traffic
from hamgr.fabric import UNIT, Fabric
from hamgr.trafgen import Record, check_sequence, read_records

pytestmark = [
    pytest.mark.root,
]

PPS = 500
# Inputs sent this close to the kill may still have been on their way to A (the client's
# socket, the bridge) or waiting in A's wire port while a cut paused ingress (a pause is 20-40 ms
# on this loaded machine; one run saw 21 ms): no one delivered or mirrored them. It also absorbs
# a short stall of the sender (2 ms between inputs at PPS). Without the replay the newest input
# reflected precedes the last committed cut, which lies more than an epoch (50 ms) plus a pause
# before the kill (96-115 ms measured), so the control below still fails the lossless bound.
MARGIN_MS = 50


def _kill_after_a_cut(fab: Fabric, timeout: float = 5.0) -> int:
    """Kill host A right after one of its cuts resumed the unit's ingress; the kill's time (µs).

    The inputs of the epoch that cut closed, and of the one it opened, are then uncommitted:
    the cut's own ship has barely started, so B holds the image of the cut before."""
    pids = fab.host_pids("A")
    with fab.dp_client("A") as dp:
        start = dp.stats(UNIT).units[UNIT].epoch
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            u = dp.stats(UNIT).units[UNIT]
            if u.epoch > start and not u.paused:
                return fab.kill_host("A", pids)
            time.sleep(0.0005)
    raise TimeoutError(f"no cut of {UNIT} on A within {timeout} s")


def _fail_over(fab: Fabric, tmp_path: Path) -> tuple[int, dict[str, Any], int]:
    """Stream, kill A after a cut, wait until B is primary and C committed its first image.

    Returns the kill's time (µs), B's failover record and the number of inputs sent; the
    sink's records are in ``tmp_path / "sink.rec"``."""
    sink, sender, _out = start_traffic(fab, tmp_path, seconds=5.0, pps=PPS)
    try:
        fab.wait_event("A", "first_commit", timeout=10)
        time.sleep(1.0)
        kill_us = _kill_after_a_cut(fab)
        rec = fab.wait_event("B", "failover_record", timeout=30, after_us=kill_us)
        fab.wait_event("B", "first_commit", timeout=30, after_us=kill_us)
    finally:
        sent = finish_traffic(sink, sender)
    return kill_us, rec, int(sent["sent"])


def reflected_before(records: list[Record], kill_ns: int) -> tuple[int, float]:
    """Of the inputs reflected at the sink and sent before `kill_ns`: how many lower seqs are
    missing (holes), and how long before the kill the newest of them was sent (ms)."""
    before = sorted({r.seq: r.sent_ns for r in records if r.sent_ns < kill_ns}.items())
    assert before, "no input sent before the kill was reflected"
    newest_seq, newest_ns = before[-1]
    holes = newest_seq - before[0][0] + 1 - len(before)
    return holes, (kill_ns - newest_ns) / 1e6


def _loss(fab: Fabric, records: list[Record], kill_us: int, sent: int) -> InputLoss:
    """The bench's estimate of the lost inputs, by when they were sent (information)."""
    attached = fab.hosts["B"].events("attached")
    return classify_lost(
        records,
        sent=sent,
        kill_ns=kill_us * 1000,
        attached_ns=attached[-1]["mono_us"] * 1000 if attached else None,
        interval_ns=int(1e9 / PPS),
    )


def test_lossless_replays_the_inputs_after_the_cut_at_the_standby(tmp_path: Path) -> None:
    with Fabric(tmp_path / "fab", lossless=True) as fab:
        fab.start()
        kill_us, rec, sent = _fail_over(fab, tmp_path)
        with fab.dp_client("B") as dp:
            b = dp.stats()
        with fab.dp_client("C") as dp:
            c = dp.stats()
        records = read_records(tmp_path / "sink.rec")
        check = check_sequence(records)
        holes, newest_ms = reflected_before(records, kill_us * 1000)
        loss = _loss(fab, records, kill_us, sent)
        replayed = fab.hosts["B"].events("replayed")
        print(f"{check}; {loss}; newest reflected input sent {newest_ms} ms before the kill")
        print(f"record {rec}; replayed {replayed}")
        assert rec["status"] == "finished", rec
        assert rec["term"] == 2
        # B replayed what A mirrored after the restored image's cut, in order, from the cut on.
        assert rec["replay_failed"] == ""
        assert rec["replayed"] > 0
        assert len(replayed) == 1
        assert replayed[0]["after"] == rec["cut_seq"]
        assert replayed[0]["first"] == rec["cut_seq"] + 1
        mirrored = replayed[0]["last"] - replayed[0]["first"] + 1
        assert replayed[0]["delivered"] == mirrored
        # Then the shadow log: what the bridge flooded to B that A never delivered, the
        # outage's inputs above all (A died after one of its cuts, so some are always there).
        assert replayed[0]["shadow"] > 0
        assert mirrored + replayed[0]["shadow"] == rec["replayed"]
        assert b.units[UNIT].replayed_pkts == rec["replayed"]
        # The log as the replay found it: no mirror frame that overtook its flooded copy was
        # forgotten before the copy came (its input would be in the shadow replay too).
        counters = replayed[0]["log"]
        assert counters["last_seq"] == replayed[0]["last"]
        assert counters["shadow_frames"] == replayed[0]["shadow"]
        assert counters["shadow_evicted"] == 0
        # Every input sent before the kill (less the margin) is reflected in some output...
        assert holes == 0
        assert newest_ms < MARGIN_MS
        # ...and so is every input at all: none sent before the kill, in the outage or after.
        assert loss == InputLoss(before_kill=0, in_outage=0, after_attach=0)
        assert check.received == sent
        # ...once: one legal execution (I4).
        assert check.duplicates == 0
        assert check.gaps == 0
        # B's log is gone once the unit resumed; B now mirrors at term 2, and C, its new
        # standby, logs that mirror (A's term-1 tag would not feed it) and trims it at commits.
        assert UNIT not in b.input_logs
        assert fab.hosts["B"].events("input_log_removed")
        tag2 = mirror_tag(UNIT, 2)
        assert b.units[UNIT].mirror == "fab"
        assert b.units[UNIT].mirror_tag == tag2
        c_log = c.input_logs[UNIT]
        assert c_log.tag == tag2
        assert c_log.received > 0
        assert c_log.trim_seq > 0
        assert c_log.gaps == 0


def test_without_lossless_the_same_kill_loses_inputs_sent_before_it(tmp_path: Path) -> None:
    with Fabric(tmp_path / "fab") as fab:
        fab.start()
        kill_us, rec, sent = _fail_over(fab, tmp_path)
        records = read_records(tmp_path / "sink.rec")
        check = check_sequence(records)
        holes, newest_ms = reflected_before(records, kill_us * 1000)
        loss = _loss(fab, records, kill_us, sent)
        print(f"{check}; {loss}; newest reflected input sent {newest_ms} ms before the kill")
        print(f"record {rec}")
        assert rec["status"] == "finished", rec
        assert rec["replayed"] is None
        # The inputs A took after its last committed cut died with it: some inputs sent before
        # the kill are never reflected. (How long before the kill the newest reflected one was
        # sent is no longer a test: a commit now lands within 25-30 ms of its cut, so it can be
        # under MARGIN_MS, which the lossless test needs only as an upper bound.)
        assert holes == 0
        assert newest_ms > 0
        assert loss.before_kill > 0
        assert check.duplicates == 0
        assert check.gaps == 0
