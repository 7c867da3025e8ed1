"""`shim.remote_failover.RemoteFailover` against fake steps: order, timeouts, idempotence."""

from __future__ import annotations

import threading
import time

import pytest

from hamgr.agent.remote import seed, unprotected_machine
from policies.detection import DetectionPolicy
from policies.epoch import FixedEpoch
from policies.placement import HostFacts
from shim import epoch as ep
from shim import failover as fo
from shim import remote_failover as rf
from shim.remote_failover import RemoteFailover


class FakeSteps:
    def __init__(
        self,
        *,
        alive: bool = False,
        restore_s: float = 0.0,
        fail: str = "",
        confirm_s: tuple[float, ...] = (),
    ) -> None:
        self.calls: list[str] = []
        self.alive = alive
        self.confirm_s = list(confirm_s)  # how long each check takes, in turn (then at once)
        self.restore_s = restore_s
        self.fail = fail
        self.destroyed: list[int | None] = []
        self.release = threading.Event()
        self.prestore_at: tuple[str, int] | None = None

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if name == self.fail:
            raise RuntimeError(f"{name} broke")

    def confirm(self, peer: str, timeout_s: float) -> bool:
        self._call("confirm")
        if self.confirm_s:
            time.sleep(self.confirm_s.pop(0))
        return self.alive

    def raise_term(self, term: int) -> None:
        self._call(f"raise_term:{term}")

    def fence(self, term: int) -> tuple[int, int]:
        self._call("fence")
        return 0, 1

    def locate(self, term: int) -> tuple[str, int, int]:
        self._call("locate")
        return "/img", 7, 123

    def restore(self, image: str, term: int) -> int:
        self._call("restore")
        if self.restore_s:
            time.sleep(self.restore_s)
        return 4242

    def prestore(self, term: int, peer: str, not_before_us: int) -> None:
        self._call(f"prestore:{term}")
        self.prestore_at = (peer, not_before_us)

    def drop_prestore(self, term: int) -> None:
        self._call(f"drop_prestore:{term}")

    def attach(self, term: int) -> None:
        self._call("attach")

    def announce(self, term: int) -> None:
        self._call("announce")

    def resume(self, term: int) -> None:
        self._call("resume")

    def survey(self, term: int) -> tuple[HostFacts, ...]:
        self._call("survey")
        return (HostFacts("hostC", True, 1 << 30, 0, False),)

    def reprotect(self, term: int, standby: str) -> None:
        self._call(f"reprotect:{standby}")

    def detach(self, term: int) -> None:
        self._call("detach")

    def destroy_restored(self, term: int, pid: int | None) -> None:
        self._call("destroy")
        self.destroyed.append(pid)

    def discard_output(self, term: int) -> None:
        self._call("discard")


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000

    def __call__(self) -> int:
        return self.now


def _driver(
    steps: FakeSteps,
    clock: Clock,
    timeouts: fo.StepTimeouts | None = None,
    *,
    prestore: bool = False,
) -> RemoteFailover:
    config = fo.FailoverConfig(
        detection=DetectionPolicy(confirm_window_us=30_000, hold_down_us=5_000),
        timeouts=timeouts or fo.StepTimeouts(),
        prestore=prestore,
    )
    machine = fo.FailoverMachine("seq0", 1, config, peer="hostA", now_us=clock.now)
    return RemoteFailover(machine, steps, clock=clock)


def test_dead_peer_is_taken_over_in_order() -> None:
    steps, clock = FakeSteps(), Clock()
    d = _driver(steps, clock)
    clock.now += 10_000
    d.peer_down("hostA", clock.now - 10_000, clock.now - 7_000)
    assert steps.calls == [
        "confirm",
        "raise_term:2",
        "fence",
        "locate",
        "restore",
        "attach",
        "announce",
        "resume",
        "survey",
        "reprotect:hostC",
    ]
    assert d.machine.state is fo.State.WATCHING
    assert d.machine.term == 2
    rec = d.records[-1]
    assert rec.status == "finished"
    assert (rec.image_epoch, rec.cut_seq, rec.new_pid) == (7, 123, 4242)
    assert rec.detect_us == 3_000
    d.close()


def test_the_restore_starts_before_the_check_and_its_copy_is_taken_over() -> None:
    steps, clock = FakeSteps(), Clock()
    d = _driver(steps, clock, prestore=True)
    clock.now += 10_000
    d.peer_down("hostA", clock.now - 10_000, clock.now - 7_000)
    # Not before the silence is prestore_after_us long (the last probe came 10 ms ago).
    assert steps.prestore_at == (
        "hostA",
        clock.now - 10_000 + fo.FailoverConfig().prestore_after_us,
    )
    assert steps.calls[:6] == [
        "prestore:2",
        "confirm",
        "raise_term:2",
        "fence",
        "locate",
        "restore",
    ]
    assert d.machine.state is fo.State.WATCHING
    assert d.records[-1].status == "finished"
    d.close()


def test_a_copy_restored_for_a_live_peer_is_dropped() -> None:
    steps, clock = FakeSteps(alive=True), Clock()
    d = _driver(steps, clock, prestore=True)
    clock.now += 10_000
    d.peer_down("hostA", clock.now - 10_000, clock.now - 7_000)
    assert steps.calls == ["prestore:2", "confirm", "drop_prestore:2"]
    assert d.machine.state is fo.State.CONFIRMING  # disputed, still silent
    assert not d.records
    d.close()


def test_alive_peer_is_disputed_not_failed_over() -> None:
    steps, clock = FakeSteps(alive=True), Clock()
    d = _suspect(steps, clock)
    assert steps.calls == ["confirm"]
    assert d.alarms
    assert "split" in d.alarms[0]
    assert d.machine.term == 1
    d.close()


def _suspect(steps: FakeSteps, clock: Clock) -> RemoteFailover:
    """A driver whose data plane just reported hostA down (silent for 10 ms)."""
    d = _driver(steps, clock)
    clock.now += 10_000
    d.peer_down("hostA", clock.now - 10_000, clock.now)
    return d


def _tick_until_checked(d: RemoteFailover, steps: FakeSteps, clock: Clock, checks: int) -> None:
    """Let the machine's windows pass (the peer stays silent) until it checked `checks` times."""
    for _ in range(20):
        if steps.calls.count("confirm") >= checks:
            return
        wake = d.machine.next_wakeup_us
        assert wake is not None, "a silent peer must be checked again"
        clock.now = max(clock.now, wake)
        d.tick()
    raise AssertionError(f"only {steps.calls.count('confirm')} checks")


def test_a_peer_that_answered_once_and_stays_silent_is_checked_again() -> None:
    # Its agent answered the first check (disputed); its probes never came back: it died
    # right after. The data plane reports a peer down only once, so the machine asks again.
    steps, clock = FakeSteps(alive=True), Clock()
    d = _suspect(steps, clock)
    assert steps.calls == ["confirm"]
    assert d.machine.term == 1
    steps.alive = False
    _tick_until_checked(d, steps, clock, 2)
    assert d.machine.term == 2
    assert "reprotect:hostC" in steps.calls
    assert len(d.alarms) == 1  # one alarm for the dispute, not one per check
    d.close()


def test_an_alive_answer_at_the_end_of_the_window_is_a_dispute() -> None:
    # The check waits its whole window (a ping that timed out) and then finds the peer's host
    # up (its kernel answered): alive, although the window's time has passed meanwhile.
    clock = Clock()

    class SlowAlive(FakeSteps):
        def confirm(self, peer: str, timeout_s: float) -> bool:
            clock.now += int(timeout_s * 1e6) + 500
            return super().confirm(peer, timeout_s)

    steps = SlowAlive(alive=True)
    d = _suspect(steps, clock)
    assert steps.calls == ["confirm"]
    assert d.machine.term == 1
    assert d.machine.state is fo.State.CONFIRMING
    assert any("split" in a for a in d.alarms)
    d.close()


def test_a_check_our_starved_host_returns_late_is_no_verdict(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(rf, "CONFIRM_LATE_US", 10_000)
    # The first check returns after its window (at most 60 ms dampened) + 10 ms: it is not
    # taken for "dead".
    steps, clock = FakeSteps(confirm_s=(0.1,)), Clock()
    d = _suspect(steps, clock)
    assert steps.calls == ["confirm"]
    assert d.machine.term == 1
    # The next check answers in time that the peer is dead: taken over.
    _tick_until_checked(d, steps, clock, 2)
    assert d.machine.term == 2
    assert "reprotect:hostC" in steps.calls
    d.close()


def test_checks_that_keep_returning_late_end_in_a_takeover(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rf, "CONFIRM_LATE_US", 10_000)
    steps, clock = FakeSteps(confirm_s=(0.1,) * (rf.CONFIRM_LATE_MAX + 1)), Clock()
    d = _suspect(steps, clock)
    _tick_until_checked(d, steps, clock, rf.CONFIRM_LATE_MAX)
    assert d.machine.term == 1
    # One more late check in a row: no longer "starved", no answer at all.
    _tick_until_checked(d, steps, clock, rf.CONFIRM_LATE_MAX + 1)
    assert d.machine.term == 2
    assert steps.calls.count("confirm") == rf.CONFIRM_LATE_MAX + 1
    d.close()


def test_second_trigger_during_a_failover_is_ignored() -> None:
    steps, clock = FakeSteps(), Clock()
    d = _driver(steps, clock)
    clock.now += 10_000
    # The first PeerDown runs the whole sequence; a retried operator request naming the old
    # term and a duplicate PeerDown find it done: one failover only.
    d.peer_down("hostA", clock.now - 10_000, clock.now)
    d.feed(fo.FailoverRequested("operator", False, 1))
    d.peer_down("hostA", clock.now - 10_000, clock.now)
    assert steps.calls.count("restore") == 1
    assert len(d.records) == 1
    assert d.machine.term == 2
    assert any("stale term 1" in why for why in d.ignored)
    d.close()


def test_a_failed_step_cleans_up_and_leaves_no_half_started_unit() -> None:
    steps, clock = FakeSteps(fail="attach"), Clock()
    d = _driver(steps, clock)
    clock.now += 10_000
    d.peer_down("hostA", clock.now - 10_000, clock.now)
    assert d.machine.state is fo.State.FAILED
    # Nothing was attached or fed, so only the restored copy has to go.
    assert steps.calls[-2:] == ["attach", "destroy"]
    assert steps.destroyed == [4242]
    assert "resume" not in steps.calls
    assert d.records[-1].status == "error"
    d.close()


def test_a_step_that_times_out_is_reported_and_its_late_copy_destroyed() -> None:
    steps, clock = FakeSteps(restore_s=0.3), Clock()
    d = _driver(steps, clock, fo.StepTimeouts(restore_us=50_000))
    clock.now += 10_000
    d.peer_down("hostA", clock.now - 10_000, clock.now)
    assert d.machine.state is fo.State.FAILED
    assert "attach" not in steps.calls
    time.sleep(0.5)
    d.tick()  # the late Restored arrives and is answered with DestroyRestored
    assert 4242 in steps.destroyed
    d.close()


def test_a_local_pid_is_refused() -> None:
    machine = fo.FailoverMachine("seq0", 1, pid=10)
    with pytest.raises(ValueError, match="peer"):
        RemoteFailover(machine, FakeSteps())


def test_a_taken_over_unit_runs_unprotected_until_its_new_standby_acks_a_full_image() -> None:
    config = ep.PrimaryConfig(epoch=FixedEpoch(1_000))
    machine, alarm = unprotected_machine("seq0", 2, config, 0)
    # No standby holds an image: output leaves without commit (the unit is attached plain).
    assert machine.protection is ep.Protection.UNPROTECTED
    assert "UNPROTECTED" in alarm.reason
    assert machine.handle(ep.Tick(5_000)) == []  # no cut while nobody can take an image
    commands = seed(machine, config, 10_000)
    assert ep.SetOutputCommit(True) in commands
    assert not [c for c in commands if isinstance(c, ep.Ship)]
    assert machine.protection is ep.Protection.PROTECTED
    assert machine.config == config  # the unit's own standby-loss policy from now on
    out = machine.handle(ep.OutputWaiting(1, 5, 500)) + machine.handle(ep.Tick(12_000))
    assert ep.PauseIngress() in out
    for ev in (
        ep.IngressPaused(77),
        ep.Frozen(),
        ep.EpochClosed(1, 5),
        ep.CheckpointTaken(1, "", 100),
        ep.Thawed(),
    ):
        machine.handle(ev)
    ships = [c for c in machine.handle(ep.IngressResumed()) if isinstance(c, ep.Ship)]
    assert ships == [ep.Ship(1, 2, None, 77)]  # the first image is a full one
    assert ep.Release(1) in machine.handle(ep.Acked("seq0", 1, 2))


def test_a_primary_s_request_after_a_disputed_silence_is_one_takeover_its_own_record() -> None:
    """An NF death on the primary (hamgr.agent.handoff): its request, then the same death seen
    by the probes and asked by an operator, fail the unit over once; the record of the takeover
    is the request's, not that of an earlier silence the primary's agent disputed."""
    steps, clock = FakeSteps(alive=True), Clock()
    d = _driver(steps, clock)
    clock.now += 10_000
    d.peer_down("hostA", clock.now - 10_000, clock.now - 7_000)  # a flap: A answers
    assert d.machine.state is fo.State.CONFIRMING or d.machine.state is fo.State.WATCHING
    assert not d.records
    clock.now += 5_000
    d.feed(fo.PeerUp("hostA", clock.now))
    clock.now += 1_000_000
    d.tick()
    d.feed(fo.FailoverRequested("the NF of seq0 (pid 77) died on hostA", False, 1))
    assert d.machine.term == 2
    assert len(d.records) == 1
    rec = d.records[0]
    assert rec.status == "finished"
    assert (rec.last_rx_us, rec.peer_down_us, rec.started_us) == (clock.now,) * 3
    assert rec.detect_us == 0
    # The same death again: a probe silence and an operator's request at term 1.
    steps.alive = False
    d.peer_down("hostA", clock.now - 10_000, clock.now)
    d.feed(fo.FailoverRequested("operator", False, 1))
    assert len(d.records) == 1
    assert d.machine.term == 2
    assert steps.calls.count("restore") == 1
    assert any("stale term 1" in why for why in d.ignored), d.ignored
    d.close()
