"""The standby's checkpoint store for one unit: the last committed checkpoint, at most one being
assembled, and the fencing term (DESIGN.md step 6 and invariant I3).

Layout under `root` (tmpfs in production)::

    state.json                  {"term": highest term seen, "promoted": term of promote() or null,
                                 "released": [term, epoch] whose held output was sent, or null}
    committed -> checkpoint.<epoch>.<term>     a relative symlink, the only commit pointer
    checkpoint.<epoch>.<term>/  images/ (what restore uses), manifest.bin, meta.json
    assembling.<epoch>/         the same shape, while blocks arrive

A commit verifies the assembly, fsyncs it, renames `assembling.<e>` to `checkpoint.<e>.<t>`,
then swaps the pointer by renaming a fresh symlink over `committed`; only after that (and after
the ack, see `collect`) is the previous checkpoint deleted. Every step before the swap leaves the
old pointer, and so the old checkpoint, untouched; every step after it leaves the new one
complete. `recover()` therefore only has to delete whatever the pointer does not name. A crash
at any moment leaves the last committed checkpoint intact and restorable.

Fencing: the store remembers the highest term it has seen, persisted before anything that relied
on it is acknowledged. Anything below it is refused. After `promote(term)` the node is the primary
of `term`, so anything at or below that term can only come from a deposed primary and is refused
too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Final

import attrs

from shim.delta import (
    Assembler,
    Base,
    Manifest,
    ManifestError,
    decode_manifest,
    encode_manifest,
    verify_tree,
)
from shim.standby import output_epoch

__all__ = [
    "Checkpoint",
    "Meta",
    "NoAssemblyError",
    "StaleEpochError",
    "StaleTermError",
    "Store",
    "StoreError",
    "link_copy",
    "output_files",
]

log = logging.getLogger(__name__)

Meta = Mapping[str, int | str]

_STATE: Final = "state.json"
_POINTER: Final = "committed"
_POINTER_TMP: Final = "committed.tmp"
_IMAGES: Final = "images"
_MANIFEST: Final = "manifest.bin"
_META: Final = "meta.json"
_CHECKPOINT_RE: Final = re.compile(r"^checkpoint\.(\d+)\.(\d+)$")
_ASSEMBLING_RE: Final = re.compile(r"^assembling\.\d+$")


def output_files(images: Path) -> list[tuple[int, Path]]:
    """The held-output files in an image directory, as (epoch, path) in epoch order."""
    found = []
    for path in images.iterdir():
        epoch = output_epoch(path.name)
        if epoch is not None and path.is_file():
            found.append((epoch, path))
    return sorted(found)


class StoreError(Exception):
    """The store refused an operation; the message says why."""


class StaleTermError(StoreError):
    """A term below the highest seen, or at or below the term this node promoted itself to."""

    def __init__(self, term: int, highest: int, promoted: int | None) -> None:
        why = f"promoted at term {promoted}" if promoted is not None else f"has seen {highest}"
        super().__init__(f"term {term} is stale: this standby {why}")
        self.term = term
        self.highest = highest


class StaleEpochError(StoreError):
    """An epoch that does not come after the committed one within the same term."""


class NoAssemblyError(StoreError):
    """A block or a commit arrived with no checkpoint being assembled."""


@attrs.frozen
class Checkpoint:
    """The committed checkpoint: restore from the image files under `path`."""

    epoch: int
    term: int
    path: Path
    manifest: Manifest = attrs.field(repr=False, eq=False)
    meta: Meta = attrs.field(factory=dict, eq=False)

    @property
    def base(self) -> Base:
        return Base.of(self.manifest)


@attrs.define
class _Assembly:
    epoch: int
    term: int
    dir: Path
    manifest: Manifest
    meta: Meta
    assembler: Assembler


def _fsync_path(path: Path, *, directory: bool = False) -> None:
    fd = os.open(path, (os.O_RDONLY | os.O_DIRECTORY) if directory else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    # Directories after their contents, so each entry is durable before the name that reaches it.
    for dirpath, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            _fsync_path(Path(dirpath, name))
        _fsync_path(Path(dirpath), directory=True)


def _write_file(path: Path, data: bytes, *, sync: bool) -> None:
    with path.open("wb") as f:
        f.write(data)
        if sync:
            f.flush()
            os.fsync(f.fileno())


def link_copy(images: Path, dest: Path) -> None:
    """A copy of the committed image directory `images` at `dest` (which must not exist), made
    of hard links, so on the same filesystem and in about a millisecond: it stays whole after
    the store's `collect` deleted the checkpoint. A committed file is never written again
    (every commit assembles new files), so the links share nothing that changes. Raises
    `FileNotFoundError` if the checkpoint went away meanwhile (`dest` is then removed)."""
    try:
        shutil.copytree(images, dest, copy_function=os.link)
    except BaseException as exc:
        shutil.rmtree(dest, ignore_errors=True)
        if isinstance(exc, OSError) and not images.exists():  # shutil.Error is an OSError
            raise FileNotFoundError(f"{images} went while it was linked") from exc
        raise


class Store:
    """Checkpoints of one unit on the standby. Not thread-safe: one owner drives it.

    `fault` is for crash tests only: it is called with the name of each commit step right after
    that step, and whatever it raises stops the commit there, as a crash would.
    """

    COMMIT_STEPS: Final = ("verified", "written", "synced", "renamed", "linked", "swapped")

    def __init__(
        self,
        root: Path,
        *,
        fsync: bool = True,
        fault: Callable[[str], None] | None = None,
    ) -> None:
        self.root = Path(root)
        self._fsync = fsync
        self._fault = fault
        self._term = 0
        self._promoted: int | None = None
        self._released: tuple[int, int] | None = None
        self._committed: Checkpoint | None = None
        self._base: Base | None = None
        self._assembly: _Assembly | None = None
        self._garbage: list[Path] = []
        self.recover()

    # --- state ---------------------------------------------------------------------------------

    @property
    def term(self) -> int:
        """The highest term this store has seen."""
        return self._term

    @property
    def promoted(self) -> int | None:
        return self._promoted

    def committed(self) -> Checkpoint | None:
        return self._committed

    @property
    def released(self) -> tuple[int, int]:
        """(term, epoch) up to which the held output shipped here has been sent; (0, 0) if
        none was."""
        return (0, 0) if self._released is None else self._released

    def record_released(self, term: int, epoch: int) -> None:
        """Durably note that the held output up to (`term`, `epoch`) has been sent."""
        if (term, epoch) <= self.released:
            return
        self._released = (term, epoch)
        self._save_state()

    def committed_base(self) -> Base | None:
        """The committed manifest prepared for decoding deltas against it (cached)."""
        if self._base is None and self._committed is not None:
            self._base = self._committed.base
        return self._base

    @property
    def assembling(self) -> tuple[int, int] | None:
        """(epoch, term) of the checkpoint being assembled, if any."""
        a = self._assembly
        return None if a is None else (a.epoch, a.term)

    @property
    def pending(self) -> int:
        """Distinct blocks the assembly still waits for."""
        if self._assembly is None:
            raise NoAssemblyError("no checkpoint is being assembled")
        return self._assembly.assembler.pending

    # --- fencing -------------------------------------------------------------------------------

    def _check_term(self, term: int) -> None:
        if term < self._term or (self._promoted is not None and term <= self._promoted):
            raise StaleTermError(term, self._term, self._promoted)

    def observe_term(self, term: int) -> None:
        """Accept a message carrying `term`: refuse it if stale, remember it if it is news.

        A higher term also abandons an assembly started under a lower one, whose primary is
        deposed.
        """
        self._check_term(term)
        if term > self._term:
            if self._assembly is not None and self._assembly.term < term:
                self.abort()
            self._term = term
            self._save_state()

    def promote(self, term: int) -> None:
        """This node becomes the primary of `term`: fence every lower (and equal) term for good."""
        if term < self._term:
            raise StaleTermError(term, self._term, self._promoted)
        self.abort()
        self._term = term
        self._promoted = term
        self._save_state()

    def _save_state(self) -> None:
        tmp = self.root / (_STATE + ".tmp")
        released = None if self._released is None else list(self._released)
        state = {"term": self._term, "promoted": self._promoted, "released": released}
        data = json.dumps(state).encode()
        _write_file(tmp, data, sync=self._fsync)
        os.replace(tmp, self.root / _STATE)
        if self._fsync:
            _fsync_path(self.root, directory=True)

    def _load_state(self) -> None:
        path = self.root / _STATE
        if not path.exists():
            return
        try:
            state = json.loads(path.read_bytes())
            term, promoted = state["term"], state["promoted"]
            released = state.get("released")
            if not isinstance(term, int) or not (promoted is None or isinstance(promoted, int)):
                raise TypeError("wrong types")
            if released is not None and not (
                isinstance(released, list)
                and len(released) == 2
                and all(isinstance(v, int) for v in released)
            ):
                raise TypeError("released is not [term, epoch]")
        except (ValueError, KeyError, TypeError) as e:
            # Losing the term would let a deposed primary commit again, so refuse to start.
            raise StoreError(f"{path} is unreadable ({e}); fencing state would be lost") from e
        self._term, self._promoted = term, promoted
        self._released = None if released is None else (released[0], released[1])

    # --- assembly ------------------------------------------------------------------------------

    def begin(self, epoch: int, term: int, manifest: Manifest, meta: Meta | None = None) -> int:
        """Start assembling checkpoint `epoch` of `term`; returns how many blocks it waits for.

        Any assembly already in progress is abandoned: its primary has moved on.
        """
        self.observe_term(term)
        self.collect()
        c = self._committed
        if c is not None and term == c.term and epoch <= c.epoch:
            raise StaleEpochError(f"epoch {epoch} of term {term}: epoch {c.epoch} is committed")
        if manifest.epoch != epoch:
            raise StoreError(f"manifest is for epoch {manifest.epoch}, not {epoch}")
        self.abort()
        work = self.root / f"assembling.{epoch}"
        if work.exists():
            shutil.rmtree(work)
        work.mkdir()
        try:
            assembler = Assembler(
                work / _IMAGES,
                manifest,
                c.path if c is not None else None,
                c.manifest if c is not None else None,
            )
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        self._assembly = _Assembly(epoch, term, work, manifest, dict(meta or {}), assembler)
        return assembler.pending

    def _current(self) -> _Assembly:
        if self._assembly is None:
            raise NoAssemblyError("no checkpoint is being assembled")
        return self._assembly

    def put_block(self, digest: bytes, data: bytes | memoryview) -> None:
        """Store one shipped block; raises `delta.BlockError` if it is not right."""
        self._current().assembler.put_block(digest, data)

    def verify(self) -> None:
        """Raise `delta.VerifyError` naming the first missing, extra or corrupt file."""
        self._current().assembler.verify()

    def commit(self) -> Checkpoint:
        """Verify the assembly and make it the committed checkpoint, atomically.

        On a `VerifyError` nothing changes and the assembly stays open; the caller aborts it or
        supplies what is missing.
        """
        a = self._current()
        self._check_term(a.term)
        a.assembler.verify()
        a.assembler.close()
        self._step("verified")

        _write_file(a.dir / _MANIFEST, encode_manifest(a.manifest), sync=False)
        meta = {"epoch": a.epoch, "term": a.term, "meta": dict(a.meta)}
        _write_file(a.dir / _META, json.dumps(meta).encode(), sync=False)
        self._step("written")
        if self._fsync:
            _fsync_tree(a.dir)
        self._step("synced")

        name = f"checkpoint.{a.epoch}.{a.term}"
        final = self.root / name
        if final.exists():
            raise StoreError(f"{final} already exists")
        os.rename(a.dir, final)
        self._sync_root()
        self._step("renamed")

        tmp = self.root / _POINTER_TMP
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(name, tmp)
        self._step("linked")
        os.replace(tmp, self.root / _POINTER)
        self._sync_root()
        self._step("swapped")

        old = self._committed
        self._assembly = None
        self._committed = Checkpoint(a.epoch, a.term, final / _IMAGES, a.manifest, a.meta)
        self._base = None
        if old is not None:
            self._garbage.append(old.path.parent)
        return self._committed

    def collect(self) -> None:
        """Delete checkpoints that are no longer committed.

        Separate from `commit` so that the ack need not wait for it; `begin` and `recover` call it
        too, and a crash before it only leaves what `recover` deletes anyway.
        """
        while self._garbage:
            shutil.rmtree(self._garbage.pop(), ignore_errors=True)

    def abort(self) -> None:
        """Drop the assembly in progress, if any. The committed checkpoint is untouched."""
        a, self._assembly = self._assembly, None
        if a is not None:
            a.assembler.close()
            shutil.rmtree(a.dir, ignore_errors=True)

    def verify_committed(self) -> None:
        """Re-check every committed file against its manifest, e.g. before a restore."""
        if self._committed is None:
            raise StoreError("nothing is committed")
        verify_tree(self._committed.path, self._committed.manifest)

    def _step(self, name: str) -> None:
        if self._fault is not None:
            self._fault(name)

    def _sync_root(self) -> None:
        if self._fsync:
            _fsync_path(self.root, directory=True)

    # --- start-up ------------------------------------------------------------------------------

    def recover(self) -> None:
        """Load the committed checkpoint and the term; delete what a crash left half-written.

        Idempotent. Only names the store itself creates are ever deleted.
        """
        if self._assembly is not None:
            self._assembly.assembler.close()
            self._assembly = None
        self._garbage.clear()
        self.root.mkdir(parents=True, exist_ok=True)
        self._load_state()
        with contextlib.suppress(FileNotFoundError):
            (self.root / (_STATE + ".tmp")).unlink()
        with contextlib.suppress(FileNotFoundError):
            (self.root / _POINTER_TMP).unlink()
        self._committed = self._load_committed()
        self._base = None
        if self._committed is not None and self._committed.term > self._term:
            self._term = self._committed.term
            self._save_state()
        keep = self._committed.path.parent.name if self._committed is not None else None
        for entry in self.root.iterdir():
            name = entry.name
            leftover = _ASSEMBLING_RE.match(name) or _CHECKPOINT_RE.match(name)
            if leftover and name != keep and not entry.is_symlink():
                log.info("store %s: removing leftover %s", self.root, name)
                shutil.rmtree(entry, ignore_errors=True)

    def _load_committed(self) -> Checkpoint | None:
        pointer = self.root / _POINTER
        if not pointer.is_symlink():
            return None
        target = os.readlink(pointer)
        m = _CHECKPOINT_RE.match(target)
        ckpt = self.root / target
        try:
            if m is None or not ckpt.is_dir() or ckpt.is_symlink():
                raise StoreError(f"points to {target!r}")
            manifest = decode_manifest((ckpt / _MANIFEST).read_bytes())
            meta = json.loads((ckpt / _META).read_bytes())
            epoch, term = int(m.group(1)), int(m.group(2))
            if (meta.get("epoch"), meta.get("term"), manifest.epoch) != (epoch, term, epoch):
                raise StoreError("metadata does not match the checkpoint's name")
            user_meta = meta.get("meta", {})
            if not isinstance(user_meta, dict):
                raise StoreError("bad meta")
        except (OSError, ValueError, ManifestError, StoreError) as e:
            # The pointer is only ever swapped onto a complete checkpoint, so this is damage
            # from outside. Starting empty makes the primary ship a full image.
            log.error("store %s: committed checkpoint unusable (%s); starting empty", self.root, e)
            pointer.unlink()
            return None
        return Checkpoint(epoch, term, ckpt / _IMAGES, manifest, MappingProxyType(user_meta))
