"""Tiny PNG charts with no plotting library: a bar chart over time and a CDF line.

The demo report needs two pictures and nothing else; a plotting stack would be the heaviest
dependency of the project. Axes and labels are drawn by the HTML around the image.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

RGB = tuple[int, int, int]
WHITE: RGB = (255, 255, 255)
GREY: RGB = (200, 200, 200)
BLUE: RGB = (40, 90, 200)
RED: RGB = (200, 40, 40)
GREEN: RGB = (30, 150, 60)


class Canvas:
    def __init__(self, width: int, height: int) -> None:
        self.width = width
        self.height = height
        self.pixels = bytearray(WHITE * (width * height))

    def set(self, x: int, y: int, color: RGB) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            i = 3 * (y * self.width + x)
            self.pixels[i : i + 3] = bytes(color)

    def vline(self, x: int, y0: int, y1: int, color: RGB) -> None:
        for y in range(min(y0, y1), max(y0, y1) + 1):
            self.set(x, y, color)

    def hline(self, y: int, x0: int, x1: int, color: RGB) -> None:
        for x in range(min(x0, x1), max(x0, x1) + 1):
            self.set(x, y, color)

    def png(self) -> bytes:
        raw = b"".join(
            b"\0" + bytes(self.pixels[3 * y * self.width : 3 * (y + 1) * self.width])
            for y in range(self.height)
        )

        def chunk(kind: bytes, data: bytes) -> bytes:
            body = kind + data
            return struct.pack("!I", len(data)) + body + struct.pack("!I", zlib.crc32(body))

        header = struct.pack("!IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        return (
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw, 6))
            + chunk(b"IEND", b"")
        )

    def save(self, path: Path) -> None:
        path.write_bytes(self.png())


def bars(
    values: Sequence[float],
    path: Path,
    *,
    height: int = 240,
    markers: Sequence[tuple[int, RGB]] = (),
) -> None:
    """One bar per value, one pixel wide; `markers` are (index, colour) vertical lines."""
    width = max(1, len(values))
    top = max(values, default=0.0) or 1.0
    canvas = Canvas(width, height)
    for quarter in (1, 2, 3):
        canvas.hline(height - 1 - quarter * (height - 1) // 4, 0, width - 1, GREY)
    for x, value in enumerate(values):
        if value > 0:
            canvas.vline(x, height - 1, height - 1 - round(value / top * (height - 1)), BLUE)
    for x, color in markers:
        canvas.vline(x, 0, height - 1, color)
    canvas.save(path)


def cdf(samples: Sequence[float], path: Path, *, width: int = 480, height: int = 240) -> float:
    """The empirical CDF of `samples` on a linear x axis from 0 to the maximum; returns it."""
    ordered = sorted(samples)
    canvas = Canvas(width, height)
    for quarter in (1, 2, 3):
        canvas.hline(height - 1 - quarter * (height - 1) // 4, 0, width - 1, GREY)
    if not ordered:
        canvas.save(path)
        return 0.0
    top = ordered[-1] or 1.0
    n = len(ordered)
    last_y = height - 1
    index = 0
    for x in range(width):
        limit = top * (x + 1) / width
        while index < n and ordered[index] <= limit:
            index += 1
        y = height - 1 - round(index / n * (height - 1))
        canvas.vline(x, last_y, y, GREEN)
        last_y = y
    canvas.save(path)
    return top
