"""Playbook tests of the standby's epoch machine and its store contract (shim/standby.py)."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

import attrs
import pytest

from shim.standby import (
    TRANSITIONS,
    Chunk,
    Commit,
    CommittedImage,
    DropAssembly,
    Event,
    FileSpec,
    Ignored,
    ImageEnd,
    Manifest,
    Promote,
    ProtocolError,
    RecordTerm,
    Reject,
    SendAck,
    StandbyMachine,
    StartAssembly,
    State,
    StoreChunk,
)
from tests.unit.playbook import Playbook

UNIT = "nat0"
TERM = 5
PAGES = b"pages-" * 10
CORE = b"core"


def spec(name: str, data: bytes) -> FileSpec:
    return FileSpec(name, len(data), hashlib.sha256(data).hexdigest())


def manifest(
    epoch: int, term: int = TERM, parent: int | None = None, files: dict[str, bytes] | None = None
) -> Manifest:
    files = {"pages.img": PAGES, "core.img": CORE} if files is None else files
    return Manifest(
        UNIT, epoch, term, parent, 100 + epoch, tuple(spec(n, d) for n, d in files.items())
    )


def start(m: Manifest) -> StartAssembly:
    return StartAssembly(m.epoch, m.term, m.parent, m.files)


def committed(
    m: StandbyMachine, epoch: int, term: int = TERM, parent: int | None = None
) -> Playbook:
    """Extend a playbook with one complete, valid image transfer."""
    pb = Playbook(m)
    first = m.term < term
    pb >> manifest(epoch, term, parent)
    if first:
        pb << RecordTerm(term)
    pb << start(manifest(epoch, term, parent))
    pb >> Chunk(UNIT, epoch, term, "pages.img", 0, PAGES[:25])
    pb << StoreChunk(epoch, "pages.img", 0, PAGES[:25])
    pb >> Chunk(UNIT, epoch, term, "pages.img", 25, PAGES[25:])
    pb << StoreChunk(epoch, "pages.img", 25, PAGES[25:])
    pb >> Chunk(UNIT, epoch, term, "core.img", 0, CORE) << StoreChunk(epoch, "core.img", 0, CORE)
    pb >> ImageEnd(UNIT, epoch, term) << Commit(epoch, term, 100 + epoch)
    pb << SendAck(UNIT, epoch, term)
    assert pb
    return pb


def test_a_complete_image_is_committed_then_acked() -> None:
    m = StandbyMachine(UNIT)
    committed(m, 1)
    assert m.last_committed == CommittedImage(1, TERM, 101)
    assert m.state is State.IDLE
    committed(m, 2, parent=1)
    assert m.last_committed == CommittedImage(2, TERM, 102)


def test_a_corrupt_chunk_is_never_committed() -> None:
    m = StandbyMachine(UNIT)
    bad = b"X" + PAGES[1:]
    assert (
        Playbook(m)
        >> manifest(1)
        << RecordTerm(TERM)
        << start(manifest(1))
        >> Chunk(UNIT, 1, TERM, "pages.img", 0, bad)
        << DropAssembly(1)
        << Reject(UNIT, 1, TERM, "corrupt: file pages.img does not match its sha256")
        >> Chunk(UNIT, 1, TERM, "core.img", 0, CORE)
        << Ignored
        >> ImageEnd(UNIT, 1, TERM)
        << Ignored
    )
    assert m.last_committed is None


def test_a_partial_image_is_never_acked() -> None:
    m = StandbyMachine(UNIT, TERM)
    assert (
        Playbook(m)
        >> manifest(1)
        << start(manifest(1))
        >> Chunk(UNIT, 1, TERM, "pages.img", 0, PAGES)
        << StoreChunk(1, "pages.img", 0, PAGES)
        >> ImageEnd(UNIT, 1, TERM)
        << DropAssembly(1)
        << Reject(UNIT, 1, TERM, "partial: file core.img has 0 of 4 bytes")
    )
    assert m.last_committed is None


def test_a_half_sent_file_is_partial() -> None:
    m = StandbyMachine(UNIT, TERM)
    assert (
        Playbook(m)
        >> manifest(1, files={"pages.img": PAGES})
        << start(manifest(1, files={"pages.img": PAGES}))
        >> Chunk(UNIT, 1, TERM, "pages.img", 0, PAGES[:7])
        << StoreChunk
        >> ImageEnd(UNIT, 1, TERM)
        << DropAssembly(1)
        << Reject(UNIT, 1, TERM, f"partial: file pages.img has 7 of {len(PAGES)} bytes")
    )


def test_a_new_manifest_abandons_the_image_in_progress() -> None:
    m = StandbyMachine(UNIT, TERM)
    committed(m, 1)
    assert (
        Playbook(m)
        >> manifest(2, parent=1)
        << start(manifest(2, parent=1))
        >> manifest(3, parent=None)
        << DropAssembly(2)
        << Reject(UNIT, 2, TERM, "partial: superseded by a manifest for epoch 3")
        << start(manifest(3, parent=None))
    )
    assert m.last_committed == CommittedImage(1, TERM, 101)


@pytest.mark.parametrize(
    ("chunk", "why"),
    [
        (Chunk(UNIT, 1, TERM, "pages.img", 5, PAGES[5:]), "chunk at 5, expected 0"),
        (Chunk(UNIT, 1, TERM, "pages.img", 0, PAGES + b"!"), "grows past its size"),
        (Chunk(UNIT, 1, TERM, "evil.img", 0, b"x"), "unlisted file 'evil.img'"),
    ],
)
def test_malformed_chunks_reject_the_image(chunk: Chunk, why: str) -> None:
    m = StandbyMachine(UNIT, TERM)
    pb = Playbook(m) >> manifest(1) << start(manifest(1)) >> chunk << DropAssembly(1)
    assert pb << Reject
    reject = pb.commands[-1]
    assert isinstance(reject, Reject)
    assert why in reject.reason
    assert m.state is State.IDLE


def test_an_empty_file_is_verified_at_the_end() -> None:
    m = StandbyMachine(UNIT, TERM)
    assert (
        Playbook(m)
        >> manifest(1, files={"empty.img": b""})
        << start(manifest(1, files={"empty.img": b""}))
        >> ImageEnd(UNIT, 1, TERM)
        << Commit(1, TERM, 101)
        << SendAck(UNIT, 1, TERM)
    )


@pytest.mark.parametrize(
    ("files", "why"),
    [
        ((), "manifest lists no files"),
        ((spec("a", b"1"), spec("a", b"1")), "manifest lists a file twice"),
        ((FileSpec("a", -1, "0" * 64),), "file a: negative size -1"),
        ((FileSpec("a", 1, "abc"),), "file a: not a sha256 digest: 'abc'"),
    ],
)
def test_bad_manifests_are_rejected(files: tuple[FileSpec, ...], why: str) -> None:
    m = StandbyMachine(UNIT, TERM)
    bad = attrs.evolve(manifest(1), files=files)
    assert Playbook(m) >> bad << Reject(UNIT, 1, TERM, why)


# --- term and epoch order ----------------------------------------------------------------------


def test_a_stale_term_is_rejected_with_the_standbys_term() -> None:
    m = StandbyMachine(UNIT, TERM)
    assert (
        Playbook(m)
        >> manifest(1, term=TERM - 1)
        << Reject(UNIT, 1, TERM, f"stale term {TERM - 1}, seen {TERM}")
        >> Chunk(UNIT, 1, TERM - 1, "core.img", 0, CORE)
        << Ignored
        >> ImageEnd(UNIT, 1, TERM - 1)
        << Ignored
    )


def test_epochs_only_move_forward_within_a_term() -> None:
    m = StandbyMachine(UNIT, TERM)
    committed(m, 4)
    assert Playbook(m) >> manifest(3) << Reject(UNIT, 3, TERM, "stale epoch 3, committed 4")
    # Gaps are fine: epochs whose checkpoint failed are never shipped.
    committed(m, 7, parent=4)


def test_a_delta_needs_its_parent_committed_here() -> None:
    m = StandbyMachine(UNIT, TERM)
    committed(m, 1)
    why = f"parent epoch 2 is not committed here (have epoch 1 term {TERM})"
    assert Playbook(m) >> manifest(3, parent=2) << Reject(UNIT, 3, TERM, why)


def test_a_higher_term_is_recorded_and_needs_a_full_image() -> None:
    m = StandbyMachine(UNIT, TERM)
    committed(m, 9)
    why = f"parent epoch 9 is not committed here (have epoch 9 term {TERM})"
    assert (
        Playbook(m)
        >> manifest(2, term=TERM + 1, parent=9)
        << RecordTerm(TERM + 1)
        << Reject(UNIT, 2, TERM + 1, why)
        >> manifest(1, term=TERM)
        << Reject(UNIT, 1, TERM + 1, f"stale term {TERM}, seen {TERM + 1}")
    )
    committed(m, 2, term=TERM + 1)


def test_a_repeated_image_is_acked_again_without_transfer() -> None:
    m = StandbyMachine(UNIT, TERM)
    committed(m, 1)
    assert (
        Playbook(m)
        >> manifest(1)
        << SendAck(UNIT, 1, TERM)
        >> Chunk(UNIT, 1, TERM, "core.img", 0, CORE)
        << Ignored
        >> ImageEnd(UNIT, 1, TERM)
        << Ignored
    )


def test_messages_for_another_unit_are_ignored() -> None:
    m = StandbyMachine(UNIT, TERM)
    other = attrs.evolve(manifest(1), unit="other")
    assert Playbook(m) >> other << Ignored(other, "for unit other, this is nat0")


# --- I3: promotion -----------------------------------------------------------------------------


def test_after_promotion_a_lower_term_is_never_acked() -> None:
    m = StandbyMachine(UNIT, TERM)
    committed(m, 1)
    promoted = f"promoted to primary at term {TERM + 1}"
    assert (
        Playbook(m)
        >> manifest(2, parent=1)
        << start(manifest(2, parent=1))
        >> Promote(TERM + 1)
        << DropAssembly(2)
        << RecordTerm(TERM + 1)
        >> Chunk(UNIT, 2, TERM, "core.img", 0, CORE)
        << Ignored
        >> ImageEnd(UNIT, 2, TERM)
        << Reject(UNIT, 2, TERM + 1, promoted)
        >> manifest(1)
        << Reject(UNIT, 1, TERM + 1, promoted)
        >> manifest(2, term=TERM + 1)
        << Reject(UNIT, 2, TERM + 1, promoted)
        >> Promote(TERM + 1)
    )
    assert m.state is State.PROMOTED
    assert m.last_committed == CommittedImage(1, TERM, 101)
    with pytest.raises(ProtocolError, match="already promoted"):
        m.handle(Promote(TERM + 2))


def test_promotion_must_raise_the_term() -> None:
    m = StandbyMachine(UNIT, TERM)
    with pytest.raises(ProtocolError, match="must raise the term"):
        m.handle(Promote(TERM))


def test_every_state_handles_every_event_by_the_table() -> None:
    assert set(TRANSITIONS) == set(State)
    for table in TRANSITIONS.values():
        assert set(table) == {Manifest, Chunk, ImageEnd, Promote}


# --- the store's contract: a crash while assembling keeps the last committed image --------------


@attrs.define
class FakeStore:
    """Applies store commands the way the contract says a real store must."""

    committed: dict[str, bytes] = attrs.field(factory=dict)
    committed_epoch: CommittedImage | None = None
    term: int = 0
    staging: dict[str, bytes] = attrs.field(factory=dict)
    staging_epoch: int | None = None

    def apply(self, commands: Sequence[object]) -> None:
        for c in commands:
            match c:
                case RecordTerm(term=term):
                    self.term = term
                case StartAssembly(epoch=epoch, files=files):
                    self.staging = {f.name: b"" for f in files}
                    self.staging_epoch = epoch
                case StoreChunk(epoch=epoch, file=name, offset=offset, data=data):
                    assert epoch == self.staging_epoch
                    old = self.staging[name]
                    assert len(old) == offset
                    self.staging[name] = old + data
                case DropAssembly():
                    self.staging, self.staging_epoch = {}, None
                case Commit(epoch=epoch, term=term, cut_seq=cut_seq):
                    assert epoch == self.staging_epoch
                    self.committed, self.staging = self.staging, {}
                    self.committed_epoch = CommittedImage(epoch, term, cut_seq)
                    self.staging_epoch = None

    def crash_and_restart(self, unit: str) -> StandbyMachine:
        self.staging, self.staging_epoch = {}, None
        return StandbyMachine(unit, self.term, self.committed_epoch)


def test_a_crash_while_assembling_leaves_the_last_committed_image_intact() -> None:
    store = FakeStore()
    m = StandbyMachine(UNIT)
    store.apply(committed(m, 1).commands)
    assert store.committed == {"pages.img": PAGES, "core.img": CORE}
    store.apply(m.handle(manifest(2, parent=1, files={"pages.img": b"new" * 9})))
    store.apply(m.handle(Chunk(UNIT, 2, TERM, "pages.img", 0, b"new")))
    assert store.staging == {"pages.img": b"new"}
    m = store.crash_and_restart(UNIT)
    assert store.committed == {"pages.img": PAGES, "core.img": CORE}
    assert m.last_committed == CommittedImage(1, TERM, 101)
    assert m.term == TERM
    # Epoch 2 comes again over the new link, still as a delta against the intact epoch 1.
    store.apply(committed(m, 2, parent=1).commands)
    assert store.committed_epoch == CommittedImage(2, TERM, 102)


def test_a_restart_remembers_a_higher_term_it_had_seen() -> None:
    store = FakeStore()
    m = StandbyMachine(UNIT)
    store.apply(committed(m, 1).commands)
    store.apply(m.handle(manifest(1, term=TERM + 1)))
    m = store.crash_and_restart(UNIT)
    assert m.handle(manifest(2, parent=1))[0] == Reject(
        UNIT, 2, TERM + 1, f"stale term {TERM}, seen {TERM + 1}"
    )


def test_a_store_whose_term_is_below_its_image_is_refused() -> None:
    with pytest.raises(ValueError, match="below the committed image's term"):
        StandbyMachine(UNIT, 1, CommittedImage(1, 2, 0))


# --- randomized transfers ----------------------------------------------------------------------


def arrives_intact(events: list[Event], files: dict[str, bytes]) -> bool:
    """Whether a receiver that only appends in-order bytes would rebuild every file exactly."""
    rebuilt = dict.fromkeys(files, b"")
    for event in events:
        if isinstance(event, Chunk):
            if event.file not in rebuilt or event.offset != len(rebuilt[event.file]):
                return False
            rebuilt[event.file] += event.data
    return isinstance(events[-1], ImageEnd) and rebuilt == files


def transfer(rng: random.Random, m: Manifest, contents: dict[str, bytes]) -> list[Event]:
    events: list[Event] = [m]
    for name, data in contents.items():
        cuts = sorted(rng.sample(range(1, len(data)), min(2, max(0, len(data) - 1))))
        offset = 0
        for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True):
            events.append(Chunk(UNIT, m.epoch, m.term, name, offset, data[a:b]))
            offset += b - a
    events.append(ImageEnd(UNIT, m.epoch, m.term))
    return events


def damage(rng: random.Random, events: list[Event]) -> None:
    chunk_at = [i for i, e in enumerate(events) if isinstance(e, Chunk)]
    roll = rng.random()
    if roll < 0.1:
        i = rng.choice(chunk_at)
        victim = events[i]
        assert isinstance(victim, Chunk)
        data = victim.data
        events[i] = attrs.evolve(victim, data=bytes([data[0] ^ 1]) + data[1:] if data else b"?")
    elif roll < 0.2:
        del events[rng.choice(chunk_at)]
    elif roll < 0.3 and len(chunk_at) >= 2:
        i, j = rng.sample(chunk_at, 2)
        events[i], events[j] = events[j], events[i]
    elif roll < 0.4:
        events.pop()  # no ImageEnd: the next manifest supersedes it


@pytest.mark.parametrize("seed", range(20))
def test_random_transfers_commit_exactly_the_intact_images(seed: int) -> None:
    """Images arrive whole, corrupted, cut short, reordered, stale or across a crash; only
    intact, current ones may be committed and acked, and nothing is acked after promotion."""
    rng = random.Random(seed)
    store = FakeStore()
    m = StandbyMachine(UNIT)
    term, epoch = TERM, 0
    last: CommittedImage | None = None
    sent: dict[tuple[int, int], dict[str, bytes]] = {}
    for _ in range(80):
        epoch += 1
        n_files = rng.randrange(1, 4)
        contents = {f"f{i}.img": rng.randbytes(rng.randrange(0, 40)) for i in range(n_files)}
        roll = rng.random()
        use_term, use_epoch, parent = term, epoch, None
        if last is not None and last.term == term and rng.random() < 0.7:
            parent = last.epoch
        valid = True
        if roll < 0.05 and m.term == term:
            use_term = term - 1  # from a deposed primary
            valid = False
        elif roll < 0.1 and last is not None and last.epoch > 1 and last.term == term:
            use_epoch, parent = last.epoch - 1, None  # an epoch older than the committed one
            valid = False
        elif roll < 0.15:
            term = use_term = term + 1  # a failover elsewhere: a new primary, a new lineage
            valid = parent is None
        elif roll < 0.2:
            parent, valid = 10_000, False
        sent[use_epoch, use_term] = contents
        events = transfer(rng, manifest(use_epoch, use_term, parent, contents), contents)
        damage(rng, events)
        valid = valid and arrives_intact(events, contents)
        crash_at = rng.randrange(len(events)) if rng.random() < 0.05 else None
        acked: list[tuple[int, int]] = []
        for i, event in enumerate(events):
            if i == crash_at:
                m = store.crash_and_restart(UNIT)
                valid = valid and i == 0
            out = m.handle(event)
            store.apply(out)
            acked += [(c.epoch, c.term) for c in out if isinstance(c, SendAck)]
            for c in out:
                if isinstance(c, Commit):
                    assert store.committed == sent[c.epoch, c.term], "committed a damaged image"
        assert acked == ([(use_epoch, use_term)] if valid else [])
        if valid:
            last = CommittedImage(use_epoch, use_term, 100 + use_epoch)
        assert m.last_committed == last == store.committed_epoch
    assert m.handle(Promote(term + 1))[-1] == RecordTerm(term + 1)
    for t in (term, term + 1, term + 2):
        for event in transfer(rng, manifest(epoch + 1, t), {"pages.img": PAGES, "core.img": CORE}):
            assert not any(isinstance(c, SendAck | Commit) for c in m.handle(event))
