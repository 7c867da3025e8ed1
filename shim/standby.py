"""The standby side of the epoch protocol for one unit: a state machine with no I/O.

Everything that decides what the standby accepts, stores, commits, acks and refuses lives in this
file. Its I/O driver is `shim.replication.Receiver`: it turns what arrives on the replication link
into events (`Greeting`, `Manifest`, `Chunk`, `ImageEnd`, `Confirm`, `Damaged`), takes the
failover executor's `Promote`, feeds them to `StandbyMachine.handle`, and carries out the returned
commands in order: the store's (`RecordTerm`, `StartAssembly`, `StoreChunk`, `DropAssembly`,
`Commit`, which `shim.store.Store` executes), `ReleaseOutput` (the host's data plane sends held
output) and the link's (`SendAck`, `SendReleased`, `Reject`, `SendStatus`, which become the
wire's ack, released, nack and status/heartbeat, each answering the message being handled).
Checking data needs the data, so the store does it and the driver reports the verdict as
`Verified`: a bad block after `StoreChunk` (only failures are reported), and always the outcome
of `Commit`. `StoreChunk` and `Commit` therefore end their command list.

Transfers are content-addressed (`shim.delta`): `Manifest` carries the wire manifest, which names
every block by digest and, for a delta, names its base by the digest of the base's manifest; each
`Chunk` is one wire batch of blocks, in any order. The machine decodes the manifest against its
committed image (pure code), so it alone decides whether a delta's base is here.

The store's contract, which makes a crash harmless: it keeps the last committed image and at most
one image being assembled; `Commit` verifies every file (size and sha256) and only then swaps the
commit pointer atomically, so nothing unverified is ever committed and a failed verification
changes nothing. A crash while assembling leaves the last committed image intact; the restarted
driver builds a new machine from the store's committed image, recorded term and promotion.
`RecordTerm` must be durable before the driver sends anything after it, so that a restart never
forgets a term it has seen.

States, and the transition table in words (TRANSITIONS lists the same pairs):

- IDLE: no transfer open. The last committed image, or none.
- Term check, on Greeting, Manifest and ImageEnd: a term below the highest seen gets Reject
  (stale_term) and changes nothing, not even a transfer in progress. A higher term ends any
  transfer of the lower one (DropAssembly of its image, no reply: its sender is deposed) and is
  recorded (RecordTerm). Chunks only count inside their own transfer, whose term is current.
- Greeting (hello, heartbeat) -> same state, SendStatus; or IDLE if a higher term ended a transfer.
- A Greeting with a ``claim`` (a standby about to take over claims its new term here, naming the
  (term, epoch) of the image it will restore): a compare-and-set. After the term check it is
  granted only if this node's committed image is at most that (term, epoch), or there is none:
  then it is a Greeting like any other (RecordTerm of the higher term, which also ends a lower
  term's transfer, so the old primary's later ships here get stale_term; SendStatus). If the
  committed image is newer, the old primary committed here after the claimant's image, so it is
  alive and protected: Reject (newer_commit, naming the committed (term, epoch)), and nothing is
  recorded, not even the term. A claim whose term is not above its image's term is
  bad_message.
- Manifest that passes the term check: the transfer in progress is superseded (DropAssembly; its
  end will find no transfer, one assembly at a time), then
  - the committed (epoch, term) again -> RESENDING: the ack was lost; nothing is stored;
  - an acceptable image -> ASSEMBLING (StartAssembly). Acceptable: the epoch is above the
    committed one within the same term (any epoch in a new term); the manifest decodes, is for
    this epoch and lists files; a delta's base is the committed image of the same term (a new
    term starts from a full image);
  - anything else -> REJECTED (Reject: stale_epoch, base_mismatch or bad_manifest).
- ASSEMBLING + Chunk of its transfer, seq above the last -> StoreChunk; a seq at or below the
  last -> REJECTED (DropAssembly, Reject sequence). Verified(ok=False) -> REJECTED (DropAssembly,
  Reject bad_checksum).
- RESENDING + Chunk of its transfer: seq checked and counted as above, but nothing is stored.
- ASSEMBLING + ImageEnd of its transfer: if its seq and counts (begin seq, messages, blocks)
  match what arrived -> COMMITTING (Commit); else IDLE (DropAssembly, Reject sequence).
- COMMITTING + Verified: ok -> IDLE, the image is the last committed one, SendAck (unsent if
  it carries held output not sent yet, see below); not ok -> IDLE (DropAssembly, Reject
  verify_failed). Nothing else may happen in COMMITTING: the driver reports the outcome of
  Commit before it handles anything else.
- RESENDING + ImageEnd of its transfer -> IDLE, SendAck (unsent as after a commit) if seq and
  counts match (else Reject).
- Confirm(epoch, term), in any state but COMMITTING, which it leaves as it is: the primary
  releases the output up to that epoch (see below). Term check as for a Greeting, but a
  higher term is not recorded (nothing can be committed at it). Then, if the committed image
  is of that term and at or above that epoch: ReleaseOutput of what it carries and was not
  sent, up to that epoch (nothing if all was sent: a repeated confirm sends nothing twice),
  and SendReleased; else Reject (not_committed), nothing sent.
- REJECTED: the transfer failed and its sender has the Reject. Its remaining chunks are Ignored
  and its ImageEnd gets the same Reject again -> IDLE.
- ImageEnd of no open transfer: term check, then Reject (no_transfer). Chunk of no open
  transfer: Ignored (the rest of a superseded, stale or failed transfer).
- Damaged (a message that failed its crc or did not parse) -> Reject with its code; if it belongs
  to the open transfer, that transfer can no longer complete -> REJECTED (DropAssembly).
- any state but COMMITTING + Promote(term) -> PROMOTED, if term is above every term seen
  (DropAssembly of any image in progress, RecordTerm(promoted)). Promote again with the same term
  is a no-op, so a repeated failover step is harmless; any other Promote raises ProtocolError.
- PROMOTED is final: every Greeting, Manifest, ImageEnd, Confirm and Damaged gets Reject with the
  promoted term (stale_term for a term at or below it; unknown_unit above it: this node is no
  standby any more); Chunks are Ignored. Nothing is ever acked again (I3), and no confirm sends
  anything.

Release at the standby: a primary that releases here ships each epoch's held output inside its
checkpoints, and the output leaves from this host, in two steps:
1. The commit (or the RESENDING end) does not send it. If the committed image carries output of
   epochs above what was sent, the ack says so (SendAck unsent); else it is a plain ack.
2. The primary answers an unsent ack with a Confirm of (term, epoch). Only then does the machine
   command ReleaseOutput for the epochs not sent yet, up to that epoch, remember them as sent,
   and answer SendReleased; the primary frees its buffers only on that answer.
So output that a partitioned primary never heard about stays here unsent: a primary cut off
after the transfer, before the ack, re-protects elsewhere with that output in its recovery cut,
and it leaves once, from there. What is left: the confirm arrived and the output went out, but
the released answer was lost (one trip). A new term starts from epoch 0. A promotion first sends
whatever its committed image still carries unsent: the restored unit continues after it, and
nobody else will ever confirm it. The driver records what it sent durably (the store's
``released``), and that record (not the committed epoch) is what SendStatus reports as sent; a
failed send is handled as a crash of the standby (the machine is rebuilt from that record, the
message nacked), and the primary's next confirm, or a promotion, sends it again.

Messages from the network never raise: a bad one is rejected or ignored. ProtocolError is kept
for the driver's mistakes (an outcome event nothing asked for, anything during COMMITTING).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from types import MappingProxyType

import attrs

from shim import delta
from shim.epoch import ProtocolError

# Release at the standby: the held output of epoch e rides in the checkpoint's image directory
# as a file of this name (the data plane's saved-output format, `dpdk_vhost.heldout`).
OUTPUT_PREFIX = "hamgr-output-"
_OUTPUT_RE = re.compile(r"^hamgr-output-(\d{8,})\.out$")


def output_name(epoch: int) -> str:
    return f"{OUTPUT_PREFIX}{epoch:08d}.out"


def output_epoch(name: str) -> int | None:
    """The epoch of a held-output file's name (a path inside the image), or None."""
    m = _OUTPUT_RE.match(name)
    return None if m is None else int(m.group(1))


__all__ = [
    "TRANSITIONS",
    "Chunk",
    "Code",
    "Command",
    "Commit",
    "CommittedImage",
    "Confirm",
    "Damaged",
    "DropAssembly",
    "Event",
    "Greeting",
    "Ignored",
    "ImageEnd",
    "Manifest",
    "Meta",
    "Promote",
    "ProtocolError",
    "RecordTerm",
    "Reject",
    "ReleaseOutput",
    "SendAck",
    "SendReleased",
    "SendStatus",
    "StandbyMachine",
    "StartAssembly",
    "State",
    "StoreChunk",
    "Verified",
]

Meta = Mapping[str, int | str]


class Code(enum.StrEnum):
    """Why a standby refused something. Only these strings appear in a nack."""

    BAD_MESSAGE = "bad_message"
    BAD_CHECKSUM = "bad_checksum"
    UNKNOWN_UNIT = "unknown_unit"
    STALE_TERM = "stale_term"
    STALE_EPOCH = "stale_epoch"
    BASE_MISMATCH = "base_mismatch"
    BAD_MANIFEST = "bad_manifest"
    SEQUENCE = "sequence"
    NO_TRANSFER = "no_transfer"
    VERIFY_FAILED = "verify_failed"
    STORE_ERROR = "store_error"
    INTERNAL = "internal"
    # A term claim refused: this node committed an image newer than the claimant's.
    NEWER_COMMIT = "newer_commit"
    # A confirm for an epoch that is not committed here at that term.
    NOT_COMMITTED = "not_committed"


# --- events ---------------------------------------------------------------------------------


@attrs.frozen
class Event:
    """Something the standby's driver received or was told."""


@attrs.frozen
class Greeting(Event):
    """A hello or a heartbeat: the primary announces its term and asks for the standby's state.

    ``claim`` (hello only): the sender is a standby taking the unit over at ``term``, and names
    the (term, epoch) of the committed image it will restore; see the module docstring.
    """

    unit: str
    epoch: int
    term: int
    seq: int
    claim: tuple[int, int] | None = None


@attrs.frozen
class Manifest(Event):
    """A transfer begins: checkpoint ``epoch`` of ``term``, described by its wire manifest.

    ``manifest`` is `delta.encode_manifest`'s form: per file its size, sha256 and block digests;
    a delta also names its base by epoch and by the digest of the base's manifest.
    """

    unit: str
    epoch: int
    term: int
    seq: int
    manifest: bytes = attrs.field(repr=lambda v: f"<{len(v)} B>")
    meta: Meta = attrs.field(factory=dict)


@attrs.frozen
class Chunk(Event):
    """One wire batch of content-addressed blocks of the transfer, in any order."""

    unit: str
    epoch: int
    term: int
    seq: int
    batch: delta.Batch


@attrs.frozen
class ImageEnd(Event):
    """The sender has sent everything: the seq of its begin, how many batches and blocks."""

    unit: str
    epoch: int
    term: int
    seq: int
    first_seq: int
    messages: int
    blocks: int


@attrs.frozen
class Confirm(Event):
    """The primary got the unsent ack of checkpoint ``epoch`` of ``term`` and asks this standby
    to send the output the checkpoints carry, up to ``epoch`` (release at the standby)."""

    unit: str
    epoch: int
    term: int
    seq: int


@attrs.frozen
class Damaged(Event):
    """A message that failed its checksum or did not parse, addressed as well as it could be read.

    ``epoch`` and ``term`` are None when they were unreadable; ``code`` is bad_message or
    bad_checksum.
    """

    unit: str
    epoch: int | None
    term: int | None
    seq: int
    code: Code
    reason: str


@attrs.frozen
class Verified(Event):
    """The store's verdict on the data of the assembly of (epoch, term).

    After `StoreChunk` only a failure is reported (a block that is not part of the image or does
    not match its digest). `Commit` is always answered: ok means every file verified and the image
    is now the committed one; not ok means it did not verify and nothing changed.
    """

    epoch: int
    term: int
    ok: bool
    reason: str = ""


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
    """Durably record the highest term seen (and, if ``promoted``, that this node is the primary
    of it), before anything later is sent."""

    term: int
    promoted: bool = False


@attrs.frozen
class StartAssembly(Command):
    """Prepare the image of ``manifest`` from the committed image; its missing blocks follow."""

    epoch: int
    term: int
    manifest: delta.Manifest
    meta: Meta = attrs.field(factory=dict)


@attrs.frozen
class StoreChunk(Command):
    """Check each block against its digest and store it; report a bad one as `Verified`."""

    epoch: int
    term: int
    batch: delta.Batch


@attrs.frozen
class DropAssembly(Command):
    epoch: int
    term: int


@attrs.frozen
class Commit(Command):
    """Verify every file of the assembled image and, only then, atomically make it the last
    committed one; report the outcome as `Verified`."""

    epoch: int
    term: int


@attrs.frozen
class SendAck(Command):
    """Checkpoint ``epoch`` of ``term`` is committed; answers the message ``seq``.

    ``unsent``: the committed image carries held output this standby has not sent; it goes out
    on the primary's Confirm (release at the standby). A plain ack means nothing up to
    ``epoch`` waits here to be sent."""

    unit: str
    epoch: int
    term: int
    seq: int
    unsent: bool = False


@attrs.frozen
class SendReleased(Command):
    """Answer Confirm ``seq``: the held output up to ``epoch`` of ``term`` has been sent."""

    unit: str
    epoch: int
    term: int
    seq: int


@attrs.frozen
class ReleaseOutput(Command):
    """Send the held output that rode with the committed image of ``term``: the epochs in
    (``after``, ``upto``], in epoch order, then durably note ``(term, upto)`` as sent. The
    committed image is of ``term`` and at or above ``upto``. Comes before the released answer
    that tells the primary to free those buffers (release at the standby), or in a promotion."""

    unit: str
    term: int
    after: int
    upto: int


@attrs.frozen
class Reject(Command):
    """Answer message ``seq`` with a refusal. ``term`` is the standby's own. ``committed`` is the
    (term, epoch) of the committed image that refused a claim (newer_commit only)."""

    unit: str
    epoch: int
    term: int
    seq: int
    code: Code
    reason: str
    committed: tuple[int, int] | None = None


@attrs.frozen
class SendStatus(Command):
    """Answer a greeting with the standby's term and its committed image, if any.

    ``released``: (term, epoch) up to which the held output shipped here has really been sent
    ((0, 0): none), which may be below the committed image (release at the standby)."""

    unit: str
    seq: int
    term: int
    committed_epoch: int | None
    committed_term: int | None
    manifest_id: bytes | None = attrs.field(repr=lambda v: v and v.hex())
    released: tuple[int, int] = (0, 0)


@attrs.frozen
class Ignored(Command):
    event: Event
    reason: str


# --- the machine ----------------------------------------------------------------------------


class State(enum.Enum):
    IDLE = "idle"
    ASSEMBLING = "assembling"
    RESENDING = "resending"
    REJECTED = "rejected"
    COMMITTING = "committing"
    PROMOTED = "promoted"


_I, _A, _R, _X, _C, _P = (
    State.IDLE,
    State.ASSEMBLING,
    State.RESENDING,
    State.REJECTED,
    State.COMMITTING,
    State.PROMOTED,
)


def _row(
    greeting: frozenset[State],
    manifest: frozenset[State],
    chunk: frozenset[State],
    end: frozenset[State],
    damaged: frozenset[State],
    **more: frozenset[State],
) -> Mapping[type[Event], frozenset[State]]:
    row: dict[type[Event], frozenset[State]] = {
        Greeting: greeting,
        Manifest: manifest,
        Chunk: chunk,
        ImageEnd: end,
        Damaged: damaged,
        Promote: frozenset({_P}),
    }
    if "verified" in more:
        row[Verified] = more["verified"]
    return MappingProxyType(row)


def _s(*states: State) -> frozenset[State]:
    return frozenset(states)


# A stale Manifest leaves the state as it is; any other starts a new transfer.
_NEW = _s(_A, _R, _X)

# For each state and event, the states the machine may be in afterwards; checked on every event.
# A pair that is missing is a driver bug (ProtocolError).
_ROWS: Mapping[State, Mapping[type[Event], frozenset[State]]] = MappingProxyType(
    {
        _I: _row(_s(_I), _NEW | {_I}, _s(_I), _s(_I), _s(_I)),
        _A: _row(_s(_A, _I), _NEW, _s(_A, _X), _s(_A, _C, _I), _s(_A, _X), verified=_s(_A, _X)),
        _R: _row(_s(_R, _I), _NEW, _s(_R, _X), _s(_R, _I), _s(_R, _X)),
        _X: _row(_s(_X, _I), _NEW, _s(_X), _s(_X, _I), _s(_X)),
        _C: MappingProxyType({Verified: _s(_I)}),
        _P: _row(_s(_P), _s(_P), _s(_P), _s(_P), _s(_P)),
    }
)

# A Confirm touches no transfer: it leaves every state but COMMITTING as it is.
TRANSITIONS: Mapping[State, Mapping[type[Event], frozenset[State]]] = MappingProxyType(
    {
        state: row if state is _C else MappingProxyType({**row, Confirm: _s(state)})
        for state, row in _ROWS.items()
    }
)


@attrs.frozen
class CommittedImage:
    epoch: int
    term: int
    manifest: delta.Manifest = attrs.field(repr=False)


@attrs.define
class _Transfer:
    """The transfer in progress: what its end is checked against, and its failure if it failed."""

    epoch: int
    term: int
    first_seq: int
    last_seq: int
    manifest: delta.Manifest | None = None
    messages: int = 0
    blocks: int = 0
    failed: Reject | None = None


_LinkEvent = Greeting | Manifest | Chunk | ImageEnd | Confirm | Damaged


class StandbyMachine:
    """The standby's epoch protocol for one unit. See the module docstring."""

    def __init__(
        self,
        unit: str,
        term: int = 0,
        last_committed: CommittedImage | None = None,
        *,
        promoted: int | None = None,
        released: tuple[int, int] = (0, 0),
    ) -> None:
        if last_committed is not None and last_committed.term > term:
            raise ValueError(
                f"recorded term {term} is below the committed image's term {last_committed.term}"
            )
        if promoted is not None and promoted > term:
            raise ValueError(f"recorded term {term} is below the promotion's term {promoted}")
        self.unit = unit
        self._term = term
        self._promoted = promoted
        self._state = State.IDLE if promoted is None else State.PROMOTED
        self._committed = last_committed
        self._released = released
        self._base: delta.Base | None = None
        self._transfer: _Transfer | None = None

    @property
    def state(self) -> State:
        return self._state

    @property
    def term(self) -> int:
        """The highest term seen."""
        return self._term

    @property
    def promoted(self) -> int | None:
        return self._promoted

    @property
    def last_committed(self) -> CommittedImage | None:
        return self._committed

    @property
    def released(self) -> tuple[int, int]:
        """(term, epoch) up to which the held output shipped here has been sent."""
        return self._released

    def _unsent(self, term: int, epoch: int) -> tuple[int, bool]:
        """(after, any): the epochs in (after, ``epoch``] of ``term`` are not sent yet, and
        whether the committed image carries the output of any of them."""
        c = self._committed
        if c is None or (term, epoch) <= self._released:
            return epoch, False
        after = self._released[1] if self._released[0] == term else 0
        carried = (output_epoch(f.path) for f in c.manifest.files)
        return after, any(e is not None and after < e <= epoch for e in carried)

    def _release_output(self, term: int, epoch: int, out: list[Command]) -> None:
        """Send what the committed image carries up to ``epoch`` of ``term`` and has not been
        sent (each epoch once)."""
        after, any_carried = self._unsent(term, epoch)
        if any_carried:
            out.append(ReleaseOutput(self.unit, term, after, epoch))
            self._released = (term, epoch)

    @property
    def assembling(self) -> tuple[int, int] | None:
        """(epoch, term) of the image the store is assembling, if any."""
        t = self._transfer
        if t is None or self._state not in (State.ASSEMBLING, State.COMMITTING):
            return None
        return t.epoch, t.term

    def handle(self, event: Event) -> list[Command]:
        allowed = TRANSITIONS[self._state].get(type(event))
        if allowed is None:
            raise ProtocolError(
                f"unit {self.unit}: {type(event).__name__} is not allowed in {self._state.value}"
            )
        out: list[Command] = []
        match event:
            case Promote():
                self._on_promote(event, out)
            case Verified():
                self._on_verified(event, out)
            case Greeting() | Manifest() | Chunk() | ImageEnd() | Confirm() | Damaged() if (
                event.unit != self.unit
            ):
                out.append(Ignored(event, f"for unit {event.unit}, this is {self.unit}"))
            case Greeting():
                self._on_greeting(event, out)
            case Manifest():
                self._on_manifest(event, out)
            case Chunk():
                self._on_chunk(event, out)
            case ImageEnd():
                self._on_end(event, out)
            case Confirm():
                self._on_confirm(event, out)
            case Damaged():
                self._on_damaged(event, out)
        if self._state not in allowed:
            raise AssertionError(f"{self._state} after {event!r} is not in the table")
        return out

    # --- helpers ----------------------------------------------------------------------------

    def _reject(self, event: _LinkEvent, code: Code, reason: str) -> Reject:
        epoch = event.epoch if event.epoch is not None else 0
        return Reject(self.unit, epoch, self._term, event.seq, code, reason)

    def _fenced(self, term: int) -> tuple[Code, str] | None:
        """Why a message of ``term`` is refused outright, if it is."""
        if self._promoted is not None:
            if term <= self._promoted:
                return Code.STALE_TERM, f"term {term} is stale: promoted at term {self._promoted}"
            return Code.UNKNOWN_UNIT, (
                f"promoted to primary at term {self._promoted}: no longer a standby"
            )
        if term < self._term:
            return Code.STALE_TERM, f"term {term} is stale: this standby has seen {self._term}"
        return None

    def _observe(self, term: int, out: list[Command]) -> None:
        """Accept ``term``, which passed `_fenced`; a new highest term deposes the transfer's."""
        if term > self._term:
            self._end_transfer(out)
            self._term = term
            out.append(RecordTerm(term))

    def _end_transfer(self, out: list[Command]) -> None:
        """Forget the transfer in progress without a reply: its sender is deposed or moved on."""
        t = self._transfer
        if t is None:
            return
        if self._state is State.ASSEMBLING:
            out.append(DropAssembly(t.epoch, t.term))
        self._transfer = None
        self._state = State.IDLE

    def _fail(self, t: _Transfer, reject: Reject, out: list[Command]) -> None:
        """The open transfer cannot complete: its end will get the same Reject."""
        if self._state is State.ASSEMBLING:
            out.append(DropAssembly(t.epoch, t.term))
        t.failed = reject
        self._state = State.REJECTED
        out.append(reject)

    def _committed_base(self) -> delta.Base | None:
        if self._base is None and self._committed is not None:
            self._base = delta.Base.of(self._committed.manifest)
        return self._base

    def _current(self, event: Chunk | ImageEnd | Damaged) -> _Transfer | None:
        t = self._transfer
        if t is None or (t.epoch, t.term) != (event.epoch, event.term):
            return None
        return t

    # --- events -----------------------------------------------------------------------------

    def _on_promote(self, event: Promote, out: list[Command]) -> None:
        if self._promoted is not None:
            if event.term != self._promoted:
                raise ProtocolError(
                    f"unit {self.unit}: already promoted at term {self._promoted}, "
                    f"asked again with term {event.term}"
                )
            return
        if event.term <= self._term:
            raise ProtocolError(
                f"unit {self.unit}: promotion must raise the term above {self._term}, "
                f"got {event.term}"
            )
        self._end_transfer(out)
        self._term = self._promoted = event.term
        self._state = State.PROMOTED
        out.append(RecordTerm(event.term, promoted=True))
        # The restored unit continues after the committed image: its output must be out first
        # (a release that failed at commit time gets its last chance here).
        c = self._committed
        if c is not None:
            self._release_output(c.term, c.epoch, out)

    def _on_greeting(self, g: Greeting, out: list[Command]) -> None:
        fenced = self._fenced(g.term)
        if fenced is not None:
            out.append(self._reject(g, *fenced))
            return
        if g.claim is not None and self._refuse_claim(g, g.claim, out):
            return
        self._observe(g.term, out)
        c = self._committed
        base = self._committed_base()
        out.append(
            SendStatus(
                self.unit,
                g.seq,
                self._term,
                None if c is None else c.epoch,
                None if c is None else c.term,
                None if base is None else base.id,
                self._released,
            )
        )

    def _refuse_claim(self, g: Greeting, claim: tuple[int, int], out: list[Command]) -> bool:
        """The compare-and-set of a term claim: True if refused (and the Reject is out)."""
        image_term, image_epoch = claim
        if g.term <= image_term:
            why = f"claim of term {g.term} for an image of term {image_term}: not a new term"
            out.append(self._reject(g, Code.BAD_MESSAGE, why))
            return True
        c = self._committed
        if c is None or (c.term, c.epoch) <= claim:
            return False
        why = (
            f"committed epoch {c.epoch} of term {c.term} is newer than the claimant's image "
            f"(epoch {image_epoch} of term {image_term}): its primary committed here after that "
            f"image, so it is alive and protected"
        )
        out.append(
            attrs.evolve(self._reject(g, Code.NEWER_COMMIT, why), committed=(c.term, c.epoch))
        )
        return True

    def _on_manifest(self, m: Manifest, out: list[Command]) -> None:
        fenced = self._fenced(m.term)
        if fenced is not None:
            out.append(self._reject(m, *fenced))
            return
        # One assembly at a time: a new transfer supersedes the one in progress.
        self._end_transfer(out)
        self._observe(m.term, out)
        t = _Transfer(m.epoch, m.term, m.seq, m.seq)
        self._transfer = t
        c = self._committed
        if c is not None and (c.epoch, c.term) == (m.epoch, m.term):
            # Our ack was lost and the primary sent the image again. One primary per term and
            # one dump per epoch: it is the image already committed, so its end is acked again.
            self._state = State.RESENDING
            return
        decoded = self._decode(m)
        if not isinstance(decoded, delta.Manifest):
            self._fail(t, self._reject(m, *decoded), out)
            return
        t.manifest = decoded
        self._state = State.ASSEMBLING
        out.append(StartAssembly(m.epoch, m.term, decoded, m.meta))

    def _decode(self, m: Manifest) -> delta.Manifest | tuple[Code, str]:
        c = self._committed
        same_term = c is not None and c.term == m.term
        if c is not None and same_term and m.epoch <= c.epoch:
            why = f"epoch {m.epoch} of term {m.term}: epoch {c.epoch} is committed"
            return Code.STALE_EPOCH, why
        # A delta is taken only against the committed image of the same term.
        base = self._committed_base() if same_term else None
        try:
            manifest = delta.decode_manifest(m.manifest, base)
        except delta.BaseMismatchError as e:
            if c is not None and not same_term:
                return Code.BASE_MISMATCH, (
                    f"{e}: a new term starts from a full image (committed: epoch {c.epoch} "
                    f"of term {c.term})"
                )
            return Code.BASE_MISMATCH, str(e)
        except ValueError as e:
            return Code.BAD_MANIFEST, str(e)
        if manifest.epoch != m.epoch:
            return Code.BAD_MANIFEST, f"manifest is for epoch {manifest.epoch}, not {m.epoch}"
        if not manifest.files:
            return Code.BAD_MANIFEST, "manifest lists no files"
        return manifest

    def _on_chunk(self, c: Chunk, out: list[Command]) -> None:
        t = self._current(c)
        if t is None:
            out.append(Ignored(c, f"no transfer of epoch {c.epoch} term {c.term} open"))
            return
        if self._state is State.REJECTED:
            out.append(Ignored(c, "the rest of a rejected transfer"))
            return
        if c.seq <= t.last_seq:
            self._fail(t, self._reject(c, Code.SEQUENCE, f"seq {c.seq} after {t.last_seq}"), out)
            return
        t.last_seq = c.seq
        t.messages += 1
        t.blocks += len(c.batch)
        if self._state is State.ASSEMBLING:
            out.append(StoreChunk(t.epoch, t.term, c.batch))

    def _on_end(self, end: ImageEnd, out: list[Command]) -> None:
        t = self._current(end)
        if t is None:
            # The term first: a deposed primary must learn that it is, whatever else went wrong.
            fenced = self._fenced(end.term)
            if fenced is not None:
                out.append(self._reject(end, *fenced))
                return
            self._observe(end.term, out)
            why = f"no transfer of epoch {end.epoch} term {end.term}"
            out.append(self._reject(end, Code.NO_TRANSFER, why))
            return
        if t.failed is not None:
            self._transfer = None
            self._state = State.IDLE
            out.append(attrs.evolve(t.failed, seq=end.seq))
            return
        sent = (end.first_seq, end.messages, end.blocks)
        got = (t.first_seq, t.messages, t.blocks)
        if end.seq <= t.last_seq or sent != got:
            self._end_transfer(out)
            why = f"sender sent (begin seq, messages, blocks) {sent}, received {got}"
            out.append(self._reject(end, Code.SEQUENCE, why))
            return
        if self._state is State.RESENDING:
            self._transfer = None
            self._state = State.IDLE
            out.append(self._ack(end.epoch, end.term, end.seq))
            return
        t.last_seq = end.seq
        self._state = State.COMMITTING
        out.append(Commit(t.epoch, t.term))

    def _on_damaged(self, d: Damaged, out: list[Command]) -> None:
        t = self._current(d)
        reject = self._reject(d, d.code, d.reason)
        if t is not None and self._state in (State.ASSEMBLING, State.RESENDING):
            self._fail(t, reject, out)
            return
        out.append(reject)

    def _on_verified(self, v: Verified, out: list[Command]) -> None:
        t = self._transfer
        if t is None or (t.epoch, t.term) != (v.epoch, v.term):
            raise ProtocolError(f"unit {self.unit}: {v!r} answers nothing that was asked")
        if self._state is State.ASSEMBLING:
            if not v.ok:
                bad = Reject(
                    self.unit, t.epoch, self._term, t.last_seq, Code.BAD_CHECKSUM, v.reason
                )
                self._fail(t, bad, out)
            return
        self._transfer = None
        self._state = State.IDLE
        if not v.ok:
            out.append(DropAssembly(t.epoch, t.term))
            out.append(
                Reject(self.unit, t.epoch, self._term, t.last_seq, Code.VERIFY_FAILED, v.reason)
            )
            return
        assert t.manifest is not None
        self._committed = CommittedImage(t.epoch, t.term, t.manifest)
        self._base = None
        # Nothing is sent here: the output waits for the primary's Confirm (module doc).
        out.append(self._ack(t.epoch, t.term, t.last_seq))

    def _ack(self, epoch: int, term: int, seq: int) -> SendAck:
        """The ack of the committed image (epoch, term): unsent if it carries output not sent."""
        _, unsent = self._unsent(term, epoch)
        return SendAck(self.unit, epoch, term, seq, unsent=unsent)

    def _on_confirm(self, cf: Confirm, out: list[Command]) -> None:
        fenced = self._fenced(cf.term)
        if fenced is not None:
            # A deposed primary's confirm: the promotion (or the new primary) owns that output.
            out.append(self._reject(cf, *fenced))
            return
        c = self._committed
        if c is None or c.term != cf.term or c.epoch < cf.epoch:
            have = "nothing" if c is None else f"epoch {c.epoch} of term {c.term}"
            why = f"epoch {cf.epoch} of term {cf.term} is not committed here ({have} is)"
            out.append(self._reject(cf, Code.NOT_COMMITTED, why))
            return
        self._release_output(cf.term, cf.epoch, out)
        out.append(SendReleased(self.unit, cf.epoch, cf.term, cf.seq))
