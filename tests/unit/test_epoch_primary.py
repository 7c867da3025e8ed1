"""Playbook tests of the primary's epoch machine (shim/epoch.py)."""

from __future__ import annotations

import hashlib
import random
from collections import deque

import pytest

from policies import (
    AdaptiveEpoch,
    CheckpointRetry,
    FixedEpoch,
    InflightPolicy,
    StandbyLossAction,
    StandbyLossPolicy,
)
from shim import delta as dl
from shim.epoch import (
    ANY_STATE,
    TRANSITIONS,
    Acked,
    Alarm,
    Checkpoint,
    CheckpointFailed,
    CheckpointTaken,
    CloseEpoch,
    Discard,
    EpochClosed,
    Event,
    Freeze,
    Frozen,
    HoldCuts,
    Ignored,
    IngressPaused,
    IngressResumed,
    Nacked,
    OutputWaiting,
    PauseIngress,
    PrimaryConfig,
    PrimaryMachine,
    Protection,
    ProtocolError,
    Release,
    ResumeIngress,
    SetBackPressure,
    SetOutputCommit,
    Ship,
    StandbyBack,
    StandbyLost,
    State,
    TermRaised,
    Thaw,
    Thawed,
    Tick,
)
from shim.standby import (
    Chunk,
    Commit,
    ImageEnd,
    Manifest,
    Reject,
    SendAck,
    StandbyMachine,
    StartAssembly,
    StoreChunk,
    Verified,
)
from shim.standby import Event as StandbyEvent
from tests.unit.playbook import Playbook

UNIT = "nat0"
TERM = 5
LEN = 1_000


def make(
    k: int = 4,
    budget: int = 1 << 20,
    loss: StandbyLossAction = StandbyLossAction.STALL,
    epoch: FixedEpoch | AdaptiveEpoch | None = None,
    retry: CheckpointRetry | None = None,
) -> PrimaryMachine:
    config = PrimaryConfig(
        epoch=epoch or FixedEpoch(LEN),
        inflight=InflightPolicy(max_inflight=k, budget_bytes=budget),
        standby_loss=StandbyLossPolicy(loss),
        retry=retry or CheckpointRetry(backoff_us=500, max_backoff_us=4_000, alarm_after=2),
    )
    return PrimaryMachine(UNIT, TERM, config)


def cut(pb: Playbook, e: int, *, seq: int, parent: int | None, pkts: int = 3) -> Playbook:
    """The completions of one cut whose PauseIngress was already asserted, up to its Ship."""
    return (
        pb
        >> IngressPaused(seq)
        << Freeze()
        >> Frozen()
        << CloseEpoch(e)
        >> EpochClosed(e, pkts)
        << Checkpoint(e)
        >> CheckpointTaken(e, f"sha-{e}", 4096)
        << Thaw()
        >> Thawed()
        << ResumeIngress()
        >> IngressResumed()
        << Ship(e, TERM, parent, seq)
    )


def shipped(m: PrimaryMachine, *epochs: int) -> Playbook:
    """A playbook in which each epoch was cut and shipped, one epoch length apart."""
    pb = Playbook(m)
    parent: int | None = None
    for i, e in enumerate(epochs):
        now = (i + 1) * LEN
        pb >> OutputWaiting(e, 3, 300) >> Tick(now) << PauseIngress()
        cut(pb, e, seq=10 * e, parent=parent)
        parent = e
    assert pb
    return pb


# --- steps 1-7 in order ---------------------------------------------------------------------


def test_one_epoch_goes_through_steps_1_to_7_in_order() -> None:
    m = make()
    assert (
        Playbook(m)
        >> OutputWaiting(1, 3, 300)
        >> Tick(999)
        >> Tick(1_000)
        << PauseIngress()
        >> IngressPaused(41)
        << Freeze()
        >> Frozen()
        << CloseEpoch(1)
        >> EpochClosed(1, 3)
        << Checkpoint(1)
        >> CheckpointTaken(1, "sha-1", 4096)
        << Thaw()
        >> Thawed()
        << ResumeIngress()
        >> IngressResumed()
        << Ship(1, TERM, None, 41)
        >> Acked(UNIT, 1, TERM)
        << Release(1)
    )
    assert m.state is State.RUNNING
    assert m.last_released == 1
    assert m.held_epochs == ()


def test_the_next_epoch_counts_from_the_resume_not_from_the_cut() -> None:
    # A pause as long as the epoch must not leave the unit frozen back to back.
    m = make()
    pause = 3 * LEN
    pb = Playbook(m) >> OutputWaiting(1, 3, 300) >> Tick(LEN) << PauseIngress()
    pb = (
        pb
        >> IngressPaused(7)
        << Freeze()
        >> Frozen()
        << CloseEpoch(1)
        >> EpochClosed(1, 3)
        << Checkpoint(1)
        >> Tick(LEN + pause)
        >> CheckpointTaken(1, "sha-1", 4096)
        << Thaw()
        >> Thawed()
        << ResumeIngress()
        >> IngressResumed()
        << Ship(1, TERM, None, 7)
        >> OutputWaiting(2, 5, 500)
        >> Tick(2 * LEN + pause - 1)
    )
    assert pb
    assert m.state is State.RUNNING
    assert Playbook(m) >> Tick(2 * LEN + pause) << PauseIngress()


def test_freeze_before_the_ingress_pause_is_refused() -> None:
    m = make()
    assert Playbook(m) >> OutputWaiting(1, 1, 100) >> Tick(LEN) << PauseIngress()
    with pytest.raises(ProtocolError, match="Frozen is not allowed in state PAUSING"):
        m.handle(Frozen())


def test_checkpoint_events_before_freeze_and_close_are_refused() -> None:
    m = make()
    assert Playbook(m) >> OutputWaiting(1, 1, 100) >> Tick(LEN) << PauseIngress()
    with pytest.raises(ProtocolError):
        m.handle(CheckpointTaken(1, "x", 1))
    assert Playbook(m) >> IngressPaused(1) << Freeze()
    with pytest.raises(ProtocolError, match="CheckpointTaken is not allowed in state FREEZING"):
        m.handle(CheckpointTaken(1, "x", 1))
    with pytest.raises(ProtocolError, match="EpochClosed is not allowed in state FREEZING"):
        m.handle(EpochClosed(1, 1))


def test_completion_for_another_epoch_is_refused() -> None:
    m = make()
    assert (
        Playbook(m)
        >> OutputWaiting(1, 1, 100)
        >> Tick(LEN)
        << PauseIngress()
        >> IngressPaused(1)
        << Freeze()
        >> Frozen()
        << CloseEpoch(1)
    )
    with pytest.raises(ProtocolError, match="epoch 2 while cutting epoch 1"):
        m.handle(EpochClosed(2, 1))
    assert m.state is State.CLOSING  # a refused event changes nothing
    assert Playbook(m) >> EpochClosed(1, 1) << Checkpoint(1)


def machine_in(state: State) -> PrimaryMachine:
    m = make()
    path = [OutputWaiting(1, 1, 100), Tick(LEN), IngressPaused(1), Frozen(), EpochClosed(1, 1)]
    path += [CheckpointTaken(1, "x", 1), Thawed()]
    for event in path:
        if m.state is state:
            break
        m.handle(event)
    assert m.state is state
    return m


@pytest.mark.parametrize("state", [s for s in State if s is not State.FENCED])
def test_every_pipeline_event_outside_its_state_is_refused(state: State) -> None:
    pipeline: list[Event] = [IngressPaused(1), Frozen(), EpochClosed(1, 1)]
    pipeline += [CheckpointTaken(1, "x", 1), CheckpointFailed(1, "x"), Thawed(), IngressResumed()]
    for event in pipeline:
        if type(event) not in TRANSITIONS[state]:
            with pytest.raises(ProtocolError, match=f"not allowed in state {state.name}"):
                machine_in(state).handle(event)
    assert set(TRANSITIONS[state]).isdisjoint(ANY_STATE)


# --- I5: external synchrony ----------------------------------------------------------------


def test_an_idle_unit_never_checkpoints() -> None:
    m = make()
    pb = Playbook(m)
    for now in range(0, 100 * LEN, 250):
        pb >> Tick(now)
    assert pb >> OutputWaiting(1, 0, 0) >> Tick(200 * LEN)
    assert m.state is State.RUNNING
    assert m.next_wakeup_us is None


def test_output_waits_for_the_epoch_length() -> None:
    m = make()
    assert Playbook(m) >> Tick(100) >> Tick(700) >> OutputWaiting(1, 2, 200)
    assert m.next_wakeup_us == LEN
    assert Playbook(m) >> Tick(999) >> Tick(1_000) << PauseIngress()


def test_a_prompt_first_cut_comes_with_the_first_output_and_never_before_it() -> None:
    """A copy restored after a failover: its first epoch counts as already long enough, so the
    first output starts a cut at once (I5 still holds: no output, no cut); the next epochs
    wait their length as usual."""
    config = PrimaryConfig(epoch=FixedEpoch(LEN))
    m = PrimaryMachine(UNIT, TERM, config, first_epoch=7, now_us=50_000, prompt_first_cut=True)
    pb = Playbook(m) >> Tick(50_000) >> Tick(50_100)
    assert m.next_wakeup_us is None  # idle: nothing to commit
    # 100 us into the epoch: without the prompt cut this would wait until 51_000.
    assert pb >> OutputWaiting(7, 1, 60) << PauseIngress()
    assert cut(pb, 7, seq=3, parent=None)
    assert pb >> OutputWaiting(8, 2, 120) >> Tick(50_500)
    assert m.state is State.RUNNING  # the second epoch waits its length
    assert pb >> Tick(51_099) >> Tick(51_100) << PauseIngress()


def test_without_a_prompt_first_cut_the_first_output_waits_an_epoch() -> None:
    m = PrimaryMachine(UNIT, TERM, PrimaryConfig(epoch=FixedEpoch(LEN)), now_us=50_000)
    assert Playbook(m) >> Tick(50_100) >> OutputWaiting(1, 1, 60) >> Tick(50_999)
    assert m.next_wakeup_us == 51_000


def test_a_report_about_a_closed_epoch_does_not_start_a_checkpoint() -> None:
    m = make()
    pb = shipped(m, 1)
    stale = OutputWaiting(1, 5, 500)
    assert pb >> stale << Ignored(stale, "epoch 1 is already closed") >> Tick(10 * LEN)
    with pytest.raises(ProtocolError, match="reports epoch 3 open"):
        m.handle(OutputWaiting(3, 1, 1))


def test_the_clock_may_not_go_back() -> None:
    m = make()
    m.handle(Tick(500))
    with pytest.raises(ProtocolError, match="clock went back"):
        m.handle(Tick(499))


# --- I1: release only on an ack with the current term ----------------------------------------


def test_no_release_without_an_ack() -> None:
    m = make()
    pb = shipped(m, 1)
    for now in range(2 * LEN, 50 * LEN, LEN):
        pb >> Tick(now)
    assert pb >> Acked(UNIT, 1, TERM) << Release(1)
    assert not any(isinstance(c, Release) for c in pb.commands[:-1])


def test_an_ack_with_a_stale_term_releases_nothing() -> None:
    m = make()
    stale = Acked(UNIT, 1, TERM - 1)
    assert (
        shipped(m, 1)
        >> stale
        << Ignored(stale, f"stale term {TERM - 1}, current {TERM}")
        >> Acked(UNIT, 1, TERM)
        << Release(1)
    )


def test_an_ack_with_a_higher_term_fences_the_primary() -> None:
    m = make()
    late = Acked(UNIT, 1, TERM)
    assert shipped(m, 1) >> Acked(UNIT, 1, TERM + 1) << Discard(1) << Alarm >> late << Ignored
    assert m.state is State.FENCED
    assert m.held_epochs == ()


def test_acks_for_unknown_old_and_foreign_epochs_are_ignored() -> None:
    m = make()
    unknown = Acked(UNIT, 7, TERM)
    foreign = Acked("other", 1, TERM)
    old = Acked(UNIT, 1, TERM)
    assert (
        shipped(m, 1)
        >> unknown
        << Ignored(unknown, "unknown epoch 7: not shipped to this standby")
        >> foreign
        << Ignored(foreign, "for unit other, this is nat0")
        >> Acked(UNIT, 1, TERM)
        << Release(1)
        >> old
        << Ignored(old, "old epoch 1, released up to 1")
    )


def test_an_ack_for_an_epoch_still_being_cut_is_ignored() -> None:
    m = make()
    early = Acked(UNIT, 1, TERM)
    assert (
        Playbook(m)
        >> OutputWaiting(1, 1, 100)
        >> Tick(LEN)
        << PauseIngress()
        >> IngressPaused(1)
        << Freeze()
        >> Frozen()
        << CloseEpoch(1)
        >> EpochClosed(1, 1)
        << Checkpoint(1)
        >> early
        << Ignored(early, "unknown epoch 1: not shipped to this standby")
    )


def test_acks_are_cumulative_and_releases_go_in_epoch_order() -> None:
    m = make()
    assert (
        shipped(m, 1, 2, 3)
        >> Acked(UNIT, 2, TERM)
        << Release(1)
        << Release(2)
        >> Acked(UNIT, 1, TERM)
        << Ignored
        >> Acked(UNIT, 3, TERM)
        << Release(3)
    )


def test_an_ack_during_the_next_cut_releases_without_disturbing_it() -> None:
    m = make()
    pb = shipped(m, 1)
    pb >> OutputWaiting(2, 1, 100) >> Tick(2 * LEN) << PauseIngress()
    pb >> IngressPaused(20) << Freeze() >> Acked(UNIT, 1, TERM) << Release(1)
    assert pb >> Frozen() << CloseEpoch(2)


def test_ships_are_deltas_against_the_previous_ship() -> None:
    m = make()
    ships = [c for c in shipped(m, 1, 2, 3).commands if isinstance(c, Ship)]
    assert [(s.epoch, s.parent) for s in ships] == [(1, None), (2, 1), (3, 2)]


# --- I6: at most K in flight, back-pressure instead of drops --------------------------------


def test_at_k_epochs_in_flight_ingress_is_back_pressured_and_no_epoch_closes() -> None:
    m = make(k=2)
    pb = Playbook(m)
    pb >> OutputWaiting(1, 3, 300) >> Tick(LEN) << PauseIngress()
    cut(pb, 1, seq=10, parent=None)
    pb >> OutputWaiting(2, 3, 300) >> Tick(2 * LEN) << PauseIngress() << SetBackPressure(True)
    cut(pb, 2, seq=20, parent=1)
    assert pb >> OutputWaiting(3, 9, 900) >> Tick(10 * LEN)
    assert m.inflight == 2
    assert m.back_pressure
    assert (
        pb
        >> Acked(UNIT, 1, TERM)
        << Release(1)
        << PauseIngress()  # the waiting epoch 3 closes at once, which refills the window
        >> Acked(UNIT, 2, TERM)
        << Release(2)
        << SetBackPressure(False)
    )


def test_k_of_one_is_synchronous() -> None:
    m = make(k=1)
    pb = Playbook(m) >> OutputWaiting(1, 3, 300) >> Tick(LEN) << PauseIngress()
    pb << SetBackPressure(True)
    cut(pb, 1, seq=10, parent=None)
    assert pb >> OutputWaiting(2, 3, 300) >> Tick(5 * LEN)
    assert pb >> Acked(UNIT, 1, TERM) << Release(1) << PauseIngress()
    assert m.inflight == 1


def test_the_byte_budget_back_pressures_with_hysteresis() -> None:
    m = make(budget=1_000)  # resumes below 750
    assert (
        Playbook(m)
        >> OutputWaiting(1, 5, 999)
        >> OutputWaiting(1, 6, 1_000)
        << SetBackPressure(True)
        >> OutputWaiting(1, 6, 800)
        >> OutputWaiting(1, 6, 749)
        << SetBackPressure(False)
    )


# --- checkpoint failure -------------------------------------------------------------------------


def test_a_failed_checkpoint_thaws_holds_its_output_and_rides_with_the_next() -> None:
    m = make()
    pb = Playbook(m)
    pb >> OutputWaiting(1, 3, 300) >> Tick(LEN) << PauseIngress()
    pb >> IngressPaused(10) << Freeze() >> Frozen() << CloseEpoch(1)
    pb >> EpochClosed(1, 3) << Checkpoint(1)
    pb >> CheckpointFailed(1, "criu: dump failed") << Thaw()
    pb >> Thawed() << ResumeIngress() >> IngressResumed()
    assert pb
    assert m.held_epochs == (1,)
    assert m.inflight == 0  # a failed epoch does not count towards K
    # Epoch 2 is empty, but epoch 1's output still waits, so a retry is due after the backoff.
    never_shipped = Acked(UNIT, 1, TERM)
    pb >> never_shipped << Ignored
    pb >> Tick(2 * LEN) << PauseIngress()
    cut(pb, 2, seq=20, parent=None, pkts=0)
    assert pb >> Acked(UNIT, 2, TERM) << Release(1) << Release(2)
    assert [c for c in pb.commands if isinstance(c, Checkpoint | Ship)] == [
        Checkpoint(1),
        Checkpoint(2),
        Ship(2, TERM, None, 20),
    ]


def test_retries_back_off_and_alarm_once() -> None:
    m = make(retry=CheckpointRetry(backoff_us=500, max_backoff_us=4_000, alarm_after=2))
    pb = Playbook(m) >> OutputWaiting(1, 1, 100) >> Tick(LEN) << PauseIngress()
    now = LEN
    for e, expect_alarm in [(1, False), (2, True), (3, False)]:
        pb >> IngressPaused(e) << Freeze() >> Frozen() << CloseEpoch(e)
        pb >> EpochClosed(e, 1) << Checkpoint(e) >> CheckpointFailed(e, "boom") << Thaw()
        if expect_alarm:
            pb << Alarm
        pb >> Thawed() << ResumeIngress() >> IngressResumed()
        backoff = 500 << (e - 1)
        # The next epoch is also one length long, so the retry waits for the later of the two.
        due = max(now + backoff, now + LEN)
        pb >> Tick(due - 1) >> Tick(due) << PauseIngress()
        now = due
    assert pb
    assert m.held_epochs == (1, 2, 3, 4)


def test_once_covered_a_failed_epoch_asks_for_no_more_checkpoints() -> None:
    m = make()
    pb = Playbook(m) >> OutputWaiting(1, 3, 300) >> Tick(LEN) << PauseIngress()
    pb >> IngressPaused(10) << Freeze() >> Frozen() << CloseEpoch(1)
    pb >> EpochClosed(1, 3) << Checkpoint(1) >> CheckpointFailed(1, "x") << Thaw()
    pb >> Thawed() << ResumeIngress() >> IngressResumed() >> Tick(2 * LEN) << PauseIngress()
    cut(pb, 2, seq=20, parent=None, pkts=0)
    assert pb >> Tick(50 * LEN)  # I5: epoch 1 is covered by checkpoint 2, epoch 3 is empty


# --- standby loss ---------------------------------------------------------------------------


def test_standby_loss_with_stall_holds_output_and_ignores_late_acks() -> None:
    m = make()
    pb = shipped(m, 1, 2)
    late = Acked(UNIT, 2, TERM)
    pb >> StandbyLost("probes") << Alarm >> late << Ignored(late, "the standby was declared lost")
    assert pb >> OutputWaiting(3, 5, 500) >> Tick(20 * LEN)  # no cut: nothing to ship to
    assert m.protection is Protection.STALLED
    assert m.held_epochs == (1, 2)
    # The newest checkpoint goes again, in full; its ack releases everything before it too.
    assert (
        pb
        >> StandbyBack()
        << Ship(2, TERM, None, 20)
        << PauseIngress()
        >> Acked(UNIT, 2, TERM)
        << Release(1)
        << Release(2)
    )
    assert m.protection.value == "protected"


def test_after_a_standby_comes_back_the_first_ship_is_full() -> None:
    m = make()
    pb = shipped(m, 1) >> Acked(UNIT, 1, TERM) << Release(1)
    pb >> StandbyLost("probes") << Alarm >> StandbyBack()  # nothing held: nothing to ship again
    pb >> OutputWaiting(2, 1, 100) >> Tick(2 * LEN) << PauseIngress()
    assert cut(pb, 2, seq=20, parent=None)


def test_standby_loss_with_run_unprotected_releases_everything() -> None:
    m = make(loss=StandbyLossAction.RUN_UNPROTECTED)
    pb = shipped(m, 1, 2)
    pb >> OutputWaiting(3, 1, 100) >> Tick(3 * LEN) << PauseIngress() >> IngressPaused(30)
    pb << Freeze()
    assert (
        pb
        >> StandbyLost("host down")
        << Alarm
        << Release(1)
        << Release(2)
        << SetOutputCommit(False)
    )
    assert m.protection is Protection.UNPROTECTED
    # The cut in progress finishes; its epoch goes out as soon as the unit runs again.
    pb >> Frozen() << CloseEpoch(3) >> EpochClosed(3, 1) << Checkpoint(3)
    pb >> CheckpointTaken(3, "d", 1) << Thaw() >> Thawed() << ResumeIngress()
    pb >> IngressResumed() << Release(3)
    assert pb >> OutputWaiting(4, 9, 900) >> Tick(10 * LEN)
    assert pb >> StandbyBack() << SetOutputCommit(True) >> OutputWaiting(4, 1, 1)
    assert pb >> Tick(11 * LEN) << PauseIngress()
    assert m.protection.value == "protected"


def test_repeated_nacks_reship_in_full_then_count_as_standby_loss() -> None:
    m = make()
    assert (
        shipped(m, 1)
        >> Nacked(UNIT, 1, TERM, "corrupt")
        << Ship(1, TERM, None, 10)
        >> Nacked(UNIT, 1, TERM, "corrupt")
        << Ship(1, TERM, None, 10)
        >> Nacked(UNIT, 1, TERM, "corrupt")
        << Alarm
    )
    assert m.protection is Protection.STALLED


def test_a_nack_with_a_higher_term_fences() -> None:
    m = make()
    assert shipped(m, 1) >> Nacked(UNIT, 1, TERM + 2, "promoted") << Discard(1) << Alarm
    assert m.state is State.FENCED


# --- I3: fencing -------------------------------------------------------------------------------


def test_a_raised_term_discards_everything_unreleased() -> None:
    m = make()
    pb = shipped(m, 1, 2, 3) >> Acked(UNIT, 1, TERM) << Release(1)
    pb >> TermRaised(TERM + 1) << Discard(2) << Alarm
    # Nothing held may come out after the fence, whatever arrives.
    pb >> Acked(UNIT, 3, TERM) << Ignored >> Acked(UNIT, 3, TERM + 1) << Ignored
    assert pb >> OutputWaiting(4, 9, 9) >> Tick(100 * LEN)
    assert m.state is State.FENCED


def test_a_term_that_is_not_higher_changes_nothing() -> None:
    m = make()
    same = TermRaised(TERM)
    assert shipped(m, 1) >> same << Ignored(same, f"term {TERM} is not above {TERM}")
    assert m.state is State.RUNNING


def test_fencing_mid_cut_ignores_the_late_completions() -> None:
    m = make()
    pb = Playbook(m) >> OutputWaiting(1, 3, 300) >> Tick(LEN) << PauseIngress()
    pb >> IngressPaused(1) << Freeze() >> TermRaised(TERM + 1) << Discard(1) << Alarm
    assert pb >> Frozen() >> Thawed() >> IngressResumed()


# --- epoch policy ------------------------------------------------------------------------------


def test_a_slow_commit_shrinks_an_adaptive_epoch() -> None:
    m = make(epoch=AdaptiveEpoch(2_000, 500, 4_000, gain=1.0, length_us=2_000))
    pb = Playbook(m) >> OutputWaiting(1, 3, 300) >> Tick(2_000) << PauseIngress()
    cut(pb, 1, seq=1, parent=None)
    assert pb >> Tick(3_500) >> Acked(UNIT, 1, TERM) << Release(1)
    # Pause 0 us, commit 1500 us: the ideal length is 2 * (2000 - 1500) = 1000.
    assert m.epoch_length_us == 1_000


# --- randomized runs against the real standby machine ------------------------------------------
#
# A small simulator plays the data plane, the checkpoint backend and the replication link, and
# judges every command by what it knows independently of the machine: the standby's own record
# of what it committed (I1), the data plane's buffers (I5), the order of the cut (steps 1-5).

_PIPELINE = [PauseIngress, Freeze, CloseEpoch, Checkpoint, Thaw, ResumeIngress]


class PairSim:
    def __init__(
        self,
        seed: int,
        *,
        k: int,
        loss: StandbyLossAction = StandbyLossAction.STALL,
        p_fail: float = 0.1,
        p_corrupt: float = 0.05,
        p_flap: float = 0.1,
        p_fence: float = 0.0,
    ) -> None:
        self.rng = random.Random(seed)
        self.k = k
        self.loss = loss
        self.m = make(k=k, budget=2_000, loss=loss)
        self.standby = StandbyMachine(UNIT)
        self.p_fail, self.p_corrupt, self.p_flap, self.p_fence = p_fail, p_corrupt, p_flap, p_fence
        self.now = 0
        self.inputs = 0
        # the data plane
        self.dp_open = 1
        self.open_pkts = 0
        self.buffers: dict[int, int] = {}
        self.released: list[int] = []
        self.cut_paused = self.frozen = self.bp = self.unprotected = self.fenced = False
        # the backend: the one outstanding pipeline command's completion, and checkpoint results
        self.pending: Event | None = None
        self.next_pipeline = 0
        self.cutting: int | None = None
        self.resumed: set[int] = set()
        self.ok: set[int] = set()
        self.failed: set[int] = set()
        # the replication link, FIFO both ways; a lost standby's link is torn down
        self.link_up = True
        self.to_standby: deque[StandbyEvent] = deque()
        self.seq = 0
        # The standby's store, reduced to what decides its verdicts: the blocks it was sent.
        self.assembly: tuple[dl.Manifest, set[bytes]] | None = None
        self.to_primary: deque[Event] = deque()
        self.acks_seen: list[Acked] = []
        self.late: list[Acked] = []

    # -- the machine's side --

    def feed(self, event: Event) -> None:
        commands = self.m.handle(event)
        for command in commands:
            self.execute(command)
        if SetOutputCommit(False) in commands:
            assert set(self.m.held_epochs) <= {self.cutting}, "held output while unprotected"
        assert self.m.inflight <= self.k
        if self.m.inflight == self.k:
            assert self.bp, "K epochs in flight without back-pressure"
        assert self.bp == self.m.back_pressure
        if self.loss is StandbyLossAction.STALL:
            assert self.m.protection is not Protection.UNPROTECTED
        if self.link_up and self.m.protection is not Protection.PROTECTED:
            self.link_down()

    def execute(self, c: object) -> None:
        if isinstance(c, tuple(_PIPELINE)):
            assert isinstance(c, _PIPELINE[self.next_pipeline]), f"{c} out of order"
            assert self.pending is None
            self.next_pipeline = (self.next_pipeline + 1) % len(_PIPELINE)
        match c:
            case PauseIngress():
                assert self.waiting(), "a cut started with no output waiting (I5)"
                self.cutting = self.dp_open
                self.pending = IngressPaused(self.inputs)
            case Freeze():
                self.pending = Frozen()
            case CloseEpoch(epoch=e):
                assert e == self.dp_open == self.cutting
                self.pending = EpochClosed(e, 0)
            case Checkpoint(epoch=e):
                if self.rng.random() < self.p_fail:
                    self.pending = CheckpointFailed(e, "sim")
                else:
                    self.pending = CheckpointTaken(e, f"sha-{e}", 1)
            case Thaw():
                self.pending = Thawed()
            case ResumeIngress():
                self.pending = IngressResumed()
            case Ship(epoch=e, term=term, parent=parent):
                assert e in self.ok, f"ship of epoch {e} without its checkpoint"
                assert e in self.resumed, f"ship of epoch {e} before step 5"
                if self.link_up:
                    self.send_image(e, term, parent)
            case Release(epoch=e):
                assert not self.fenced, "release after the fence"
                assert not self.released or e > self.released[-1], "release out of order"
                assert e in self.buffers
                # Releases without commit are what RUN_UNPROTECTED means; STALL never gets here.
                if self.m.protection is not Protection.UNPROTECTED:
                    last = self.standby.last_committed
                    assert last is not None, f"released epoch {e}, nothing committed (I1)"
                    assert (last.term, last.epoch >= e) == (TERM, True), (
                        f"released epoch {e}, standby committed {last} (I1)"
                    )
                self.released.append(e)
                del self.buffers[e]
            case Discard(from_epoch=first):
                self.fenced = True
                for e in [e for e in self.buffers if e >= first]:
                    del self.buffers[e]
                self.open_pkts = 0
            case SetBackPressure(on=on):
                self.bp = on
            case SetOutputCommit(enabled=enabled):
                self.unprotected = not enabled
                self.open_pkts = 0
            case Alarm() | Ignored():
                pass
            case _:
                raise AssertionError(f"unexpected command {c!r}")

    def waiting(self) -> bool:
        covered = max(self.ok & set(self.buffers), default=0)
        uncovered = [e for e in self.failed if e > covered and self.buffers.get(e, 0) > 0]
        return self.open_pkts > 0 or bool(uncovered)

    def complete(self) -> None:
        event, self.pending = self.pending, None
        assert event is not None
        match event:
            case IngressPaused():
                self.cut_paused = True
            case Frozen():
                self.frozen = True
            case EpochClosed(epoch=e):
                event = EpochClosed(e, self.open_pkts)
                self.buffers[e] = self.open_pkts
                self.open_pkts = 0
                self.dp_open += 1
            case CheckpointTaken(epoch=e):
                self.ok.add(e)
            case CheckpointFailed(epoch=e):
                self.failed.add(e)
            case Thawed():
                self.frozen = False
            case IngressResumed():
                self.cut_paused = False
                assert self.cutting is not None
                self.resumed.add(self.cutting)
                self.cutting = None
        self.feed(event)

    # -- the standby's side --

    @staticmethod
    def image(e: int) -> dl.Manifest:
        content = bytes([e % 256]) * (e % 7 + 5)
        sha = hashlib.sha256(content).digest()
        return dl.Manifest(
            e, (dl.FileEntry("pages.img", len(content), sha, dl.block_digest(content)),)
        )

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def send_image(self, e: int, term: int, parent: int | None) -> None:
        # A delta names its base by digest; the primary knows what it shipped as `parent`.
        base = None if parent is None else dl.Base.of(self.image(parent))
        content = bytes([e % 256]) * (e % 7 + 5)
        blocks = [] if base is not None and dl.block_digest(content) in base.digests else [content]
        if blocks and self.rng.random() < self.p_corrupt:
            blocks[0] = b"\xff" + blocks[0][1:]
        first = self.next_seq()
        self.to_standby.append(
            Manifest(UNIT, e, term, first, dl.encode_manifest(self.image(e), base))
        )
        if blocks and self.rng.random() < self.p_corrupt:
            self.next_seq()  # the batch is lost on the way
        else:
            for data in blocks:
                batch = dl.Batch(dl.block_digest(content), (len(data),), data)
                self.to_standby.append(Chunk(UNIT, e, term, self.next_seq(), batch))
        self.to_standby.append(
            ImageEnd(UNIT, e, term, self.next_seq(), first, len(blocks), len(blocks))
        )

    def deliver_to_standby(self) -> None:
        event: StandbyEvent | None = self.to_standby.popleft()
        while event is not None:
            commands, event = self.standby.handle(event), None
            for c in commands:
                match c:
                    case StartAssembly(manifest=manifest):
                        self.assembly = (manifest, set())
                    case StoreChunk(epoch=e, term=term, batch=batch):
                        assert self.assembly is not None
                        for digest, data in batch.items():
                            if dl.block_digest(data) != digest:
                                event = Verified(e, term, ok=False, reason="bad block")
                                break
                            self.assembly[1].add(digest)
                    case Commit(epoch=e, term=term):
                        assert self.assembly is not None
                        manifest, got = self.assembly
                        last = self.standby.last_committed
                        have = got | (last.manifest.digest_set() if last is not None else set())
                        event = Verified(e, term, ok=manifest.digest_set() <= have)
                    case SendAck():
                        self.to_primary.append(Acked(c.unit, c.epoch, c.term))
                    case Reject():
                        self.to_primary.append(Nacked(c.unit, c.epoch, c.term, c.reason))

    def deliver_to_primary(self) -> None:
        event = self.to_primary.popleft()
        if isinstance(event, Acked):
            self.acks_seen.append(event)
        self.feed(event)

    def link_down(self) -> None:
        self.link_up = False
        self.to_standby.clear()
        self.late = [e for e in self.to_primary if isinstance(e, Acked)] + self.acks_seen
        self.to_primary.clear()
        self.acks_seen.clear()

    # -- the world --

    def step(self) -> None:
        r = self.rng.random()
        if r < 0.2:
            self.now += self.rng.randrange(0, 1_000)
            self.feed(Tick(self.now))
        elif r < 0.4:
            # A paused NF still works off its backlog, so only a frozen one stays silent.
            if not (self.frozen or self.fenced):
                self.inputs += 0 if self.cut_paused or self.bp else 1
                if not self.unprotected:
                    self.open_pkts += self.rng.randrange(0, 3)
                held = (self.open_pkts + sum(self.buffers.values())) * 100
                self.feed(OutputWaiting(self.dp_open, self.open_pkts, held))
        elif r < 0.6:
            if self.pending is not None:
                self.complete()
        elif r < 0.8:
            if self.to_standby:
                self.deliver_to_standby()
        elif r < 0.95:
            if self.to_primary:
                self.deliver_to_primary()
        elif r < 0.98:
            self.inject_noise()
        else:
            self.flap()

    def inject_noise(self) -> None:
        choice = self.rng.randrange(6)
        if choice == 0:
            self.feed(Acked(UNIT, self.rng.randrange(1, self.dp_open + 3), TERM - 1))
        elif choice == 1:
            self.feed(Acked(UNIT, self.cutting or self.dp_open, TERM))
        elif choice == 2:
            self.feed(Acked("intruder", self.rng.randrange(1, self.dp_open + 1), TERM))
        elif choice == 3 and self.acks_seen:
            self.feed(self.rng.choice(self.acks_seen))
        elif choice == 4 and self.late:
            # A reply from a lost standby's link, before the driver has torn it down.
            self.feed(self.late.pop(0))
        elif choice == 5 and self.rng.random() < self.p_fence:
            self.feed(Nacked(UNIT, self.rng.randrange(1, self.dp_open + 1), TERM + 1, "promoted"))
            assert self.m.state is State.FENCED, "a higher term did not fence (I3)"

    def flap(self) -> None:
        if self.rng.random() < self.p_fence:
            self.feed(TermRaised(TERM + 1))
        elif self.link_up and self.rng.random() < self.p_flap:
            self.feed(StandbyLost("sim"))
            if self.rng.random() < 0.5:
                self.standby = StandbyMachine(UNIT)  # re-protected on another host
        elif not self.link_up and self.rng.random() < 0.5:
            self.link_up = True
            self.late.clear()  # a new link: nothing from the old one can arrive on it
            self.feed(StandbyBack())

    def drain(self) -> None:
        """With failures off and the standby back, every output produced must come out."""
        self.p_fail = self.p_corrupt = 0.0
        for _ in range(10_000):
            if not self.link_up and not self.fenced:
                self.link_up = True
                self.late.clear()
                self.feed(StandbyBack())
            if self.pending is not None:
                self.complete()
            elif self.to_standby:
                self.deliver_to_standby()
            elif self.to_primary:
                self.deliver_to_primary()
            else:
                self.now += 10 * LEN
                self.feed(Tick(self.now))
                if self.pending is None and not self.to_standby and not self.m.held_epochs:
                    break
        if not self.fenced:
            assert self.open_pkts == 0
            assert sum(self.buffers.values()) == 0, f"output stuck in {self.buffers}"


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("k", [1, 2, 4])
def test_random_runs_keep_the_invariants_and_release_everything(seed: int, k: int) -> None:
    sim = PairSim(seed, k=k)
    for _ in range(2_000):
        sim.step()
    sim.drain()
    assert sim.released, "nothing was ever released"


@pytest.mark.parametrize("seed", range(6))
def test_random_runs_with_fencing_never_release_after_the_fence(seed: int) -> None:
    sim = PairSim(100 + seed, k=3, p_fence=0.05)
    for _ in range(2_000):
        sim.step()
    sim.drain()


@pytest.mark.parametrize("seed", range(6))
def test_random_runs_that_run_unprotected_after_a_loss(seed: int) -> None:
    sim = PairSim(200 + seed, k=2, loss=StandbyLossAction.RUN_UNPROTECTED)
    for _ in range(2_000):
        sim.step()
    sim.drain()


# --- holding cuts (a planned switchover settling the engine) --------------------------------


def test_held_cuts_let_the_cut_and_the_ships_finish_and_start_no_new_one() -> None:
    m = make()
    pb = Playbook(m) >> OutputWaiting(1, 3, 300) >> Tick(LEN) << PauseIngress()
    # Held in the middle of a cut: that cut still runs to its ship, and its ack releases.
    pb >> HoldCuts(True)
    cut(pb, 1, seq=10, parent=None)
    # Output waits and the epoch is long over: no new cut while held, however long it waits.
    pb >> OutputWaiting(2, 5, 500) >> Tick(3 * LEN) >> Acked(UNIT, 1, TERM) << Release(1)
    pb >> Tick(10 * LEN)
    assert pb
    assert m.state is State.RUNNING
    assert m.inflight == 0
    assert m.next_wakeup_us is None
    # Released: the waiting output is cut at once.
    assert pb >> HoldCuts(False) << PauseIngress()
    assert m.state is State.PAUSING
