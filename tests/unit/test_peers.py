"""The main agent's links to its peers (`hamgr.agent.peers`), over real CURVE sockets on loopback:
the remote roles' persistent links (`ControlLinks`) and the one-shot calls of standby_add and
standby_remove (`PeerCaller`), with every failure turned into a message that names the fix."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hamgr import control, keys
from hamgr.agent.config import AgentConfig, PeerConfig, RemoteConfig
from hamgr.agent.peers import ControlLinks, PeerCaller, PeerError, host_plan, peer_plans
from hamgr.agent.remote import PeerPlan, TcpProbe, agent_check_verdict


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class _Peer:
    """A control server standing in for hostB's agent."""

    def __init__(self) -> None:
        self.keys = keys.generate()
        self.allowed: set[bytes] = set()
        self.port = _free_port()
        self.requests: list[control.Request] = []
        self.server = control.ControlServer(
            f"tcp://127.0.0.1:{self.port}",
            secret_key=self.keys.secret,
            authorized=lambda: frozenset(self.allowed),
            handler=self.handle,
        )
        self.server.start()

    def handle(self, request: control.Request, responder: control.Responder) -> None:
        self.requests.append(request)
        match request:
            case control.Ping():
                responder.result({"host": "hostB"})
            case control.StandbyAdd(spec=spec) if spec.get("name") == "taken":
                responder.error("exists", "unit taken already has a role on hostB")
            case control.StandbyAdd(primary=primary, term=term):
                responder.result({"role": "standby", "primary": primary, "term": term})
            case control.StandbyRemove(unit="slow"):
                pass  # never answered
            case _:
                responder.error("unknown_type", type(request).__name__)

    def plan(self) -> PeerPlan:
        return PeerPlan("127.0.0.1", self.port, self.port + 1, self.keys.public.decode())


@pytest.fixture
def peer() -> Iterator[_Peer]:
    p = _Peer()
    yield p
    p.server.stop()


def test_links_ping_and_carry_replies_and_refusals(peer: _Peer) -> None:
    mine = keys.generate()
    peer.allowed.add(mine.public)
    links = ControlLinks({"hostB": peer.plan()}, mine)
    try:
        assert links.ping("hostB", 5.0)
        reply = links.request(
            "hostB", {"type": "standby_add", "spec": {}, "primary": "hostA", "term": 3}, 5.0
        )
        assert reply == {"role": "standby", "primary": "hostA", "term": 3}
        refused = links.request(
            "hostB",
            {"type": "standby_add", "spec": {"name": "taken"}, "primary": "a", "term": 1},
            5,
        )
        assert refused is not None
        assert (refused["code"], "already has a role" in refused["error"]) == ("exists", True)
        # A request the schema refuses never leaves; an unknown peer is an error, not a hang.
        bad = links.request("hostB", {"type": "watch", "unit": "u"}, 1.0)
        assert bad is not None
        assert bad["code"] == "unknown_type"
        assert links.request("hostX", {"type": "ping"}, 1.0) == {"error": "hostX is not a peer"}
    finally:
        links.close()


def test_links_to_a_peer_that_refuses_or_is_gone_ping_false_in_time(peer: _Peer) -> None:
    mine = keys.generate()  # not in the peer's authorized keys
    gone = PeerPlan("127.0.0.1", _free_port(), 1, keys.generate().public.decode())
    links = ControlLinks({"hostB": peer.plan(), "hostC": gone}, mine)
    try:
        started = time.monotonic()
        assert not links.ping("hostB", 0.5)
        assert not links.ping("hostC", 0.05)
        assert time.monotonic() - started < 2.0
    finally:
        links.close()


def test_caller_gives_the_result_or_a_peer_error_naming_the_fix(peer: _Peer) -> None:
    mine = keys.generate()
    caller = PeerCaller("hostA", {"hostB": peer.plan()}, mine, reach_timeout=1.0)
    # Not admitted yet: refused at the handshake, so nothing was asked.
    with pytest.raises(PeerError) as info:
        caller.call("hostB", lambda c: c.standby_add({}, primary="hostA", term=1), timeout=2)
    assert (info.value.code, info.value.sent) == ("refused", False)
    assert "refused hostA's key" in info.value.message
    assert mine.public.decode() in info.value.message
    assert not [r for r in peer.requests if isinstance(r, control.StandbyAdd)]

    peer.allowed.add(mine.public)
    reply = caller.call(
        "hostB", lambda c: c.standby_add({}, primary="hostA", term=2, spares=("hostC",)), timeout=5
    )
    assert reply == {"role": "standby", "primary": "hostA", "term": 2}
    (add,) = [r for r in peer.requests if isinstance(r, control.StandbyAdd)]
    assert add.spares == ("hostC",)

    # The peer answered no: it says why, and it did carry the request (it undid it itself).
    with pytest.raises(PeerError) as info:
        caller.call(
            "hostB", lambda c: c.standby_add({"name": "taken"}, primary="a", term=1), timeout=5
        )
    assert (info.value.code, info.value.sent) == ("exists", True)
    assert info.value.message.startswith("hostB refused: exists:")

    # Asked, never answered: the request may have been carried out.
    with pytest.raises(PeerError) as info:
        caller.call(
            "hostB", lambda c: c.standby_remove("slow", primary="a", timeout=0.3), timeout=0.3
        )
    assert (info.value.code, info.value.sent) == ("timeout", True)
    assert "did not answer" in info.value.message

    with pytest.raises(PeerError, match="hostX is not a peer of hostA"):
        caller.call("hostX", lambda c: c.ping(), timeout=1)


def test_caller_knows_an_unreachable_peer_within_its_reach_timeout() -> None:
    mine = keys.generate()
    gone = PeerPlan("127.0.0.1", _free_port(), 1, keys.generate().public.decode())
    caller = PeerCaller("hostA", {"hostB": gone}, mine, reach_timeout=0.3)
    started = time.monotonic()
    with pytest.raises(PeerError) as info:
        caller.call("hostB", lambda c: c.standby_add({}, primary="hostA", term=1), timeout=60)
    assert time.monotonic() - started < 2.0
    assert (info.value.code, info.value.sent) == ("timeout", False)
    assert "could not be reached" in info.value.message
    assert "[peers.hostB]" in info.value.message


def test_the_host_plan_comes_from_the_config(tmp_path: Path) -> None:
    key = keys.generate().public.decode()
    config = AgentConfig(
        state_dir=tmp_path,
        host="hostA",
        control="tcp://198.18.1.1:7100",
        remote=RemoteConfig("fA", "tcp://198.18.1.1:7200", probe_interval_us=2000),
        peers={"hostB": PeerConfig("hostB", "tcp://198.18.1.2:7101", "tcp://198.18.1.2:7201", key)},
    )
    mine = keys.generate()
    plan = host_plan(config, mine)
    assert (plan.host, plan.work, plan.runtime) == ("hostA", tmp_path, config.runtime)
    assert (plan.mgmt_ip, plan.control_port, plan.repl_port) == ("198.18.1.1", 7100, 7200)
    assert (plan.data_iface, plan.probe_interval_us, plan.units) == ("fA", 2000, ())
    assert plan.public_key == mine.public.decode()
    assert peer_plans(config) == {"hostB": PeerPlan("198.18.1.2", 7101, 7201, key)}
    assert plan.peers["hostB"].control == "tcp://198.18.1.2:7101"
    assert plan.peers["hostB"].replication == "tcp://198.18.1.2:7201"
    with pytest.raises(ValueError, match=r"no \[remote\]"):
        host_plan(AgentConfig.default(tmp_path, "hostA"), mine)


def test_a_connection_attempt_tells_a_listening_port_from_a_closed_one() -> None:
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        assert TcpProbe("127.0.0.1", listening.getsockname()[1]).result(1.0) == "open"
    assert TcpProbe("127.0.0.1", _free_port()).result(1.0) == "refused"


@pytest.mark.parametrize(
    ("answered", "host", "since", "now", "expected"),
    [
        (True, "open", None, 10.0, (True, None)),
        (True, "silent", 5.0, 10.0, (True, None)),  # an answer ends the grace
        (False, "silent", None, 10.0, (False, None)),  # a dead host or a cut link: no grace
        (False, "silent", 5.0, 10.0, (False, 5.0)),
        (False, "refused", None, 10.0, (True, 10.0)),  # its agent restarts: the grace starts
        (False, "open", None, 10.0, (True, 10.0)),  # listening, too busy to answer yet
        (False, "refused", 10.0, 24.0, (True, 10.0)),
        (False, "open", 10.0, 25.5, (False, 10.0)),  # silent past the grace: as good as dead
    ],
)
def test_a_host_that_is_up_with_its_agent_silent_gets_a_bounded_grace(
    answered: bool,
    host: str,
    since: float | None,
    now: float,
    expected: tuple[bool, float | None],
) -> None:
    assert agent_check_verdict(answered, host, since, now, 15.0) == expected
