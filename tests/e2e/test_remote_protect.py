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

from hamgr.bench.failover import finish_traffic, start_traffic
from hamgr.fabric import Fabric, sequencer_spec
from hamgr.trafgen import check_sequence, read_records
from shim import netns

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


def _spec(fab: Fabric, tmp_path: Path, standby: str) -> Path:
    path = tmp_path / f"{UNIT}.toml"
    path.write_text(sequencer_spec(epoch_ms=fab.epoch_ms, standby=standby))
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
            moved = _wait(
                lambda: (
                    (p := _role(fab, "B", "primary"))
                    and p["term"] == 2
                    and p["peer"] == c
                    and p["protection"] == "protected"
                    and p
                ),
                30,
                "B to take over and be protected by C",
            )
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
            again = _wait(
                lambda: (p := _role(fab, "A", "primary")) and p["protection"] == "protected" and p,
                30,
                "A protected by B again",
            )
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
