"""The standby's checkpoint store: atomic commit, crash recovery at every step, and fencing (I3).

No root needed: the store lives under tmp_path, and crashes are injected through the store's
`fault` hook, which raises at a named commit step exactly as if the process died there.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from shim import delta as dl
from shim.delta import BLOCK_SIZE
from shim.store import (
    NoAssemblyError,
    StaleEpochError,
    StaleTermError,
    Store,
    StoreError,
    link_copy,
)


class Crash(BaseException):
    """Not an Exception, so no handler in the store can swallow it: like a kill -9."""


def write_checkpoint(path: Path, pages: bytes, core: bytes) -> Path:
    path.mkdir(parents=True)
    (path / "pages-1.img").write_bytes(pages)
    (path / "core-1.img").write_bytes(core)
    (path / "inventory.img").write_bytes(b"inventory")
    return path


def digests_of(path: Path) -> dict[str, str]:
    return {
        p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def ship(store: Store, src: Path, epoch: int, term: int, *, skip: int = 0) -> dl.Delta:
    """Everything the replication link would do, minus the socket; leaves `skip` blocks out."""
    committed = store.committed()
    base = committed.base if committed is not None else None
    delta = dl.make_delta(src, dl.scan(src, epoch), base)
    store.begin(epoch, term, dl.decode_manifest(delta.wire_manifest, base))
    sent = 0
    for batch in dl.iter_batches(delta):
        for digest, data in batch.items():
            if sent >= len(delta.blocks) - skip:
                return delta
            store.put_block(digest, data)
            sent += 1
    return delta


@pytest.fixture
def pages() -> bytearray:
    return bytearray(os.urandom(1 << 20))


@pytest.fixture
def src1(tmp_path: Path, pages: bytearray) -> Path:
    return write_checkpoint(tmp_path / "src1", bytes(pages), b"core one")


@pytest.fixture
def src2(tmp_path: Path, pages: bytearray) -> Path:
    for i in random.Random(3).sample(range(len(pages) // BLOCK_SIZE), 5):
        pages[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE] = os.urandom(BLOCK_SIZE)
    return write_checkpoint(tmp_path / "src2", bytes(pages), b"core two")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


def committed_store(root: Path, src: Path, epoch: int = 1, term: int = 1) -> Store:
    store = Store(root)
    ship(store, src, epoch, term)
    store.commit()
    return store


def only_expected_entries(root: Path) -> set[str]:
    return {p.name for p in root.iterdir()}


def test_commit_then_delta_commit(root: Path, src1: Path, src2: Path) -> None:
    store = committed_store(root, src1)
    c1 = store.committed()
    assert c1 is not None
    assert (c1.epoch, c1.term) == (1, 1)
    assert digests_of(c1.path) == digests_of(src1)

    delta = ship(store, src2, 2, 1)
    assert len(delta.blocks) == 6  # five pages and core-1.img
    assert store.assembling == (2, 1)
    c2 = store.commit()
    assert digests_of(c2.path) == digests_of(src2)
    assert store.committed() == c2
    assert c1.path.exists()  # kept until collect(), so that the ack need not wait
    store.collect()
    assert not c1.path.exists()
    assert only_expected_entries(root) == {"state.json", "committed", "checkpoint.2.1"}

    reopened = Store(root)
    assert reopened.committed() == c2
    reopened.verify_committed()


def test_a_link_copy_of_a_commit_outlives_its_collection(
    root: Path, tmp_path: Path, src1: Path, src2: Path
) -> None:
    store = committed_store(root, src1)
    c1 = store.committed()
    assert c1 is not None
    (c1.path / "sub").mkdir(exist_ok=True)  # a nested directory is linked too
    (c1.path / "sub" / "f.img").write_bytes(b"nested")
    want = digests_of(c1.path)
    copy = tmp_path / "copies" / "seq0"
    link_copy(c1.path, copy)
    ship(store, src2, 2, 1)
    store.commit()
    store.collect()
    assert not c1.path.exists()
    assert digests_of(copy) == want
    # A checkpoint already gone: the error says so and no partial copy is left.
    with pytest.raises(FileNotFoundError):
        link_copy(c1.path, tmp_path / "copies" / "gone")
    assert not (tmp_path / "copies" / "gone").exists()


def test_meta_is_kept_with_the_checkpoint(root: Path, src1: Path) -> None:
    store = Store(root)
    manifest = dl.scan(src1, 1)
    store.begin(1, 1, manifest, {"cut_seq": 41, "kind": "container"})
    for batch in dl.iter_batches(dl.make_delta(src1, manifest, None)):
        for digest, data in batch.items():
            store.put_block(digest, data)
    store.commit()
    c = Store(root).committed()
    assert c is not None
    assert dict(c.meta) == {"cut_seq": 41, "kind": "container"}


def test_corrupt_block_is_refused_and_nothing_is_committed(
    root: Path, src1: Path, src2: Path
) -> None:
    store = committed_store(root, src1)
    before = store.committed()
    delta = dl.make_delta(src2, dl.scan(src2, 2), store.committed_base())
    store.begin(2, 1, delta.manifest)
    batch = next(dl.iter_batches(delta))
    digest, data = next(batch.items())
    with pytest.raises(dl.BlockError, match="checksum"):
        store.put_block(digest, bytes([data[0] ^ 0x40]) + bytes(data[1:]))
    with pytest.raises(dl.VerifyError, match="never arrived"):
        store.commit()
    assert store.committed() == before
    store.abort()
    assert store.assembling is None
    after = Store(root).committed()
    assert after is not None
    assert after == before
    assert digests_of(after.path) == digests_of(src1)


def test_partial_checkpoint_cannot_commit(root: Path, src1: Path, src2: Path) -> None:
    store = committed_store(root, src1)
    ship(store, src2, 2, 1, skip=1)
    assert store.pending == 1
    with pytest.raises(dl.VerifyError, match="1 blocks never arrived"):
        store.verify()
    with pytest.raises(dl.VerifyError):
        store.commit()
    committed = store.committed()
    assert committed is not None
    assert committed.epoch == 1
    assert digests_of(committed.path) == digests_of(src1)


def test_tampered_assembly_fails_verify_and_names_the_file(
    root: Path, src1: Path, src2: Path
) -> None:
    store = committed_store(root, src1)
    ship(store, src2, 2, 1)
    assembling = root / "assembling.2" / "images"
    (assembling / "inventory.img").write_bytes(b"inventorX")
    with pytest.raises(dl.VerifyError) as err:
        store.commit()
    assert err.value.path == "inventory.img"
    (assembling / "inventory.img").write_bytes(b"inventory")
    (assembling / "stray.img").write_bytes(b"")
    with pytest.raises(dl.VerifyError) as err:
        store.commit()
    assert err.value.path == "stray.img"
    committed = store.committed()
    assert committed is not None
    assert committed.epoch == 1


def test_commit_without_assembly(root: Path) -> None:
    store = Store(root)
    with pytest.raises(NoAssemblyError):
        store.commit()
    with pytest.raises(NoAssemblyError):
        store.put_block(bytes(16), b"x")


def _crash_at(step: str) -> Callable[[str], None]:
    def fault(name: str) -> None:
        if name == step:
            raise Crash(step)

    return fault


@pytest.mark.parametrize("step", Store.COMMIT_STEPS)
def test_crash_at_any_commit_step_leaves_a_whole_checkpoint(
    root: Path, src1: Path, src2: Path, step: str
) -> None:
    committed_store(root, src1)
    store = Store(root, fault=_crash_at(step))
    ship(store, src2, 2, 1)
    with pytest.raises(Crash):
        store.commit()

    restarted = Store(root)  # recover() runs at start-up
    committed = restarted.committed()
    assert committed is not None
    # The pointer swap is the commit point: before it the old checkpoint stands, after it the new.
    swapped = Store.COMMIT_STEPS.index(step) >= Store.COMMIT_STEPS.index("swapped")
    expected, source = ((2, 1), src2) if swapped else ((1, 1), src1)
    assert (committed.epoch, committed.term) == expected
    assert digests_of(committed.path) == digests_of(source)
    restarted.verify_committed()
    assert only_expected_entries(root) == {
        "state.json",
        "committed",
        f"checkpoint.{expected[0]}.{expected[1]}",
    }
    # And the store carries on from there.
    ship(restarted, src2 if not swapped else src1, 3, 1)
    assert restarted.commit().epoch == 3


def test_recover_removes_leftovers_and_keeps_the_commit(root: Path, src1: Path) -> None:
    committed_store(root, src1)
    (root / "assembling.7" / "images").mkdir(parents=True)
    (root / "assembling.7" / "images" / "pages-1.img").write_bytes(b"half")
    (root / "checkpoint.7.1").mkdir()
    os.symlink("checkpoint.7.1", root / "committed.tmp")
    (root / "state.json.tmp").write_bytes(b"{")
    (root / "unrelated").write_bytes(b"not ours")
    store = Store(root)
    committed = store.committed()
    assert committed is not None
    assert committed.epoch == 1
    assert digests_of(committed.path) == digests_of(src1)
    assert only_expected_entries(root) == {"state.json", "committed", "checkpoint.1.1", "unrelated"}


def test_dangling_pointer_starts_empty(root: Path, src1: Path) -> None:
    committed_store(root, src1)
    (root / "committed").unlink()
    os.symlink("checkpoint.9.9", root / "committed")
    store = Store(root)
    assert store.committed() is None
    assert store.term == 1  # the fencing state survives
    assert only_expected_entries(root) == {"state.json"}


def test_unreadable_fencing_state_refuses_to_start(root: Path) -> None:
    Store(root).observe_term(3)
    (root / "state.json").write_text('{"term": "three"}')
    with pytest.raises(StoreError, match="fencing"):
        Store(root)


def test_stale_term_is_refused(root: Path, src1: Path, src2: Path) -> None:
    store = committed_store(root, src1, epoch=1, term=3)
    with pytest.raises(StaleTermError, match="term 2 is stale"):
        ship(store, src2, 2, 2)
    assert store.assembling is None
    assert Store(root).term == 3
    with pytest.raises(StaleTermError):
        Store(root).begin(5, 1, dl.scan(src2, 5))


def test_stale_epoch_within_a_term_is_refused(root: Path, src1: Path, src2: Path) -> None:
    store = committed_store(root, src1, epoch=4, term=1)
    for epoch in (3, 4):
        with pytest.raises(StaleEpochError):
            store.begin(epoch, 1, dl.scan(src2, epoch))
    # A new term may number epochs afresh.
    ship(store, src2, 1, 2)
    assert store.commit().term == 2


def test_higher_term_abandons_the_assembly(root: Path, src1: Path, src2: Path) -> None:
    store = committed_store(root, src1)
    ship(store, src2, 2, 1)
    store.observe_term(2)
    assert store.assembling is None
    assert not (root / "assembling.2").exists()
    with pytest.raises(NoAssemblyError):
        store.commit()


def test_after_promote_nothing_at_or_below_the_term_is_accepted(
    root: Path, src1: Path, src2: Path
) -> None:
    store = committed_store(root, src1, term=1)
    ship(store, src2, 2, 1)
    store.promote(2)
    assert store.assembling is None
    committed = store.committed()
    assert committed is not None
    assert committed.epoch == 1
    for term in (1, 2):
        with pytest.raises(StaleTermError, match="promoted"):
            store.begin(3, term, dl.scan(src2, 3))
    restarted = Store(root)
    assert restarted.promoted == 2
    with pytest.raises(StaleTermError):
        restarted.observe_term(2)
    with pytest.raises(StaleTermError):
        restarted.promote(1)
    restarted.observe_term(3)  # a later primary may use this node as its standby again
    assert restarted.term == 3
