"""A real agent protecting a real sequencer NF, driven by the `hamgr` CLI over its control channel.

Each test gets its own namespaces (`hamgr.agent.topology.AgentBed`): a client netns with the
traffic source and sink, and a host netns where `hamgr up --netns` starts the agent, which starts
its data plane and, on `hamgr protect`, the NF's netns, veth, data-plane ports, container and a
local standby store (the same agent is primary and standby in this milestone).
"""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from hamgr import control, keys
from hamgr.agent import procs
from hamgr.agent.daemon import STACKS_FILE
from hamgr.agent.topology import AgentHarness
from hamgr.testbed import NF_PORT, SINK_PORT, wait_udp_bound
from shim import netns
from tests.integration.container_env import UdpSender, UdpSink, in_netns
from tests.integration.dp_env import wait_for

pytestmark = pytest.mark.root

UNIT = "seq0"


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentHarness]:
    harness = AgentHarness(tmp_path / "state")
    try:
        harness.start()
        yield harness
    finally:
        left = harness.close()
        host = harness.bed.host
        assert not list(Path("/run/netns").glob(f"hamgr-{host}-*"))
        assert not left, f"the agent left {left} behind"


def _status(agent: AgentHarness) -> dict[str, Any]:
    return agent.json("status")


def _role(status: dict[str, Any], role: str, unit: str = UNIT) -> dict[str, Any]:
    found = [u for u in status["units"] if u["unit"] == unit and u["role"] == role]
    assert len(found) == 1, status
    return found[0]


def _protect(agent: AgentHarness, tmp_path: Path, **kwargs: Any) -> dict[str, Any]:
    spec = tmp_path / f"{UNIT}.toml"
    spec.write_text(agent.bed.spec(UNIT, **kwargs))
    result = agent.json("protect", str(spec))
    wait_udp_bound(result["nf_pid"], NF_PORT)
    return result


def _stacks(agent: AgentHarness, status: dict[str, Any]) -> str:
    """The agent's thread stacks (`kill -USR1`), for a failure's message."""
    path = agent.state_dir / "log" / STACKS_FILE
    os.kill(status["pid"], signal.SIGUSR1)
    sizes = [-1]

    def settled() -> bool:
        # Written thread by thread: done once it has stopped growing.
        time.sleep(0.2)
        size = path.stat().st_size if path.exists() else 0
        sizes.append(size)
        return size > 0 and sizes[-2] == size

    wait_for(settled, 5.0, step=0.0)
    return f"the agent's threads:\n{path.read_text() if path.exists() else '(none written)'}"


def _wait(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _in_order(records: list[tuple[int, int, float]], sent: int) -> None:
    assert [seq for _, seq, _ in records] == list(range(1, sent + 1))
    assert [counter for counter, _, _ in records] == list(range(1, sent + 1))


def _consistent(records: list[tuple[int, int, float]], sent: int, lost_window: range) -> None:
    seqs = [seq for _, seq, _ in records]
    assert seqs == sorted(set(seqs)), "duplicated or reordered output"
    assert [counter for counter, _, _ in records] == list(range(1, len(records) + 1))
    missing = sorted(set(range(1, sent + 1)) - set(seqs))
    assert set(missing) <= set(lost_window), f"lost outside the agent's downtime: {missing}"


def _metrics(agent: AgentHarness, address: str) -> str:
    def fetch() -> str:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:
            return str(reply.read().decode())

    return in_netns(agent.bed.host_ns, fetch)


def test_protect_sends_output_in_order_and_reports_commits(
    agent: AgentHarness, tmp_path: Path
) -> None:
    result = _protect(agent, tmp_path)
    assert result["term"] == 1
    sink = UdpSink.open(agent.bed.cl, SINK_PORT)
    sender = UdpSender.open(agent.bed.cl, NF_PORT)
    try:
        sender.start_stream(interval=0.004, max_count=500, max_seconds=3.0)
        first = _wait(
            lambda: (s := _status(agent)) and (_role(s, "primary")["commits_total"] or 0) > 0 and s,
            20,
            "a first commit",
        )
        time.sleep(1.0)
        second = _status(agent)
        sender.stop_stream()
        sent = sender.next_seq - 1
        records = sink.wait_count(sent, timeout=20)
        _in_order(records, sent)
    finally:
        sender.close()
        sink.close()
    p1, p2 = _role(first, "primary"), _role(second, "primary")
    assert p2["protection"] == "protected"
    assert p2["state"] == "running"
    assert p2["term"] == 1
    assert p2["commits_total"] > p1["commits_total"]
    assert p2["last_committed"] > p1["last_committed"]
    assert p2["epochs_total"] >= p2["commits_total"]
    assert p2["nf_pid"] == result["nf_pid"]
    standby = _role(second, "standby")
    assert standby["term"] == 1
    assert standby["last_committed"] >= p1["last_committed"]

    # The idle unit takes no more checkpoints (I5) and holds nothing.
    idle = _wait(
        lambda: (p := _role(_status(agent), "primary"))["buffered_pkts"] == 0 and p,
        10,
        "the held output to drain",
    )
    time.sleep(0.5)
    assert _role(_status(agent), "primary")["epochs_total"] == idle["epochs_total"]

    text = _metrics(agent, second["metrics"])
    for name in (
        "hamgr_epochs_total",
        "hamgr_commits_total",
        "hamgr_buffered_packets",
        "hamgr_buffered_bytes",
        "hamgr_checkpoint_pause_seconds_bucket",
        "hamgr_term",
    ):
        assert any(
            ln.startswith(name + "{") and f'unit="{UNIT}"' in ln for ln in text.splitlines()
        ), text
    assert "# TYPE hamgr_failover_seconds histogram" in text
    commits = [
        ln for ln in text.splitlines() if ln.startswith(f'hamgr_commits_total{{unit="{UNIT}"}}')
    ]
    assert float(commits[0].split()[-1]) >= p2["commits_total"]

    # Unprotect removes everything the agent made for the unit.
    host = agent.bed.host
    assert netns.netns_exists(f"hamgr-{host}-{UNIT}")
    agent.hamgr("unprotect", UNIT)
    assert not netns.netns_exists(f"hamgr-{host}-{UNIT}")
    assert not procs.process_alive(result["nf_pid"], procs.start_ticks(result["nf_pid"]) or -1)
    assert _status(agent)["units"] == []


def test_events_stream_commits(agent: AgentHarness, tmp_path: Path) -> None:
    _protect(agent, tmp_path)
    sender = UdpSender.open(agent.bed.cl, NF_PORT)
    try:
        sender.start_stream(interval=0.005, max_count=400, max_seconds=2.0)
        proc = agent.hamgr("events", "--seconds", "1.5", "--kind", "commit", "--json")
    finally:
        sender.close()
    lines = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    events, summary = lines[:-1], lines[-1]
    assert summary == {"ok": True, "events": len(events), "seconds": 1.5}
    assert events, "no commit event in 1.5 s of traffic"
    assert {e["kind"] for e in events} == {"commit"}
    epochs = [e["epoch"] for e in events]
    assert epochs == sorted(epochs)


def _on_a_tty(agent: AgentHarness, *args: str, no_color: bool) -> bytes:
    """Run `hamgr ARGS` with stdout on a pseudo-terminal; returns what it printed there."""
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    env["TERM"] = "xterm"
    if no_color:
        env["NO_COLOR"] = "1"
    master, slave = pty.openpty()
    try:
        subprocess.run(
            [sys.executable, "-m", "hamgr", *args, "--state-dir", str(agent.state_dir)],
            stdout=slave,
            stderr=subprocess.DEVNULL,
            env=env,
            timeout=60,
            check=True,
        )
    finally:
        os.close(slave)
    out = b""
    for _ in range(1000):
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the other side is closed and drained
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    return out


def _raw_dealer(state_dir: Path, keypair: keys.Keypair) -> tuple[zmq.Context[Any], zmq.Socket[Any]]:
    ctx: zmq.Context[Any] = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    sock.setsockopt(zmq.CURVE_SERVERKEY, keys.load_public(state_dir / "keys", keys.AGENT))
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keypair.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keypair.secret)
    sock.connect(f"ipc://{state_dir}/control.sock")
    return ctx, sock


def test_a_peer_with_a_wrong_key_is_refused_and_logged(agent: AgentHarness) -> None:
    state = agent.state_dir
    stranger = keys.generate()
    client = control.ControlClient(
        f"ipc://{state}/control.sock",
        server_key=keys.load_public(state / "keys", keys.AGENT),
        keypair=(stranger.public, stranger.secret),
        timeout=10,
    )
    started = time.monotonic()
    try:
        with pytest.raises(control.ControlAuthError):
            client.ping()
    finally:
        client.close()
    assert time.monotonic() - started < 5, "the refusal should be known at once, not by timeout"

    def refused_logged() -> bool:
        for line in agent.log().splitlines():
            record = json.loads(line)
            if "refused a client" in record["msg"] and record.get("peer_key") == (
                stranger.public.decode()
            ):
                assert record["level"] == "warning"
                return True
        return False

    _wait(refused_logged, 10, "the refusal in the agent's log")

    # The CLI with a key the agent does not know exits 3 and says why.
    own = keys.load_keypair(state / "keys", keys.CLI)
    keys.write_keypair(state / "keys", keys.CLI, stranger)
    try:
        proc = agent.hamgr("status", check=False)
        assert proc.returncode == 3, proc
        assert "refused this client's key" in proc.stderr
    finally:
        keys.write_keypair(state / "keys", keys.CLI, own)
    status = _status(agent)
    assert status["control"]["refused"] >= 2


def test_malformed_messages_get_error_replies_and_the_agent_keeps_serving(
    agent: AgentHarness,
) -> None:
    state = agent.state_dir
    ctx, sock = _raw_dealer(state, keys.load_keypair(state / "keys", keys.CLI))
    try:
        cases: list[tuple[list[bytes], str, str]] = [
            ([b"\x00\xffnot json"], "bad_request", "not JSON"),
            ([b"[1, 2]"], "bad_request", "must be a JSON object"),
            ([b'{"v": 1, "id": "a", "type": "ping"}', b"extra frame"], "bad_request", "one frame"),
            ([b'{"v": 9, "id": "a", "type": "ping"}'], "bad_request", "protocol version 9"),
            ([b'{"v": 1, "id": "a", "type": "format_disk"}'], "unknown_type", "format_disk"),
            ([b'{"v": 1, "id": "a", "type": "status", "unit": 7}'], "bad_field", "status.unit"),
            ([b'{"v": 1, "id": "a", "type": "ping", "x": 1}'], "bad_field", "ping.x"),
            ([b'{"v": 1, "id": "a", "type": "events", "seconds": -1}'], "bad_field", "events.sec"),
            (
                [b'{"v": 1, "id": "a", "type": "protect", "spec": {"name": "x y"}}'],
                "bad_spec",
                "name: must be 1-24 characters",
            ),
            (
                [b'{"v": 1, "id": "a", "type": "unprotect", "unit": "nosuch"}'],
                "no_such_unit",
                "nosuch",
            ),
        ]
        for frames, code, text in cases:
            sock.send_multipart(frames)
            reply = control.check_reply(json.loads(sock.recv()))
            assert reply.type == "error", (frames, reply)
            assert reply.code == code, (frames, reply)
            assert text in (reply.message or ""), (frames, reply)
            sock.send(b'{"v": 1, "id": "p", "type": "ping"}')
            pong = control.check_reply(json.loads(sock.recv()))
            assert pong.type == "result"
            assert pong.data["host"] == agent.bed.host
    finally:
        sock.close()
        ctx.term()
    assert _status(agent)["control"]["bad"] >= 8


def test_agent_killed_mid_protection_restarts_without_disturbing_the_nf(
    agent: AgentHarness, tmp_path: Path
) -> None:
    result = _protect(agent, tmp_path)
    nf_pid = result["nf_pid"]
    nf_ticks = procs.start_ticks(nf_pid)
    before = _status(agent)
    agent_pid, dp_pid = before["pid"], before["dataplane_pid"]
    sink = UdpSink.open(agent.bed.cl, SINK_PORT)
    sender = UdpSender.open(agent.bed.cl, NF_PORT)
    try:
        sender.start_stream(interval=0.004, max_count=1500, max_seconds=8.0)
        _wait(
            lambda: (_role(_status(agent), "primary")["commits_total"] or 0) >= 3,
            20,
            "commits before the kill",
        )
        committed_before = _role(_status(agent), "primary")
        kill_seq = sender.next_seq
        os.kill(agent_pid, signal.SIGKILL)
        _wait(lambda: procs.start_ticks(agent_pid) is None, 10, "the agent to die")
        # Without an agent nothing commits, so output stops (it is held, not lost).
        time.sleep(0.3)
        held_at = len(sink.snapshot())
        time.sleep(0.5)
        assert len(sink.snapshot()) == held_at, "output left without a commit"
        assert procs.start_ticks(nf_pid) == nf_ticks, "the NF was disturbed"
        assert procs.start_ticks(dp_pid) is not None, "the data plane died with the agent"

        agent.hamgr("up", "--netns", agent.bed.host_ns)
        up_seq = sender.next_seq
        after = _status(agent)
        assert after["pid"] != agent_pid
        assert after["dataplane_pid"] == dp_pid, "the data plane was restarted"
        p = _role(after, "primary")
        assert p["nf_pid"] == nf_pid
        assert p["term"] == committed_before["term"] == 1, "a failover happened"
        assert p["state"] == "running", p
        assert p["protection"] == "protected"
        assert p["commits_total"] >= committed_before["commits_total"]
        _wait(
            lambda: (
                (_role(_status(agent), "primary")["commits_total"] or 0) > p["commits_total"] + 2
            ),
            20,
            "commits after the restart",
        )
        _wait(lambda: len(sink.snapshot()) > held_at, 10, "output to flow again")
        sender.stop_stream()
        sent = sender.next_seq - 1
        records = sink.wait_quiet(quiet=1.0, timeout=30)
        # A kill inside a cut leaves ingress paused until the new agent resumes it, and the
        # wire's backlog can overflow meanwhile: inputs of that window may be lost (as in Remus,
        # without lossless mode). The output stays one legal execution (I4): in order, no
        # duplicates, and the NF's own numbering without gaps.
        _consistent(records, sent, lost_window=range(kill_seq - 100, up_seq + 1))
    finally:
        sender.close()
        sink.close()
    assert procs.start_ticks(nf_pid) == nf_ticks
    final = _role(_status(agent), "primary")
    assert final["term"] == 1
    assert final["nf_pid"] == nf_pid
    adopt = [json.loads(ln) for ln in agent.log().splitlines() if '"unit adopted"' in ln]
    assert adopt, "the restarted agent did not log the adoption"
    assert adopt[-1]["nf_pid"] == nf_pid


def test_graceful_down_and_up_keeps_the_unit(agent: AgentHarness, tmp_path: Path) -> None:
    result = _protect(agent, tmp_path)
    nf_ticks = procs.start_ticks(result["nf_pid"])
    agent.hamgr("down")
    assert procs.start_ticks(result["nf_pid"]) == nf_ticks
    proc = agent.hamgr("status", check=False)
    assert proc.returncode == 3, proc
    agent.hamgr("up", "--netns", agent.bed.host_ns)
    p = _role(_status(agent), "primary")
    assert p["nf_pid"] == result["nf_pid"]
    assert p["protection"] == "protected"
    # On a terminal the protection is coloured, unless NO_COLOR is set.
    coloured = _on_a_tty(agent, "status", no_color=False)
    assert b"\x1b[32m" in coloured
    plain = _on_a_tty(agent, "status", no_color=True)
    assert b"protected" in plain
    assert b"\x1b[" not in plain
    # A second protect of the same unit is refused, and nothing is disturbed by it.
    spec = tmp_path / f"{UNIT}.toml"
    again = agent.hamgr("protect", str(spec), "--json", check=False)
    assert again.returncode == 1
    assert json.loads(again.stdout.splitlines()[-1])["code"] == "exists"
    assert procs.start_ticks(result["nf_pid"]) == nf_ticks


def test_the_agent_speaks_sd_notify_and_pings_the_watchdog(agent: AgentHarness) -> None:
    """Under systemd (Type=notify, WatchdogSec=): READY=1 once serving, then WATCHDOG=1."""
    import socket as socket_mod

    agent.hamgr("down")
    notify = agent.state_dir / "notify.sock"
    listener = socket_mod.socket(socket_mod.AF_UNIX, socket_mod.SOCK_DGRAM)
    listener.bind(str(notify))
    listener.settimeout(0.2)
    env = {**os.environ, "NOTIFY_SOCKET": str(notify), "WATCHDOG_USEC": "400000"}
    env.pop("WATCHDOG_PID", None)
    log = (agent.state_dir / "log" / "agent.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "hamgr.agent", "run", "--state-dir", str(agent.state_dir),
         "--netns", agent.bed.host_ns],
        env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    messages: list[bytes] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and messages.count(b"WATCHDOG=1") < 3:
            assert proc.poll() is None, agent.log()[-3000:]
            try:
                messages.append(listener.recv(4096))
            except TimeoutError:
                continue
        ready = [m for m in messages if m.startswith(b"READY=1")]
        assert ready, messages
        assert messages.index(ready[0]) < messages.index(b"WATCHDOG=1")
        assert messages.count(b"WATCHDOG=1") >= 3
        assert _status(agent)["pid"] == proc.pid
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        assert proc.returncode == 0
        stopping = []
        for _ in range(50):
            try:
                stopping.append(listener.recv(4096))
            except TimeoutError:
                break
        assert b"STOPPING=1" in stopping
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        listener.close()
        log.close()


def test_a_failed_protect_rolls_back_and_refusals_touch_nothing(
    agent: AgentHarness, tmp_path: Path
) -> None:
    host = agent.bed.host
    spec = tmp_path / "broken.toml"
    spec.write_text(
        agent.bed.spec(UNIT).replace('"/usr/local/bin/sequencer"', '"/usr/local/bin/no-such-nf"')
    )
    proc = agent.hamgr("protect", str(spec), "--json", check=False)
    assert proc.returncode == 1, proc
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["code"] == "failed"
    assert "could not start the NF" in out["error"]
    assert not netns.netns_exists(f"hamgr-{host}-{UNIT}")
    assert _status(agent)["units"] == []

    # Refused before anything is made: another host's standby, lossless, a missing interface.
    for extra, code, text in (
        ('host = "elsewhere"', "unsupported", "standby.host"),
        ("lossless = true", "unsupported", "lossless"),
    ):
        body = agent.bed.spec(UNIT)
        key = extra.split(" = ")[0]
        body = "\n".join(ln for ln in body.splitlines() if not ln.startswith(f"{key} = "))
        table = "[standby]" if key == "host" else "[protection]"
        spec.write_text(body.replace(table, f"{table}\n{extra}"))
        proc = agent.hamgr("protect", str(spec), "--json", check=False)
        assert proc.returncode == 1, proc
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        assert (out["code"], text in out["error"]) == (code, True), out
    spec.write_text(
        agent.bed.spec(UNIT)
        + '\n[[chain]]\nimage = "sequencer"\nargs = ["/usr/local/bin/sequencer"]\n'
    )
    proc = agent.hamgr("protect", str(spec), "--json", check=False)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (out["code"], out["error"].startswith("chain: ")) == ("unsupported", True), out
    spec.write_text(agent.bed.spec(UNIT).replace(agent.bed.wire, "nosuchif0"))
    proc = agent.hamgr("protect", str(spec), "--json", check=False)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["code"] == "bad_spec"
    assert "ports.wire: interface nosuchif0 does not exist" in out["error"]
    assert _status(agent)["units"] == []

    # The same names work once the failed attempt is gone.
    _protect(agent, tmp_path)
    assert [u["role"] for u in agent.json("status", UNIT)["units"]] == ["primary", "standby"]
    missing = agent.hamgr("status", "nosuch", "--json", check=False)
    assert missing.returncode == 1
    assert json.loads(missing.stdout.strip().splitlines()[-1])["code"] == "no_such_unit"


def test_sigusr1_writes_the_stack_of_every_thread(agent: AgentHarness, tmp_path: Path) -> None:
    """`kill -USR1` on the agent: every thread's stack, the unit's loop among them, in
    log/stacks.txt; the agent goes on serving."""
    _protect(agent, tmp_path)
    status = _status(agent)
    text = _stacks(agent, status)
    assert re.search(r'hamgr/agent/local\.py", line \d+ in _run', text), text
    assert "in _supervise" in text, text
    assert _status(agent)["pid"] == status["pid"]
    assert _role(_status(agent), "primary")["state"] == "running"


def test_a_stalled_data_plane_is_survived_in_process(agent: AgentHarness, tmp_path: Path) -> None:
    """The data plane stops answering for longer than a request's timeout (SIGSTOP): the unit's
    step fails, the loop unwedges the unit and takes it over again with a fresh engine, and
    output goes on, consistent, without an agent restart or a failover."""
    result = _protect(agent, tmp_path)
    before = _status(agent)
    dp_pid = before["dataplane_pid"]
    sink = UdpSink.open(agent.bed.cl, SINK_PORT)
    sender = UdpSender.open(agent.bed.cl, NF_PORT)
    try:
        sender.start_stream(interval=0.005, max_count=3000, max_seconds=20.0)
        _wait(lambda: (_role(_status(agent), "primary")["commits_total"] or 0) >= 3, 20, "commits")
        stop_seq = sender.next_seq
        os.kill(dp_pid, signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            # Stopped until a request of the unit's loop has timed out (the client's timeout is
            # 5 s, counted from the request, which may come a moment after the stop).
            failed = wait_for(lambda: "epoch step failed" in agent.log(), 20.0, step=0.05)
            stalled_s = time.monotonic() - stopped
            # Where the loop waits, taken while the data plane is still stopped.
            stuck = "" if failed else _stacks(agent, before)
        finally:
            os.kill(dp_pid, signal.SIGCONT)
        if not failed:
            pytest.fail(f"no epoch step failed within 20 s of the stall; {stuck}")
        print(f"the first step failed {stalled_s:.1f} s into the stall")
        assert stalled_s >= 5.0
        cont_seq = sender.next_seq
        _wait(lambda: "epoch engine restarted" in agent.log(), 40, "the engine to be restarted")
        mid = _role(_status(agent), "primary")
        _wait(
            lambda: (
                (_role(_status(agent), "primary")["commits_total"] or 0)
                > (mid["commits_total"] or 0) + 2
            ),
            20,
            "commits after the stall",
        )
        sender.stop_stream()
        sent = sender.next_seq - 1
        records = sink.wait_quiet(quiet=1.0, timeout=30)
        _consistent(records, sent, lost_window=range(stop_seq - 100, cont_seq + 100))
    finally:
        sender.close()
        sink.close()
    after = _status(agent)
    p = _role(after, "primary")
    assert after["pid"] == before["pid"], "the agent was restarted"
    assert p["term"] == 1
    assert p["nf_pid"] == result["nf_pid"]
    assert p["state"] == "running", p
    assert p["protection"] == "protected"
