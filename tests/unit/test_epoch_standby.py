"""Playbook tests of the standby's epoch machine and its store contract (shim/standby.py)."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Mapping

import attrs
import pytest

from shim import delta as dl
from shim.delta import BLOCK_SIZE
from shim.standby import (
    TRANSITIONS,
    Chunk,
    Code,
    Command,
    Commit,
    CommittedImage,
    Damaged,
    DropAssembly,
    Event,
    Greeting,
    Ignored,
    ImageEnd,
    Manifest,
    Promote,
    ProtocolError,
    RecordTerm,
    Reject,
    SendAck,
    SendStatus,
    StandbyMachine,
    StartAssembly,
    State,
    StoreChunk,
    Verified,
)
from tests.unit.playbook import Playbook

UNIT = "nat0"
TERM = 5
PAGES = bytes(range(256)) * 16 + b"\x01" * BLOCK_SIZE + b"\x02" * 100
CORE = b"core"
FILES = {"pages.img": PAGES, "core.img": CORE}
SENT = "sender sent (begin seq, messages, blocks)"


def split(data: bytes) -> list[bytes]:
    return [data[i : i + BLOCK_SIZE] for i in range(0, len(data), BLOCK_SIZE)]


def image(epoch: int, files: Mapping[str, bytes] = FILES) -> dl.Manifest:
    return dl.Manifest(
        epoch,
        tuple(
            dl.FileEntry(
                path,
                len(data),
                hashlib.sha256(data).digest(),
                b"".join(dl.block_digest(b) for b in split(data)),
            )
            for path, data in files.items()
        ),
    )


def wire(manifest: dl.Manifest, base: dl.Manifest | None = None) -> bytes:
    return dl.encode_manifest(manifest, None if base is None else dl.Base.of(base))


def needed(files: Mapping[str, bytes], base: Mapping[str, bytes] | None = None) -> list[bytes]:
    """The distinct blocks of `files` that the base lacks: what the primary ships."""
    have = {dl.block_digest(b) for data in (base or {}).values() for b in split(data)}
    out: list[bytes] = []
    for data in files.values():
        for block in split(data):
            d = dl.block_digest(block)
            if d not in have:
                have.add(d)
                out.append(block)
    return out


def batch(blocks: Iterable[bytes]) -> dl.Batch:
    blocks = list(blocks)
    return dl.Batch(
        b"".join(dl.block_digest(b) for b in blocks),
        tuple(len(b) for b in blocks),
        b"".join(blocks),
    )


def manifest(
    epoch: int,
    term: int = TERM,
    files: Mapping[str, bytes] = FILES,
    base: Mapping[str, bytes] | None = None,
    *,
    base_epoch: int = 0,
    seq: int = 1,
) -> Manifest:
    old = None if base is None else image(base_epoch, base)
    return Manifest(UNIT, epoch, term, seq, wire(image(epoch, files), old))


def chunk(epoch: int, seq: int, blocks: Iterable[bytes], term: int = TERM) -> Chunk:
    return Chunk(UNIT, epoch, term, seq, batch(blocks))


def end(
    epoch: int, seq: int, messages: int, blocks: int, *, term: int = TERM, first: int = 1
) -> ImageEnd:
    return ImageEnd(UNIT, epoch, term, seq, first, messages, blocks)


def reject(epoch: int, seq: int, code: Code, reason: str, term: int = TERM) -> Reject:
    return Reject(UNIT, epoch, term, seq, code, reason)


def committed(
    m: StandbyMachine,
    epoch: int,
    term: int = TERM,
    files: Mapping[str, bytes] = FILES,
    base: Mapping[str, bytes] | None = None,
) -> Playbook:
    """Extend a playbook with one complete, valid transfer: begin, two batches, end, commit."""
    assert (base is None) == (m.last_committed is None or m.last_committed.term != term)
    base_epoch = 0 if m.last_committed is None else m.last_committed.epoch
    blocks = needed(files, base)
    parts = [blocks[:1], blocks[1:]]
    pb = Playbook(m) >> manifest(epoch, term, files, base, base_epoch=base_epoch)
    if m.term < term:
        pb << RecordTerm(term)
    pb << StartAssembly(epoch, term, image(epoch, files), {})
    for i, part in enumerate(parts, 2):
        pb >> chunk(epoch, i, part, term) << StoreChunk(epoch, term, batch(part))
    pb >> end(epoch, 4, 2, len(blocks), term=term) << Commit(epoch, term)
    pb >> Verified(epoch, term, ok=True) << SendAck(UNIT, epoch, term, 4)
    assert pb
    return pb


def test_a_complete_image_is_committed_then_acked() -> None:
    m = StandbyMachine(UNIT)
    committed(m, 1)
    assert m.last_committed == CommittedImage(1, TERM, image(1))
    assert m.state is State.IDLE
    changed = {"pages.img": PAGES[:-100] + b"\x03" * 100, "core.img": b"core two"}
    committed(m, 2, files=changed, base=FILES)
    assert m.last_committed == CommittedImage(2, TERM, image(2, changed))


def test_an_unchanged_image_needs_no_blocks() -> None:
    m = StandbyMachine(UNIT, TERM)
    committed(m, 1)
    assert (
        Playbook(m)
        >> manifest(2, base=FILES, base_epoch=1)
        << StartAssembly(2, TERM, image(2), {})
        >> end(2, 2, 0, 0)
        << Commit(2, TERM)
        >> Verified(2, TERM, ok=True)
        << SendAck(UNIT, 2, TERM, 2)
    )


def test_blocks_may_come_in_any_order_across_batches() -> None:
    m = StandbyMachine(UNIT, TERM)
    blocks = needed(FILES)[::-1]
    assert (
        Playbook(m)
        >> manifest(1)
        << StartAssembly
        >> chunk(1, 2, blocks[:2])
        << StoreChunk(1, TERM, batch(blocks[:2]))
        >> chunk(1, 3, blocks[2:])
        << StoreChunk(1, TERM, batch(blocks[2:]))
        >> end(1, 4, 2, len(blocks))
        << Commit(1, TERM)
    )


# --- nothing unverified is committed, nothing partial is acked ---------------------------------


def test_a_bad_block_rejects_the_transfer_and_is_never_committed() -> None:
    m = StandbyMachine(UNIT, TERM)
    bad = "block 00ff does not match its checksum"
    assert (
        Playbook(m)
        >> manifest(1)
        << StartAssembly
        >> chunk(1, 2, needed(FILES)[:1])
        << StoreChunk
        >> Verified(1, TERM, ok=False, reason=bad)
        << DropAssembly(1, TERM)
        << reject(1, 2, Code.BAD_CHECKSUM, bad)
        >> chunk(1, 3, needed(FILES)[1:])
        << Ignored
        >> end(1, 4, 2, 4)
        << reject(1, 4, Code.BAD_CHECKSUM, bad)
    )
    assert m.last_committed is None
    assert m.state is State.IDLE


def test_an_image_that_fails_verification_is_not_acked_and_the_old_one_stays() -> None:
    m = StandbyMachine(UNIT, TERM)
    committed(m, 1)
    why = "pages.img: sha256 differs from the manifest"
    assert (
        Playbook(m)
        >> manifest(2, files={"pages.img": PAGES}, base=FILES, base_epoch=1)
        << StartAssembly
        >> end(2, 2, 0, 0)
        << Commit(2, TERM)
        >> Verified(2, TERM, ok=False, reason=why)
        << DropAssembly(2, TERM)
        << reject(2, 2, Code.VERIFY_FAILED, why)
    )
    assert m.last_committed == CommittedImage(1, TERM, image(1))


@pytest.mark.parametrize(
    ("events", "why"),
    [
        # A batch went missing: the end's counts say so.
        ([chunk(1, 2, needed(FILES)), end(1, 4, 2, 4)], "(1, 2, 4), received (1, 1, 4)"),
        # The end itself came before the last batch.
        ([chunk(1, 2, needed(FILES)[:1]), end(1, 3, 2, 4)], "(1, 2, 4), received (1, 1, 1)"),
        # Nothing at all arrived.
        ([end(1, 2, 1, 4)], "(1, 1, 4), received (1, 0, 0)"),
    ],
)
def test_a_partial_image_is_never_committed_or_acked(events: list[Event], why: str) -> None:
    m = StandbyMachine(UNIT, TERM)
    pb = Playbook(m) >> manifest(1) << StartAssembly
    for event in events[:-1]:
        pb >> event << StoreChunk
    final = events[-1]
    assert isinstance(final, ImageEnd)
    refusal = reject(1, final.seq, Code.SEQUENCE, f"{SENT} {why}")
    assert pb >> final << DropAssembly(1, TERM) << refusal
    assert not any(isinstance(c, Commit | SendAck) for c in pb.commands)
    assert m.last_committed is None


def test_an_image_is_only_committed_on_the_stores_word() -> None:
    """Even a transfer whose counts add up is acked only after the store verified it."""
    m = StandbyMachine(UNIT, TERM)
    out = Playbook(m) >> manifest(1) << StartAssembly >> end(1, 2, 0, 0) << Commit(1, TERM)
    assert out
    assert m.state is State.COMMITTING
    assert m.last_committed is None
    for event in (manifest(2), chunk(1, 3, [CORE]), end(1, 3, 0, 0), Promote(TERM + 1)):
        with pytest.raises(ProtocolError):
            m.handle(event)
    with pytest.raises(ProtocolError, match="answers nothing"):
        m.handle(Verified(2, TERM, ok=True))


@pytest.mark.parametrize("seq", [1, 2])
def test_reordered_or_repeated_batches_reject_the_transfer(seq: int) -> None:
    m = StandbyMachine(UNIT, TERM)
    assert (
        Playbook(m)
        >> manifest(1)
        << StartAssembly
        >> chunk(1, 2, needed(FILES)[:1])
        << StoreChunk
        >> chunk(1, seq, needed(FILES)[1:])
        << DropAssembly(1, TERM)
        << reject(1, seq, Code.SEQUENCE, f"seq {seq} after 2")
        >> end(1, 4, 2, 4)
        << reject(1, 4, Code.SEQUENCE, f"seq {seq} after 2")
    )


def test_a_damaged_message_dooms_its_transfer_only() -> None:
    m = StandbyMachine(UNIT, TERM)
    committed(m, 1)
    crc = "frame 2 of blocks fails its crc"
    assert (
        Playbook(m)
        >> Damaged(UNIT, 7, TERM, 9, Code.BAD_CHECKSUM, crc)  # not the open transfer's
        << reject(7, 9, Code.BAD_CHECKSUM, crc)
        >> manifest(2, base=FILES, base_epoch=1)
        << StartAssembly
        >> Damaged(UNIT, None, None, 0, Code.BAD_MESSAGE, "missing field 'term'")
        << reject(0, 0, Code.BAD_MESSAGE, "missing field 'term'")
        >> Damaged(UNIT, 2, TERM, 2, Code.BAD_CHECKSUM, crc)
        << DropAssembly(2, TERM)
        << reject(2, 2, Code.BAD_CHECKSUM, crc)
        >> chunk(2, 3, [CORE])
        << Ignored
        >> end(2, 4, 2, 1)
        << reject(2, 4, Code.BAD_CHECKSUM, crc)
    )
    assert m.last_committed == CommittedImage(1, TERM, image(1))


def test_a_new_manifest_abandons_the_image_in_progress() -> None:
    """One assembly at a time; the superseded transfer's end finds nothing to complete."""
    m = StandbyMachine(UNIT, TERM)
    committed(m, 1)
    assert (
        Playbook(m)
        >> manifest(2, base=FILES, base_epoch=1)
        << StartAssembly(2, TERM, image(2), {})
        >> manifest(3, seq=10)
        << DropAssembly(2, TERM)
        << StartAssembly(3, TERM, image(3), {})
        >> end(2, 5, 0, 0)
        << reject(2, 5, Code.NO_TRANSFER, f"no transfer of epoch 2 term {TERM}")
    )
    assert m.assembling == (3, TERM)
    assert m.last_committed == CommittedImage(1, TERM, image(1))


@pytest.mark.parametrize(
    ("data", "code", "why"),
    [
        (b"not a manifest", Code.BAD_MANIFEST, "bad magic"),
        (wire(image(1))[:-3], Code.BAD_MANIFEST, "truncated"),
        (wire(image(4)), Code.BAD_MANIFEST, "manifest is for epoch 4, not 1"),
        (wire(dl.Manifest(1, ())), Code.BAD_MANIFEST, "manifest lists no files"),
        (wire(image(1), image(0)), Code.BASE_MISMATCH, "no base checkpoint here"),
    ],
)
def test_bad_manifests_are_rejected(data: bytes, code: Code, why: str) -> None:
    m = StandbyMachine(UNIT, TERM)
    pb = Playbook(m) >> Manifest(UNIT, 1, TERM, 1, data) << Reject
    assert pb
    refusal = pb.commands[-1]
    assert isinstance(refusal, Reject)
    assert refusal.code is code
    assert why in refusal.reason
    assert m.state is State.REJECTED
    assert Playbook(m) >> chunk(1, 2, [CORE]) << Ignored >> end(1, 3, 1, 1) << Reject
    assert m.state is State.IDLE


def test_a_delta_needs_its_base_committed_here() -> None:
    m = StandbyMachine(UNIT, TERM)
    committed(m, 1)
    other = {"pages.img": PAGES, "core.img": b"another core"}
    pb = Playbook(m) >> manifest(2, base=other, base_epoch=1) << Reject
    assert pb
    refusal = pb.commands[-1]
    assert isinstance(refusal, Reject)
    assert refusal.code is Code.BASE_MISMATCH
    assert "another content" in refusal.reason


# --- term and epoch order ----------------------------------------------------------------------


def test_a_stale_term_is_rejected_and_leaves_the_current_transfer_alone() -> None:
    m = StandbyMachine(UNIT, TERM)
    stale = f"term {TERM - 1} is stale: this standby has seen {TERM}"
    blocks = needed(FILES)
    assert (
        Playbook(m)
        >> manifest(1)
        << StartAssembly
        >> chunk(1, 2, blocks[:1])
        << StoreChunk
        >> manifest(1, term=TERM - 1, seq=50)
        << reject(1, 50, Code.STALE_TERM, stale)
        >> chunk(1, 51, [CORE], term=TERM - 1)
        << Ignored
        >> end(1, 52, 1, 1, term=TERM - 1, first=50)
        << reject(1, 52, Code.STALE_TERM, stale)
        >> Greeting(UNIT, 0, TERM - 1, 53)
        << reject(0, 53, Code.STALE_TERM, stale)
        >> chunk(1, 3, blocks[1:])
        << StoreChunk
        >> end(1, 4, 2, len(blocks))
        << Commit(1, TERM)
        >> Verified(1, TERM, ok=True)
        << SendAck(UNIT, 1, TERM, 4)
    )


def test_epochs_only_move_forward_within_a_term() -> None:
    m = StandbyMachine(UNIT, TERM)
    committed(m, 4)
    why = f"epoch 3 of term {TERM}: epoch 4 is committed"
    assert Playbook(m) >> manifest(3) << reject(3, 1, Code.STALE_EPOCH, why)
    # Gaps are fine: epochs whose checkpoint failed are never shipped.
    committed(m, 7, base=FILES)


def test_a_higher_term_is_recorded_deposes_the_old_transfer_and_needs_a_full_image() -> None:
    m = StandbyMachine(UNIT, TERM)
    committed(m, 9)
    new = TERM + 1
    stale = f"term {TERM} is stale: this standby has seen {new}"
    assert (
        Playbook(m)
        >> manifest(10, base=FILES, base_epoch=9)
        << StartAssembly
        >> manifest(2, term=new, base=FILES, base_epoch=9, seq=20)
        << DropAssembly(10, TERM)
        << RecordTerm(new)
        << Reject
        >> end(10, 2, 0, 0)
        << reject(10, 2, Code.STALE_TERM, stale, term=new)
    )
    assert m.term == new
    committed(m, 2, term=new)  # epochs may start afresh in a new term


@pytest.mark.parametrize(
    "event",
    [Greeting(UNIT, 0, TERM + 1, 9), end(3, 9, 0, 0, term=TERM + 1)],
    ids=["greeting", "end"],
)
def test_any_message_of_a_higher_term_deposes_the_transfer(event: Event) -> None:
    m = StandbyMachine(UNIT, TERM)
    pb = Playbook(m) >> manifest(1) << StartAssembly >> event << DropAssembly(1, TERM)
    pb << RecordTerm(TERM + 1)
    assert pb << (SendStatus if isinstance(event, Greeting) else Reject)
    assert m.state is State.IDLE
    assert Playbook(m) >> chunk(1, 2, [CORE]) << Ignored


def test_a_repeated_image_is_acked_again_without_transfer() -> None:
    m = StandbyMachine(UNIT, TERM)
    committed(m, 1)
    assert (
        Playbook(m)
        >> manifest(1, seq=7)
        >> chunk(1, 8, needed(FILES))
        >> end(1, 9, 1, 4, first=7)
        << SendAck(UNIT, 1, TERM, 9)
        # Counted all the same: a lost batch is not acked.
        >> manifest(1, seq=10)
        >> end(1, 12, 1, 4, first=10)
        << reject(1, 12, Code.SEQUENCE, f"{SENT} (10, 1, 4), received (10, 0, 0)")
    )
    assert m.last_committed == CommittedImage(1, TERM, image(1))


def test_greetings_report_the_term_and_the_committed_image() -> None:
    m = StandbyMachine(UNIT)
    assert (
        Playbook(m)
        >> Greeting(UNIT, 0, 3, 1)
        << RecordTerm(3)
        << SendStatus(UNIT, 1, 3, None, None, None)
    )
    committed(m, 1, term=3)
    base_id = dl.manifest_digest(image(1))
    assert Playbook(m) >> Greeting(UNIT, 0, 3, 9) << SendStatus(UNIT, 9, 3, 1, 3, base_id)


def test_messages_for_another_unit_are_ignored() -> None:
    m = StandbyMachine(UNIT, TERM)
    other = attrs.evolve(manifest(1), unit="other")
    assert Playbook(m) >> other << Ignored(other, "for unit other, this is nat0")


# --- I3: promotion -----------------------------------------------------------------------------


def test_after_promotion_no_term_is_ever_acked_again() -> None:
    m = StandbyMachine(UNIT, TERM)
    committed(m, 1)
    new = TERM + 1

    def stale(term: int) -> str:
        return f"term {term} is stale: promoted at term {new}"

    gone = f"promoted to primary at term {new}: no longer a standby"
    assert (
        Playbook(m)
        >> manifest(2, base=FILES, base_epoch=1)
        << StartAssembly
        >> Promote(new)
        << DropAssembly(2, TERM)
        << RecordTerm(new, promoted=True)
        >> chunk(2, 2, [CORE])
        << Ignored
        >> end(2, 3, 1, 1)
        << reject(2, 3, Code.STALE_TERM, stale(TERM), term=new)
        >> manifest(1)
        << reject(1, 1, Code.STALE_TERM, stale(TERM), term=new)
        >> manifest(2, term=new)
        << reject(2, 1, Code.STALE_TERM, stale(new), term=new)
        >> manifest(2, term=new + 1)
        << reject(2, 1, Code.UNKNOWN_UNIT, gone, term=new)
        >> Greeting(UNIT, 0, new, 5)
        << reject(0, 5, Code.STALE_TERM, stale(new), term=new)
        >> Promote(new)
    )
    assert m.state is State.PROMOTED
    assert m.last_committed == CommittedImage(1, TERM, image(1))
    with pytest.raises(ProtocolError, match="already promoted"):
        m.handle(Promote(new + 1))


def test_promotion_must_raise_the_term() -> None:
    m = StandbyMachine(UNIT, TERM)
    with pytest.raises(ProtocolError, match="must raise the term"):
        m.handle(Promote(TERM))


def test_every_state_handles_every_link_event_by_the_table() -> None:
    assert set(TRANSITIONS) == set(State)
    link = {Greeting, Manifest, Chunk, ImageEnd, Damaged}
    for state, table in TRANSITIONS.items():
        if state is State.COMMITTING:
            # The driver reports the outcome of Commit before it handles anything else.
            assert set(table) == {Verified}
        else:
            assert link | {Promote} <= set(table)
    assert {s for s, table in TRANSITIONS.items() if Verified in table} == {
        State.ASSEMBLING,
        State.COMMITTING,
    }
    with pytest.raises(ProtocolError):
        StandbyMachine(UNIT).handle(Event())


# --- the store's contract: a crash keeps the last committed image -------------------------------


@attrs.define
class FakeStore:
    """The store's contract in memory, driven the way `replication.Receiver` drives the real one.

    It checks each block against its digest and every file against its sha256 at commit, and it
    refuses to hold two assemblies at once.
    """

    files: dict[str, bytes] = attrs.field(factory=dict)
    image: CommittedImage | None = None
    term: int = 0
    promoted: int | None = None
    assembly: tuple[int, int, dl.Manifest] | None = None
    blocks: dict[bytes, bytes] = attrs.field(factory=dict)

    def run(self, m: StandbyMachine, event: Event) -> list[Command]:
        out: list[Command] = []
        follow: Event | None = event
        while follow is not None:
            commands = m.handle(follow)
            out += commands
            follow = None
            for c in commands:
                assert follow is None, "a command that gives a verdict must end its list"
                follow = self.apply(c)
        return out

    def apply(self, c: Command) -> Event | None:
        match c:
            case RecordTerm(term=term, promoted=promoted):
                assert term >= self.term
                self.term = term
                if promoted:
                    self.promoted = term
            case StartAssembly(epoch=epoch, term=term, manifest=man):
                assert self.assembly is None, "two assemblies at once"
                self.assembly, self.blocks = (epoch, term, man), {}
            case StoreChunk(epoch=epoch, term=term, batch=b):
                assert self.assembly is not None
                assert self.assembly[:2] == (epoch, term)
                known = self.assembly[2].digest_set()
                for digest, data in b.items():
                    if digest not in known or dl.block_digest(data) != digest:
                        return Verified(epoch, term, ok=False, reason="bad block")
                    self.blocks[digest] = bytes(data)
            case DropAssembly(epoch=epoch, term=term):
                assert self.assembly is not None
                assert self.assembly[:2] == (epoch, term)
                self.assembly = None
            case Commit(epoch=epoch, term=term):
                assert self.assembly is not None
                assert self.assembly[:2] == (epoch, term)
                return self._commit(*self.assembly)
        return None

    def _commit(self, epoch: int, term: int, man: dl.Manifest) -> Verified:
        have = {dl.block_digest(b): b for data in self.files.values() for b in split(data)}
        have.update(self.blocks)
        rebuilt = {}
        for f in man.files:
            parts = [have.get(f.digest(i)) for i in range(f.nblocks)]
            content = b"".join(p for p in parts if p is not None)
            if None in parts or hashlib.sha256(content).digest() != f.sha256:
                return Verified(epoch, term, ok=False, reason=f"{f.path} does not verify")
            rebuilt[f.path] = content
        self.files, self.image, self.assembly = rebuilt, CommittedImage(epoch, term, man), None
        return Verified(epoch, term, ok=True)

    def crash_and_restart(self, unit: str) -> StandbyMachine:
        self.assembly = None
        return StandbyMachine(unit, self.term, self.image, promoted=self.promoted)


def test_a_crash_while_assembling_leaves_the_last_committed_image_intact() -> None:
    store = FakeStore()
    m = StandbyMachine(UNIT)
    for event in transfer(1, TERM, FILES, None, seq=1):
        store.run(m, event)
    assert store.files == FILES
    new = {"pages.img": b"new" * 900}
    events = transfer(2, TERM, new, FILES, seq=10)
    store.run(m, events[0])
    store.run(m, events[1])
    assert store.assembly is not None
    m = store.crash_and_restart(UNIT)
    assert store.files == FILES
    assert m.last_committed == CommittedImage(1, TERM, image(1))
    assert m.term == TERM
    # The rest of the interrupted transfer finds nothing to complete ...
    assert [type(c) for c in store.run(m, events[-1])] == [Reject]
    # ... and epoch 2 comes again over the new link, still as a delta against the intact epoch 1.
    acks = [c for e in transfer(2, TERM, new, FILES, seq=1) for c in store.run(m, e)]
    assert acks[-1] == SendAck(UNIT, 2, TERM, 3)
    assert store.files == new


def test_a_restart_remembers_a_higher_term_and_a_promotion() -> None:
    store = FakeStore()
    m = StandbyMachine(UNIT)
    for event in transfer(1, TERM, FILES, None, seq=1):
        store.run(m, event)
    store.run(m, Greeting(UNIT, 0, TERM + 1, 9))
    m = store.crash_and_restart(UNIT)
    assert m.handle(manifest(2, base=FILES, base_epoch=1))[0] == reject(
        2, 1, Code.STALE_TERM, f"term {TERM} is stale: this standby has seen {TERM + 1}", TERM + 1
    )
    store.run(m, Promote(TERM + 2))
    m = store.crash_and_restart(UNIT)
    assert m.state is State.PROMOTED
    assert m.handle(Promote(TERM + 2)) == []
    (refusal,) = m.handle(manifest(2, term=TERM + 2))
    assert isinstance(refusal, Reject)
    assert refusal.code is Code.STALE_TERM


def test_a_store_whose_term_is_below_its_image_is_refused() -> None:
    with pytest.raises(ValueError, match="below the committed image's term"):
        StandbyMachine(UNIT, 1, CommittedImage(1, 2, image(1)))
    with pytest.raises(ValueError, match="below the promotion's term"):
        StandbyMachine(UNIT, 1, promoted=2)


# --- randomized transfers ----------------------------------------------------------------------


def transfer(
    epoch: int,
    term: int,
    files: Mapping[str, bytes],
    base: Mapping[str, bytes] | None,
    *,
    seq: int,
    base_epoch: int = 1,
    rng: random.Random | None = None,
) -> list[Event]:
    """What a primary sends: begin, the missing blocks in batches of one to three, end."""
    blocks = needed(files, base)
    events: list[Event] = [manifest(epoch, term, files, base, base_epoch=base_epoch, seq=seq)]
    i = 0
    while i < len(blocks):
        n = rng.randrange(1, 4) if rng is not None else 2
        events.append(chunk(epoch, seq + len(events), blocks[i : i + n], term))
        i += n
    events.append(end(epoch, seq + len(events), len(events) - 1, len(blocks), term=term, first=seq))
    return events


def damage(rng: random.Random, events: list[Event]) -> str | None:
    """Damage the transfer in one of the ways a link can; say how (None: left intact)."""
    at = [i for i, e in enumerate(events) if isinstance(e, Chunk)]
    roll = rng.random()
    if roll < 0.08 and at:
        i = rng.choice(at)
        victim = events[i]
        assert isinstance(victim, Chunk)
        data = bytearray(victim.batch.data)
        data[rng.randrange(len(data))] ^= 1
        events[i] = attrs.evolve(victim, batch=attrs.evolve(victim.batch, data=bytes(data)))
        return "data"
    if roll < 0.16 and at:
        del events[rng.choice(at)]
        return "lost"
    if roll < 0.24 and len(at) >= 2:
        i, j = rng.sample(at, 2)
        events[i], events[j] = events[j], events[i]
        return "reordered"
    if roll < 0.28 and at:
        i = rng.choice(at)
        events.insert(i + 1, events[i])
        return "repeated"
    if roll < 0.32 and at:
        i = rng.choice(at)
        e = events[i]
        assert isinstance(e, Chunk)
        events[i] = Damaged(UNIT, e.epoch, e.term, e.seq, Code.BAD_CHECKSUM, "crc")
        return "crc"
    if roll < 0.38:
        events.pop()  # no end: the next manifest supersedes it
        return "cut"
    return None


def contents(rng: random.Random, last: Mapping[str, bytes] | None) -> dict[str, bytes]:
    if last is not None and rng.random() < 0.6:
        # Mostly the same blocks: a real delta. Rewrite one block of one file.
        out = dict(last)
        name = rng.choice(sorted(out))
        data = bytearray(out[name])
        if data:
            k = rng.randrange(len(data))
            data[k] ^= 0xFF
        out[name] = bytes(data) + rng.randbytes(rng.randrange(0, 2))
        return out
    n_files = rng.randrange(1, 4)
    return {f"f{i}.img": rng.randbytes(rng.randrange(0, 3 * BLOCK_SIZE)) for i in range(n_files)}


@pytest.mark.parametrize("seed", range(20))
def test_random_transfers_commit_exactly_the_intact_images(seed: int) -> None:
    """Images arrive whole, corrupted, cut short, reordered, stale, against the wrong base, again
    after a lost ack, or across a crash; only intact, current ones may be committed and acked, an
    ack only ever follows the store's verdict, and nothing is acked after promotion."""
    rng = random.Random(seed)
    store = FakeStore()
    m = StandbyMachine(UNIT)
    term, epoch, seq = TERM, 0, 1
    last: CommittedImage | None = None
    last_files: dict[str, bytes] | None = None
    for _ in range(80):
        epoch += 1
        files = contents(rng, last_files)
        use_term, use_epoch = term, epoch
        base = last_files if last is not None and last.term == term else None
        base_epoch = last.epoch if last is not None else 0
        valid = True
        resend = False
        roll = rng.random()
        if roll < 0.05 and m.term == term:
            use_term, valid = term - 1, False  # from a deposed primary
        elif roll < 0.1 and last is not None and last.epoch > 1 and last.term == term:
            use_epoch, base, valid = last.epoch - 1, None, False  # older than the committed one
        elif roll < 0.15:
            term = use_term = term + 1  # a failover elsewhere: a new primary, a new lineage
            valid = base is None
        elif roll < 0.2:
            base, base_epoch, valid = {"x.img": b"elsewhere"}, 77, False
        elif roll < 0.25 and last is not None and last_files is not None and last.term == term:
            # The primary missed our ack and sends the committed image again, in full.
            use_epoch, files, base, resend = last.epoch, last_files, None, True
        events = transfer(use_epoch, use_term, files, base, seq=seq, base_epoch=base_epoch, rng=rng)
        seq += len(events) + 1
        how = damage(rng, events)
        # A resend stores nothing, so only damage to the transfer's shape can cost its ack.
        valid = valid and (how is None or (resend and how == "data"))
        crash_at = rng.randrange(len(events)) if rng.random() < 0.05 else None
        acked: list[tuple[int, int]] = []
        verified: set[tuple[int, int]] = set()
        for i, event in enumerate(events):
            if i == crash_at:
                m = store.crash_and_restart(UNIT)
                valid = valid and i == 0
            for c in store.run(m, event):
                if isinstance(c, Commit):
                    assert isinstance(event, ImageEnd), "committed before the end"
                    verified.add((c.epoch, c.term))
                if isinstance(c, SendAck):
                    acked.append((c.epoch, c.term))
                    assert resend or (c.epoch, c.term) in verified, "acked without a verdict"
        assert acked == ([(use_epoch, use_term)] if valid else [])
        if valid and not resend:
            last, last_files = CommittedImage(use_epoch, use_term, image(use_epoch, files)), files
            assert store.files == files
        assert m.last_committed == last == store.image
    assert store.run(m, Promote(term + 1))[-1] == RecordTerm(term + 1, promoted=True)
    for t in (term, term + 1, term + 2):
        for event in transfer(epoch + 1, t, FILES, None, seq=seq):
            out = store.run(m, event)
            assert not any(isinstance(c, SendAck | Commit | StartAssembly) for c in out)
