"""The held-output file format, in pure Python (the data plane writes and reads the same)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from dpdk_vhost.heldout import (
    HEADER,
    MAGIC,
    MAX_FILE,
    MAX_FRAME,
    HeldOutputError,
    encode_frames,
    parse_frames,
    read_frames,
    write_frames,
)

FRAMES = [bytes([i]) * (60 + i) for i in range(5)]


def test_header_is_40_bytes_little_endian() -> None:
    data = encode_frames(7, 3, [b"\xaa" * 14, b"\xbb" * 20])
    assert HEADER.size == 40
    assert data[:8] == b"HMGROUT1" == MAGIC
    assert struct.unpack_from("<QQQQ", data, 8) == (7, 3, 2, 34)
    assert data[40:44] == (14).to_bytes(4, "little")
    assert data[44:58] == b"\xaa" * 14
    assert data[58:62] == (20).to_bytes(4, "little")
    assert len(data) == 40 + 4 + 14 + 4 + 20


def test_round_trip_keeps_order_epoch_and_term(tmp_path: Path) -> None:
    path = tmp_path / "e5.out"
    size = write_frames(path, 5, 2, FRAMES)
    assert size == path.stat().st_size
    assert read_frames(path) == (5, 2, FRAMES)
    assert not (tmp_path / "e5.out.tmp").exists()


def test_empty_epoch_is_a_valid_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.out"
    assert write_frames(path, 9, 0, []) == 40
    assert read_frames(path) == (9, 0, [])


def test_write_replaces_atomically_and_leaves_no_tmp_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "e.out"
    write_frames(path, 1, 0, FRAMES)
    before = path.read_bytes()
    with pytest.raises(HeldOutputError):
        write_frames(path, 2, 0, [b""])
    assert path.read_bytes() == before
    with pytest.raises(FileNotFoundError):
        write_frames(tmp_path / "no" / "such" / "dir.out", 1, 0, FRAMES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.out"]


def test_write_refuses_out_of_range_frames() -> None:
    with pytest.raises(HeldOutputError, match="frame 2 is 0 bytes"):
        encode_frames(1, 0, [b"x", b""])
    with pytest.raises(HeldOutputError, match=f"1..{MAX_FRAME}"):
        encode_frames(1, 0, [b"x" * (MAX_FRAME + 1)])


def _good() -> bytes:
    return encode_frames(4, 1, FRAMES)


def _with_header(count: int | None = None, total: int | None = None) -> bytes:
    data = bytearray(_good())
    _, epoch, term, c, t = HEADER.unpack_from(data)
    HEADER.pack_into(
        data, 0, MAGIC, epoch, term, c if count is None else count, t if total is None else total
    )
    return bytes(data)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "truncated: 0 bytes, shorter than the 40-byte header"),
        (_good()[:39], "shorter than the 40-byte header"),
        (b"HMGROUT2" + _good()[8:], "not a held-output file"),
        (_good()[:-1], r"truncated: frame 5 of 5 needs 64 bytes, 63 are left"),
        (_good()[:42], "truncated: frame 1 of 5 has no length"),
        (_with_header(count=6), "truncated: frame 6 of 6 has no length"),
        (_with_header(count=4), "68 bytes follow the 4 frames the header counts"),
        (_good() + b"\x00", "1 bytes follow the 5 frames"),
        (_with_header(total=1), "the header says 1"),
        (
            HEADER.pack(MAGIC, 1, 0, 1, 0) + struct.pack("<I", 0),
            "frame 1 has length 0",
        ),
        (
            HEADER.pack(MAGIC, 1, 0, 1, 70000) + struct.pack("<I", 70000) + b"x" * 70000,
            "frame 1 has length 70000",
        ),
        (HEADER.pack(MAGIC, 1, 0, 2**64 - 1, 0), "truncated: frame 1 of"),
    ],
    ids=[
        "empty",
        "short_header",
        "bad_magic",
        "last_frame_truncated",
        "no_room_for_length",
        "count_too_high",
        "count_too_low",
        "trailing_byte",
        "byte_total_wrong",
        "zero_length_frame",
        "oversized_frame",
        "huge_count",
    ],
)
def test_malformed_files_are_refused(data: bytes, match: str, tmp_path: Path) -> None:
    with pytest.raises(HeldOutputError, match=match):
        parse_frames(data)
    path = tmp_path / "bad.out"
    path.write_bytes(data)
    with pytest.raises(HeldOutputError, match=match):
        read_frames(path)


def test_files_over_256_mib_are_refused_without_reading_them(tmp_path: Path) -> None:
    path = tmp_path / "big.out"
    with path.open("wb") as f:
        f.write(_good())
        f.truncate(MAX_FILE + 1)  # sparse: costs no space
    with pytest.raises(HeldOutputError, match="the limit is 268435456"):
        read_frames(path)


def test_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "named.out"
    path.write_bytes(b"junk")
    with pytest.raises(HeldOutputError, match=str(path)):
        read_frames(path)
