"""Held-output files: one closed epoch's output frames, for release at the standby.

The data plane writes one at ``close_epoch(..., save=PATH)``; it travels inside the
checkpoint, and the standby's data plane sends it with ``xmit``. This module reads and
writes the same format in pure Python (tests, tools, the standby's checks). It does no
I/O beyond the one file it is given.

Format, all integers little-endian:

- header, 40 bytes: magic ``HMGROUT1``, u64 epoch, u64 term, u64 frame count,
  u64 total frame bytes;
- then for each frame: u32 length (1..65535), then the frame.

The data plane refuses a file larger than 256 MiB, with trailing bytes, or whose count,
lengths or byte total do not add up; :func:`parse_frames` refuses exactly the same ones.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterable
from pathlib import Path

MAGIC = b"HMGROUT1"
HEADER = struct.Struct("<8sQQQQ")
LENGTH = struct.Struct("<I")
MAX_FILE = 256 << 20
MAX_FRAME = 65535
TMP_SUFFIX = ".tmp"


class HeldOutputError(ValueError):
    """A held-output file that does not follow the format."""


def encode_frames(epoch: int, term: int, frames: Iterable[bytes]) -> bytes:
    """The file's bytes for ``frames`` of ``epoch`` under ``term``."""
    frames = list(frames)
    for i, f in enumerate(frames, start=1):
        if not 1 <= len(f) <= MAX_FRAME:
            raise HeldOutputError(f"frame {i} is {len(f)} bytes; frames are 1..{MAX_FRAME}")
    total = sum(len(f) for f in frames)
    parts = [HEADER.pack(MAGIC, epoch, term, len(frames), total)]
    for f in frames:
        parts.append(LENGTH.pack(len(f)))
        parts.append(f)
    data = b"".join(parts)
    if len(data) > MAX_FILE:
        raise HeldOutputError(f"the file would be {len(data)} bytes; the limit is {MAX_FILE}")
    return data


def parse_frames(data: bytes, name: str = "held output") -> tuple[int, int, list[bytes]]:
    """(epoch, term, frames) of a whole file's bytes; raises HeldOutputError."""
    if len(data) > MAX_FILE:
        raise HeldOutputError(f"{name} is {len(data)} bytes; the limit is {MAX_FILE}")
    if len(data) < HEADER.size:
        raise HeldOutputError(
            f"{name} is truncated: {len(data)} bytes, shorter than the {HEADER.size}-byte header"
        )
    magic, epoch, term, count, total = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise HeldOutputError(f"{name} is not a held-output file (magic {magic!r})")
    frames: list[bytes] = []
    off = HEADER.size
    for i in range(1, count + 1):
        if len(data) - off < LENGTH.size:
            raise HeldOutputError(f"{name} is truncated: frame {i} of {count} has no length")
        (length,) = LENGTH.unpack_from(data, off)
        if not 1 <= length <= MAX_FRAME:
            raise HeldOutputError(
                f"{name}: frame {i} has length {length}; frames are 1..{MAX_FRAME} bytes"
            )
        off += LENGTH.size
        if len(data) - off < length:
            raise HeldOutputError(
                f"{name} is truncated: frame {i} of {count} needs {length} bytes, "
                f"{len(data) - off} are left"
            )
        frames.append(bytes(data[off : off + length]))
        off += length
    if off != len(data):
        raise HeldOutputError(
            f"{name}: {len(data) - off} bytes follow the {count} frames the header counts"
        )
    got = sum(len(f) for f in frames)
    if got != total:
        raise HeldOutputError(f"{name}: the frames hold {got} bytes, the header says {total}")
    return epoch, term, frames


def read_frames(path: str | os.PathLike[str]) -> tuple[int, int, list[bytes]]:
    """(epoch, term, frames) of the file at ``path``; raises HeldOutputError or OSError."""
    p = Path(path)
    size = p.stat().st_size
    if size > MAX_FILE:
        raise HeldOutputError(f"{p} is {size} bytes; the limit is {MAX_FILE}")
    return parse_frames(p.read_bytes(), str(p))


def write_frames(
    path: str | os.PathLike[str], epoch: int, term: int, frames: Iterable[bytes]
) -> int:
    """Writes the file atomically (``PATH.tmp``, then rename); returns its size.

    On failure no ``PATH.tmp`` is left behind and ``PATH`` is untouched.
    """
    data = encode_frames(epoch, term, frames)
    p = Path(path)
    tmp = p.with_name(p.name + TMP_SUFFIX)
    try:
        with tmp.open("wb") as f:
            f.write(data)
        tmp.replace(p)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return len(data)
