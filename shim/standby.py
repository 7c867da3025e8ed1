"""The standby side of the epoch protocol for one unit: a state machine with no I/O.

Everything that affects this machine lives in this file. The driver feeds it what arrives on the
replication link (`Manifest`, `Chunk`, `ImageEnd`) and the failover executor's `Promote`, through
`StandbyMachine.handle`, and carries out the returned commands in order: the store's
(`StartAssembly`, `StoreChunk`, `Commit`, `DropAssembly`, `RecordTerm`) and the link's (`SendAck`,
`Reject`, which the primary sees as Acked and Nacked).

The store's contract, which makes a crash harmless: it keeps the last committed image and at most
one image being assembled. `Commit` is the only command that changes the last committed image, and
does so atomically (a rename). A crash while assembling therefore leaves the last committed image
intact; the restarted driver builds a new machine from the store's last committed image and its
recorded term. `RecordTerm` must be durable before the driver sends anything after it, so that a
restart never forgets a term it has seen.

States, and the transition table in words (TRANSITIONS lists the same pairs):

- IDLE: holds the last committed image, or none; nothing is being assembled.
- IDLE + Manifest -> ASSEMBLING if the manifest is acceptable (StartAssembly); else IDLE (Reject).
  Acceptable means: the term is not below the standby's; the epoch is above the last committed
  one (same term), or any epoch in a new, higher term; a delta's parent is the last committed
  epoch of the same term (a new term needs a full image); the file list is non-empty, without
  duplicates, with sizes >= 0 and sha256 digests. A repeat of the last committed epoch and term is
  acked again without transfer, because the ack may have been lost.
- ASSEMBLING + Chunk -> ASSEMBLING (StoreChunk) if it is the next bytes of a listed file and a
  file it completes matches its sha256; else IDLE (DropAssembly, Reject). Chunks must arrive in
  order per file: the checksum is computed as they pass.
- ASSEMBLING + ImageEnd -> IDLE: Commit then SendAck if every file is complete and verified; else
  DropAssembly and Reject (partial). Nothing is ever acked before ImageEnd.
- ASSEMBLING + Manifest: the current image can no longer complete (DropAssembly, Reject), then the
  manifest is treated as in IDLE.
- Chunk or ImageEnd that are not for the image being assembled (in IDLE, all of them): Ignored,
  and the state stays. A rejected image's remaining chunks land here, and the primary already has
  its Reject; so do those of a stale-term image, which leaves the current assembly alone.
- any state + Promote(term) -> PROMOTED, if term is above every term seen (DropAssembly of any
  image in progress). Promote again with the same term is a no-op, so a repeated failover step
  is harmless; any other Promote in PROMOTED raises ProtocolError.
- PROMOTED is final: Manifests and ImageEnds get Reject with the promoted term, so the old primary
  learns it is fenced; Chunks are Ignored. Nothing is acked again (I3).

Messages from the network never raise: a bad one is rejected or ignored. ProtocolError is kept
for the local executor's mistakes.
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

import attrs

from shim.epoch import ProtocolError

if TYPE_CHECKING:
    from _hashlib import HASH

__all__ = [
    "TRANSITIONS",
    "Chunk",
    "Command",
    "Commit",
    "CommittedImage",
    "DropAssembly",
    "Event",
    "FileSpec",
    "Ignored",
    "ImageEnd",
    "Manifest",
    "Promote",
    "ProtocolError",
    "RecordTerm",
    "Reject",
    "SendAck",
    "StandbyMachine",
    "StartAssembly",
    "State",
    "StoreChunk",
]

_SHA256 = re.compile(r"[0-9a-f]{64}")


# --- events ---------------------------------------------------------------------------------


@attrs.frozen
class Event:
    """Something the standby's driver received or was told."""


@attrs.frozen
class FileSpec:
    name: str
    size: int
    sha256: str


@attrs.frozen
class Manifest(Event):
    unit: str
    epoch: int
    term: int
    # The epoch this image is a delta against, or None for a full image.
    parent: int | None
    cut_seq: int
    files: tuple[FileSpec, ...]


@attrs.frozen
class Chunk(Event):
    unit: str
    epoch: int
    term: int
    file: str
    offset: int
    data: bytes


@attrs.frozen
class ImageEnd(Event):
    unit: str
    epoch: int
    term: int


@attrs.frozen
class Promote(Event):
    """This standby becomes the primary under ``term``."""

    term: int


# --- commands -------------------------------------------------------------------------------


@attrs.frozen
class Command:
    """Something the machine asks the standby's driver to do."""


@attrs.frozen
class RecordTerm(Command):
    """Durably record the highest term seen, before anything later is sent."""

    term: int


@attrs.frozen
class StartAssembly(Command):
    """Prepare an empty image with these files; an empty file may get no chunk at all."""

    epoch: int
    term: int
    parent: int | None
    files: tuple[FileSpec, ...]


@attrs.frozen
class StoreChunk(Command):
    epoch: int
    file: str
    offset: int
    data: bytes


@attrs.frozen
class DropAssembly(Command):
    epoch: int


@attrs.frozen
class Commit(Command):
    """Atomically make the assembled image of ``epoch`` the last committed one."""

    epoch: int
    term: int
    cut_seq: int


@attrs.frozen
class SendAck(Command):
    unit: str
    epoch: int
    term: int


@attrs.frozen
class Reject(Command):
    """Tell the primary that ``epoch`` was not committed. ``term`` is the standby's own."""

    unit: str
    epoch: int
    term: int
    reason: str


@attrs.frozen
class Ignored(Command):
    event: Event
    reason: str


# --- the machine ----------------------------------------------------------------------------


class State(enum.Enum):
    IDLE = "idle"
    ASSEMBLING = "assembling"
    PROMOTED = "promoted"


_I, _A, _P = State.IDLE, State.ASSEMBLING, State.PROMOTED

# For each state and event, the states the machine may be in afterwards; checked on every event.
TRANSITIONS: Mapping[State, Mapping[type[Event], frozenset[State]]] = MappingProxyType(
    {
        _I: {
            Manifest: frozenset({_A, _I}),
            Chunk: frozenset({_I}),
            ImageEnd: frozenset({_I}),
            Promote: frozenset({_P}),
        },
        _A: {
            Manifest: frozenset({_A, _I}),
            Chunk: frozenset({_A, _I}),
            ImageEnd: frozenset({_I, _A}),
            Promote: frozenset({_P}),
        },
        _P: {
            Manifest: frozenset({_P}),
            Chunk: frozenset({_P}),
            ImageEnd: frozenset({_P}),
            Promote: frozenset({_P}),
        },
    }
)


@attrs.frozen
class CommittedImage:
    epoch: int
    term: int
    cut_seq: int


@attrs.define
class _File:
    spec: FileSpec
    hasher: HASH = attrs.field(factory=hashlib.sha256)
    received: int = 0

    @property
    def verified(self) -> bool:
        return self.received == self.spec.size and self.hasher.hexdigest() == self.spec.sha256


@attrs.define
class _Assembly:
    manifest: Manifest
    files: dict[str, _File]


class StandbyMachine:
    """The standby's epoch protocol for one unit. See the module docstring."""

    def __init__(
        self, unit: str, term: int = 0, last_committed: CommittedImage | None = None
    ) -> None:
        if last_committed is not None and last_committed.term > term:
            raise ValueError(
                f"recorded term {term} is below the committed image's term {last_committed.term}"
            )
        self.unit = unit
        self._term = term
        self._state = State.IDLE
        self._committed = last_committed
        self._assembly: _Assembly | None = None

    @property
    def state(self) -> State:
        return self._state

    @property
    def term(self) -> int:
        return self._term

    @property
    def last_committed(self) -> CommittedImage | None:
        return self._committed

    @property
    def assembling(self) -> int | None:
        return None if self._assembly is None else self._assembly.manifest.epoch

    def handle(self, event: Event) -> list[Command]:
        allowed = TRANSITIONS[self._state].get(type(event))
        if allowed is None:
            raise ProtocolError(f"unit {self.unit}: unknown event {event!r}")
        out: list[Command] = []
        match event:
            case Promote():
                self._on_promote(event, out)
            case Manifest() | Chunk() | ImageEnd() if event.unit != self.unit:
                out.append(Ignored(event, f"for unit {event.unit}, this is {self.unit}"))
            case Manifest():
                self._on_manifest(event, out)
            case Chunk():
                self._on_chunk(event, out)
            case ImageEnd():
                self._on_end(event, out)
        if self._state not in allowed:
            raise AssertionError(f"{self._state} after {event!r} is not in the table")
        return out

    def _reject(self, epoch: int, reason: str, out: list[Command]) -> None:
        out.append(Reject(self.unit, epoch, self._term, reason))

    def _abandon(self, reason: str, out: list[Command]) -> None:
        assembly = self._assembly
        if assembly is None:
            return
        self._assembly = None
        if self._state is State.ASSEMBLING:
            self._state = State.IDLE
        out.append(DropAssembly(assembly.manifest.epoch))
        self._reject(assembly.manifest.epoch, reason, out)

    def _on_promote(self, event: Promote, out: list[Command]) -> None:
        if self._state is State.PROMOTED:
            if event.term != self._term:
                raise ProtocolError(
                    f"unit {self.unit}: already promoted at term {self._term}, "
                    f"asked again with term {event.term}"
                )
            return
        if event.term <= self._term:
            raise ProtocolError(
                f"unit {self.unit}: promotion must raise the term above {self._term}, "
                f"got {event.term}"
            )
        if self._assembly is not None:
            out.append(DropAssembly(self._assembly.manifest.epoch))
            self._assembly = None
        self._term = event.term
        self._state = State.PROMOTED
        out.append(RecordTerm(event.term))

    def _on_manifest(self, m: Manifest, out: list[Command]) -> None:
        if self._state is State.PROMOTED:
            self._reject(m.epoch, f"promoted to primary at term {self._term}", out)
            return
        if m.term < self._term:
            self._reject(m.epoch, f"stale term {m.term}, seen {self._term}", out)
            return
        self._abandon(f"partial: superseded by a manifest for epoch {m.epoch}", out)
        if m.term > self._term:
            self._term = m.term
            out.append(RecordTerm(m.term))
        last = self._committed
        if last is not None and (last.epoch, last.term) == (m.epoch, m.term):
            # Our ack was lost and the primary shipped the same image again.
            out.append(SendAck(self.unit, m.epoch, m.term))
            return
        problem = self._manifest_problem(m)
        if problem is not None:
            self._reject(m.epoch, problem, out)
            return
        self._assembly = _Assembly(m, {f.name: _File(f) for f in m.files})
        self._state = State.ASSEMBLING
        out.append(StartAssembly(m.epoch, m.term, m.parent, m.files))

    def _manifest_problem(self, m: Manifest) -> str | None:
        last = self._committed
        same_term = last is not None and last.term == m.term
        if last is not None and same_term and m.epoch <= last.epoch:
            return f"stale epoch {m.epoch}, committed {last.epoch}"
        if m.parent is not None and not (last is not None and same_term and m.parent == last.epoch):
            have = "nothing" if last is None else f"epoch {last.epoch} term {last.term}"
            return f"parent epoch {m.parent} is not committed here (have {have})"
        if not m.files:
            return "manifest lists no files"
        names = [f.name for f in m.files]
        if len(set(names)) != len(names):
            return "manifest lists a file twice"
        for f in m.files:
            if f.size < 0:
                return f"file {f.name}: negative size {f.size}"
            if not _SHA256.fullmatch(f.sha256):
                return f"file {f.name}: not a sha256 digest: {f.sha256!r}"
        return None

    def _current(self, event: Chunk | ImageEnd, out: list[Command]) -> _Assembly | None:
        assembly = self._assembly
        if self._state is State.PROMOTED:
            if isinstance(event, ImageEnd):
                self._reject(event.epoch, f"promoted to primary at term {self._term}", out)
            else:
                out.append(Ignored(event, "promoted"))
            return None
        if assembly is None or (assembly.manifest.epoch, assembly.manifest.term) != (
            event.epoch,
            event.term,
        ):
            out.append(Ignored(event, f"no image of epoch {event.epoch} term {event.term} open"))
            return None
        return assembly

    def _on_chunk(self, c: Chunk, out: list[Command]) -> None:
        assembly = self._current(c, out)
        if assembly is None:
            return
        f = assembly.files.get(c.file)
        if f is None:
            self._abandon(f"corrupt: chunk for unlisted file {c.file!r}", out)
            return
        if c.offset != f.received:
            self._abandon(f"corrupt: file {c.file} chunk at {c.offset}, expected {f.received}", out)
            return
        if f.received + len(c.data) > f.spec.size:
            self._abandon(f"corrupt: file {c.file} grows past its size {f.spec.size}", out)
            return
        f.hasher.update(c.data)
        f.received += len(c.data)
        if f.received == f.spec.size and not f.verified:
            # Refuse to store the last bytes of a file already known to be corrupt.
            self._abandon(f"corrupt: file {c.file} does not match its sha256", out)
            return
        out.append(StoreChunk(c.epoch, c.file, c.offset, c.data))

    def _on_end(self, end: ImageEnd, out: list[Command]) -> None:
        assembly = self._current(end, out)
        if assembly is None:
            return
        for f in assembly.files.values():
            if not f.verified:
                how = (
                    f"{f.received} of {f.spec.size} bytes"
                    if f.received != f.spec.size
                    else "sha256 mismatch"
                )
                self._abandon(f"partial: file {f.spec.name} has {how}", out)
                return
        m = assembly.manifest
        self._assembly = None
        self._state = State.IDLE
        self._committed = CommittedImage(m.epoch, m.term, m.cut_seq)
        out.append(Commit(m.epoch, m.term, m.cut_seq))
        out.append(SendAck(self.unit, m.epoch, m.term))
