"""Block-level delta encoding: what is shipped, that the standby rebuilds exactly the source, and
that every kind of damage is caught and named."""

from __future__ import annotations

import os
import random
import shutil
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim import delta as dl
from shim.delta import BLOCK_SIZE

SMALL = {"core-1.img": 1234, "mm-1.img": 5000, "pagemap-1.img": 96, "sub/fs-1.img": 4096}


def make_checkpoint(path: Path, pages: bytes, small: dict[str, bytes]) -> Path:
    path.mkdir(parents=True)
    (path / "pages-1.img").write_bytes(pages)
    for name, data in small.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return path


def change_pages(pages: bytearray, fraction: float, rng: random.Random) -> list[int]:
    nblocks = len(pages) // BLOCK_SIZE
    changed = rng.sample(range(nblocks), max(1, int(nblocks * fraction)))
    for i in changed:
        pages[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE] = os.urandom(BLOCK_SIZE)
    return changed


def assemble(delta: dl.Delta, out: Path, base_dir: Path | None, base: dl.Manifest | None) -> Path:
    manifest = dl.decode_manifest(delta.wire_manifest, delta.base)
    asm = dl.Assembler(out, manifest, base_dir, base)
    try:
        for batch in dl.iter_batches(delta, 64 << 10):
            for digest, data in batch.items():
                asm.put_block(digest, data)
        asm.verify()
    finally:
        asm.close()
    return out


def same_tree(a: Path, b: Path) -> bool:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return files_a == files_b and all((a / f).read_bytes() == (b / f).read_bytes() for f in files_a)


@pytest.fixture
def small_files() -> dict[str, bytes]:
    return {name: os.urandom(size) for name, size in SMALL.items()}


@pytest.fixture
def pages() -> bytearray:
    return bytearray(os.urandom(4 << 20))


@pytest.fixture
def rng() -> random.Random:
    return random.Random(42)


def test_full_then_one_percent_delta_rebuilds_the_source(
    tmp_path: Path, pages: bytearray, small_files: dict[str, bytes], rng: random.Random
) -> None:
    src1 = make_checkpoint(tmp_path / "src1", bytes(pages), small_files)
    enc = dl.Encoder()
    full = enc.encode(src1, 1)
    assert full.base is None
    assert len(full.blocks) == full.manifest.nblocks  # random data: every block distinct
    out1 = assemble(full, tmp_path / "out1", None, None)
    assert same_tree(src1, out1)

    enc.commit(full.manifest)
    changed = change_pages(pages, 0.01, rng)
    small_files["core-1.img"] = os.urandom(1234)
    src2 = make_checkpoint(tmp_path / "src2", bytes(pages), small_files)
    delta = enc.encode(src2, 2)
    assert delta.base is not None
    assert delta.base.manifest == full.manifest
    assert len(delta.blocks) == len(changed) + 1  # the pages that changed, plus core-1.img
    assert delta.wire_bytes < 0.02 * full.manifest.total_size
    assert len(delta.wire_manifest) < 2048
    out2 = assemble(delta, tmp_path / "out2", out1, full.manifest)
    assert same_tree(src2, out2)


def test_moved_pages_and_unchanged_small_files_cost_nothing(
    tmp_path: Path, pages: bytearray, small_files: dict[str, bytes]
) -> None:
    src1 = make_checkpoint(tmp_path / "src1", bytes(pages), small_files)
    base = dl.scan(src1, 1)
    blocks = [pages[i : i + BLOCK_SIZE] for i in range(0, len(pages), BLOCK_SIZE)]
    random.Random(7).shuffle(blocks)
    # Same content at other offsets, and split across two files: content-addressed, so free.
    half = len(blocks) // 2
    src2 = make_checkpoint(tmp_path / "src2", b"".join(blocks[:half]), small_files)
    (src2 / "pages-2.img").write_bytes(b"".join(blocks[half:]))
    delta = dl.make_delta(src2, dl.scan(src2, 2), dl.Base.of(base))
    assert delta.blocks == ()
    out = assemble(delta, tmp_path / "out", src1, base)
    assert same_tree(src2, out)


def test_growth_shrinkage_new_and_removed_files(
    tmp_path: Path, pages: bytearray, small_files: dict[str, bytes]
) -> None:
    src1 = make_checkpoint(tmp_path / "src1", bytes(pages), small_files)
    base = dl.scan(src1, 1)
    grown = bytes(pages) + os.urandom(BLOCK_SIZE + 17)  # ends in a partial block
    small2 = dict(small_files)
    del small2["mm-1.img"]
    small2["mm-2.img"] = os.urandom(10)
    small2["pagemap-1.img"] = small_files["pagemap-1.img"][:50]
    small2["empty.img"] = b""
    src2 = make_checkpoint(tmp_path / "src2", grown, small2)
    delta = dl.make_delta(src2, dl.scan(src2, 2), dl.Base.of(base))
    assert {b.path for b in delta.blocks} == {"pages-1.img", "mm-2.img", "pagemap-1.img"}
    assert sorted(b.length for b in delta.blocks if b.path == "pages-1.img") == [17, BLOCK_SIZE]
    out = assemble(delta, tmp_path / "out", src1, base)
    assert same_tree(src2, out)
    assert (out / "empty.img").stat().st_size == 0


def test_repeated_blocks_ship_once(tmp_path: Path) -> None:
    zero = bytes(BLOCK_SIZE)
    src = make_checkpoint(tmp_path / "src", zero * 100 + os.urandom(BLOCK_SIZE), {})
    delta = dl.make_delta(src, dl.scan(src, 1), None)
    assert len(delta.blocks) == 2
    assert same_tree(src, assemble(delta, tmp_path / "out", None, None))


def test_manifest_round_trip_with_and_without_base(
    tmp_path: Path, pages: bytearray, small_files: dict[str, bytes], rng: random.Random
) -> None:
    m1 = dl.scan(make_checkpoint(tmp_path / "a", bytes(pages), small_files), 1)
    change_pages(pages, 0.05, rng)
    m2 = dl.scan(make_checkpoint(tmp_path / "b", bytes(pages), small_files), 2)
    assert dl.decode_manifest(dl.encode_manifest(m2)) == m2
    base = dl.Base.of(m1)
    assert dl.decode_manifest(dl.encode_manifest(m2, base), base) == m2
    assert dl.manifest_digest(m1) != dl.manifest_digest(m2)


def test_delta_manifest_needs_its_own_base(
    tmp_path: Path, pages: bytearray, small_files: dict[str, bytes], rng: random.Random
) -> None:
    m1 = dl.scan(make_checkpoint(tmp_path / "a", bytes(pages), small_files), 1)
    change_pages(pages, 0.01, rng)
    m2 = dl.scan(make_checkpoint(tmp_path / "b", bytes(pages), small_files), 2)
    wire = dl.encode_manifest(m2, dl.Base.of(m1))
    with pytest.raises(dl.BaseMismatchError, match="no base"):
        dl.decode_manifest(wire, None)
    with pytest.raises(dl.BaseMismatchError, match="epoch 2"):
        dl.decode_manifest(wire, dl.Base.of(m2))


def _wire(body: bytes) -> bytes:
    return b"HMF1" + zlib.compress(body)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "magic"),
        (b"XXXX" + zlib.compress(b"x"), "magic"),
        (b"HMF1not-zlib", "inflate"),
        (b"HMF1" + zlib.compress(b"\x01\x00")[:-3], "truncated"),
        (_wire(dl._HEAD.pack(2, 0, BLOCK_SIZE, 1, 0)), "unsupported"),
        (_wire(dl._HEAD.pack(1, 0, 512, 1, 0)), "unsupported"),
        (_wire(dl._HEAD.pack(1, 0, BLOCK_SIZE, 1, 1)), "truncated"),
        (_wire(dl._HEAD.pack(1, 0, BLOCK_SIZE, 1, 0) + b"x"), "trailing"),
        (
            _wire(
                dl._HEAD.pack(1, 0, BLOCK_SIZE, 1, 1) + dl._FILE.pack(5, 0, bytes(32), 0) + b"../ab"
            ),
            "bad path",
        ),
        (
            _wire(
                dl._HEAD.pack(1, 0, BLOCK_SIZE, 1, 1) + dl._FILE.pack(2, 0, bytes(32), 0) + b"/a"
            ),
            "bad path",
        ),
        (
            _wire(
                dl._HEAD.pack(1, 0, BLOCK_SIZE, 1, 1) + dl._FILE.pack(1, 10, bytes(32), 1) + b"a"
            ),
            "mode",
        ),
        (
            _wire(
                dl._HEAD.pack(1, 0, BLOCK_SIZE, 1, 1)
                + dl._FILE.pack(1, 1 << 60, bytes(32), 0)
                + b"a"
            ),
            "truncated",
        ),
    ],
)
def test_malformed_manifests_are_refused(data: bytes, match: str) -> None:
    with pytest.raises(dl.ManifestError, match=match):
        dl.decode_manifest(data)


@pytest.mark.parametrize("path", ["", "/etc/passwd", "../x", "a/../b", "a//b", "./a", "a/", "a\0b"])
def test_unsafe_paths_are_refused(path: str) -> None:
    with pytest.raises(dl.ManifestError):
        dl.check_path(path)


def test_file_and_directory_of_one_name_is_refused() -> None:
    entry = dl.FileEntry("a", 0, bytes(32), b"")
    inner = dl.FileEntry("a/b", 0, bytes(32), b"")
    with pytest.raises(dl.ManifestError, match="both"):
        dl.Manifest(1, (entry, inner))


def test_scan_refuses_symlinks(tmp_path: Path) -> None:
    src = make_checkpoint(tmp_path / "src", b"x", {})
    (src / "link").symlink_to(src / "pages-1.img")
    with pytest.raises(dl.UnsupportedFileError, match="link"):
        dl.scan(src, 1)


@pytest.fixture
def assembler(tmp_path: Path, pages: bytearray) -> Iterator[dl.Assembler]:
    pages[-100:] = b""  # the last block is partial
    src = make_checkpoint(tmp_path / "src", bytes(pages), {"core-1.img": b"core"})
    asm = dl.Assembler(tmp_path / "out", dl.scan(src, 1), None, None)
    yield asm
    asm.close()


def _first_block(asm: dl.Assembler) -> tuple[bytes, bytes]:
    f = asm.manifest.by_path()["pages-1.img"]
    src = asm.out_dir.parent / "src" / f.path
    return f.digest(0), src.read_bytes()[:BLOCK_SIZE]


def test_corrupt_block_is_refused(assembler: dl.Assembler) -> None:
    digest, data = _first_block(assembler)
    before = assembler.pending
    with pytest.raises(dl.BlockError, match="checksum"):
        assembler.put_block(digest, bytes([data[0] ^ 1]) + data[1:])
    with pytest.raises(dl.BlockError, match="B, expected"):
        assembler.put_block(digest, data[:-1])
    with pytest.raises(dl.BlockError, match="not part"):
        assembler.put_block(bytes(16), data)
    assert assembler.pending == before
    assembler.put_block(digest, data)
    assembler.put_block(digest, data)  # a duplicate is harmless
    assert assembler.pending == before - 1


def test_verify_names_the_incomplete_file(assembler: dl.Assembler) -> None:
    with pytest.raises(dl.VerifyError, match="blocks never arrived") as err:
        assembler.verify()
    assert err.value.path == "core-1.img"


def _complete(asm: dl.Assembler) -> None:
    src = asm.out_dir.parent / "src"
    for f in asm.manifest.files:
        data = (src / f.path).read_bytes()
        for i in range(f.nblocks):
            asm.put_block(f.digest(i), data[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE])


def test_verify_names_a_file_corrupted_on_disk(assembler: dl.Assembler) -> None:
    _complete(assembler)
    assembler.verify()
    target = assembler.out_dir / "pages-1.img"
    with target.open("r+b") as f:
        f.seek(12345)
        byte = f.read(1)
        f.seek(12345)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(dl.VerifyError, match="sha256") as err:
        assembler.verify()
    assert err.value.path == "pages-1.img"


def test_verify_names_extra_missing_and_resized_files(assembler: dl.Assembler) -> None:
    _complete(assembler)
    (assembler.out_dir / "extra.img").write_bytes(b"x")
    with pytest.raises(dl.VerifyError, match="not in the manifest") as err:
        assembler.verify()
    assert err.value.path == "extra.img"
    (assembler.out_dir / "extra.img").unlink()
    (assembler.out_dir / "core-1.img").write_bytes(b"core!")
    with pytest.raises(dl.VerifyError, match="size 5") as err:
        assembler.verify()
    (assembler.out_dir / "core-1.img").unlink()
    with pytest.raises(dl.VerifyError, match="missing") as err:
        assembler.verify()
    assert err.value.path == "core-1.img"


def test_batches_are_bounded_and_carry_the_right_data(tmp_path: Path, pages: bytearray) -> None:
    src = make_checkpoint(tmp_path / "src", bytes(pages), {"a": b"a" * 10})
    delta = dl.make_delta(src, dl.scan(src, 1), None)
    batches = list(dl.iter_batches(delta, 10 * BLOCK_SIZE))
    assert all(len(b.data) <= 10 * BLOCK_SIZE for b in batches)
    assert sum(len(b) for b in batches) == len(delta.blocks)
    for batch in batches:
        for digest, data in batch.items():
            assert dl.block_digest(data) == digest
    with pytest.raises(ValueError, match="at least one block"):
        next(dl.iter_batches(delta, 100))


def test_source_shrinking_while_shipped_is_an_error(tmp_path: Path, pages: bytearray) -> None:
    src = make_checkpoint(tmp_path / "src", bytes(pages), {})
    delta = dl.make_delta(src, dl.scan(src, 1), None)
    os.truncate(src / "pages-1.img", 100)
    with pytest.raises(dl.DeltaError, match="shrank"):
        list(dl.iter_batches(delta))


def test_encoder_remembers_the_committed_base(
    tmp_path: Path, pages: bytearray, small_files: dict[str, bytes]
) -> None:
    src = make_checkpoint(tmp_path / "src", bytes(pages), small_files)
    enc = dl.Encoder()
    first = enc.encode(src, 1)
    enc.commit(first.manifest)
    again = enc.encode(src, 2)
    assert again.blocks == ()
    assert enc.delta(src, again.manifest, full=True).blocks == first.blocks
    enc.reset()
    assert enc.encode(src, 3).base is None
    shutil.rmtree(src)
