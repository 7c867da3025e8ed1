"""A remote standby chosen by `hamgr protect` and run by the main agent, on the 3-host testbed.

Each host runs ``hamgr agent run`` (started by ``hamgr up`` in its netns) with the two other hosts
as peers in its agent.toml (`Fabric(agents="main")`). The sequencer is protected with the CLI on
host A, its standby named in the spec (host B). Everything is checked through the CLI: ``hamgr
status --json`` on A and on B, then the sink's view of the NF's counter (I4) after A is killed.
`Fabric.close` removes every process, namespace, cgroup and file.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hamgr.agent.state import StateDB
from hamgr.bench.failover import finish_traffic, start_traffic
from hamgr.fabric import Fabric, sequencer_spec
from hamgr.trafgen import check_sequence, read_records
from shim import netns
from tests.e2e.test_partition import (
    assert_stood_down_unanswered,
    heal_until_rejoined,
    isolate_b_after_a_first_stream,
)

pytestmark = [pytest.mark.root]

UNIT = "seq0"
PPS = 500


def _wait(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _units(fab: Fabric, letter: str) -> list[dict[str, Any]]:
    status = fab.cli_json(letter, "status")
    assert status["ok"], status
    units: list[dict[str, Any]] = status["units"]
    return units


def _role(fab: Fabric, letter: str, role: str) -> dict[str, Any] | None:
    found = [u for u in _units(fab, letter) if u["unit"] == UNIT and u["role"] == role]
    assert len(found) <= 1, found
    return found[0] if found else None


def _kill_a_after_its_commits(fab: Fabric) -> int:
    """Wait for A's first commit, let it run for a second, then kill host A; the kill's time."""
    _wait(
        lambda: (p := _role(fab, "A", "primary")) and p.get("last_committed"),
        20,
        "a first commit on A",
    )
    time.sleep(1.0)
    return fab.kill_host("A")


def _taken_over(fab: Fabric, letter: str, term: int) -> dict[str, Any]:
    """The unit's primary role on `letter` once it took the unit over at `term`: the role
    shows the term as soon as it is raised, the takeover's record once it finished."""
    taken: dict[str, Any] = _wait(
        lambda: (
            (p := _role(fab, letter, "primary")) and p["term"] == term and p["failovers"] > 0 and p
        ),
        30,
        f"host {letter} to take the unit over at term {term} and record it",
    )
    return taken


def _protected(
    fab: Fabric, letter: str, *, peer: str | None = None, term: int | None = None
) -> dict[str, Any]:
    """The unit's primary role on `letter` once its standby (`peer`, if given) acked it, at
    `term` if given."""
    role: dict[str, Any] = _wait(
        lambda: (
            (p := _role(fab, letter, "primary"))
            and p["protection"] == "protected"
            and (peer is None or p["peer"] == peer)
            and (term is None or p["term"] == term)
            and p
        ),
        30,
        f"host {letter} protected"
        + (f" by {peer}" if peer else "")
        + (f" at term {term}" if term else ""),
    )
    return role


def _unprotect(fab: Fabric, letter: str) -> None:
    """`hamgr unprotect` on `letter` until it removed everything: a standby refuses to go while
    its machine checks a flapping probe (a loaded host), and the message says to run it again."""
    _wait(
        lambda: fab.cli_json(letter, "unprotect", UNIT, check=False)["ok"],
        60,
        f"hamgr unprotect on {letter} to remove every role",
    )


def _spec(fab: Fabric, tmp_path: Path, standby: str, spares: tuple[str, ...] = ()) -> Path:
    path = tmp_path / f"{UNIT}.toml"
    path.write_text(sequencer_spec(epoch_ms=fab.epoch_ms, standby=standby, spares=spares))
    return path


def test_protect_onto_b_status_on_both_then_b_takes_over_when_a_dies(tmp_path: Path) -> None:
    with Fabric(tmp_path / "fab", agents="main") as fab:
        fab.start()
        a, b = fab.hosts["A"].name, fab.hosts["B"].name
        result = fab.cli_json("A", "protect", str(_spec(fab, tmp_path, b)))
        assert (result["ok"], result["standby"], result["term"]) == (True, b, 1), result
        sink, sender, out = start_traffic(fab, tmp_path, seconds=6.0, pps=PPS)
        try:
            primary = _wait(
                lambda: (p := _role(fab, "A", "primary")) and p.get("last_committed") and p,
                20,
                "a first commit on A",
            )
            standby = _role(fab, "B", "standby")
            time.sleep(1.0)
            kill_us = fab.kill_host("A")
            taken = _taken_over(fab, "B", 2)
        finally:
            finish_traffic(sink, sender)
        # Before the kill: A is the primary shipping to B, B the standby watching A.
        assert primary["peer"] == b
        assert primary["term"] == 1
        assert primary["protection"] == "protected"
        assert primary["nf_pid"] == result["nf_pid"]
        assert standby is not None
        assert (standby["peer"], standby["term"], standby["state"]) == (a, 1, "watching")
        # After it: B is the primary at term 2, re-protected onto C (its peers but the dead A):
        # unprotected while it seeds C, protected from C's first ack on.
        assert taken["peer"] == fab.hosts["C"].name
        assert taken["protection"] in ("unprotected", "protected")
        assert taken["failovers"] == 1
        assert taken["last_failover"]["status"] == "finished"
        assert _role(fab, "B", "standby") is None
        records = read_records(out)
        check = check_sequence(records)
        after = [r for r in records if r.recv_ns > kill_us * 1000]
        print(f"{check}; takeover {taken['last_failover']}")
        assert after, "no output at the sink after B took over"
        assert check.duplicates == 0
        assert check.reordered == 0
        assert check.gaps == 0

        # B's agent restarts and finds the unit it took over again.
        fab.cli("B", "down")
        fab.cli("B", "up")
        again = _role(fab, "B", "primary")
        assert again is not None
        assert (again["term"], again["state"], again["nf_pid"]) == (2, "running", taken["nf_pid"])


def test_b_reprotects_onto_c_after_the_takeover_and_c_takes_over_when_b_dies(
    tmp_path: Path,
) -> None:
    """Two failures in a row with the main agents: after taking the unit over, B makes C its
    new standby (C's `standby_add`, B's peers but the dead A) and ships to it; when B dies too,
    C takes over at term 3. The sink sees the NF's counter go on, once, through both."""
    with Fabric(tmp_path / "fab", agents="main") as fab:
        fab.start()
        b, c = fab.hosts["B"].name, fab.hosts["C"].name
        fab.cli_json("A", "protect", str(_spec(fab, tmp_path, b)))
        sink, sender, out = start_traffic(fab, tmp_path, seconds=9.0, pps=PPS)
        try:
            _kill_a_after_its_commits(fab)
            moved = _protected(fab, "B", peer=c, term=2)
            standby = _wait(
                lambda: (s := _role(fab, "C", "standby")) and (s.get("last_committed") or 0) and s,
                10,
                "commits on C",
            )
            time.sleep(1.0)
            fab.kill_host("B")
            taken = _taken_over(fab, "C", 3)
        finally:
            finish_traffic(sink, sender)
        check = check_sequence(read_records(out))
        print(f"{check}; B {moved}; C {taken['last_failover']}")
        assert (standby["peer"], standby["term"]) == (b, 2)
        assert taken["last_failover"]["status"] == "finished"
        assert (check.duplicates, check.gaps, check.reordered) == (0, 0, 0)
        assert check.received > 0


def test_a_lossless_unit_loses_no_input_when_b_takes_over(tmp_path: Path) -> None:
    """`protection.lossless = true` with the standby on B: A mirrors its inputs to B's data
    plane, B logs them (and a shadow log of those the fabric floods to it) and replays them
    at the takeover. Every input sent is reflected at the sink, once."""
    with Fabric(tmp_path / "fab", agents="main", lossless=True) as fab:
        fab.start()
        b = fab.hosts["B"].name
        path = tmp_path / f"{UNIT}.toml"
        path.write_text(sequencer_spec(epoch_ms=fab.epoch_ms, standby=b, lossless=True))
        result = fab.cli_json("A", "protect", str(path))
        assert result["ok"], result
        sink, sender, out = start_traffic(fab, tmp_path, seconds=6.0, pps=PPS)
        try:
            _kill_a_after_its_commits(fab)
            taken = _taken_over(fab, "B", 2)
        finally:
            sent = finish_traffic(sink, sender)
        check = check_sequence(read_records(out))
        record = taken["last_failover"]
        print(f"{check}; sent {sent['sent']}; takeover {record}")
        assert record["status"] == "finished"
        assert record["replay_failed"] == ""
        # A's inputs after its last commit (mirrored) and the outage's (flooded to B).
        assert record["replayed"] > 0
        assert check.received == sent["sent"]
        assert (check.duplicates, check.gaps, check.reordered) == (0, 0, 0)


def test_restarted_agents_adopt_their_roles_and_unprotect_drops_the_standby_on_b(
    tmp_path: Path,
) -> None:
    with Fabric(tmp_path / "fab", agents="main") as fab:
        fab.start()
        a, b = fab.hosts["A"], fab.hosts["B"]
        fab.cli_json("A", "protect", str(_spec(fab, tmp_path, b.name)))
        assert _role(fab, "B", "standby") is not None
        assert netns.netns_exists(f"hamgr-{b.name}-{UNIT}")
        assert (b.runtime / "standby" / UNIT).is_dir()
        text = fab.cli("A", "status").stdout
        assert any(ln.split()[:4] == [UNIT, "primary", b.name, "1"] for ln in text.splitlines())

        # Under traffic, A's agent restarts (it adopts its NF and takes the unit over with a
        # recovery cut shipped to B), then B's (it reopens its store and watches A again; the
        # checkpoints A shipped while it was down are shipped again).
        # While B's agent is down, A holds the output B would release: the sink waits.
        sink, sender, out = start_traffic(fab, tmp_path, seconds=10.0, pps=PPS, idle_exit=15)
        try:
            _wait(
                lambda: (p := _role(fab, "A", "primary")) and p.get("last_committed"),
                20,
                "a commit",
            )
            fab.cli("A", "down")
            fab.cli("A", "up")
            primary = _role(fab, "A", "primary")
            fab.cli("B", "down")
            fab.cli("B", "up")
            standby = _role(fab, "B", "standby")
            assert standby is not None, (_units(fab, "B"), b.log()[-3000:])
            later = _wait(
                lambda: (
                    (s := _role(fab, "B", "standby"))
                    and (s["last_committed"] or 0) > (standby["last_committed"] or 0) + 5
                    and s
                ),
                30,
                "commits on B after the restarts",
            )
            # A counts as protected again once B acks what it ships after B's restart.
            again = _protected(fab, "A")
        except BaseException:
            finish_traffic(sink, sender)
            raise
        assert primary is not None
        assert (primary["peer"], primary["term"], primary["state"]) == (b.name, 1, "running")
        assert (standby["peer"], standby["state"], standby["term"]) == (a.name, "watching", 1)
        assert later["term"] == 1
        assert again is not None
        assert again["protection"] == "protected"
        sent = finish_traffic(sink, sender)
        check = check_sequence(read_records(out))
        print(f"{check} of {sent['sent']} sent")
        # Inputs may be lost while ingress is paused (no lossless mode), outputs never (I4).
        assert check.received > sent["sent"] // 2, check
        assert (check.duplicates, check.gaps, check.reordered) == (0, 0, 0), check

        out_json = fab.cli_json("A", "unprotect", UNIT)
        assert out_json["ok"], out_json
        assert _units(fab, "A") == []
        assert _units(fab, "B") == []
        for h in (a, b):
            assert not netns.netns_exists(f"hamgr-{h.name}-{UNIT}")
        assert not (b.runtime / "standby" / UNIT).exists()


def test_b_claims_its_term_at_the_spare_c_when_a_dies_and_c_becomes_its_standby(
    tmp_path: Path,
) -> None:
    """`[standby] spares = [C]`: C holds a store of the unit (role spare). When A dies, B's
    takeover claims term 2 at C first (C grants and records it), then B makes C its standby:
    C's spare turns into the standby with the store it has. One takeover, no duplicate, no gap."""
    with Fabric(tmp_path / "fab", agents="main") as fab:
        fab.start()
        a, b, c = (fab.hosts[x].name for x in "ABC")
        result = fab.cli_json("A", "protect", str(_spec(fab, tmp_path, b, spares=(c,))))
        assert (result["ok"], result["standby"], result["spares"]) == (True, b, [c]), result
        spare = _role(fab, "C", "spare")
        text = fab.cli("C", "status").stdout
        # C's agent restarts: it finds its spare role (and store) again in state.db.
        fab.cli("C", "down")
        fab.cli("C", "up")
        adopted = _role(fab, "C", "spare")
        sink, sender, out = start_traffic(fab, tmp_path, seconds=7.0, pps=PPS)
        try:
            kill_us = _kill_a_after_its_commits(fab)
            taken = _taken_over(fab, "B", 2)
            standby = _wait(
                lambda: (s := _role(fab, "C", "standby")) and s["peer"] == b and s,
                30,
                "C to become B's standby",
            )
            protected = _protected(fab, "B")
        finally:
            finish_traffic(sink, sender)
        records = read_records(out)
        check = check_sequence(records)
        claims = fab.hosts["B"].events("claims")
        print(f"{check}; takeover {taken['last_failover']}; claims {claims}")
        # Before the kill: C is the unit's spare for A, shown as such by `hamgr status`.
        assert spare is not None
        assert (spare["peer"], spare["term"], spare["state"]) == (a, 1, "spare")
        assert spare["last_committed"] is None
        assert any(ln.split()[:4] == [UNIT, "spare", a, "1"] for ln in text.splitlines()), text
        assert adopted == spare
        # B claimed term 2 at C before it restored anything, and C granted it.
        assert [(e["term"], e["claims"]) for e in claims] == [
            (2, [{"spare": c, "verdict": "granted", "detail": ""}])
        ]
        assert taken["last_failover"]["claims"] == [f"{c}: granted"]
        assert taken["last_failover"]["status"] == "finished"
        assert taken["failovers"] == 1
        # C recorded term 2 (its store, and state.db), and is B's standby now, not a spare.
        assert _role(fab, "C", "spare") is None
        assert (standby["peer"], standby["term"]) == (b, 2)
        c_db = StateDB(fab.hosts["C"].work / "state.db", host=c)
        try:
            assert [(r.role, r.peer, r.term) for r in c_db.roles(UNIT)] == [("standby", b, 2)]
        finally:
            c_db.close()
        assert protected["peer"] == c
        assert protected["term"] == 2
        after = [r for r in records if r.recv_ns > kill_us * 1000]
        assert after, "no output at the sink after B took over"
        assert (check.duplicates, check.gaps, check.reordered) == (0, 0, 0)

        # B unprotects: C's standby goes too.
        _unprotect(fab, "B")
        assert _units(fab, "B") == []
        assert _units(fab, "C") == []
        assert not (fab.hosts["C"].runtime / "standby" / UNIT).exists()


def test_an_isolated_standby_stands_down_and_a_reprotects_onto_the_spare(tmp_path: Path) -> None:
    """B cut off from A and C while the unit is idle (see docs/failover.md, "Partitions", for
    why idle): B's term claim at C gets no answer, B stands down and restores nothing; A loses
    B and re-protects onto its spare C, which becomes its standby. After the heal nothing came
    out twice, and `hamgr unprotect` on A removes the roles on B and C."""
    with Fabric(tmp_path / "fab", agents="main") as fab:
        fab.start()
        a, b, c = (fab.hosts[x].name for x in "ABC")
        fab.cli_json("A", "protect", str(_spec(fab, tmp_path, b, spares=(c,))))
        out1, cut_us = isolate_b_after_a_first_stream(
            fab,
            tmp_path,
            lambda: _wait(
                lambda: (s := _role(fab, "B", "standby")) and s.get("last_committed"),
                20,
                "a commit on B",
            ),
        )
        second = tmp_path / "second"
        second.mkdir()
        sink, sender, out2 = start_traffic(fab, second, seconds=8.0, pps=PPS)
        try:
            isolated = fab.wait_event("B", "failover_record", timeout=30, after_us=cut_us)
            moved = fab.wait_event("A", "reprotected", timeout=30, after_us=cut_us)
            on_c = _protected(fab, "A", peer=c)
            c_standby = _wait(
                lambda: (s := _role(fab, "C", "standby")) and s["peer"] == a and s,
                30,
                "C to become A's standby",
            )
            b_during = _role(fab, "B", "standby")
            b_primary = _role(fab, "B", "primary")
            heal_us = fab.heal("B", "C")
            fab.heal("A", "B")
            time.sleep(1.5)
            a_after = _role(fab, "A", "primary")
            b_after = _role(fab, "B", "standby")
        finally:
            finish_traffic(sink, sender)
        before, records = read_records(out1), read_records(out2)
        check = check_sequence(records)
        print(f"{check_sequence(before)}, {check}; isolated {isolated}; moved {moved}")
        # Isolated: B's claim reached no spare; no takeover, nothing restored.
        assert_stood_down_unanswered(isolated, c)
        assert b_primary is None
        assert b_during is not None
        assert (b_during["peer"], b_during["state"]) == (a, "watching")
        assert not [u for u in _units(fab, "B") if u["role"] == "primary"]
        # A re-protected onto its spare C, which is its standby now; A was never fenced.
        assert moved["standby"] == c
        assert (on_c["term"], on_c["failovers"]) == (1, 0)
        assert (c_standby["term"], c_standby["state"]) == (1, "watching")
        assert _role(fab, "C", "spare") is None
        assert a_after is not None
        assert (a_after["peer"], a_after["term"], a_after["state"]) == (c, 1, "running"), a_after
        assert not fab.hosts["A"].events("fenced"), fab.hosts["A"].events("fenced")
        assert b_after is not None
        assert b_after["peer"] == a
        # Output went on through A, once, before and after the heal.
        first_check = check_sequence(before)
        assert first_check.received > 0
        assert (first_check.duplicates, first_check.gaps, first_check.reordered) == (0, 0, 0)
        assert [r for r in records if r.recv_ns > heal_us * 1000], "no output after the heal"
        assert (check.duplicates, check.gaps, check.reordered) == (0, 0, 0)

        # A's unprotect drops C's standby and B's stale one.
        _unprotect(fab, "A")
        for letter in "ABC":
            assert _units(fab, letter) == [], letter
            assert not netns.netns_exists(f"hamgr-{fab.hosts[letter].name}-{UNIT}")


def _protect_deposable(fab: Fabric, tmp_path: Path) -> tuple[str, str, str]:
    """The unit on A, standby B, spare C, with `[standby] on_fenced = "standby"`."""
    a, b, c = (fab.hosts[x].name for x in "ABC")
    spec = tmp_path / f"{UNIT}.toml"
    spec.write_text(
        sequencer_spec(epoch_ms=fab.epoch_ms, standby=b, spares=(c,), on_fenced="standby")
    )
    fab.cli_json("A", "protect", str(spec))
    return a, b, c


def _remote_spares(fab: Fabric, letter: str) -> list[str]:
    """The spares of the unit that the host's state.db records (`remote_spare`)."""
    h = fab.hosts[letter]
    db = StateDB(h.work / "state.db", host=h.name)
    try:
        return [r.name for r in db.resources(UNIT, "remote_spare")]
    finally:
        db.close()


def test_a_deposed_primary_with_on_fenced_standby_rejoins_and_takes_the_unit_back(
    tmp_path: Path,
) -> None:
    """`[standby] on_fenced = "standby"` with the main agents: A|B, B takes over at term 2 and
    re-protects onto C, A is deposed and keeps a spare's store (its NF, netns and records of
    the old role gone). After the heal its offer reaches B (and B's agent restarts, which keeps
    A among the unit's spares); when C dies, B re-protects onto A,
    which becomes its standby and holds B's commits; when B dies, A takes the unit back at
    term 3. No output twice, none skipped."""
    with Fabric(tmp_path / "fab", agents="main") as fab:
        fab.start()
        a, b, c = _protect_deposable(fab, tmp_path)
        first = tmp_path / "first"
        first.mkdir()
        sink, sender, out1 = start_traffic(fab, first, seconds=8.0, pps=PPS)
        try:
            primary = _wait(
                lambda: (p := _role(fab, "A", "primary")) and p.get("last_committed") and p,
                20,
                "a first commit on A",
            )
            time.sleep(1.0)
            cut_us = fab.partition("A", "B")
            taken = _taken_over(fab, "B", 2)
            fenced = fab.wait_event("A", "fenced", timeout=30, after_us=cut_us)
            fab.wait_event("A", "spare", timeout=10, after_us=cut_us)
            a_spare = _wait(lambda: _role(fab, "A", "spare"), 10, "A's spare role")
            time.sleep(1.5)  # offers unanswered while cut off
            rejoined, joined = heal_until_rejoined(fab)
            a_joined = _role(fab, "A", "spare")
            b_spares = _remote_spares(fab, "B")
        finally:
            finish_traffic(sink, sender)
        second = tmp_path / "second"
        second.mkdir()
        # B's agent restarts: the spare that joined is one of the unit's spares still.
        fab.cli("B", "down")
        fab.cli("B", "up")
        _protected(fab, "B", peer=c, term=2)
        # C dies while the unit is idle (see the plan agents' test for why).
        c_killed = fab.kill_host("C")
        moved = fab.wait_event("B", "reprotected", timeout=20, after_us=c_killed)
        sink, sender, out2 = start_traffic(fab, second, seconds=8.0, pps=PPS)
        try:
            standby = _wait(
                lambda: (
                    (s := _role(fab, "A", "standby"))
                    and s["peer"] == b
                    and (s["last_committed"] or 0) > 0
                    # Not "confirming": a flap of B's probes on this loaded host, being checked.
                    and s["state"] == "watching"
                    and s
                ),
                30,
                "A to hold B's commits and watch B",
            )
            on_a = _protected(fab, "B", peer=a, term=2)
            time.sleep(0.5)
            b_killed = fab.kill_host("B")
            back = _taken_over(fab, "A", 3)
        finally:
            finish_traffic(sink, sender)
        checks = [check_sequence(read_records(out)) for out in (out1, out2)]
        print(f"{checks}; fenced {fenced}; moved {moved}")
        assert taken["last_failover"]["status"] == "finished"
        assert (fenced["term"], fenced["policy"]) == (2, "standby")
        assert fenced["nf_pid"] == primary["nf_pid"]
        assert not Path(f"/proc/{primary['nf_pid']}").exists()
        # Deposed, A is a spare of B at term 2, with a store and nothing of the old role.
        assert (a_spare["term"], a_spare["state"]) == (2, "spare"), a_spare
        assert (rejoined["primary"], rejoined["term"]) == (b, 2)
        # Joined: A's spare role names B, and B records A as its spare (its unprotect drops it).
        assert a_joined is not None
        assert (a_joined["peer"], a_joined["term"]) == (b, 2), a_joined
        assert a in b_spares
        assert (joined["spare"], joined["term"]) == (a, 2)
        # C died: A is B's standby now, holding its commits, and B counts as protected by it.
        assert (moved["standby"], moved["term"]) == (a, 2)
        assert (standby["term"], standby["state"]) == (2, "watching")
        assert _role(fab, "A", "spare") is None
        assert on_a["protection"] == "protected"
        # B died: A took the unit back at term 3, claiming at no spare (C, B's old standby, is
        # not one any more: B passed on its spares, not the spec's), and runs it.
        assert back["last_failover"]["status"] == "finished", back
        assert back["last_failover"]["claims"] == [], back
        assert [r for r in read_records(out2) if r.recv_ns > b_killed * 1000], "no output from A"
        a_db = StateDB(fab.hosts["A"].work / "state.db", host=a)
        try:
            assert [(r.role, r.term) for r in a_db.roles(UNIT)] == [("primary", 3)]
        finally:
            a_db.close()
        for check in checks:
            assert check.received > 0
            assert (check.duplicates, check.gaps, check.reordered) == (0, 0, 0), check


def test_a_deposed_primary_offers_itself_again_after_its_agent_restarts(tmp_path: Path) -> None:
    """on_fenced = "standby" with the main agents: A|B, B takes the unit over, A is deposed
    and offers itself as a spare, unanswered while cut off; then A's agent restarts. The
    restarted agent goes on offering (the offer is in its state.db), and after the heal B
    takes it: A is B's spare in both state.dbs, and the offer's record is gone."""
    with Fabric(tmp_path / "fab", agents="main") as fab:
        fab.start()
        a, b, c = _protect_deposable(fab, tmp_path)
        sink, sender, _ = start_traffic(fab, tmp_path, seconds=3.0, pps=PPS)
        try:
            _wait(
                lambda: (p := _role(fab, "A", "primary")) and p.get("last_committed"),
                20,
                "a commit",
            )
            cut_us = fab.partition("A", "B")
            _taken_over(fab, "B", 2)
            fab.wait_event("A", "spare", timeout=30, after_us=cut_us)
        finally:
            finish_traffic(sink, sender)

        def offers() -> list[dict[str, Any]]:
            db = StateDB(fab.hosts["A"].work / "state.db", host=a)
            try:
                return [dict(r.detail) for r in db.resources(UNIT, "spare_offer")]
            finally:
                db.close()

        before = offers()
        restart_us = time.monotonic_ns() // 1000
        fab.cli("A", "down")
        fab.cli("A", "up")
        adopted = _role(fab, "A", "spare")
        fab.wait_event("A", "spare", timeout=10, after_us=restart_us)
        rejoined, joined = heal_until_rejoined(fab)
        a_joined = _role(fab, "A", "spare")
        b_spares = _remote_spares(fab, "B")
        assert len(before) == 1, before
        assert (before[0]["term"], before[0]["candidates"][0]) == (2, b), before
        assert set(before[0]["candidates"]) == {b, c}, before
        assert adopted is not None
        assert adopted["term"] == 2, adopted
        assert rejoined["offers"] >= 1, rejoined
        assert (rejoined["primary"], rejoined["term"]) == (b, 2)
        assert (joined["spare"], joined["term"]) == (a, 2)
        assert a_joined is not None
        assert (a_joined["peer"], a_joined["term"]) == (b, 2), a_joined
        assert a in b_spares
        assert offers() == []


def test_refusals_leave_nothing_on_either_host(tmp_path: Path) -> None:
    with Fabric(tmp_path / "fab", agents="main") as fab:
        fab.start()
        a, b, c = fab.hosts["A"], fab.hosts["B"], fab.hosts["C"]

        def nothing_left() -> None:
            for letter in ("A", "B", "C"):
                assert _units(fab, letter) == [], letter
            for h in (a, b, c):
                assert not netns.netns_exists(f"hamgr-{h.name}-{UNIT}")
            assert not (b.runtime / "standby" / UNIT).exists()

        # A host that is not a peer of A.
        out = fab.cli_json("A", "protect", str(_spec(fab, tmp_path, "elsewhere")), check=False)
        assert (out["exit"], out["code"]) == (1, "bad_spec"), out
        assert "'elsewhere' is not a peer" in out["error"]
        nothing_left()

        # B does not admit A's key any more: B refuses the handshake.
        from hamgr import keys

        authorized = keys.AuthorizedKeys(b.work / keys.AUTHORIZED_KEYS)
        authorized.remove(a.public)
        out = fab.cli_json("A", "protect", str(_spec(fab, tmp_path, b.name)), check=False)
        assert (out["exit"], out["code"]) == (1, "failed"), out
        assert f"{b.name}'s agent" in out["error"]
        assert "refused" in out["error"]
        assert "authorized_keys" in out["error"]
        nothing_left()
        authorized.add(a.public, f"agent of {a.name}")

        # B's agent is down: A cannot reach it.
        fab.cli("B", "down")
        started = time.monotonic()
        out = fab.cli_json("A", "protect", str(_spec(fab, tmp_path, b.name)), check=False)
        assert (out["exit"], out["code"]) == (1, "failed"), out
        assert "could not be reached" in out["error"]
        assert time.monotonic() - started < 90
        fab.cli("B", "up")
        nothing_left()

        # A spare that is not a peer is refused before anything is made; a spare whose agent
        # is down fails the protect after B set up its standby: A asks B to drop it.
        spec = _spec(fab, tmp_path, b.name, spares=("elsewhere",))
        out = fab.cli_json("A", "protect", str(spec), check=False)
        assert (out["exit"], out["code"]) == (1, "bad_spec"), out
        assert "standby.spares: 'elsewhere' is not a peer" in out["error"]
        assert "[peers.elsewhere]" in out["error"]
        nothing_left()
        fab.cli("C", "down")
        spec = _spec(fab, tmp_path, b.name, spares=(c.name,))
        out = fab.cli_json("A", "protect", str(spec), check=False)
        assert (out["exit"], out["code"]) == (1, "failed"), out
        assert f"set up its spare on {c.name}" in out["error"]
        assert "could not be reached" in out["error"]
        fab.cli("C", "up")
        nothing_left()

        # C refuses B's standby_add of a unit whose spec names C as... the standby of A's
        # unit on B is refused when B already has a unit of that name: A rolls back.
        fab.cli_json("C", "protect", str(_spec(fab, tmp_path, b.name)))
        out = fab.cli_json("A", "protect", str(_spec(fab, tmp_path, b.name)), check=False)
        assert (out["exit"], out["code"]) == (1, "failed"), out
        assert "exists" in out["error"]
        assert _units(fab, "A") == []
        assert not netns.netns_exists(f"hamgr-{a.name}-{UNIT}")
        assert [u["peer"] for u in _units(fab, "B")] == [c.name]

        # With B's standby gone, the name is free again on A.
        fab.cli_json("C", "unprotect", UNIT)
        result = fab.cli_json("A", "protect", str(_spec(fab, tmp_path, b.name)))
        assert result["standby"] == b.name
