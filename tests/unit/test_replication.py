"""The replication link without sockets: the pure wire codec, and the standby's `Receiver`, the I/O
driver that carries out `standby.StandbyMachine`'s commands against a real `Store` (under
tmp_path). No root, no network.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import attrs
import pytest

from shim import delta as dl
from shim.replication import (
    Ack,
    Begin,
    Blocks,
    Code,
    Confirm,
    End,
    Heartbeat,
    Hello,
    Message,
    Nack,
    Receiver,
    Released,
    Status,
    WireError,
    decode,
    encode,
)
from shim.standby import ProtocolError, State
from shim.store import Store, StoreError


def write_checkpoint(path: Path, pages: bytes, small: dict[str, bytes]) -> Path:
    path.mkdir(parents=True)
    (path / "pages-1.img").write_bytes(pages)
    for name, data in small.items():
        (path / name).write_bytes(data)
    return path


# --- the wire codec, without sockets ------------------------------------------------------------


BATCH = dl.Batch(dl.block_digest(b"x" * 10) + dl.block_digest(b"y"), (10, 1), b"x" * 10 + b"y")
EXAMPLES: list[Message] = [
    Hello(unit="fw0", epoch=0, term=1, seq=1),
    Status(unit="fw0", epoch=0, term=2, seq=1),
    Status(
        unit="fw0",
        epoch=4,
        term=2,
        seq=1,
        committed_epoch=4,
        committed_term=2,
        manifest_id=b"\x01" * 16,
        released=(2, 3),
    ),
    Heartbeat(unit="fw0", epoch=3, term=1, seq=9),
    Begin(unit="fw0", epoch=3, term=1, seq=2, manifest=b"HMF1abc", base_epoch=2, meta={"a": 1}),
    Blocks(unit="fw0", epoch=3, term=1, seq=3, batch=BATCH),
    End(unit="fw0", epoch=3, term=1, seq=4, first_seq=2, messages=1, blocks=2),
    Ack(unit="fw0", epoch=3, term=1, seq=4),
    Ack(unit="fw0", epoch=3, term=1, seq=4, unsent=True),
    Confirm(unit="fw0", epoch=3, term=1, seq=5),
    Released(unit="fw0", epoch=3, term=1, seq=5),
    Nack(unit="fw0", epoch=3, term=2, seq=4, code=Code.STALE_TERM, reason="deposed"),
]


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(msg: Message) -> None:
    assert decode(encode(msg)) == msg


def test_a_plain_ack_and_an_old_status_carry_nothing_new() -> None:
    """A plain ack has no `unsent` field; a status without `released` reads as (0, 0)."""
    header = json.loads(encode(Ack(unit="fw0", epoch=3, term=1, seq=4))[0])
    assert "unsent" not in header
    frames = encode(Status(unit="fw0", epoch=0, term=2, seq=1))
    old = json.loads(frames[0])
    del old["released"]
    status = decode([json.dumps(old).encode()])
    assert isinstance(status, Status)
    assert status.released == (0, 0)


@pytest.mark.parametrize(
    ("field", "value"),
    [("unsent", 1), ("unsent", "yes"), ("released", [1]), ("released", [1, -1])],
)
def test_malformed_confirm_fields_are_refused(field: str, value: object) -> None:
    msg: Message = (
        Ack(unit="fw0", epoch=3, term=1, seq=4)
        if field == "unsent"
        else Status(unit="fw0", epoch=0, term=2, seq=1)
    )
    header = json.loads(encode(msg)[0])
    header[field] = value
    with pytest.raises(WireError, match=field):
        decode([json.dumps(header).encode()])


def test_a_standby_refuses_a_released_or_ack_sent_to_it(tmp_path: Path) -> None:
    r = Receiver({"fw0": Store(tmp_path / "s", fsync=False)})
    for msg in (
        Released(unit="fw0", epoch=1, term=1, seq=2),
        Ack(unit="fw0", epoch=1, term=1, seq=3, unsent=True),
    ):
        (nack,) = r.handle(msg)
        assert isinstance(nack, Nack)
        assert nack.code is Code.BAD_MESSAGE


def _frames(msg: Message, **header: object) -> list[bytes]:
    frames = encode(msg)
    fields = json.loads(frames[0])
    fields.update(header)
    return [json.dumps({k: v for k, v in fields.items() if v is not None}).encode(), *frames[1:]]


@pytest.mark.parametrize(
    ("frames", "code", "match"),
    [
        ([], Code.BAD_MESSAGE, "empty"),
        ([b"x" * 70000], Code.BAD_MESSAGE, "longer"),
        ([b"[1]"], Code.BAD_MESSAGE, "not a JSON object"),
        (_frames(EXAMPLES[0], v=2), Code.BAD_MESSAGE, "version"),
        (_frames(EXAMPLES[0], seq=-1), Code.BAD_MESSAGE, "hello"),
        (_frames(EXAMPLES[0], seq=1.5), Code.BAD_MESSAGE, "wrong type"),
        (_frames(EXAMPLES[0], term=1 << 70), Code.BAD_MESSAGE, "hello"),
        (_frames(EXAMPLES[0], unit=None), Code.BAD_MESSAGE, "missing field 'unit'"),
        ([*encode(EXAMPLES[0]), b"extra"], Code.BAD_MESSAGE, "payload frames"),
        (encode(EXAMPLES[4])[:1], Code.BAD_MESSAGE, "payload frames"),
        (_frames(EXAMPLES[4], crc=None), Code.BAD_MESSAGE, "missing field 'crc'"),
        (_frames(EXAMPLES[4], crc=[1]), Code.BAD_CHECKSUM, "frame 1"),
        (_frames(EXAMPLES[4], meta={"a": [1]}), Code.BAD_MESSAGE, "meta"),
        (_frames(EXAMPLES[5], n=3), Code.BAD_MESSAGE, "index holds"),
        (_frames(EXAMPLES[-1], code="bogus"), Code.BAD_MESSAGE, "bogus"),
    ],
)
def test_decode_refuses_bad_messages(frames: list[bytes], code: Code, match: str) -> None:
    with pytest.raises(WireError, match=match) as err:
        decode(frames)
    assert err.value.code is code


def test_blocks_index_must_match_the_data() -> None:
    frames = encode(EXAMPLES[5])
    frames[2] = frames[2] + b"z"
    header = json.loads(frames[0])
    header["crc"][1] = zlib.crc32(frames[2])
    frames[0] = json.dumps(header).encode()
    with pytest.raises(WireError, match="add up"):
        decode(frames)


def test_a_bad_message_is_answered_at_its_own_address() -> None:
    frames = _frames(EXAMPLES[4], crc=[7])
    with pytest.raises(WireError) as err:
        decode(frames)
    nack = err.value.nack(term=9)
    assert (nack.unit, nack.epoch, nack.term, nack.seq) == ("fw0", 3, 9, 2)


# --- the standby's protocol logic, without sockets ----------------------------------------------


@pytest.fixture
def receiver(tmp_path: Path) -> Receiver:
    return Receiver({"fw0": Store(tmp_path / "fw0")})


def _transfer(src: Path, epoch: int, term: int, base: dl.Base | None = None) -> list[Message]:
    delta = dl.make_delta(src, dl.scan(src, epoch), base)
    msgs: list[Message] = [
        Begin(unit="fw0", epoch=epoch, term=term, seq=10, manifest=delta.wire_manifest)
    ]
    for i, batch in enumerate(dl.iter_batches(delta, 256 << 10)):
        msgs.append(Blocks(unit="fw0", epoch=epoch, term=term, seq=11 + i, batch=batch))
    msgs.append(
        End(
            unit="fw0",
            epoch=epoch,
            term=term,
            seq=len(msgs) + 10,
            first_seq=10,
            messages=len(msgs) - 1,
            blocks=len(delta.blocks),
        )
    )
    return msgs


def _drive(receiver: Receiver, msgs: list[Message]) -> list[Message]:
    replies = []
    for msg in msgs:
        replies += receiver.handle(msg)
    return replies


@pytest.fixture
def small_src(tmp_path: Path) -> Path:
    return write_checkpoint(tmp_path / "src", os.urandom(1 << 20), {"core-1.img": b"core"})


def test_receiver_acks_only_the_end_of_a_complete_transfer(
    receiver: Receiver, small_src: Path
) -> None:
    replies = _drive(receiver, _transfer(small_src, 1, 1))
    assert replies == [Ack(unit="fw0", epoch=1, term=1, seq=replies[0].seq)]
    status = receiver.handle(Hello(unit="fw0", epoch=0, term=1, seq=50))
    assert isinstance(status[0], Status)
    assert status[0].committed_epoch == 1


def test_receiver_detects_a_lost_blocks_message(receiver: Receiver, small_src: Path) -> None:
    msgs = _transfer(small_src, 1, 1)
    del msgs[2]
    replies = _drive(receiver, msgs)
    assert len(replies) == 1
    assert isinstance(replies[0], Nack)
    assert replies[0].code is Code.SEQUENCE
    assert receiver.store("fw0").committed() is None


def test_receiver_refuses_reordered_blocks(receiver: Receiver, small_src: Path) -> None:
    msgs = _transfer(small_src, 1, 1)
    msgs[1], msgs[2] = msgs[2], msgs[1]
    replies = _drive(receiver, msgs)
    # The first failure is reported at once, and the end repeats it.
    assert [(type(r), getattr(r, "code", None)) for r in replies] == [
        (Nack, Code.SEQUENCE),
        (Nack, Code.SEQUENCE),
    ]


def test_receiver_refuses_what_a_standby_never_receives(receiver: Receiver) -> None:
    (reply,) = receiver.handle(EXAMPLES[7])
    assert isinstance(reply, Nack)
    assert reply.code is Code.BAD_MESSAGE


def test_receiver_survives_a_failing_store(
    receiver: Receiver, small_src: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    msgs = _transfer(small_src, 1, 1)

    def disk_full(*_args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(receiver.store("fw0"), "put_block", disk_full)
    replies = _drive(receiver, msgs)
    assert isinstance(replies[0], Nack)
    assert replies[0].code is Code.INTERNAL
    assert "No space left" in replies[0].reason
    monkeypatch.undo()
    assert isinstance(_drive(receiver, _transfer(small_src, 1, 1))[-1], Ack)


def test_a_deposed_primary_cannot_disturb_the_new_one(receiver: Receiver, small_src: Path) -> None:
    old = _transfer(small_src, 1, 1)
    new = _transfer(small_src, 1, 2)
    replies = _drive(receiver, old[:2])  # the old primary is mid-transfer ...
    replies += _drive(receiver, [new[0]])  # ... when the new one begins under a higher term
    replies += _drive(receiver, old[2:])  # the old one's late blocks and end
    (last,) = replies  # nothing but the old end's answer
    assert isinstance(last, Nack)
    assert (last.epoch, last.term, last.seq, last.code) == (1, 2, old[-1].seq, Code.STALE_TERM)
    assert receiver.store("fw0").assembling == (1, 2)
    assert _drive(receiver, new[1:]) == [Ack(unit="fw0", epoch=1, term=2, seq=new[-1].seq)]


def test_after_promotion_every_old_message_learns_the_new_term(
    receiver: Receiver, small_src: Path
) -> None:
    msgs = _transfer(small_src, 1, 1)
    _drive(receiver, msgs[:2])
    assert receiver.promote("fw0", 2) is None
    for msg in (msgs[-1], Hello(unit="fw0", epoch=0, term=2, seq=99)):
        (reply,) = receiver.handle(msg)
        assert isinstance(reply, Nack)
        assert (reply.code, reply.term) == (Code.STALE_TERM, 2)
    assert receiver.store("fw0").committed() is None


# --- the Receiver only drives: the machine's decisions reach the wire and the store ------------


def _codes(replies: list[Message]) -> list[Code | None]:
    return [r.code if isinstance(r, Nack) else None for r in replies]


def test_receiver_answers_a_refused_begin_and_its_end_alike(
    receiver: Receiver, small_src: Path, tmp_path: Path
) -> None:
    """A delta against a base this standby lacks is refused at once, the rest of the transfer is
    dropped, and its end gets the same nack: exactly one reply per failure plus one per end."""
    other = write_checkpoint(tmp_path / "other", os.urandom(64 << 10), {"core-1.img": b"x"})
    msgs = _transfer(small_src, 2, 1, dl.Base.of(dl.scan(other, 1)))
    replies = _drive(receiver, msgs)
    assert _codes(replies) == [Code.BASE_MISMATCH, Code.BASE_MISMATCH]
    assert [r.seq for r in replies] == [msgs[0].seq, msgs[-1].seq]
    assert receiver.store("fw0").assembling is None


def test_receiver_commits_a_delta_against_what_it_committed(
    receiver: Receiver, small_src: Path
) -> None:
    assert isinstance(_drive(receiver, _transfer(small_src, 1, 1))[-1], Ack)
    with (small_src / "core-1.img").open("ab") as f:
        f.write(b" two")
    committed = receiver.store("fw0").committed()
    assert committed is not None
    msgs = _transfer(small_src, 2, 1, committed.base)
    assert len(msgs) == 3  # begin, one small batch, end
    assert _drive(receiver, msgs) == [Ack(unit="fw0", epoch=2, term=1, seq=msgs[-1].seq)]


def test_receiver_never_commits_an_image_that_fails_verification(
    receiver: Receiver, small_src: Path
) -> None:
    """Every block matches its digest, but a file's sha256 does not: the store's verdict at
    commit decides, and the nack says so."""
    manifest = dl.scan(small_src, 1)
    files = list(manifest.files)
    files[0] = attrs.evolve(files[0], sha256=bytes(32))
    lying = dl.Manifest(1, tuple(files))
    delta = dl.make_delta(small_src, lying, None)
    msgs = _transfer(small_src, 1, 1)
    begin = msgs[0]
    assert isinstance(begin, Begin)
    msgs[0] = attrs.evolve(begin, manifest=delta.wire_manifest)
    replies = _drive(receiver, msgs)
    (nack,) = replies
    assert isinstance(nack, Nack)
    assert nack.code is Code.VERIFY_FAILED
    assert "sha256 differs" in nack.reason
    store = receiver.store("fw0")
    assert store.committed() is None
    assert store.assembling is None
    assert not list(store.root.glob("assembling.*"))


def test_a_stale_begin_does_not_disturb_the_current_transfer(
    receiver: Receiver, small_src: Path
) -> None:
    current = _transfer(small_src, 1, 2)
    stale = _transfer(small_src, 1, 1)
    replies = _drive(receiver, current[:2])
    replies += _drive(receiver, stale)
    assert _codes(replies) == [Code.STALE_TERM, Code.STALE_TERM]  # its begin, then its end
    assert all(r.term == 2 for r in replies)
    assert _drive(receiver, current[2:]) == [Ack(unit="fw0", epoch=1, term=2, seq=current[-1].seq)]


@pytest.mark.parametrize("how", ["frame", "block"])
def test_damage_in_flight_dooms_the_transfer_it_belongs_to(
    receiver: Receiver, small_src: Path, how: str
) -> None:
    msgs = _transfer(small_src, 1, 1)
    replies = _drive(receiver, msgs[:2])
    victim = msgs[2]
    assert isinstance(victim, Blocks)
    data = bytearray(victim.batch.data)
    data[-1] ^= 1
    if how == "frame":  # the frame crc catches it before any parsing
        frames = encode(victim)
        frames[2] = bytes(data)
    else:  # a well-formed message around a wrong block: only the block digest can tell
        frames = encode(attrs.evolve(victim, batch=attrs.evolve(victim.batch, data=bytes(data))))
    (nack,) = (decode(f) for f in receiver.receive(frames))
    assert isinstance(nack, Nack)
    assert (nack.code, nack.epoch, nack.seq) == (Code.BAD_CHECKSUM, 1, victim.seq)
    assert ("crc" if how == "frame" else "does not match its checksum") in nack.reason
    assert receiver.store("fw0").assembling is None
    replies += _drive(receiver, msgs[3:])
    assert _codes(replies[-1:]) == [Code.BAD_CHECKSUM]
    assert receiver.store("fw0").committed() is None
    assert isinstance(_drive(receiver, _transfer(small_src, 1, 1))[-1], Ack)


def test_a_store_error_restarts_the_unit_from_what_its_store_holds(
    receiver: Receiver, small_src: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert isinstance(_drive(receiver, _transfer(small_src, 1, 1))[-1], Ack)
    store = receiver.store("fw0")
    committed = store.committed()
    assert committed is not None

    def refuse() -> None:
        raise StoreError("checkpoint.2.1 already exists")

    monkeypatch.setattr(store, "commit", refuse)
    (nack,) = _drive(receiver, _transfer(small_src, 2, 1, committed.base))
    assert isinstance(nack, Nack)
    assert nack.code is Code.STORE_ERROR
    assert "already exists" in nack.reason
    assert store.committed() == committed
    assert not list(store.root.glob("assembling.*"))
    assert receiver.machine("fw0").state is State.IDLE
    monkeypatch.undo()
    assert isinstance(_drive(receiver, _transfer(small_src, 2, 1, committed.base))[-1], Ack)


def test_a_restarted_receiver_picks_up_its_term_commit_and_promotion(
    tmp_path: Path, small_src: Path
) -> None:
    first = Receiver({"fw0": Store(tmp_path / "fw0")})
    assert isinstance(_drive(first, _transfer(small_src, 1, 3))[-1], Ack)
    again = Receiver({"fw0": Store(tmp_path / "fw0")})
    (status,) = again.handle(Hello(unit="fw0", epoch=0, term=3, seq=1))
    assert isinstance(status, Status)
    assert (status.committed_epoch, status.committed_term, status.term) == (1, 3, 3)
    # A resend after a lost ack is acked again, across the restart.
    assert isinstance(_drive(again, _transfer(small_src, 1, 3))[-1], Ack)
    assert _codes(_drive(again, _transfer(small_src, 2, 2))) == [Code.STALE_TERM] * 2
    assert again.promote("fw0", 4) is not None
    last = Receiver({"fw0": Store(tmp_path / "fw0")})
    assert last.machine("fw0").state is State.PROMOTED
    assert _codes(last.handle(Heartbeat(unit="fw0", epoch=0, term=4, seq=1))) == [Code.STALE_TERM]


def test_a_term_seen_only_in_a_heartbeat_survives_a_restart(tmp_path: Path) -> None:
    first = Receiver({"fw0": Store(tmp_path / "fw0")})
    (beat,) = first.handle(Heartbeat(unit="fw0", epoch=0, term=7, seq=1))
    assert isinstance(beat, Heartbeat)
    assert beat.term == 7
    again = Receiver({"fw0": Store(tmp_path / "fw0")})
    (nack,) = again.handle(Hello(unit="fw0", epoch=0, term=6, seq=1))
    assert isinstance(nack, Nack)
    assert (nack.code, nack.term) == (Code.STALE_TERM, 7)


def test_promotion_must_raise_the_term_and_may_be_repeated(
    receiver: Receiver, small_src: Path
) -> None:
    assert isinstance(_drive(receiver, _transfer(small_src, 1, 3))[-1], Ack)
    with pytest.raises(ProtocolError, match="must raise the term"):
        receiver.promote("fw0", 3)
    restore = receiver.promote("fw0", 4)
    assert restore is not None
    assert restore.epoch == 1
    assert receiver.promote("fw0", 4) == restore
    assert receiver.store("fw0").promoted == 4


def test_a_unit_added_at_run_time_is_served_and_a_removed_one_refused(
    tmp_path: Path, small_src: Path
) -> None:
    receiver = Receiver({})
    (nack,) = receiver.handle(Hello(unit="fw0", epoch=0, term=1, seq=1))
    assert isinstance(nack, Nack)
    assert nack.code is Code.UNKNOWN_UNIT
    receiver.add("fw0", Store(tmp_path / "fw0"))
    assert receiver.units == frozenset({"fw0"})
    assert isinstance(_drive(receiver, _transfer(small_src, 1, 1))[-1], Ack)
    with pytest.raises(ValueError, match="already a standby for fw0"):
        receiver.add("fw0", Store(tmp_path / "fw0"))
    store = receiver.remove("fw0")
    assert store is not None
    assert store.committed() is not None  # its files stay, for the caller to remove
    assert receiver.remove("fw0") is None
    (nack,) = receiver.handle(Hello(unit="fw0", epoch=0, term=1, seq=2))
    assert isinstance(nack, Nack)
    assert nack.code is Code.UNKNOWN_UNIT
    # Added again, it starts from what the store holds durably, as after a restart.
    receiver.add("fw0", Store(tmp_path / "fw0"))
    (status,) = receiver.handle(Hello(unit="fw0", epoch=0, term=1, seq=3))
    assert isinstance(status, Status)
    assert (status.committed_epoch, status.committed_term) == (1, 1)
