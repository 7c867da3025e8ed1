"""Remote failover on the three-host testbed (`hamgr.fabric`): real agents, data planes, runc.

Each test builds the fabric, protects the sequencer on A (standby B, spare C), runs a bounded
UDP stream through it, breaks something, and checks what the sink saw: no duplicate and no gap in
the NF's counter (I4). Output is released at the standby, so a primary that dies takes no
committed output with it. `Fabric.close` removes every process, namespace, cgroup and file.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from hamgr.bench.failover import finish_traffic, outage_ms, start_traffic, start_udp
from hamgr.fabric import Fabric
from hamgr.trafgen import check_sequence, member_records, read_records

pytestmark = [
    pytest.mark.root,
]

PPS = 500


def _term_events(fab: Fabric, letter: str, kind: str) -> list[dict[str, object]]:
    return fab.hosts[letter].events(kind)


def test_kill_primary_host_standby_takes_over_without_duplicates(tmp_path: Path) -> None:
    with Fabric(tmp_path / "fab") as fab:
        fab.start()
        sink, sender, out = start_traffic(fab, tmp_path, seconds=6.0, pps=PPS)
        try:
            fab.wait_event("A", "first_commit", timeout=10)
            time.sleep(1.0)
            a_unit, b_link = fab.dp_stats("A").units["seq0"], fab.dp_stats("B").ports["fab"]
            kill_us = fab.kill_host("A")
            rec = fab.wait_event("B", "failover_record", timeout=30, after_us=kill_us)
            first = fab.wait_event("B", "first_commit", timeout=30, after_us=kill_us)
            protected = fab.wait_event("B", "protected", timeout=5, after_us=kill_us)
            status = fab.request("B", {"type": "status"})
        finally:
            finish_traffic(sink, sender)
        records = read_records(out)
        check = check_sequence(records)
        after = [r for r in records if r.recv_ns > kill_us * 1000]
        unprotected = fab.hosts["B"].events("unprotected")
        print(f"failover {outage_ms(records, kill_us)} ms; {check}; record {rec}")
        # B released output while C was being seeded, before C's first ack...
        assert len(unprotected) == 1
        assert unprotected[0]["term"] == 2
        window = [
            r
            for r in after
            if unprotected[0]["mono_us"] * 1000 < r.recv_ns < first["mono_us"] * 1000
        ]
        assert window, "B held its output until C's first ack"
        # ...and the unit counts as protected once C acked.
        assert protected["standby"] == fab.hosts["C"].name
        assert protected["mono_us"] >= first["mono_us"]
        assert status["primary"]["seq0"]["protection"] == "protected"
        assert rec["status"] == "finished"
        assert rec["term"] == 2
        assert after, "no output at the sink after the takeover"
        assert check.duplicates == 0
        assert check.reordered == 0
        # Released at the standby: A's data plane sent none of the NF's output, B's sent it
        # (what A retired, give or take what was in flight between the two reads)...
        assert a_unit.released_pkts == 0
        assert a_unit.retired_pkts > 0
        assert b_link.xmit_pkts >= a_unit.retired_pkts
        # ...so whatever B restored, B had already sent (I4).
        assert check.gaps == 0
        # The restored NF continues the counter of the committed image.
        assert len(fab.hosts["B"].events("failover")) == 2  # running, finished: once


def test_kill_standby_host_primary_reprotects_onto_spare(tmp_path: Path) -> None:
    with Fabric(tmp_path / "fab") as fab:
        fab.start()
        sink, sender, out = start_traffic(fab, tmp_path, seconds=6.0, pps=PPS)
        try:
            fab.wait_event("A", "first_commit", timeout=10)
            time.sleep(0.5)
            kill_us = fab.kill_host("B")
            ev = fab.wait_event("A", "reprotected", timeout=30, after_us=kill_us)
            commit = fab.wait_event("A", "protected", timeout=5, after_us=kill_us)
        finally:
            finish_traffic(sink, sender)
        records = read_records(out)
        check = check_sequence(records)
        spare = fab.hosts["C"].name
        assert ev["standby"] == spare
        assert commit["standby"] == spare
        assert ev["term"] == 1  # the unit did not move
        late = [r for r in records if r.recv_ns > ev["mono_us"] * 1000 + 200_000_000]
        assert late, "output did not go on after the re-protection (no commit on the spare)"
        assert check.duplicates == 0
        assert check.gaps == 0
        assert (fab.hosts["C"].runtime / "standby" / "seq0").exists()


def test_a_standby_killed_before_any_probe_flap_is_found_lost(tmp_path: Path) -> None:
    # A's data plane reports B up once, while A's agent is still seeding B, before its loop
    # listens: only a later flap told the loop that B had ever spoken, and a B killed before
    # one was taken for a peer still starting (the unit stalled for good). Killed right after
    # the first commit, B has rarely flapped yet.
    with Fabric(tmp_path / "fab") as fab:
        fab.start()
        sink, sender, out = start_traffic(fab, tmp_path, seconds=5.0, pps=PPS)
        try:
            fab.wait_event("A", "first_commit", timeout=10)
            kill_us = fab.kill_host("B")
            lost = fab.wait_event("A", "standby_lost", timeout=10, after_us=kill_us)
            ev = fab.wait_event("A", "reprotected", timeout=30, after_us=kill_us)
        finally:
            finish_traffic(sink, sender)
        check = check_sequence(read_records(out))
        assert lost["standby"] == fab.hosts["B"].name
        assert ev["standby"] == fab.hosts["C"].name
        assert check.duplicates == 0
        assert check.gaps == 0


def test_failover_requested_while_one_runs_happens_once(tmp_path: Path) -> None:
    with Fabric(tmp_path / "fab") as fab:
        fab.start()
        sink, sender, out = start_traffic(fab, tmp_path, seconds=6.0, pps=PPS)
        try:
            fab.wait_event("A", "first_commit", timeout=10)
            time.sleep(0.5)
            kill_us = fab.kill_host("A")
            # An operator asks too, naming the term they saw: the same failure, twice more.
            for _ in range(2):
                reply = fab.request("B", {"type": "failover", "unit": "seq0", "term": 1})
                assert reply["queued"] is True
            fab.wait_event("B", "failover_record", timeout=30, after_us=kill_us)
            fab.wait_event("B", "first_commit", timeout=30, after_us=kill_us)
            time.sleep(0.3)
            status = fab.request("B", {"type": "status"})
        finally:
            finish_traffic(sink, sender)
        check = check_sequence(read_records(out))
        running = [e for e in fab.hosts["B"].events("failover") if e["status"] == "running"]
        assert len(running) == 1
        assert status["standby"]["seq0"] == {"state": "watching", "term": 2}
        assert status["primary"]["seq0"]["protection"] == "protected"
        assert len(set(fab.hosts["B"].status()["nf_pids"].values())) == 1  # one restored NF
        assert check.duplicates == 0
        assert check.gaps == 0


def test_two_failures_in_a_row_the_spare_takes_over_from_the_new_primary(tmp_path: Path) -> None:
    """Kill A: B takes over and re-protects onto C, which starts watching B. Kill B: C takes
    over from B's last commit. The sink's counter never repeats and never skips (I4)."""
    with Fabric(tmp_path / "fab") as fab:
        fab.start()
        sink, sender, out = start_traffic(fab, tmp_path, seconds=9.0, pps=PPS)
        try:
            fab.wait_event("A", "first_commit", timeout=10)
            time.sleep(0.8)
            kill_a = fab.kill_host("A")
            fab.wait_event("B", "failover_record", timeout=30, after_us=kill_a)
            fab.wait_event("B", "protected", timeout=30, after_us=kill_a)
            watching = fab.wait_event("C", "watching", timeout=5, after_us=kill_a)
            time.sleep(0.8)
            kill_b = fab.kill_host("B")
            rec = fab.wait_event("C", "failover_record", timeout=30, after_us=kill_b)
            status = fab.request("C", {"type": "status"}, timeout=5)
        finally:
            finish_traffic(sink, sender)
        records = read_records(out)
        check = check_sequence(records)
        assert watching["primary"] == fab.hosts["B"].name
        assert watching["term"] == 2
        assert rec["status"] == "finished", rec
        assert rec["term"] == 3
        assert status["primary"]["seq0"]["term"] == 3
        late = [r for r in records if r.recv_ns > rec["resumed_us"] * 1000]
        assert late, "no output at the sink after C took over"
        assert check.duplicates == 0
        assert check.gaps == 0
        assert check.reordered == 0


def test_a_live_primary_keeps_the_unit_and_a_dead_one_is_replaced_by_the_copy_restored_ahead(
    tmp_path: Path,
) -> None:
    """Probes between A and B muted while their agents still talk: B's check finds A alive, so
    nothing moves, and no copy B may have begun restoring for the silence is left running.
    Then A dies: B restores while it confirms (`Prestore`), and that copy takes over."""
    with Fabric(tmp_path / "fab") as fab:
        fab.start()
        sink, sender, out = start_traffic(fab, tmp_path, seconds=8.0, pps=PPS)
        try:
            fab.wait_event("A", "first_commit", timeout=10)
            time.sleep(0.5)
            muted = fab.mute_probes("A", "B")
            fab.wait_event("B", "peer_down", timeout=5, after_us=muted)
            time.sleep(1.0)  # disputed all along: A's agent answers every check
            running_while_muted = fab.nf_netns_pids("B")
            unmuted = fab.unmute_probes("A", "B")
            fab.wait_event("B", "peer_up", timeout=5, after_us=unmuted)
            time.sleep(0.5)
            kill_us = fab.kill_host("A")
            rec = fab.wait_event("B", "failover_record", timeout=30, after_us=kill_us)
            used = fab.wait_event("B", "prestore_used", timeout=5, after_us=kill_us)
        finally:
            finish_traffic(sink, sender)
        check = check_sequence(read_records(out))

        def between(kind: str, a: int, b: int) -> list[dict[str, Any]]:
            return [e for e in fab.hosts["B"].events(kind) if a <= e["mono_us"] < b]

        made = between("prestored", muted, kill_us)
        dropped = between("prestore_dropped", muted, kill_us)
        assert {e["pid"] for e in made} == {e["pid"] for e in dropped}
        assert running_while_muted == set(), "B ran a copy while A was alive"
        assert between("failover", 0, kill_us) == [], "B took a live A over"
        # The takeover's NF is the copy of the death's suspicion, restored before the verdict.
        ahead = between("prestored", kill_us, rec["mono_us"])
        assert [e["pid"] for e in ahead] == [used["pid"]] == [rec["new_pid"]]
        assert ahead[0]["image"][1] == rec["image_epoch"]
        assert rec["status"] == "finished"
        assert check.duplicates == 0
        assert check.gaps == 0


def test_a_chain_fails_over_to_the_standby_with_every_member(tmp_path: Path) -> None:
    """A chain of two sequencers on A (`Fabric(chain=2)`): B restores both members from the
    committed chain image, and neither member's counter repeats or skips at the sink."""
    with Fabric(tmp_path / "fab", chain=2) as fab:
        fab.start()
        sink, sender, out = start_udp(fab.cl, fab.sk, tmp_path, seconds=6.0, pps=PPS, stamps=2)
        try:
            fab.wait_event("A", "first_commit", timeout=10)
            time.sleep(1.0)
            kill_us = fab.kill_host("A")
            rec = fab.wait_event("B", "failover_record", timeout=30, after_us=kill_us)
            fab.wait_event("B", "first_commit", timeout=30, after_us=kill_us)
            # Both members run on B, each a container of its own, restored under the new term.
            names = {str(c["id"]) for c in _runc_list(fab, "B")}
            (chain,) = _chain_names(names)
            assert {f"{chain}-m0", f"{chain}-m1"} <= names, names
        finally:
            finish_traffic(sink, sender)
        last = read_records(out)
        first = read_records(member_records(out, 0))
        print(f"chain failover {outage_ms(last, kill_us)} ms; record {rec}")
        assert rec["status"] == "finished"
        assert rec["term"] == 2
        after = [r for r in last if r.recv_ns > kill_us * 1000]
        assert after, "no output at the sink after the takeover"
        for member, records in (("last", last), ("first", first)):
            check = check_sequence(records)
            assert (check.duplicates, check.gaps, check.reordered) == (0, 0, 0), (member, check)
        # Every datagram went through both members, which number it alike.
        assert [r.counter for r in first] == [r.counter for r in last]


def _runc_list(fab: Fabric, letter: str) -> list[dict[str, object]]:
    root = fab.hosts[letter].work / "containers" / "runc"
    proc = subprocess.run(
        ["runc", "--root", str(root), "list", "--format", "json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    )
    listed: list[dict[str, object]] = json.loads(proc.stdout or "[]") or []
    # A member frozen for a cut reads "paused": alive all the same.
    return [c for c in listed if c.get("status") in ("running", "paused")]


def _chain_names(names: set[str]) -> set[str]:
    """The chains among runc container names `<chain>-m<i>`, restored under term 2."""
    return {n.rsplit("-m", 1)[0] for n in names if "-t2-m" in n}
