"""Release at the standby, without I/O: the primary machine's commands, the standby machine's
ReleaseOutput, and the Receiver sending held output through its `emit` exactly once per epoch
(against a real `Store` under tmp_path). No root, no network.
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
from shim.replication import Ack, Message, Nack, Receiver
from shim.standby import (
    CommittedImage,
    Promote,
    ReleaseOutput,
    StandbyMachine,
    output_epoch,
    output_name,
)
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


def test_each_epochs_output_is_sent_once_in_order_before_the_ack(tmp_path: Path) -> None:
    emit = Emitter()
    order: list[str] = []

    def tracking(unit: str, path: Path) -> None:
        emit(unit, path)
        order.append("emit")

    r = Receiver({UNIT: Store(tmp_path / "store", fsync=False)}, emit=tracking)
    src1 = _image(tmp_path, 1, {1: b"out-1"})
    replies = _drive(r, _transfer(src1, 1, TERM))
    order.append("ack")
    assert isinstance(replies[-1], Ack)
    assert order == ["emit", "ack"]
    # Checkpoint 2 carries epoch 1 again (its ack was late) and epoch 2: only 2 goes out.
    src2 = _image(tmp_path, 2, {1: b"out-1", 2: b"out-2a", 3: b"not-yet"})
    (src2 / output_name(3)).unlink()
    base = r.store(UNIT).committed_base()
    replies = _drive(r, _transfer(src2, 2, TERM, base))
    assert isinstance(replies[-1], Ack)
    assert emit.sent == [b"out-1", b"out-2a"]
    assert r.store(UNIT).released == (TERM, 2)


def test_a_resent_image_sends_nothing_again_and_a_restart_remembers(tmp_path: Path) -> None:
    emit = Emitter()
    store_root = tmp_path / "store"
    r = Receiver({UNIT: Store(store_root, fsync=False)}, emit=emit)
    src = _image(tmp_path, 1, {1: b"out-1"})
    assert isinstance(_drive(r, _transfer(src, 1, TERM))[-1], Ack)
    # The ack was lost: the primary sends the same image again.
    assert isinstance(_drive(r, _transfer(src, 1, TERM))[-1], Ack)
    again = Receiver({UNIT: Store(store_root, fsync=False)}, emit=emit)
    assert isinstance(_drive(again, _transfer(src, 1, TERM))[-1], Ack)
    assert emit.sent == [b"out-1"]


def test_a_failed_send_is_nacked_and_sent_on_the_resend(tmp_path: Path) -> None:
    emit = Emitter()
    r = Receiver({UNIT: Store(tmp_path / "store", fsync=False)}, emit=emit)
    src = _image(tmp_path, 1, {1: b"out-1"})
    emit.fail = True
    replies = _drive(r, _transfer(src, 1, TERM))
    assert isinstance(replies[-1], Nack)
    assert "data plane gone" in replies[-1].reason
    assert r.store(UNIT).released == (0, 0)
    emit.fail = False
    assert isinstance(_drive(r, _transfer(src, 1, TERM))[-1], Ack)
    assert emit.sent == [b"out-1"]
    assert r.store(UNIT).released == (TERM, 1)


def test_a_standby_without_a_data_plane_refuses_held_output(tmp_path: Path) -> None:
    r = Receiver({UNIT: Store(tmp_path / "store", fsync=False)})
    replies = _drive(r, _transfer(_image(tmp_path, 1, {1: b"out-1"}), 1, TERM))
    assert isinstance(replies[-1], Nack)
    assert "no data plane" in replies[-1].reason
    # Without held output it is an ordinary standby.
    assert isinstance(_drive(r, _transfer(_image(tmp_path, 2, {}), 2, TERM))[-1], Ack)


def test_a_new_term_starts_over_at_epoch_zero(tmp_path: Path) -> None:
    emit = Emitter()
    r = Receiver({UNIT: Store(tmp_path / "store", fsync=False)}, emit=emit)
    assert isinstance(_drive(r, _transfer(_image(tmp_path, 5, {5: b"t3-e5"}), 5, TERM))[-1], Ack)
    # After a failover the new primary's epochs count from 1 again, in a higher term.
    assert isinstance(
        _drive(r, _transfer(_image(tmp_path, 1, {1: b"t4-e1"}), 1, TERM + 1))[-1], Ack
    )
    assert emit.sent == [b"t3-e5", b"t4-e1"]


def test_promotion_sends_the_output_a_failed_send_left(tmp_path: Path) -> None:
    emit = Emitter()
    r = Receiver({UNIT: Store(tmp_path / "store", fsync=False)}, emit=emit)
    emit.fail = True
    assert isinstance(_drive(r, _transfer(_image(tmp_path, 1, {1: b"out-1"}), 1, TERM))[-1], Nack)
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
