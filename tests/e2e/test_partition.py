"""Partitions on the three-host testbed (`hamgr.fabric`): both sides alive, a link cut.

The sequencer runs on A (standby B, spare C) under a bounded UDP stream. `Fabric.partition`
drops every frame between two hosts' links in the bridge and nothing else; `Fabric.heal` undoes
it. What the sink saw must be one legal execution (I4): no duplicate, no gap in the NF's counter.

- A|B: B takes over at term 2 after its term claim at C is granted, and re-protects onto C. A
  gets no acks, so it releases nothing; its own re-protection onto C meets term 2 there and A is
  fenced (held output discarded, NF stopped, unit removed from its data plane).
- B isolated (A|B and B|C): B's claim reaches no spare, so B stands down and restores nothing;
  A re-protects onto C. Once B reaches C again, an operator's failover request on B is refused
  by C, which holds A's newer commit: B stands down again. A never notices.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hamgr.bench.failover import finish_traffic, start_traffic
from hamgr.fabric import Fabric
from hamgr.trafgen import check_sequence, read_records

pytestmark = [
    pytest.mark.root,
]

PPS = 500


_CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.0).close()
except ConnectionRefusedError:
    pass  # an answer all the same
except OSError:
    sys.exit(1)
"""


def _reaches(fab: Fabric, src: str, dst: str) -> bool:
    """Whether host `src` reaches host `dst`'s management address (a TCP connect, 1 s)."""
    h = fab.hosts[dst]
    argv = [sys.executable, "-c", _CONNECT, h.mgmt_ip, h.control.rsplit(":", 1)[1]]
    run = fab.in_ns(fab.hosts[src].ns, argv)
    return subprocess.run(run, check=False, capture_output=True, timeout=20).returncode == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:", 1)[1].split("\n", 1)[0]
    except (OSError, IndexError):
        return "zombie (gone)"


def isolate_b_after_a_first_stream(
    fab: Fabric, tmp_path: Path, committed: Callable[[], Any]
) -> tuple[Path, int]:
    """A first stream until `committed()` returns, then B cut off from C and from A while the
    unit is idle (the sink leaves after 2 s without traffic). Returns the first stream's
    output file and the time of the cut (µs)."""
    first = tmp_path / "first"
    first.mkdir()
    sink, sender, out1 = start_traffic(fab, first, seconds=2.0, pps=PPS)
    try:
        committed()
    finally:
        finish_traffic(sink, sender)
    cut_us = fab.partition("B", "C")
    fab.partition("A", "B")
    return out1, cut_us


def heal_until_rejoined(fab: Fabric) -> tuple[dict[str, Any], dict[str, Any]]:
    """Heal A|B, then wait until A's offer to be a spare reached B: A's `rejoined` and B's
    `spare_joined` events."""
    heal_us = fab.heal("A", "B")
    try:
        rejoined = fab.wait_event("A", "rejoined", timeout=15, after_us=heal_us)
    except TimeoutError as exc:
        status = fab.request("A", {"type": "status"}) if fab.agents == "plan" else None
        raise AssertionError(
            f"{exc}; A's status {status}; A's last events {_tail(fab, 'A')}"
        ) from exc
    return rejoined, fab.wait_event("B", "spare_joined", timeout=10, after_us=heal_us)


def _tail(fab: Fabric, letter: str, n: int = 8) -> list[dict[str, Any]]:
    skip = {"peer_up", "peer_down", "standby_disputed", "commit"}
    return [e for e in fab.hosts[letter].events() if e["kind"] not in skip][-n:]


def assert_stood_down_unanswered(record: dict[str, Any], spare: str) -> None:
    """A standby's takeover record at term 2 while it was cut off from its one spare: the
    claim got no answer, so it stood down and restored nothing."""
    assert record["status"] == "aborted", record
    assert record["term"] == 2
    assert record["detail"].startswith("stand down: no spare granted the term claim")
    assert record["new_pid"] is None
    assert len(record["claims"]) == 1
    assert record["claims"][0].startswith(f"{spare}: no-answer")


def test_partition_primary_standby_takes_over_old_primary_is_fenced(tmp_path: Path) -> None:
    with Fabric(tmp_path / "fab") as fab:
        fab.start()
        c = fab.hosts["C"].name
        sink, sender, out = start_traffic(fab, tmp_path, seconds=8.0, pps=PPS)
        try:
            fab.wait_event("A", "first_commit", timeout=10)
            time.sleep(1.0)
            a_nf = fab.hosts["A"].status()["nf_pids"]["seq0"]
            cut_us = fab.partition("A", "B")
            assert {(x, y) for x, y in fab.partitioned()} == {
                (f"{fab.prefix}b{p}{s}", f"{fab.prefix}b{q}{t}")
                for s, t in (("A", "B"), ("B", "A"))
                for p in "dm"
                for q in "dm"
            }
            rec = fab.wait_event("B", "failover_record", timeout=30, after_us=cut_us)
            fenced = fab.wait_event("A", "fenced", timeout=30, after_us=cut_us)
            protected = fab.wait_event("B", "protected", timeout=30, after_us=cut_us)
            a_during = fab.dp_stats("A")
            cut_off = (_reaches(fab, "B", "A"), _reaches(fab, "A", "B"))
            around = (_reaches(fab, "A", "C"), _reaches(fab, "B", "C"))
            heal_us = fab.heal("A", "B")
            assert fab.partitioned() == set()
            healed = _reaches(fab, "B", "A")
            time.sleep(1.0)
            a_after = fab.dp_stats("A")
            status_a = fab.request("A", {"type": "status"})
            status_b = fab.request("B", {"type": "status"})
        finally:
            finish_traffic(sink, sender)
        records = read_records(out)
        check = check_sequence(records)
        claims = fab.hosts["B"].events("claims")
        print(f"{check}; record {rec}; fenced {fenced}; claims {claims}")
        # The partition cut A and B apart, and nothing else; the heal joined them again.
        assert cut_off == (False, False)
        assert around == (True, True)
        assert healed
        # B took over at term 2, once, after C granted the claim...
        assert rec["status"] == "finished", rec
        assert rec["term"] == 2
        assert rec["claims"] == [f"{c}: granted"]
        assert [e["status"] for e in fab.hosts["B"].events("failover")] == ["running", "finished"]
        assert protected["standby"] == c
        assert status_b["primary"]["seq0"]["protection"] == "protected"
        assert status_b["primary"]["seq0"]["term"] == 2
        # ...and A, whose re-protection met term 2 at C, is fenced: nothing it held went out.
        assert fenced["term"] == 2
        assert fenced["own_term"] == 1
        assert c in fenced["cause"]
        assert fenced["released_pkts"] == 0
        assert fenced["nf_pid"] == a_nf
        assert not _alive(a_nf), f"A's NF {a_nf} still runs: {_state(a_nf)}"
        assert "seq0" not in a_during.units
        assert "seq0" not in a_after.units
        assert status_a["primary"] == {}
        # A's data plane never put NF output on the wire: released at the standby, then fenced.
        assert a_after.ports["fab"].xmit_pkts == 0
        assert not fab.hosts["A"].events("reprotected")
        # The sink: output before the cut, during the partition (B) and after the heal (B).
        assert [r for r in records if r.recv_ns > protected["mono_us"] * 1000]
        assert [r for r in records if r.recv_ns > heal_us * 1000], "no output after the heal"
        assert check.duplicates == 0
        assert check.gaps == 0
        assert check.reordered == 0


def test_isolated_standby_stands_down_and_a_newer_commit_refuses_its_claim(
    tmp_path: Path,
) -> None:
    """The cut comes while the unit is idle (a first stream ended, every commit acked). With
    output in flight, a cut between B's commit of an epoch and A's receipt of the ack leaves A
    releasing in its recovery cut what B already sent (docs/failover.md, "Partitions", what is
    left); that window is not what this test is about."""
    with Fabric(tmp_path / "fab") as fab:
        fab.start()
        c = fab.hosts["C"].name
        out1, cut_us = isolate_b_after_a_first_stream(
            fab, tmp_path, lambda: fab.wait_event("A", "first_commit", timeout=10)
        )
        second = tmp_path / "second"
        second.mkdir()
        sink, sender, out2 = start_traffic(fab, second, seconds=7.0, pps=PPS)
        try:
            isolated = fab.wait_event("B", "failover_record", timeout=30, after_us=cut_us)
            moved = fab.wait_event("A", "reprotected", timeout=30, after_us=cut_us)
            fab.wait_event("A", "protected", timeout=10, after_us=cut_us, standby=c)
            # B reaches C again (A still cut off): C now holds A's commits, newer than B's.
            healed_us = fab.heal("B", "C")
            time.sleep(1.0)
            reply = fab.request("B", {"type": "failover", "unit": "seq0", "term": 1})
            assert reply["queued"] is True
            refused = fab.wait_event("B", "failover_record", timeout=30, after_us=healed_us)
            status_b = fab.request("B", {"type": "status"})
            fab.heal("A", "B")
            time.sleep(0.5)
            status_a = fab.request("A", {"type": "status"})
        finally:
            finish_traffic(sink, sender)
        # The NF numbers each flow (source address and port) on its own: one check per stream.
        before, records = read_records(out1), read_records(out2)
        check = check_sequence(records)
        print(f"{check_sequence(before)}, {check}; isolated {isolated}; refused {refused}")
        # Isolated: no grant, no takeover, nothing restored.
        assert_stood_down_unanswered(isolated, c)
        # C committed A's epochs after the cut: B's claim against them is refused, naming them.
        assert refused["status"] == "aborted", refused
        assert refused["term"] == 3
        assert refused["detail"].startswith(f"stand down: {c} holds a newer commit (term 1, epoch")
        assert refused["detail"].endswith("from the old primary")
        assert refused["new_pid"] is None
        # B stayed A's standby in its own eyes and runs nothing; A stays primary at term 1.
        assert fab.hosts["B"].status()["nf_pids"] == {}
        # The copy B restored while it confirmed A's silence went with the stand-down.
        made = [e for e in fab.hosts["B"].events("prestored") if e["mono_us"] >= cut_us]
        dropped = [e for e in fab.hosts["B"].events("prestore_dropped") if e["mono_us"] >= cut_us]
        assert made, "B restored nothing ahead while A was silent"
        assert {e["pid"] for e in made} == {e["pid"] for e in dropped}
        assert fab.nf_netns_pids("B") == set(), "a copy restored ahead still runs on B"
        assert status_b["standby"]["seq0"] == {"state": "watching", "term": 1}
        assert status_b["primary"] == {}
        assert moved["standby"] == c
        assert status_a["primary"]["seq0"]["term"] == 1
        assert status_a["primary"]["seq0"]["standby"] == c
        assert status_a["primary"]["seq0"]["protection"] == "protected"
        assert not fab.hosts["A"].events("fenced")
        # Output went on through A, protected by C, before and after B|C healed.
        first_check = check_sequence(before)
        assert first_check.received > 0
        assert (first_check.duplicates, first_check.gaps, first_check.reordered) == (0, 0, 0)
        assert [r for r in records if r.recv_ns > healed_us * 1000], "no output after the heal"
        assert check.duplicates == 0
        assert check.gaps == 0
        assert check.reordered == 0


def test_a_takeover_of_a_live_primary_fences_it_through_its_own_engine(tmp_path: Path) -> None:
    """No partition: an operator fails the unit over to B while A runs and reaches everyone. A
    learns the higher term from B's promoted store, which refuses A's next ship; A's epoch
    machine is fenced, and the agent stops the unit there (`Observed.on_fenced`)."""
    with Fabric(tmp_path / "fab") as fab:
        fab.start()
        c = fab.hosts["C"].name
        sink, sender, out = start_traffic(fab, tmp_path, seconds=6.0, pps=PPS)
        try:
            fab.wait_event("A", "first_commit", timeout=10)
            time.sleep(1.0)
            asked_us = time.monotonic_ns() // 1000
            reply = fab.request("B", {"type": "failover", "unit": "seq0", "term": 1})
            assert reply["queued"] is True
            rec = fab.wait_event("B", "failover_record", timeout=30, after_us=asked_us)
            fenced = fab.wait_event("A", "fenced", timeout=30, after_us=asked_us)
            fab.wait_event("B", "protected", timeout=30, after_us=asked_us)
            a_after = fab.dp_stats("A")
        finally:
            finish_traffic(sink, sender)
        check = check_sequence(read_records(out))
        print(f"{check}; record {rec}; fenced {fenced}")
        assert rec["status"] == "finished", rec
        assert rec["term"] == 2
        assert rec["claims"] == [f"{c}: granted"]
        assert fenced["term"] == 2
        assert fenced["cause"] == f"{fab.hosts['B'].name} answered with a higher term"
        assert fenced["released_pkts"] == 0
        assert not _alive(fenced["nf_pid"])
        assert "seq0" not in a_after.units
        assert a_after.ports["fab"].xmit_pkts == 0
        assert not fab.hosts["A"].events("standby_lost")
        assert check.duplicates == 0
        assert check.gaps == 0
        assert check.reordered == 0


def test_a_deposed_primary_rejoins_as_a_spare_and_takes_the_unit_back(tmp_path: Path) -> None:
    """on_fenced = "standby": A, deposed by a partition, keeps an empty store of the unit and
    offers itself to B once the link heals. B lists it among its spares; when B's standby C
    dies, B re-protects onto A, and when B dies in turn, A takes the unit over at term 3. The
    sink hears one execution in each stream: every output once, the NF's counter without a
    gap across the partition, and across both deaths."""
    with Fabric(tmp_path / "fab", on_fenced="standby") as fab:
        fab.start()
        a, b, c = (fab.hosts[x].name for x in "ABC")
        first = tmp_path / "first"
        first.mkdir()
        sink, sender, out1 = start_traffic(fab, first, seconds=8.0, pps=PPS)
        try:
            fab.wait_event("A", "first_commit", timeout=10)
            time.sleep(1.0)
            cut_us = fab.partition("A", "B")
            taken = fab.wait_event("B", "failover_record", timeout=30, after_us=cut_us)
            fenced = fab.wait_event("A", "fenced", timeout=30, after_us=cut_us)
            spare = fab.wait_event("A", "spare", timeout=10, after_us=cut_us)
            fab.wait_event("B", "protected", timeout=30, after_us=cut_us)
            time.sleep(1.5)  # A's offers go unanswered while the link is cut
            offering = fab.request("A", {"type": "status"})["rejoining"]
            rejoined, joined = heal_until_rejoined(fab)
        finally:
            finish_traffic(sink, sender)
        # C dies while the unit is idle: a standby that dies between sending an epoch and
        # answering `released` has it sent again by the next one, the documented window of
        # release at the standby (docs/failover.md); this test is about the rejoin, not that.
        c_killed = fab.kill_host("C")
        lost = fab.wait_event("B", "standby_lost", timeout=15, after_us=c_killed)
        moved = fab.wait_event("B", "reprotected", timeout=15, after_us=c_killed)
        watching = fab.wait_event("A", "watching", timeout=15, after_us=c_killed)
        second = tmp_path / "second"
        second.mkdir()
        sink, sender, out2 = start_traffic(fab, second, seconds=6.0, pps=PPS)
        try:
            time.sleep(1.5)
            b_killed = fab.kill_host("B")
            back = fab.wait_event("A", "failover_record", timeout=30, after_us=b_killed)
            time.sleep(1.0)
            status_a = fab.request("A", {"type": "status"})
        finally:
            finish_traffic(sink, sender)
        # The NF counts per flow, and each stream is a flow of its own.
        checks = [check_sequence(read_records(out)) for out in (out1, out2)]
        print(f"{checks}; fenced {fenced}; rejoined {rejoined}; back {back}")
        # The partition: B took over at term 2 and A was deposed; A became a spare at term 2.
        assert (taken["status"], taken["term"]) == ("finished", 2), taken
        assert (fenced["term"], fenced["policy"]) == (2, "standby")
        assert not _alive(fenced["nf_pid"])
        assert (spare["term"], spare["cause"]) == (2, "deposed")
        assert set(spare["candidates"]) == {b, c}
        # Cut off, A kept offering; healed, B took it on its spares.
        assert offering["seq0"]["state"] == "offering", offering
        assert offering["seq0"]["offers"] >= 1
        assert offering["seq0"]["last"][b] == "no answer"
        assert offering["seq0"]["primary"] is None
        assert (rejoined["primary"], rejoined["term"]) == (b, 2)
        assert (joined["spare"], joined["term"]) == (a, 2)
        assert a in joined["spares"]
        # C died: B re-protected onto A, which watches B now...
        assert lost["standby"] == c
        assert (moved["standby"], moved["term"]) == (a, 2)
        assert (watching["primary"], watching["term"]) == (b, 2)
        # ...and B died: A took the unit back at term 3 and runs it.
        assert back["status"] == "finished", back
        assert back["term"] == 3
        assert status_a["primary"]["seq0"]["term"] == 3
        assert _alive(status_a["primary"]["seq0"]["nf_pid"])
        assert [r for r in read_records(out2) if r.recv_ns > b_killed * 1000], "no output from A"
        for check in checks:
            assert check.received > 0
            assert check.duplicates == 0
            assert check.gaps == 0
            assert check.reordered == 0
