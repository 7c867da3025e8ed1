"""Partition safety without a testbed: the term claim (a compare-and-set at the spares), the
stand-down it can cause, and what a deposed primary's runner reports.

- `shim.standby.StandbyMachine`: a Greeting with a claim is granted only if the spare's committed
  image is at most the claim's (term, epoch), and a refusal records nothing.
- the wire codec and `Receiver`: the claim and the refusal's committed (term, epoch) travel, and
  both orders of the race between the old primary's re-protection and the standby's claim.
- `shim.failover.FailoverMachine`: refused or ungranted claims end the attempt (stand down).
- `shim.remote_failover.RemoteFailover` and `hamgr.agent.remote.StandbySteps.raise_term` against
  real replication servers on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import zmq

from hamgr.agent.primary import Observed, UnitRunner
from hamgr.agent.remote import PlanError, StandbySteps, UnitPlan
from hamgr.fabric import sequencer_spec
from policies.detection import DetectionPolicy
from shim import delta as dl
from shim import epoch as ep
from shim import failover as fo
from shim.remote_failover import RemoteFailover
from shim.replication import (
    Ack,
    Begin,
    Blocks,
    Code,
    End,
    Hello,
    Message,
    Nack,
    NackedError,
    Receiver,
    ReplicationClient,
    ReplicationServer,
    Status,
    WireError,
    decode,
    encode,
)
from shim.standby import (
    CommittedImage,
    DropAssembly,
    Greeting,
    Manifest,
    Promote,
    RecordTerm,
    Reject,
    SendStatus,
    StandbyMachine,
    StartAssembly,
    State,
)
from shim.store import Store
from tests.unit.playbook import Playbook
from tests.unit.test_epoch_standby import image, wire
from tests.unit.test_remote_failover import Clock, FakeSteps

UNIT = "seq0"

# --- the machine: the compare-and-set -------------------------------------------------------


def spare(committed: tuple[int, int] | None, term: int | None = None) -> StandbyMachine:
    c = (
        None
        if committed is None
        else CommittedImage(committed[1], committed[0], image(committed[1]))
    )
    return StandbyMachine(UNIT, term if term is not None else (committed or (0, 0))[0], c)


def test_a_claim_at_a_spare_with_nothing_is_granted_and_records_the_term() -> None:
    m = spare(None)
    assert (
        Playbook(m)
        >> Greeting(UNIT, 0, 2, 7, claim=(1, 12))
        << RecordTerm(2)
        << SendStatus(UNIT, 7, 2, None, None, None)
    )
    assert m.term == 2


@pytest.mark.parametrize("committed", [(1, 12), (1, 11), (0, 40)], ids=str)
def test_a_claim_at_or_above_the_spares_commit_is_granted(committed: tuple[int, int]) -> None:
    m = spare(committed)
    (record, status) = m.handle(Greeting(UNIT, 0, 2, 7, claim=(1, 12)))
    assert record == RecordTerm(2)
    assert isinstance(status, SendStatus)
    assert (status.term, status.committed_term, status.committed_epoch) == (2, *committed)
    assert m.term == 2


@pytest.mark.parametrize("committed", [(1, 13), (2, 1)], ids=str)
def test_a_claim_below_the_spares_commit_is_refused_and_records_nothing(
    committed: tuple[int, int],
) -> None:
    m = spare(committed)
    term_before = m.term
    (reject,) = m.handle(Greeting(UNIT, 0, 3, 7, claim=(1, 12)))
    assert isinstance(reject, Reject)
    assert reject.code is Code.NEWER_COMMIT
    assert reject.committed == committed
    assert (reject.term, reject.seq) == (term_before, 7)
    assert f"epoch {committed[1]} of term {committed[0]}" in reject.reason
    # No RecordTerm: the old primary's term is still accepted here.
    assert m.term == term_before
    assert m.state is State.IDLE
    (status,) = m.handle(Greeting(UNIT, 0, committed[0], 8))
    assert isinstance(status, SendStatus)
    assert (status.term, status.committed_term, status.committed_epoch) == (
        term_before,
        *committed,
    )


def test_a_refused_claim_leaves_the_old_primarys_transfer_alone() -> None:
    m = spare((1, 13))
    m.handle(Manifest(UNIT, 14, 1, 20, wire(image(14), image(13))))
    assert m.state is State.ASSEMBLING
    (reject,) = m.handle(Greeting(UNIT, 0, 2, 7, claim=(1, 12)))
    assert isinstance(reject, Reject)
    assert reject.code is Code.NEWER_COMMIT
    assert m.state is State.ASSEMBLING
    assert m.assembling == (14, 1)


def test_a_granted_claim_ends_the_old_primarys_transfer_in_progress() -> None:
    m = spare(None, term=1)
    (start,) = m.handle(Manifest(UNIT, 5, 1, 20, wire(image(5))))
    assert isinstance(start, StartAssembly)
    assert (
        Playbook(m)
        >> Greeting(UNIT, 0, 2, 7, claim=(1, 4))
        << DropAssembly(5, 1)
        << RecordTerm(2)
        << SendStatus(UNIT, 7, 2, None, None, None)
    )
    assert m.assembling is None
    # The old primary's next ship learns the higher term.
    (reject,) = m.handle(Manifest(UNIT, 6, 1, 21, wire(image(6))))
    assert isinstance(reject, Reject)
    assert (reject.code, reject.term) == (Code.STALE_TERM, 2)


def test_a_claim_under_a_stale_term_is_refused_as_stale() -> None:
    m = spare((1, 3), term=5)
    (reject,) = m.handle(Greeting(UNIT, 0, 4, 7, claim=(1, 3)))
    assert isinstance(reject, Reject)
    assert (reject.code, reject.term, reject.committed) == (Code.STALE_TERM, 5, None)


def test_a_claim_that_does_not_raise_the_term_is_a_bad_message() -> None:
    m = spare(None, term=1)
    (reject,) = m.handle(Greeting(UNIT, 0, 2, 7, claim=(2, 3)))
    assert isinstance(reject, Reject)
    assert reject.code is Code.BAD_MESSAGE
    assert m.term == 1


def test_a_promoted_node_refuses_every_claim() -> None:
    m = spare((1, 3))
    m.handle(Promote(2))
    (reject,) = m.handle(Greeting(UNIT, 0, 2, 7, claim=(1, 3)))
    assert isinstance(reject, Reject)
    assert reject.code is Code.STALE_TERM
    (reject,) = m.handle(Greeting(UNIT, 0, 3, 8, claim=(1, 3)))
    assert isinstance(reject, Reject)
    assert reject.code is Code.UNKNOWN_UNIT


# --- the wire ------------------------------------------------------------------------------


def test_a_claim_and_a_refusals_commit_round_trip() -> None:
    hello = Hello(unit=UNIT, epoch=0, term=2, seq=3, claim=(1, 12))
    assert decode(encode(hello)) == hello
    assert json.loads(encode(hello)[0])["claim"] == [1, 12]
    nack = Nack(
        unit=UNIT, epoch=0, term=1, seq=3, code=Code.NEWER_COMMIT, reason="x", committed=(1, 13)
    )
    assert decode(encode(nack)) == nack
    plain = Hello(unit=UNIT, epoch=0, term=2, seq=3)
    assert "claim" not in json.loads(encode(plain)[0])
    assert decode(encode(plain)).claim is None  # type: ignore[attr-defined]


def _with(msg: Message, **fields: object) -> list[bytes]:
    frames = encode(msg)
    header = json.loads(frames[0])
    header.update(fields)
    return [json.dumps(header).encode(), *frames[1:]]


@pytest.mark.parametrize(
    "claim",
    [[1], [1, 2, 3], [1, True], [1, -1], [1, 1 << 63], [1, "2"], [1.0, 2], {"term": 1}, "1,2"],
    ids=repr,
)
def test_a_malformed_claim_is_refused_at_decode(claim: object) -> None:
    with pytest.raises(WireError, match="claim") as err:
        decode(_with(Hello(unit=UNIT, epoch=0, term=2, seq=3), claim=claim))
    assert err.value.code is Code.BAD_MESSAGE


def test_a_null_claim_is_no_claim_and_a_malformed_committed_is_refused() -> None:
    assert decode(_with(Hello(unit=UNIT, epoch=0, term=2, seq=3), claim=None)) == Hello(
        unit=UNIT, epoch=0, term=2, seq=3
    )
    nack = Nack(unit=UNIT, epoch=0, term=1, seq=3, code=Code.NEWER_COMMIT, reason="x")
    with pytest.raises(WireError, match="committed"):
        decode(_with(nack, committed=[1, False]))


def test_claim_values_are_checked_when_made() -> None:
    with pytest.raises((TypeError, ValueError)):
        Hello(unit=UNIT, epoch=0, term=2, seq=3, claim=(1, -2))


# --- the Receiver: both orders of the race ------------------------------------------------


def _checkpoint(root: Path, seed: int) -> Path:
    root.mkdir(parents=True)
    (root / "pages-1.img").write_bytes(os.urandom(64 << 10) + bytes([seed]))
    (root / "core-1.img").write_bytes(b"core%d" % seed)
    return root


def _transfer(src: Path, epoch: int, term: int, seq: int = 10) -> list[Message]:
    delta = dl.make_delta(src, dl.scan(src, epoch), None)
    msgs: list[Message] = [
        Begin(unit=UNIT, epoch=epoch, term=term, seq=seq, manifest=delta.wire_manifest)
    ]
    for i, batch in enumerate(dl.iter_batches(delta, 32 << 10)):
        msgs.append(Blocks(unit=UNIT, epoch=epoch, term=term, seq=seq + 1 + i, batch=batch))
    msgs.append(
        End(
            unit=UNIT,
            epoch=epoch,
            term=term,
            seq=seq + len(msgs),
            first_seq=seq,
            messages=len(msgs) - 1,
            blocks=len(delta.blocks),
        )
    )
    return msgs


def _drive(r: Receiver, msgs: list[Message]) -> list[Message]:
    return [reply for msg in msgs for reply in r.handle(msg)]


@pytest.fixture
def receiver(tmp_path: Path) -> Receiver:
    return Receiver({UNIT: Store(tmp_path / "spare")})


def test_the_old_primary_commits_first_so_the_claim_is_refused(
    receiver: Receiver, tmp_path: Path
) -> None:
    """A re-protected itself on the spare (its recovery cut, epoch 20) before B's claim for
    B's image (epoch 12) came: B must stand down, and A stays protected there."""
    recovery = _checkpoint(tmp_path / "recovery", 1)
    assert _drive(receiver, _transfer(recovery, 20, 1))[-1] == Ack(
        unit=UNIT, epoch=20, term=1, seq=10 + len(_transfer(recovery, 20, 1)) - 1
    )
    (reply,) = receiver.handle(Hello(unit=UNIT, epoch=0, term=2, seq=50, claim=(1, 12)))
    assert isinstance(reply, Nack)
    assert (reply.code, reply.committed, reply.term) == (Code.NEWER_COMMIT, (1, 20), 1)
    store = receiver.store(UNIT)
    assert store.term == 1
    # A's next epoch is still committed there: nothing of term 2 was recorded.
    later = _checkpoint(tmp_path / "later", 2)
    assert isinstance(_drive(receiver, _transfer(later, 21, 1, seq=60))[-1], Ack)
    assert Receiver({UNIT: Store(tmp_path / "spare")}).machine(UNIT).term == 1


def test_the_claim_lands_first_so_the_old_primarys_recovery_is_refused(
    receiver: Receiver, tmp_path: Path
) -> None:
    (status,) = receiver.handle(Hello(unit=UNIT, epoch=0, term=2, seq=5, claim=(1, 12)))
    assert isinstance(status, Status)
    assert status.term == 2
    # The term is durable: a restarted spare still refuses the old primary.
    assert Receiver({UNIT: Store(tmp_path / "spare")}).machine(UNIT).term == 2
    (hello,) = receiver.handle(Hello(unit=UNIT, epoch=0, term=1, seq=6))
    assert isinstance(hello, Nack)
    assert (hello.code, hello.term) == (Code.STALE_TERM, 2)
    replies = _drive(receiver, _transfer(_checkpoint(tmp_path / "recovery", 1), 20, 1))
    assert replies
    assert all(isinstance(r, Nack) and r.code is Code.STALE_TERM for r in replies)
    assert receiver.store(UNIT).committed() is None


def test_a_claim_in_the_middle_of_the_recovery_transfer_dooms_it(
    receiver: Receiver, tmp_path: Path
) -> None:
    msgs = _transfer(_checkpoint(tmp_path / "recovery", 1), 20, 1)
    assert _drive(receiver, msgs[:2]) == []
    (status,) = receiver.handle(Hello(unit=UNIT, epoch=0, term=2, seq=90, claim=(1, 12)))
    assert isinstance(status, Status)
    (last,) = _drive(receiver, msgs[2:])
    assert isinstance(last, Nack)
    assert (last.code, last.term, last.seq) == (Code.STALE_TERM, 2, msgs[-1].seq)
    assert receiver.store(UNIT).committed() is None


# --- the failover machine: stand down -------------------------------------------------------

PEER = "hostA"
GRANT = fo.Claim("hostC", fo.ClaimVerdict.GRANTED)
NEWER = fo.Claim("hostC", fo.ClaimVerdict.REFUSED, "newer_commit: ...", (1, 20))
SILENT = fo.Claim("hostD", fo.ClaimVerdict.NO_ANSWER, "no answer within 500 ms")


@pytest.mark.parametrize(
    ("claims", "verdict"),
    [
        (None, None),
        ((), None),
        ((GRANT,), None),
        ((GRANT, SILENT), None),
        (
            (NEWER,),
            "stand down: hostC holds a newer commit (term 1, epoch 20) from the old primary",
        ),
        ((SILENT, NEWER), "stand down: hostC holds a newer commit"),
        ((GRANT, NEWER), "stand down: hostC holds a newer commit"),
        (
            (fo.Claim("hostC", fo.ClaimVerdict.REFUSED, "stale_term: seen 7"),),
            "stand down: hostC refused the term claim: stale_term: seen 7",
        ),
        ((SILENT,), "stand down: no spare granted the term claim (hostD: no answer within 500"),
    ],
)
def test_judge_claims(claims: tuple[fo.Claim, ...] | None, verdict: str | None) -> None:
    got = fo.judge_claims(claims)
    if verdict is None:
        assert got is None
    else:
        assert got is not None
        assert got.startswith(verdict)


def _suspect_and_raise(m: fo.FailoverMachine) -> Playbook:
    return (
        Playbook(m)
        >> fo.Tick(10_000)
        >> fo.PeerDown(PEER, last_rx_us=10_000, now_us=13_000, term=1)
        << fo.Confirm(PEER, 5_000)
        >> fo.Confirmed(PEER, alive=False, now_us=20_000)
        << fo.Report
        << fo.RaiseTerm(2, fo.StepTimeouts().raise_term_us)
    )


def _remote() -> fo.FailoverMachine:
    detect = DetectionPolicy(confirm_window_us=5_000, hold_down_us=5_000)
    return fo.FailoverMachine(UNIT, 1, fo.FailoverConfig(detection=detect), peer=PEER)


def test_a_refused_claim_stands_the_standby_down_before_anything_is_touched() -> None:
    m = _remote()
    pb = _suspect_and_raise(m) >> fo.Tick(21_000) >> fo.TermRecorded(2, (NEWER,)) << fo.Alarm
    pb = pb << fo.Report(
        UNIT,
        fo.Status.ABORTED,
        2,
        "stand down: hostC holds a newer commit (term 1, epoch 20) from the old primary",
        1_000,
    )
    assert pb
    assert not [c for c in pb.commands if isinstance(c, fo.FenceDataPlane | fo.LocateImage)]
    alarm = next(c for c in pb.commands if isinstance(c, fo.Alarm))
    assert "stays with peer hostA at term 1" in alarm.reason
    # Back to watching the same incarnation; the spent term is not reused.
    assert (m.state, m.term, m.highest_term, m.peer) == (fo.State.WATCHING, 1, 2, PEER)
    again = (
        Playbook(m)
        >> fo.FailoverRequested("operator", planned=False, term=1)
        << fo.Report
        << fo.RaiseTerm(3, fo.StepTimeouts().raise_term_us)
        >> fo.TermRecorded(3, (GRANT,))
        << fo.FenceDataPlane(3, fo.StepTimeouts().fence_us)
    )
    assert again


def test_no_grant_stands_down_and_a_late_completion_of_it_is_ignored() -> None:
    m = _remote()
    assert _suspect_and_raise(m) >> fo.TermRecorded(2, (SILENT,)) << fo.Alarm << fo.Report
    assert m.state is fo.State.WATCHING
    (ignored,) = m.handle(fo.TermRecorded(2, (GRANT,)))
    assert isinstance(ignored, fo.Ignored)
    assert m.state is fo.State.WATCHING


@pytest.mark.parametrize("claims", [None, (), (GRANT,)], ids=str)
def test_without_a_refusal_the_takeover_goes_on(claims: tuple[fo.Claim, ...] | None) -> None:
    m = _remote()
    assert (
        _suspect_and_raise(m)
        >> fo.TermRecorded(2, claims)
        << fo.FenceDataPlane(2, fo.StepTimeouts().fence_us)
    )


# --- the remote driver ---------------------------------------------------------------------


class ClaimingSteps(FakeSteps):
    def __init__(self, claims: tuple[fo.Claim, ...]) -> None:
        super().__init__()
        self.claims = claims

    def raise_term(self, term: int) -> tuple[fo.Claim, ...]:  # type: ignore[override]
        self._call(f"raise_term:{term}")
        return self.claims


def _driver(steps: FakeSteps, clock: Clock) -> RemoteFailover:
    config = fo.FailoverConfig(
        detection=DetectionPolicy(confirm_window_us=30_000, hold_down_us=5_000)
    )
    machine = fo.FailoverMachine(UNIT, 1, config, peer=PEER, now_us=clock.now)
    return RemoteFailover(machine, steps, clock=clock)


def test_the_driver_stands_down_on_a_refused_claim_and_records_why() -> None:
    steps, clock = ClaimingSteps((NEWER,)), Clock()
    reports: list[fo.Report] = []
    d = _driver(steps, clock)
    d._on_report = reports.append
    clock.now += 10_000
    d.peer_down(PEER, clock.now - 10_000, clock.now - 7_000)
    assert steps.calls == ["confirm", "raise_term:2"]
    rec = d.records[-1]
    assert rec.status == "aborted"
    assert rec.detail.startswith("stand down: hostC holds a newer commit (term 1, epoch 20)")
    assert rec.claims == ["hostC: refused: newer_commit: ..."]
    assert rec.new_pid is None
    assert [r.status for r in reports] == [fo.Status.RUNNING, fo.Status.ABORTED]
    assert d.machine.state is fo.State.WATCHING
    d.close()


def test_the_driver_takes_over_on_a_grant() -> None:
    steps, clock = ClaimingSteps((GRANT,)), Clock()
    d = _driver(steps, clock)
    clock.now += 10_000
    d.peer_down(PEER, clock.now - 10_000, clock.now - 7_000)
    assert steps.calls[:3] == ["confirm", "raise_term:2", "fence"]
    assert d.records[-1].status == "finished"
    assert d.records[-1].claims == ["hostC: granted"]
    d.close()


# --- the standby's raise-term step against real spares --------------------------------------


@attrs.define
class _Plan:
    work: Path


@attrs.define
class _Server:
    checkpoint: Any

    def committed(self, unit: str) -> Any:
        return self.checkpoint


class _Agent:
    """What `StandbySteps` uses of `RemoteAgent`: its links to the spares, its store, events."""

    def __init__(self, work: Path, endpoints: dict[str, str], committed: Any) -> None:
        self.plan = _Plan(work)
        self.server = _Server(committed)
        self.endpoints = endpoints
        self.events: list[dict[str, Any]] = []

    def _shipper(self, peer: str, *, tcp_maxrt_ms: int | None = None) -> ReplicationClient:
        return ReplicationClient(self.endpoints[peer], tcp_maxrt_ms=tcp_maxrt_ms)

    def event(self, kind: str, **fields: Any) -> None:
        self.events.append({"kind": kind, **fields})


@pytest.fixture
def spares(tmp_path: Path) -> Iterator[dict[str, ReplicationServer]]:
    """hostC holds nothing; hostD committed epoch 20 of term 1 (the old primary's recovery)."""
    servers = {
        name: ReplicationServer("tcp://127.0.0.1:*", {UNIT: Store(tmp_path / name)})
        for name in ("hostC", "hostD")
    }
    for s in servers.values():
        s.start()
    with ReplicationClient(servers["hostD"].endpoint) as old_primary:
        old_primary.ship(UNIT, 20, 1, _checkpoint(tmp_path / "recovery", 1), full=True)
    yield servers
    for s in servers.values():
        s.stop()


def _steps(tmp_path: Path, endpoints: dict[str, str], image: tuple[int, int]) -> StandbySteps:
    committed = attrs.make_class("Cp", ["term", "epoch"])(*image)
    agent = _Agent(tmp_path / "agent", endpoints, committed)
    spec = sequencer_spec(UNIT)
    from hamgr.agent.unitnet import UnitNames
    from hamgr.unitspec import loads

    return StandbySteps(
        agent,  # type: ignore[arg-type]
        loads(spec),
        UnitNames("hostB", UNIT),
        list(endpoints),
        claim_timeout_s=0.3,
    )


def test_raise_term_claims_at_every_spare_and_reports_each_answer(
    tmp_path: Path, spares: dict[str, ReplicationServer]
) -> None:
    ctx = zmq.Context()
    silent = ctx.socket(zmq.ROUTER)  # answers nothing
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    endpoints = {n: s.endpoint for n, s in spares.items()} | {"hostE": f"tcp://127.0.0.1:{port}"}
    steps = _steps(tmp_path, endpoints, (1, 12))
    try:
        started = time.monotonic()
        claims = steps.raise_term(2)
        took = time.monotonic() - started
    finally:
        steps.close()
        silent.close(linger=0)
        ctx.term()
    by = {c.spare: c for c in claims}
    assert by["hostC"].verdict is fo.ClaimVerdict.GRANTED
    assert by["hostD"].verdict is fo.ClaimVerdict.REFUSED
    assert by["hostD"].committed == (1, 20)
    assert by["hostE"].verdict is fo.ClaimVerdict.NO_ANSWER
    assert "300 ms" in by["hostE"].detail
    # In parallel: the slowest answer bounds the step, not their sum.
    assert took < 0.3 * 2
    assert (tmp_path / "agent" / "terms" / UNIT).exists()
    assert spares["hostC"].committed(UNIT) is None
    assert fo.judge_claims(claims) == (
        "stand down: hostD holds a newer commit (term 1, epoch 20) from the old primary"
    )
    # hostC recorded term 2; hostD recorded nothing.
    with (
        ReplicationClient(spares["hostD"].endpoint) as old,
        ReplicationClient(spares["hostC"].endpoint) as other,
    ):
        assert old.hello(UNIT, 1).term == 1
        with pytest.raises(NackedError) as err:
            other.hello(UNIT, 1)
        assert (err.value.nack.code, err.value.nack.term) == (Code.STALE_TERM, 2)


def test_raise_term_without_spares_claims_nothing(tmp_path: Path) -> None:
    steps = _steps(tmp_path, {}, (1, 12))
    assert steps.raise_term(2) == ()
    steps.close()


def test_raise_term_without_a_committed_image_fails_the_step(tmp_path: Path) -> None:
    steps = _steps(tmp_path, {"hostC": "tcp://127.0.0.1:9"}, (1, 12))
    steps.agent.server = _Server(None)  # type: ignore[assignment]
    with pytest.raises(RuntimeError, match="no committed checkpoint"):
        steps.raise_term(2)
    steps.close()


def test_inside_the_main_agent_a_takeover_surveys_the_spares_first(tmp_path: Path) -> None:
    """The spec's spares (stores there already, the term claimed) come first, then the other
    peers but the failed primary and this host; the stand-alone agent surveys its spares only."""
    steps = _steps(tmp_path, {}, (1, 12))
    steps.spares, steps.primary = ["hostD"], "hostA"
    agent: Any = steps.agent
    agent.host, agent.embedded = "hostB", True
    agent.plan = attrs.make_class("P", ["work", "peers"])(
        tmp_path, dict.fromkeys(["hostA", "hostC", "hostD", "hostE"])
    )
    assert steps._candidates() == ["hostD", "hostC", "hostE"]
    agent.embedded = False
    assert steps._candidates() == ["hostD"]
    steps.close()


# --- the plan -------------------------------------------------------------------------------


def test_the_plan_refuses_what_partitions_make_unsafe_and_unknown_policies() -> None:
    spec = sequencer_spec(UNIT)
    assert UnitPlan(spec, "primary").on_fenced == "stop"
    assert UnitPlan(spec, "primary", on_fenced="standby").on_fenced == "standby"
    with pytest.raises(
        PlanError, match="on_fenced must be one of 'stop', 'standby', not 'restart'"
    ):
        UnitPlan(spec, "primary", on_fenced="restart")
    unsafe = spec.replace('on_standby_loss = "stall"', 'on_standby_loss = "run-unprotected"')
    with pytest.raises(PlanError, match="duplicates"):
        UnitPlan(unsafe, "standby")


# --- a deposed primary's runner -------------------------------------------------------------


class _Dp:
    def stats(self, unit: str) -> Any:
        return attrs.make_class("S", ["units"])({})

    def close(self) -> None:
        pass


class _Nf:
    pid = 4242

    def exited(self) -> bool:
        return False


class _Engine:
    def __init__(self) -> None:
        self.machine = ep.PrimaryMachine(UNIT, 1, ep.PrimaryConfig(), first_epoch=1)
        self.stats = attrs.make_class("St", {"epochs": attrs.field(factory=list),
                                             "alarms": attrs.field(factory=list)})()  # fmt: skip
        self.last_committed: int | None = None
        self.steps = 0
        self.closed = False

    def step(self) -> None:
        self.steps += 1
        if self.steps == 3:
            self.machine.handle(ep.TermRaised(2))

    def close(self) -> None:
        self.closed = True


class _Shipper:
    def close(self) -> None:
        pass


def test_a_runner_reports_its_fenced_machine_once() -> None:
    fenced: list[str] = []
    seen = threading.Event()

    def on_fenced(unit: str) -> None:
        fenced.append(unit)
        seen.set()

    engine = _Engine()
    runner = UnitRunner(
        UNIT,
        engine,  # type: ignore[arg-type]
        _Dp(),  # type: ignore[arg-type]
        _Nf(),  # type: ignore[arg-type]
        _Shipper(),  # type: ignore[arg-type]
        commits_base=0,
        observed=Observed(lambda *_: None, lambda *_: None, lambda *_: None, on_fenced),
        standby="hostB",
    )
    runner.start()
    assert seen.wait(5)
    deadline = time.monotonic() + 5
    while engine.steps < 10 and time.monotonic() < deadline:
        time.sleep(0.005)
    runner.stop()
    assert fenced == [UNIT]
    assert runner.fenced
    assert runner.snapshot()["machine"] == "fenced"
    # Stopping waits for the engine's dump thread (nothing else may checkpoint the NF meanwhile).
    assert engine.closed


def test_the_new_primary_keeps_the_other_spares_and_the_planned_policy(tmp_path: Path) -> None:
    """After a takeover, the unit's primary role lists the spares the standby claimed its term
    at, but the one it re-protected onto: a later loss of that standby moves the unit on to
    them. The plan's on_fenced of this host carries over to the role."""
    steps = _steps(tmp_path, {}, (1, 12))
    steps.spares = ["hostC", "hostD", "hostB"]
    agent: Any = steps.agent
    protected: list[tuple[str, bool]] = []
    agent.host, agent.embedded, agent.primaries = "hostB", False, {}
    agent._policy = lambda spec: {UNIT: "standby"}.get(spec.name, "stop")
    agent.protect = lambda role, standby, *, first, unprotected: protected.append((standby, first))
    agent.write_status = lambda: None
    steps.restored[2] = attrs.make_class("Nf", ["pid"])(4242)  # type: ignore[assignment]
    steps.unprotected[2] = (object(), object())  # type: ignore[assignment]
    steps.reprotect(2, "hostC")
    role = agent.primaries[UNIT]
    assert (role.standby, role.term, role.spares, role.on_fenced) == (
        "hostC",
        2,
        ["hostD"],
        "standby",
    )
    assert protected == [("hostC", True)]
    assert 2 not in steps.unprotected
    steps.close()
