"""Release at the standby, without I/O: the primary machine's commands, the standby machine's
unsent ack, Confirm and ReleaseOutput, and the Receiver sending held output through its `emit`
exactly once per epoch, only on the primary's confirm (against a real `Store` under tmp_path).
No root, no network.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from policies import FixedEpoch, InflightPolicy, StandbyLossAction, StandbyLossPolicy
from shim import delta as dl
from shim.epoch import (
    Acked,
    Checkpoint,
    CheckpointFailed,
    CheckpointTaken,
    CloseEpoch,
    EpochClosed,
    Freeze,
    Frozen,
    IngressPaused,
    IngressResumed,
    OutputWaiting,
    PauseIngress,
    PrimaryConfig,
    PrimaryMachine,
    Release,
    ReleasePoint,
    ResumeIngress,
    Retire,
    SetOutputCommit,
    Ship,
    StandbyBack,
    StandbyLost,
    Thaw,
    Thawed,
    Tick,
)
from shim.replication import Ack, Confirm, Hello, Message, Nack, Receiver, Released, Status
from shim.standby import (
    Chunk,
    Code,
    Commit,
    CommittedImage,
    Greeting,
    ImageEnd,
    Manifest,
    Promote,
    RecordTerm,
    Reject,
    ReleaseOutput,
    SendAck,
    SendReleased,
    SendStatus,
    StandbyMachine,
    StartAssembly,
    State,
    StoreChunk,
    Verified,
    output_epoch,
    output_name,
)
from shim.standby import Confirm as ConfirmEvent
from shim.store import Store, StoreError
from tests.unit.playbook import Playbook
from tests.unit.test_replication import _transfer

UNIT = "fw0"
TERM = 3
LEN = 1_000


def primary(loss: StandbyLossAction = StandbyLossAction.STALL) -> PrimaryMachine:
    config = PrimaryConfig(
        epoch=FixedEpoch(LEN),
        inflight=InflightPolicy(max_inflight=4, budget_bytes=1 << 20),
        standby_loss=StandbyLossPolicy(loss),
        release_at=ReleasePoint.STANDBY,
    )
    return PrimaryMachine(UNIT, TERM, config)


def cut(pb: Playbook, e: int, now: int, *, ok: bool = True) -> Playbook:
    pb >> OutputWaiting(e, 3, 300) >> Tick(now) << PauseIngress()
    pb >> IngressPaused(10 * e) << Freeze() >> Frozen() << CloseEpoch(e, save_output=True)
    pb >> EpochClosed(e, 3) << Checkpoint(e)
    if ok:
        pb >> CheckpointTaken(e, "", 4096) << Thaw()
    else:
        pb >> CheckpointFailed(e, "criu said no") << Thaw()
    return pb >> Thawed() << ResumeIngress() >> IngressResumed()


# --- the primary machine --------------------------------------------------------------------


def test_each_ship_carries_the_output_of_every_held_epoch_and_the_ack_retires() -> None:
    pb = Playbook(primary())
    cut(pb, 1, LEN) << Ship(1, TERM, None, 10, (1,))
    # Epoch 1 is not acked yet: its output rides with checkpoint 2 as well.
    cut(pb, 2, 2 * LEN) << Ship(2, TERM, 1, 20, (1, 2))
    assert pb >> Acked(UNIT, 2, TERM) << Retire(1) << Retire(2)
    assert not any(isinstance(c, Release) for c in pb.commands)


def test_a_failed_checkpoints_output_rides_with_the_next_one() -> None:
    pb = Playbook(primary())
    cut(pb, 1, LEN, ok=False)
    cut(pb, 2, 2 * LEN) << Ship(2, TERM, None, 20, (1, 2))
    assert pb >> Acked(UNIT, 2, TERM) << Retire(1) << Retire(2)


def test_running_unprotected_releases_at_the_primary() -> None:
    pb = Playbook(primary(StandbyLossAction.RUN_UNPROTECTED))
    cut(pb, 1, LEN) << Ship(1, TERM, None, 10, (1,))
    assert pb
    got = pb.machine.handle(StandbyLost("peer down"))
    assert Release(1) in got
    assert SetOutputCommit(False) in got
    assert not any(isinstance(c, Retire) for c in got)


def test_a_new_standby_gets_every_held_output_with_its_full_image() -> None:
    m = primary()
    pb = Playbook(m)
    assert cut(pb, 1, LEN) << Ship(1, TERM, None, 10, (1,))
    got = m.handle(StandbyLost("peer down"))
    assert not any(isinstance(c, Release | Retire) for c in got)
    # A new standby: the newest checkpoint again, in full, with the output B may never have sent.
    assert m.handle(StandbyBack()) == [Ship(1, TERM, None, 10, (1,))]
    assert m.handle(Acked(UNIT, 1, TERM)) == [Retire(1)]


def test_release_at_the_primary_saves_and_carries_nothing() -> None:
    m = PrimaryMachine(UNIT, TERM, PrimaryConfig(epoch=FixedEpoch(LEN)))
    pb = Playbook(m) >> OutputWaiting(1, 3, 300) >> Tick(LEN) << PauseIngress()
    pb >> IngressPaused(10) << Freeze() >> Frozen() << CloseEpoch(1)
    pb >> EpochClosed(1, 3) << Checkpoint(1) >> CheckpointTaken(1, "", 1) << Thaw()
    pb >> Thawed() << ResumeIngress() >> IngressResumed() << Ship(1, TERM, None, 10)
    assert pb >> Acked(UNIT, 1, TERM) << Release(1)


# --- the standby machine --------------------------------------------------------------------


def _manifest(epoch: int, names: list[str]) -> dl.Manifest:
    files = [dl.FileEntry(n, 1, b"\0" * 32, dl.block_digest(b"x")) for n in names]
    return dl.Manifest(epoch, tuple(files))


def test_output_names_round_trip() -> None:
    assert output_epoch(output_name(7)) == 7
    assert output_epoch("pages-1.img") is None
    assert output_epoch(output_name(7) + ".tmp") is None


def test_promotion_sends_what_the_committed_image_still_carries() -> None:
    image = CommittedImage(4, TERM, _manifest(4, ["core-1.img", output_name(3), output_name(4)]))
    m = StandbyMachine(UNIT, TERM, image, released=(TERM, 3))
    got = m.handle(Promote(TERM + 1))
    assert ReleaseOutput(UNIT, TERM, 3, 4) in got
    assert m.released == (TERM, 4)


def test_promotion_sends_nothing_twice() -> None:
    image = CommittedImage(4, TERM, _manifest(4, [output_name(4)]))
    m = StandbyMachine(UNIT, TERM, image, released=(TERM, 4))
    assert not any(isinstance(c, ReleaseOutput) for c in m.handle(Promote(TERM + 1)))


def _outputs_image(epoch: int, outputs: list[int]) -> dl.Manifest:
    return _manifest(epoch, ["core-1.img", *(output_name(e) for e in outputs)])


def _commit(pb: Playbook, epoch: int, outputs: list[int], *, seq: int = 10) -> Playbook:
    """Feed one complete transfer of `epoch` carrying `outputs`, up to the store's verdict."""
    image = _outputs_image(epoch, outputs)
    m = pb.machine
    assert isinstance(m, StandbyMachine)
    base = None if m.last_committed is None else dl.Base.of(m.last_committed.manifest)
    wire = dl.encode_manifest(image, base)
    pb >> Manifest(UNIT, epoch, TERM, seq, wire) << StartAssembly(epoch, TERM, image)
    pb >> Chunk(UNIT, epoch, TERM, seq + 1, dl.Batch(b"", (), b"")) << StoreChunk
    return pb >> ImageEnd(UNIT, epoch, TERM, seq + 2, seq, 1, 0) << Commit(epoch, TERM)


def test_a_commit_is_acked_unsent_and_sends_nothing() -> None:
    pb = _commit(Playbook(StandbyMachine(UNIT, TERM)), 1, [1])
    assert pb >> Verified(1, TERM, ok=True) << SendAck(UNIT, 1, TERM, 12, unsent=True)
    assert not any(isinstance(c, ReleaseOutput) for c in pb.commands)
    assert pb.machine.released == (0, 0)


def test_a_commit_without_held_output_is_acked_plainly() -> None:
    pb = _commit(Playbook(StandbyMachine(UNIT, TERM)), 1, [])
    assert pb >> Verified(1, TERM, ok=True) << SendAck(UNIT, 1, TERM, 12)


def test_the_confirm_sends_and_answers_released() -> None:
    m = StandbyMachine(UNIT, TERM)
    pb = _commit(Playbook(m), 1, [1]) >> Verified(1, TERM, ok=True) << SendAck
    assert (
        pb
        >> ConfirmEvent(UNIT, 1, TERM, 13)
        << ReleaseOutput(UNIT, TERM, 0, 1)
        << SendReleased(UNIT, 1, TERM, 13)
    )
    assert m.released == (TERM, 1)
    assert m.state is State.IDLE


def test_a_duplicate_confirm_sends_nothing_twice() -> None:
    m = StandbyMachine(UNIT, TERM)
    pb = _commit(Playbook(m), 1, [1]) >> Verified(1, TERM, ok=True) << SendAck
    pb >> ConfirmEvent(UNIT, 1, TERM, 13) << ReleaseOutput << SendReleased
    assert pb >> ConfirmEvent(UNIT, 1, TERM, 14) << SendReleased(UNIT, 1, TERM, 14)
    # A late confirm of an older epoch, too.
    assert pb >> ConfirmEvent(UNIT, 0, TERM, 15) << SendReleased(UNIT, 0, TERM, 15)


def test_one_confirm_sends_every_committed_unsent_epoch_up_to_it() -> None:
    m = StandbyMachine(UNIT, TERM)
    pb = _commit(Playbook(m), 1, [1]) >> Verified(1, TERM, ok=True) << SendAck
    # The confirm of 1 never came; checkpoint 2 carries epoch 1's output as well.
    (
        _commit(pb, 2, [1, 2], seq=20)
        >> Verified(2, TERM, ok=True)
        << SendAck(UNIT, 2, TERM, 22, unsent=True)
    )
    assert (
        pb
        >> ConfirmEvent(UNIT, 2, TERM, 23)
        << ReleaseOutput(UNIT, TERM, 0, 2)
        << SendReleased(UNIT, 2, TERM, 23)
    )


def test_a_confirm_of_an_older_epoch_sends_only_up_to_it() -> None:
    m = StandbyMachine(UNIT, TERM, CommittedImage(3, TERM, _outputs_image(3, [2, 3])))
    assert (
        Playbook(m)
        >> ConfirmEvent(UNIT, 2, TERM, 5)
        << ReleaseOutput(UNIT, TERM, 0, 2)
        << SendReleased(UNIT, 2, TERM, 5)
    )
    assert m.handle(ConfirmEvent(UNIT, 3, TERM, 6)) == [
        ReleaseOutput(UNIT, TERM, 2, 3),
        SendReleased(UNIT, 3, TERM, 6),
    ]


def test_a_confirm_at_a_stale_term_is_refused_and_sends_nothing() -> None:
    m = StandbyMachine(UNIT, TERM, CommittedImage(1, TERM, _outputs_image(1, [1])))
    # A standby taking over claimed a higher term here first.
    got = m.handle(Greeting(UNIT, 0, TERM + 1, 4, claim=(TERM, 1)))
    assert got[0] == RecordTerm(TERM + 1)
    assert isinstance(got[1], SendStatus)
    got = m.handle(ConfirmEvent(UNIT, 1, TERM, 5))
    assert len(got) == 1
    assert isinstance(got[0], Reject)
    assert (got[0].code, got[0].term) == (Code.STALE_TERM, TERM + 1)
    assert m.released == (0, 0)


@pytest.mark.parametrize(
    ("epoch", "term"),
    [(2, TERM), (1, TERM + 1), (1, TERM - 1)],
    ids=["newer-epoch", "higher-term", "older-term"],
)
def test_a_confirm_for_what_is_not_committed_is_refused(epoch: int, term: int) -> None:
    image = CommittedImage(1, TERM, _outputs_image(1, [1]))
    m = StandbyMachine(UNIT, TERM, image)
    got = m.handle(ConfirmEvent(UNIT, epoch, term, 5))
    assert len(got) == 1
    assert isinstance(got[0], Reject)
    expect = Code.STALE_TERM if term < TERM else Code.NOT_COMMITTED
    assert got[0].code is expect
    # Nothing recorded, not even a higher term.
    assert (m.term, m.released) == (TERM, (0, 0))


def test_a_confirm_with_nothing_committed_is_refused() -> None:
    got = StandbyMachine(UNIT, TERM).handle(ConfirmEvent(UNIT, 1, TERM, 5))
    assert [type(c) for c in got] == [Reject]
    assert got[0].code is Code.NOT_COMMITTED


def test_a_restarted_standby_sends_its_committed_unsent_output_on_confirm_once() -> None:
    # Rebuilt from the store: committed 2, sent up to 1.
    image = CommittedImage(2, TERM, _outputs_image(2, [1, 2]))
    m = StandbyMachine(UNIT, TERM, image, released=(TERM, 1))
    status = m.handle(Greeting(UNIT, 0, TERM, 4))
    assert status == [SendStatus(UNIT, 4, TERM, 2, TERM, dl.Base.of(image.manifest).id, (TERM, 1))]
    assert m.handle(ConfirmEvent(UNIT, 2, TERM, 5)) == [
        ReleaseOutput(UNIT, TERM, 1, 2),
        SendReleased(UNIT, 2, TERM, 5),
    ]
    assert m.handle(ConfirmEvent(UNIT, 2, TERM, 6)) == [SendReleased(UNIT, 2, TERM, 6)]


def test_the_resent_image_of_an_unsent_commit_is_acked_unsent_again() -> None:
    m = StandbyMachine(UNIT, TERM)
    pb = _commit(Playbook(m), 1, [1]) >> Verified(1, TERM, ok=True) << SendAck
    image = _outputs_image(1, [1])
    pb >> Manifest(UNIT, 1, TERM, 30, dl.encode_manifest(image, None))
    assert pb >> ImageEnd(UNIT, 1, TERM, 31, 30, 0, 0) << SendAck(UNIT, 1, TERM, 31, unsent=True)
    pb >> ConfirmEvent(UNIT, 1, TERM, 32) << ReleaseOutput << SendReleased
    pb >> Manifest(UNIT, 1, TERM, 40, dl.encode_manifest(image, None))
    assert pb >> ImageEnd(UNIT, 1, TERM, 41, 40, 0, 0) << SendAck(UNIT, 1, TERM, 41)


def test_a_confirm_during_the_next_transfer_leaves_it_alone() -> None:
    m = StandbyMachine(UNIT, TERM)
    pb = _commit(Playbook(m), 1, [1]) >> Verified(1, TERM, ok=True) << SendAck
    image = _outputs_image(2, [1, 2])
    base = dl.Base.of(_outputs_image(1, [1]))
    pb >> Manifest(UNIT, 2, TERM, 20, dl.encode_manifest(image, base)) << StartAssembly
    pb >> ConfirmEvent(UNIT, 1, TERM, 21) << ReleaseOutput(UNIT, TERM, 0, 1) << SendReleased
    assert pb
    assert m.state is State.ASSEMBLING
    assert m.assembling == (2, TERM)


def test_promotion_sends_committed_unsent_output_exactly_once() -> None:
    m = StandbyMachine(UNIT, TERM)
    pb = _commit(Playbook(m), 1, [1]) >> Verified(1, TERM, ok=True) << SendAck
    assert (
        pb
        >> Promote(TERM + 1)
        << RecordTerm(TERM + 1, promoted=True)
        << ReleaseOutput(UNIT, TERM, 0, 1)
    )
    # The deposed primary's confirm: refused, nothing sent again.
    got = m.handle(ConfirmEvent(UNIT, 1, TERM, 20))
    assert [type(c) for c in got] == [Reject]
    assert got[0].code is Code.STALE_TERM
    # A repeated promotion step sends nothing either.
    assert m.handle(Promote(TERM + 1)) == []


def test_promotion_after_the_confirm_sends_nothing_again() -> None:
    m = StandbyMachine(UNIT, TERM)
    pb = _commit(Playbook(m), 1, [1]) >> Verified(1, TERM, ok=True) << SendAck
    pb >> ConfirmEvent(UNIT, 1, TERM, 13) << ReleaseOutput << SendReleased
    assert pb >> Promote(TERM + 1) << RecordTerm(TERM + 1, promoted=True)


# --- the Receiver, with a real store --------------------------------------------------------


def _image(root: Path, epoch: int, outputs: dict[int, bytes]) -> Path:
    d = root / f"src-{epoch}"
    d.mkdir(parents=True)
    (d / "pages-1.img").write_bytes(os.urandom(64 << 10))
    (d / "core-1.img").write_bytes(b"core %d" % epoch)
    for e, data in outputs.items():
        (d / output_name(e)).write_bytes(data)
    return d


class Emitter:
    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.fail = False

    def __call__(self, unit: str, path: Path) -> None:
        assert unit == UNIT
        if self.fail:
            raise OSError("data plane gone")
        self.sent.append(path.read_bytes())


def _drive(r: Receiver, msgs: list[Message]) -> list[Message]:
    replies: list[Message] = []
    for msg in msgs:
        replies += r.handle(msg)
    return replies


def _confirm(r: Receiver, ack: Message, seq: int = 90) -> list[Message]:
    """The primary's answer to an unsent ack."""
    assert isinstance(ack, Ack)
    assert ack.unsent, ack
    return r.handle(Confirm(unit=UNIT, epoch=ack.epoch, term=ack.term, seq=seq))


def _released(replies: list[Message], epoch: int, term: int = TERM) -> bool:
    return replies == [Released(unit=UNIT, epoch=epoch, term=term, seq=replies[0].seq)]


def test_the_commit_sends_nothing_and_the_confirm_sends_each_epoch_once_in_order(
    tmp_path: Path,
) -> None:
    emit = Emitter()
    order: list[str] = []

    def tracking(unit: str, path: Path) -> None:
        emit(unit, path)
        order.append("emit")

    r = Receiver({UNIT: Store(tmp_path / "store", fsync=False)}, emit=tracking)
    src1 = _image(tmp_path, 1, {1: b"out-1"})
    replies = _drive(r, _transfer(src1, 1, TERM))
    order.append("ack")
    assert replies[-1] == Ack(unit=UNIT, epoch=1, term=TERM, seq=replies[-1].seq, unsent=True)
    assert emit.sent == []
    assert r.store(UNIT).released == (0, 0)
    got = _confirm(r, replies[-1])
    order.append("released")
    assert _released(got, 1)
    assert order == ["ack", "emit", "released"]
    assert r.store(UNIT).released == (TERM, 1)
    # Checkpoint 2 carries epoch 1 again (its answer was late) and epoch 2: only 2 goes out.
    src2 = _image(tmp_path, 2, {1: b"out-1", 2: b"out-2a", 3: b"not-yet"})
    (src2 / output_name(3)).unlink()
    base = r.store(UNIT).committed_base()
    replies = _drive(r, _transfer(src2, 2, TERM, base))
    assert _released(_confirm(r, replies[-1]), 2)
    assert emit.sent == [b"out-1", b"out-2a"]
    assert r.store(UNIT).released == (TERM, 2)


def test_a_repeated_confirm_sends_nothing_twice(tmp_path: Path) -> None:
    emit = Emitter()
    r = Receiver({UNIT: Store(tmp_path / "store", fsync=False)}, emit=emit)
    ack = _drive(r, _transfer(_image(tmp_path, 1, {1: b"out-1"}), 1, TERM))[-1]
    assert _released(_confirm(r, ack, seq=90), 1)
    # The released answer was lost, or the confirm was delivered twice.
    assert _released(_confirm(r, ack, seq=91), 1)
    assert emit.sent == [b"out-1"]


def test_a_confirm_for_what_is_not_committed_sends_nothing(tmp_path: Path) -> None:
    emit = Emitter()
    r = Receiver({UNIT: Store(tmp_path / "store", fsync=False)}, emit=emit)
    early = r.handle(Confirm(unit=UNIT, epoch=1, term=TERM, seq=5))
    assert isinstance(early[0], Nack)
    assert early[0].code is Code.NOT_COMMITTED
    _drive(r, _transfer(_image(tmp_path, 1, {1: b"out-1"}), 1, TERM))
    for epoch, term in ((2, TERM), (1, TERM + 1)):
        got = r.handle(Confirm(unit=UNIT, epoch=epoch, term=term, seq=6))
        assert isinstance(got[0], Nack)
        assert got[0].code is Code.NOT_COMMITTED
    # A higher term in a confirm is not recorded: nothing is committed at it.
    assert r.store(UNIT).term == TERM
    assert emit.sent == []


def test_a_confirm_after_a_higher_term_is_refused_and_sends_nothing(tmp_path: Path) -> None:
    emit = Emitter()
    r = Receiver({UNIT: Store(tmp_path / "store", fsync=False)}, emit=emit)
    ack = _drive(r, _transfer(_image(tmp_path, 1, {1: b"out-1"}), 1, TERM))[-1]
    # A standby taking over claims its term here first: the old primary is deposed.
    status = r.handle(Hello(unit=UNIT, epoch=0, term=TERM + 1, seq=50, claim=(TERM, 1)))
    assert isinstance(status[0], Status)
    got = _confirm(r, ack)
    assert isinstance(got[0], Nack)
    assert (got[0].code, got[0].term) == (Code.STALE_TERM, TERM + 1)
    assert emit.sent == []


def test_the_status_reports_what_was_sent_not_what_was_committed(tmp_path: Path) -> None:
    emit = Emitter()
    r = Receiver({UNIT: Store(tmp_path / "store", fsync=False)}, emit=emit)
    ack = _drive(r, _transfer(_image(tmp_path, 1, {1: b"out-1"}), 1, TERM))[-1]
    status = r.handle(Hello(unit=UNIT, epoch=0, term=TERM, seq=50))[0]
    assert isinstance(status, Status)
    assert (status.committed_term, status.committed_epoch, status.released) == (TERM, 1, (0, 0))
    _confirm(r, ack)
    status = r.handle(Hello(unit=UNIT, epoch=0, term=TERM, seq=51))[0]
    assert isinstance(status, Status)
    assert status.released == (TERM, 1)


def test_a_resent_image_sends_nothing_again_and_a_restart_remembers(tmp_path: Path) -> None:
    emit = Emitter()
    store_root = tmp_path / "store"
    r = Receiver({UNIT: Store(store_root, fsync=False)}, emit=emit)
    src = _image(tmp_path, 1, {1: b"out-1"})
    assert _released(_confirm(r, _drive(r, _transfer(src, 1, TERM))[-1]), 1)
    # The released answer was lost: the primary sends the same image again, acked plainly.
    ack = _drive(r, _transfer(src, 1, TERM))[-1]
    assert ack == Ack(unit=UNIT, epoch=1, term=TERM, seq=ack.seq)
    again = Receiver({UNIT: Store(store_root, fsync=False)}, emit=emit)
    ack = _drive(again, _transfer(src, 1, TERM))[-1]
    assert ack == Ack(unit=UNIT, epoch=1, term=TERM, seq=ack.seq)
    assert _released(again.handle(Confirm(unit=UNIT, epoch=1, term=TERM, seq=99)), 1)
    assert emit.sent == [b"out-1"]


def _restarted_after_an_unsent_commit(tmp_path: Path) -> tuple[Emitter, Ack, Receiver]:
    """Epoch 1 committed and acked unsent, then the standby's agent restarts before any
    confirm: the new Receiver starts from the store alone."""
    emit = Emitter()
    store_root = tmp_path / "store"
    r = Receiver({UNIT: Store(store_root, fsync=False)}, emit=emit)
    ack = _drive(r, _transfer(_image(tmp_path, 1, {1: b"out-1"}), 1, TERM))[-1]
    assert isinstance(ack, Ack)
    assert ack.unsent
    return emit, ack, Receiver({UNIT: Store(store_root, fsync=False)}, emit=emit)


def test_a_restart_between_commit_and_confirm_keeps_the_output_sendable_once(
    tmp_path: Path,
) -> None:
    emit, ack, again = _restarted_after_an_unsent_commit(tmp_path)
    # The commit survived the restart, unsent.
    status = again.handle(Hello(unit=UNIT, epoch=0, term=TERM, seq=50))[0]
    assert isinstance(status, Status)
    assert (status.committed_epoch, status.released) == (1, (0, 0))
    assert _released(_confirm(again, ack), 1)
    assert _released(_confirm(again, ack, seq=91), 1)
    # And once more after another restart: remembered as sent.
    third = Receiver({UNIT: Store(tmp_path / "store", fsync=False)}, emit=emit)
    assert _released(_confirm(third, ack, seq=92), 1)
    assert third.promote(UNIT, TERM + 1) is not None
    assert emit.sent == [b"out-1"]


def test_a_restart_between_commit_and_confirm_then_a_promotion_sends_once(
    tmp_path: Path,
) -> None:
    emit, ack, again = _restarted_after_an_unsent_commit(tmp_path)
    checkpoint = again.promote(UNIT, TERM + 1)
    assert checkpoint is not None
    assert checkpoint.epoch == 1
    assert emit.sent == [b"out-1"]
    # The deposed primary's confirm arrives late: refused, nothing sent again.
    got = _confirm(again, ack)
    assert isinstance(got[0], Nack)
    assert got[0].code is Code.STALE_TERM
    assert emit.sent == [b"out-1"]


def test_an_epoch_b_committed_unconfirmed_leaves_once_from_the_spare(tmp_path: Path) -> None:
    """The partition window: B has the whole transfer of epoch 2 and commits it, and the cut
    comes before A has the ack. A's re-protection onto C carries epoch 2's held output in its
    recovery cut (epoch 3); C sends it on A's confirm. B stood down: it never sent epoch 2, and
    its promotion later (had its claim been granted) would send it only if C had not."""
    b_emit, c_emit = Emitter(), Emitter()
    b = Receiver({UNIT: Store(tmp_path / "b", fsync=False)}, emit=b_emit)
    c = Receiver({UNIT: Store(tmp_path / "c", fsync=False)}, emit=c_emit)
    ack1 = _drive(b, _transfer(_image(tmp_path, 1, {1: b"out-1"}), 1, TERM))[-1]
    assert _released(_confirm(b, ack1), 1)
    src2 = _image(tmp_path, 2, {2: b"out-2"})
    ack2 = _drive(b, _transfer(src2, 2, TERM, b.store(UNIT).committed_base()))[-1]
    assert isinstance(ack2, Ack)
    assert ack2.unsent
    # The cut: the ack never reaches A, and no confirm reaches B.
    recovery = _image(tmp_path, 3, {2: b"out-2", 3: b"out-3"})
    ack3 = _drive(c, _transfer(recovery, 3, TERM))[-1]
    assert _released(_confirm(c, ack3), 3)
    assert b_emit.sent == [b"out-1"]
    assert c_emit.sent == [b"out-2", b"out-3"]
    # B's claim at C is refused (C holds a newer commit): B stands down, sending nothing more.
    refused = c.handle(Hello(unit=UNIT, epoch=0, term=TERM + 1, seq=60, claim=(TERM, 2)))
    assert isinstance(refused[0], Nack)
    assert refused[0].code is Code.NEWER_COMMIT
    assert b_emit.sent == [b"out-1"]


def test_a_failed_send_is_nacked_and_sent_on_the_next_confirm(tmp_path: Path) -> None:
    emit = Emitter()
    r = Receiver({UNIT: Store(tmp_path / "store", fsync=False)}, emit=emit)
    src = _image(tmp_path, 1, {1: b"out-1"})
    ack = _drive(r, _transfer(src, 1, TERM))[-1]
    emit.fail = True
    replies = _confirm(r, ack)
    assert isinstance(replies[-1], Nack)
    assert "data plane gone" in replies[-1].reason
    assert r.store(UNIT).released == (0, 0)
    emit.fail = False
    # The primary ships the epoch again (its nack): committed already, still unsent.
    ack = _drive(r, _transfer(src, 1, TERM))[-1]
    assert _released(_confirm(r, ack), 1)
    assert emit.sent == [b"out-1"]
    assert r.store(UNIT).released == (TERM, 1)


def test_a_standby_without_a_data_plane_refuses_held_output(tmp_path: Path) -> None:
    r = Receiver({UNIT: Store(tmp_path / "store", fsync=False)})
    ack = _drive(r, _transfer(_image(tmp_path, 1, {1: b"out-1"}), 1, TERM))[-1]
    replies = _confirm(r, ack)
    assert isinstance(replies[-1], Nack)
    assert "no data plane" in replies[-1].reason
    # Without held output it is an ordinary standby: a plain ack, no confirm round.
    ack = _drive(r, _transfer(_image(tmp_path, 2, {}), 2, TERM))[-1]
    assert ack == Ack(unit=UNIT, epoch=2, term=TERM, seq=ack.seq)


def test_a_new_term_starts_over_at_epoch_zero(tmp_path: Path) -> None:
    emit = Emitter()
    r = Receiver({UNIT: Store(tmp_path / "store", fsync=False)}, emit=emit)
    ack = _drive(r, _transfer(_image(tmp_path, 5, {5: b"t3-e5"}), 5, TERM))[-1]
    assert _released(_confirm(r, ack), 5)
    # After a failover the new primary's epochs count from 1 again, in a higher term.
    ack = _drive(r, _transfer(_image(tmp_path, 1, {1: b"t4-e1"}), 1, TERM + 1))[-1]
    assert _released(_confirm(r, ack), 1, TERM + 1)
    assert emit.sent == [b"t3-e5", b"t4-e1"]


def test_promotion_sends_the_output_a_failed_send_left(tmp_path: Path) -> None:
    emit = Emitter()
    r = Receiver({UNIT: Store(tmp_path / "store", fsync=False)}, emit=emit)
    ack = _drive(r, _transfer(_image(tmp_path, 1, {1: b"out-1"}), 1, TERM))[-1]
    emit.fail = True
    assert isinstance(_confirm(r, ack)[-1], Nack)
    emit.fail = False
    checkpoint = r.promote(UNIT, TERM + 1)
    assert checkpoint is not None
    assert checkpoint.epoch == 1
    assert emit.sent == [b"out-1"]


@pytest.mark.parametrize("released", [None, [1], [1, "x"], "3"])
def test_a_store_with_a_malformed_release_record_refuses_to_start(
    tmp_path: Path, released: object
) -> None:
    root = tmp_path / "store"
    Store(root, fsync=False).observe_term(TERM)
    state = json.loads((root / "state.json").read_text())
    state["released"] = released
    (root / "state.json").write_text(json.dumps(state))
    if released is None:
        assert Store(root, fsync=False).released == (0, 0)
        return
    with pytest.raises(StoreError, match="released"):
        Store(root, fsync=False)
