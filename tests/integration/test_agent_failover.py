"""Local failover inside the real agent, and `hamgr failover`, on the real stack (runc, CRIU, the
DPDK data plane), driven through the `hamgr` CLI as in tests/integration/test_agent.py.

The sequencer NF stamps each output with its own counter; the sink records (counter, sender
sequence). I4 (no visible rollback) is: the counter has no duplicate and no gap. No lost input is
stronger: every sender sequence appears, once, in order.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from hamgr import control, keys
from hamgr.agent import procs
from hamgr.agent.topology import AgentHarness
from hamgr.testbed import NF_PORT, SINK_PORT, wait_udp_bound
from shim import netns
from tests.integration.container_env import UdpSender, UdpSink

pytestmark = pytest.mark.root

UNIT = "seq0"
Records = list[tuple[int, int, float]]


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentHarness]:
    harness = AgentHarness(tmp_path / "state")
    try:
        harness.start()
        yield harness
    finally:
        left = harness.close()
        assert not list(Path("/run/netns").glob(f"hamgr-{harness.bed.host}-*"))
        assert not left, f"the agent left {left} behind"


def _status(agent: AgentHarness) -> dict[str, Any]:
    return agent.json("status")


def _primary(agent: AgentHarness) -> dict[str, Any]:
    units: list[dict[str, Any]] = _status(agent)["units"]
    found = [u for u in units if u["unit"] == UNIT and u["role"] == "primary"]
    assert len(found) == 1, found
    return found[0]


def _wait(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _protect(agent: AgentHarness, tmp_path: Path) -> dict[str, Any]:
    spec = tmp_path / f"{UNIT}.toml"
    spec.write_text(agent.bed.spec(UNIT))
    result = agent.json("protect", str(spec))
    wait_udp_bound(result["nf_pid"], NF_PORT)
    return result


def _commits_at_least(agent: AgentHarness, n: int) -> bool:
    return (_primary(agent)["commits_total"] or 0) >= n


def _no_visible_rollback(records: Records) -> None:
    """I4: the NF's counter, as the sink saw it, has no duplicate and no gap; the inputs that
    were not lost keep their order."""
    counters = [c for c, _, _ in records]
    assert counters == list(range(1, len(counters) + 1)), "a duplicate or a gap in the counter"
    seqs = [s for _, s, _ in records]
    assert seqs == sorted(set(seqs)), "duplicated or reordered inputs"


def _no_lost_input(records: Records, sent: int) -> None:
    """Every datagram sent is reflected in exactly one output, in order."""
    _no_visible_rollback(records)
    missing = sorted(set(range(1, sent + 1)) - {s for _, s, _ in records})
    assert not missing, f"{len(missing)} inputs lost: {missing[:20]}"
    assert len(records) == sent


def _client(agent: AgentHarness, timeout: float = 10.0) -> control.ControlClient:
    state = agent.state_dir
    cli = keys.load_keypair(state / "keys", keys.CLI)
    return control.ControlClient(
        f"ipc://{state}/control.sock",
        server_key=keys.load_public(state / "keys", keys.AGENT),
        keypair=(cli.public, cli.secret),
        timeout=timeout,
    )


class EventTap:
    """The agent's `failover` events, collected live by a control client on a thread."""

    def __init__(self, agent: AgentHarness, seconds: float) -> None:
        self.client = _client(agent)
        self.events: list[Mapping[str, Any]] = []
        self._stop = threading.Event()
        request = control.Events(self.client.new_id(), seconds, ("failover",))
        self.client.send_raw(control.encode(control.request_json(request)))
        self._thread = threading.Thread(target=self._run, name="event-tap", daemon=True)
        self._thread.start()
        time.sleep(0.5)  # the subscription is served within the control loop's 10 ms poll

    def _run(self) -> None:
        # Polled, so that `close` ends it even when the agent that held the stream died.
        while not self._stop.is_set():
            try:
                reply = self.client.recv_reply(timeout=0.2)
            except control.ControlTimeoutError:
                continue
            if reply.type != "event":
                return
            self.events.append(reply.data)

    def wait(self, status: str, timeout: float) -> Mapping[str, Any]:
        event: Mapping[str, Any] = _wait(
            lambda: next((e for e in self.events if e["status"] == status), None),
            timeout,
            f"a failover event with status {status}: {self.events}",
        )
        return event

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=10)
        self.client.close()


def _leftovers(agent: AgentHarness, names: list[str]) -> list[str]:
    """What of the unit is still on the host: netns, veth, containers (runc state, bundles,
    work dirs), cgroups, images, standby store, processes."""
    host = agent.bed.host
    found = []
    if netns.netns_exists(f"hamgr-{host}-{UNIT}"):
        found.append("netns")
    containers = agent.state_dir / "containers"
    runc = subprocess.run(
        ["runc", "--root", str(containers / "runc"), "list", "-q"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    found += [f"runc container {n}" for n in runc.stdout.split()]
    for sub in ("bundles", "work"):
        d = containers / sub
        found += [f"{sub}/{p.name}" for p in d.iterdir()] if d.is_dir() else []
    # Every hierarchy (v1 here: freezer, memory, ...; or the v2 tree).
    for pattern in (f"hamgr-{host}/*", f"*/hamgr-{host}/*"):
        found += [
            f"cgroup {p.relative_to('/sys/fs/cgroup')}"
            for p in Path("/sys/fs/cgroup").glob(pattern)
            if p.is_dir()
        ]
    runtime = Path("/dev/shm") / f"hamgr-{host}"
    for sub in ("images", "standby"):
        found += [f"{sub}/{p.name}" for p in (runtime / sub).glob("*")]
    found += [f"pid {n}" for n in names if n.isdigit() and procs.start_ticks(int(n)) is not None]
    return found


def test_a_killed_nf_is_restored_adopted_after_an_agent_crash_and_unprotected_cleanly(
    agent: AgentHarness, tmp_path: Path
) -> None:
    first = _protect(agent, tmp_path)
    old_pid = first["nf_pid"]
    sink = UdpSink.open(agent.bed.cl, SINK_PORT)
    sender = UdpSender.open(agent.bed.cl, NF_PORT)
    tap = EventTap(agent, seconds=25)
    try:
        sender.start_stream(interval=0.004, max_count=3000, max_seconds=12.0)
        _wait(lambda: _commits_at_least(agent, 3), 20, "commits before the kill")
        killed_at = time.monotonic()
        os.kill(old_pid, signal.SIGKILL)

        # (a) The agent restores the NF from its last committed image, at term 2.
        done = tap.wait("finished", 20)
        p = _wait(lambda: (p := _primary(agent))["term"] == 2 and p, 10, "term 2 in status")
        new_pid = p["nf_pid"]
        assert new_pid not in (None, old_pid)
        assert procs.start_ticks(new_pid) is not None
        assert (p["state"], p["failovers"]) == ("running", 1), p
        assert p["last_failover"]["status"] == "finished"
        running = tap.wait("running", 1)
        assert (running["term"], running["old_pid"]) == (2, old_pid)
        assert (done["term"], done["old_pid"], done["new_pid"]) == (2, old_pid, new_pid)
        assert done["planned"] is False
        assert set(done["steps_ms"]) >= {"raise-term", "fence", "restore", "resume", "reprotect"}
        print(
            f"\nkill -> failover finished: outage {done['outage_ms']} ms, steps ms "
            f"{done['steps_ms']}, detected {(time.monotonic() - killed_at) * 1e3:.0f} ms ago"
        )
        _wait(
            lambda: (
                (q := _primary(agent))["protection"] == "protected"
                and (q["last_committed"] or 0) > 0
            ),
            20,
            "the restored NF to be protected and committing",
        )

        # (e) SIGKILL the agent; the restarted one adopts the restored NF, without another
        # failover, and traffic flows on.
        tap.close()
        assert [e["status"] for e in tap.events] == ["running", "finished"]
        agent_pid = _status(agent)["pid"]
        os.kill(agent_pid, signal.SIGKILL)
        _wait(lambda: procs.start_ticks(agent_pid) is None, 10, "the agent to die")
        held = len(sink.snapshot())
        agent.hamgr("up", "--netns", agent.bed.host_ns)
        tap = EventTap(agent, seconds=60)
        after = _primary(agent)
        assert (after["term"], after["nf_pid"], after["failovers"]) == (2, new_pid, 1), after
        assert after["state"] == "running", after
        adopted = [json.loads(ln) for ln in agent.log().splitlines() if '"unit adopted"' in ln]
        assert adopted
        assert (adopted[-1]["nf_pid"], adopted[-1]["term"]) == (new_pid, 2)
        _wait(lambda: len(sink.snapshot()) > held + 20, 15, "output after the restart")
        sender.stop_stream()
        assert _wait(lambda: _primary(agent)["buffered_pkts"] == 0, 20, "the held output")
        records = sink.wait_quiet(quiet=0.5, timeout=20)
    finally:
        sender.close()
        sink.close()
        tap.close()
    _no_visible_rollback(records)
    assert tap.events == [], "the restarted agent failed the unit over again"
    assert procs.start_ticks(new_pid) is not None

    # (f) Unprotect after the failover removes everything: the restored container too.
    restored = f"{agent.bed.host}-{UNIT}-t2"
    present = _leftovers(agent, [str(old_pid), str(new_pid)])
    for item in ("netns", f"runc container {restored}", f"pid {new_pid}"):
        assert item in present, present  # what the check below must find gone
    assert [c for c in present if c.startswith("cgroup ") and c.endswith(restored)], present
    assert f"runc container {agent.bed.host}-{UNIT}" not in present, "the dead NF was not reaped"
    agent.hamgr("unprotect", UNIT)
    assert _status(agent)["units"] == []
    assert not _leftovers(agent, [str(old_pid), str(new_pid)])


def test_an_nf_that_died_while_the_agent_was_down_is_restored_at_its_restart(
    agent: AgentHarness, tmp_path: Path
) -> None:
    """`hamgr down` (the NF and the data plane run on), the NF is killed, `hamgr up`: no pidfd
    saw the death, so the adoption finds it and the unit's failover driver restores the last
    committed image at term 2, as it would have at once. The sink's counter has no duplicate
    and no gap; output flows again."""
    first = _protect(agent, tmp_path)
    old_pid = first["nf_pid"]
    sink = UdpSink.open(agent.bed.cl, SINK_PORT)
    sender = UdpSender.open(agent.bed.cl, NF_PORT)
    try:
        sender.start_stream(interval=0.004, max_count=2500, max_seconds=10.0)
        _wait(lambda: _commits_at_least(agent, 3), 20, "commits before the agent stops")
        agent.hamgr("down")
        os.kill(old_pid, signal.SIGKILL)
        _wait(lambda: procs.start_ticks(old_pid) is None, 10, "the NF to die")
        held = len(sink.snapshot())
        agent.hamgr("up", "--netns", agent.bed.host_ns)
        p = _wait(
            lambda: (p := _primary(agent))["term"] == 2 and p["failovers"] >= 1 and p,
            20,
            "the restore at term 2",
        )
        new_pid = p["nf_pid"]
        assert new_pid not in (None, old_pid)
        assert procs.start_ticks(new_pid) is not None
        assert p["last_failover"]["status"] == "finished", p
        assert p["last_failover"]["old_pid"] == old_pid
        _wait(
            lambda: (
                (q := _primary(agent))["protection"] == "protected"
                and (q["last_committed"] or 0) > 0
                and q["state"] == "running"
            ),
            20,
            "the restored NF to be protected and committing",
        )
        _wait(lambda: len(sink.snapshot()) > held, 10, "output to flow again")
        sender.stop_stream()
        records = sink.wait_quiet(quiet=1.0, timeout=30)
    finally:
        sender.close()
        sink.close()
    _no_visible_rollback(records)
    assert len(records) > held
    found = [ln for ln in agent.log().splitlines() if "while the agent was down" in ln]
    assert found, "the restarted agent did not say why it restored the unit"


def test_planned_switchover_loses_no_input_and_now_restores_the_last_commit(
    agent: AgentHarness, tmp_path: Path
) -> None:
    first = _protect(agent, tmp_path)
    sink = UdpSink.open(agent.bed.cl, SINK_PORT)
    sender = UdpSender.open(agent.bed.cl, NF_PORT)
    try:
        sender.start_stream(interval=0.004, max_count=2500, max_seconds=10.0)
        _wait(lambda: _commits_at_least(agent, 3), 20, "commits before the switchover")

        # (b) Planned: a last cut, committed, then restored; the inputs queued meanwhile reach
        # the restored copy.
        planned = agent.json("failover", UNIT)
        assert planned["ok"] is True, planned
        assert (planned["status"], planned["planned"], planned["term"]) == ("finished", True, 2)
        assert planned["old_pid"] == first["nf_pid"]
        assert planned["quiesced_epoch"] == planned["restored_epoch"]
        assert planned["steps_ms"]["quiesce"] > 0
        print(f"\nplanned switchover: {planned['elapsed_ms']} ms, steps {planned['steps_ms']}")
        p = _primary(agent)
        assert (p["term"], p["nf_pid"], p["failovers"]) == (2, planned["new_pid"], 1)
        time.sleep(1.0)
        sender.stop_stream()
        sent = sender.next_seq - 1
        _wait(lambda: _primary(agent)["buffered_pkts"] == 0, 20, "the held output")
        records = sink.wait_count(sent, timeout=20)
        records = sink.wait_quiet(quiet=0.3, timeout=5)
        _no_lost_input(records, sent)

        # (d) Refusals: an unknown unit, lossless, a stale term (a retried request), and a
        # second request while a failover runs.
        for args, code, text in (
            (("nosuch",), "no_such_unit", "no unit nosuch"),
            ((UNIT, "--now", "--lossless"), "unsupported", "lossless"),
            ((UNIT, "--term", "1"), "busy", "stale term 1"),
        ):
            out = agent.json("failover", *args, check=False)
            assert (out["ok"], out["code"]) == (False, code), out
            assert text in out["error"], out
        assert _primary(agent)["term"] == 2

        # (c) --now under traffic, raced by a second request sent at the same moment: one
        # failover runs, the other is refused; then the `hamgr failover --now` command itself.
        sender.start_stream(interval=0.004, max_count=2500, max_seconds=10.0)
        _wait(lambda: _commits_at_least(agent, p["commits_total"] + 3), 20, "commits at term 2")
        clients = [_client(agent, timeout=60), _client(agent, timeout=60)]
        try:
            for c in clients:
                c.ping()  # both handshakes done: the two requests leave back to back
            requests = [control.Failover(c.new_id(), UNIT, planned=False) for c in clients]
            for c, r in zip(clients, requests, strict=True):
                c.send_raw(control.encode(control.request_json(r)))
            replies = [c.recv_reply() for c in clients]
        finally:
            for c in clients:
                c.close()
        done = [r for r in replies if r.type == "result"]
        refused = [r for r in replies if r.type == "error"]
        assert (len(done), len(refused)) == (1, 1), replies
        assert refused[0].code == "busy", refused
        assert "already" in (refused[0].message or ""), refused
        now = dict(done[0].data)
        assert (now["status"], now["planned"], now["term"]) == ("finished", False, 3), now
        assert now["old_pid"] == planned["new_pid"]
        assert procs.start_ticks(planned["new_pid"]) is None, "the running copy was not stopped"
        print(f"\n--now failover: {now['elapsed_ms']} ms, steps {now['steps_ms']}")
        _wait(lambda: _commits_at_least(agent, p["commits_total"] + 6), 20, "commits at term 3")
        cli_now = agent.json("failover", UNIT, "--now")
        assert (cli_now["ok"], cli_now["status"], cli_now["term"]) == (True, "finished", 4)
        assert cli_now["old_pid"] == now["new_pid"]
        now = cli_now
        time.sleep(1.0)
        sender.stop_stream()
        _wait(lambda: _primary(agent)["buffered_pkts"] == 0, 20, "the held output")
        records = sink.wait_quiet(quiet=0.5, timeout=20)
    finally:
        sender.close()
        sink.close()
    # An unplanned failover may lose the inputs of the uncommitted epoch, never show a rollback.
    _no_visible_rollback(records)
    p = _primary(agent)
    assert (p["term"], p["nf_pid"], p["failovers"]) == (4, now["new_pid"], 3)
    assert p["last_failover"]["planned"] is False


def test_a_failover_that_cannot_complete_leaves_the_unit_down_until_an_operator_retries(
    agent: AgentHarness, tmp_path: Path
) -> None:
    first = _protect(agent, tmp_path)
    sink = UdpSink.open(agent.bed.cl, SINK_PORT)
    sender = UdpSender.open(agent.bed.cl, NF_PORT)
    tap = EventTap(agent, seconds=30)
    images = Path("/dev/shm") / f"hamgr-{agent.bed.host}" / "images" / UNIT
    hidden = images.with_name(f".hidden-{UNIT}")
    try:
        sender.send(50, gap=0.002)
        # Idle again: the committed image stays the same (I5: no output, no checkpoint).
        _wait(
            lambda: _commits_at_least(agent, 1) and _primary(agent)["buffered_pkts"] == 0,
            20,
            "a commit of every output",
        )
        time.sleep(0.3)
        # The local copy of the last committed checkpoint disappears, then the NF dies.
        images.rename(hidden)
        os.kill(first["nf_pid"], signal.SIGKILL)
        failed = tap.wait("failed", 20)
        assert "locate-image" in failed["detail"], failed
        p = _wait(lambda: (p := _primary(agent))["state"] == "error" and p, 10, "error state")
        assert p["protection"] == "stalled"
        assert "the unit is down" in p["error"], p
        assert p["last_failover"]["status"] == "failed"
        # Never half-started: no restored container; the data plane stays fenced at term 2.
        runc = subprocess.run(
            ["runc", "--root", str(agent.state_dir / "containers" / "runc"), "list", "-q"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert not [n for n in runc.stdout.split() if n.endswith("-t2")], runc.stdout
        # A second kill cannot happen; an operator's retry can, once the image is back.
        hidden.rename(images)
        retry = agent.json("failover", UNIT, "--now", "--reason", "image restored")
        assert (retry["ok"], retry["status"], retry["term"]) == (True, "finished", 3), retry
        p = _primary(agent)
        assert (p["state"], p["term"], p["nf_pid"]) == ("running", 3, retry["new_pid"])
        assert p["error"] is None, p
        # The restored copy serves, and carries the dead one's committed state on.
        before = len(sink.snapshot())
        sender.send(50, gap=0.002)
        records = sink.wait_count(before + 50, timeout=20)
    finally:
        if hidden.exists():
            hidden.rename(images)
        sender.close()
        sink.close()
        tap.close()
    assert len(records) == before + 50
    _no_visible_rollback(records)
    assert [e["status"] for e in tap.events] == ["running", "failed", "running", "finished"]
