"""The demo's PNG writer: valid PNGs whose pixels are where the data says."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from hamgr import plot


def decode(path: Path) -> tuple[int, int, list[bytes]]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height = 8, b"", 0, 0
    while pos < len(data):
        (length,) = struct.unpack("!I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack("!I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body)
        if kind == b"IHDR":
            width, height = struct.unpack("!II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = 1 + 3 * width
    rows = [raw[y * stride + 1 : (y + 1) * stride] for y in range(height)]
    return width, height, rows


def pixel(rows: list[bytes], x: int, y: int) -> tuple[int, ...]:
    return tuple(rows[y][3 * x : 3 * x + 3])


def test_bars_are_as_tall_as_their_values(tmp_path: Path) -> None:
    path = tmp_path / "b.png"
    plot.bars([0, 5, 10], path, height=11, markers=[(0, plot.RED)])
    width, height, rows = decode(path)
    assert (width, height) == (3, 11)
    assert pixel(rows, 2, 0) == plot.BLUE  # the peak reaches the top
    assert pixel(rows, 1, 10) == plot.BLUE
    assert pixel(rows, 1, 4) == plot.WHITE  # half height stops at the middle
    assert pixel(rows, 1, 5) == plot.BLUE
    assert pixel(rows, 0, 3) == plot.RED  # the marker spans the column


def test_cdf_reaches_the_top_at_the_maximum(tmp_path: Path) -> None:
    path = tmp_path / "c.png"
    top = plot.cdf([1.0, 2.0, 3.0, 4.0], path, width=40, height=21)
    assert top == 4.0
    _, _, rows = decode(path)
    assert pixel(rows, 39, 0) == plot.GREEN
    assert pixel(rows, 0, 0) == plot.WHITE
