"""The checkpoint replication link between a primary and its standby (DESIGN.md step 6), on pyzmq.

Three layers, each usable without the ones above it:

1. **Wire codec** (`encode`, `decode`): pure functions between `Message` values and zmq frames.
2. **`Receiver`**: the standby's I/O driver, without sockets. `standby.StandbyMachine` decides
   (one per unit); the Receiver turns decoded messages into its events, carries out its commands
   against one `store.Store` per unit and returns the replies. It never raises on bad input
   (every refusal is a `Nack` with a code and a reason).
3. **Sockets**: `ReplicationServer` (ROUTER, a poller thread around a `Receiver`) and
   `ReplicationClient` (DEALER, an asyncio loop in its own thread, with sync twins).

Wire format (version 1). Every message is one multipart zmq message (the ROUTER adds the peer's
routing id in front). Frame 0 is a UTF-8 JSON object, at most 64 KiB::

    {"v": 1, "type": T, "unit": U, "epoch": E, "term": N, "seq": S, ...,
     "crc": [crc32 of payload frame 1, crc32 of frame 2, ...]}

`seq` counts up per unit on each link; the standby uses it to detect loss and reordering within
a transfer. `crc` is present exactly when payload frames follow. Types and their extra fields:

==========  =========  ===================================================  ==================
type        direction  extra header fields                                  payload frames
==========  =========  ===================================================  ==================
hello       P -> S     claim (optional): [term, epoch] (a term claim)      -
status      S -> P     committed: null | {epoch, term, id (hex)},           -
                       released: [term, epoch] (held output really sent)
heartbeat   both       - (the standby answers with its highest term)        -
begin       P -> S     base: base epoch or null, meta: {str: int|str}       manifest
blocks      P -> S     n: number of blocks                                  index, data
end         P -> S     first: seq of begin, messages: blocks messages sent,  -
                       blocks: blocks sent
ack         S -> P     unsent (optional, true): output waits for confirm    -
                       (term is the committed term)
confirm     P -> S     - (send the held output up to epoch, of term)         -
released    S -> P     - (answers confirm: sent up to epoch, of term)        -
nack        S -> P     code, reason (term is the standby's highest term);   -
                       committed: [term, epoch] (newer_commit only)
==========  =========  ===================================================  ==================

**Release at the standby** (a checkpoint that carries held output, `shim.standby`): the standby
commits without sending that output and acks with ``unsent``. The client answers with
``confirm`` for the same (unit, term, epoch), the standby sends what it has not sent up to that
epoch and answers ``released``; only then does the ship succeed (the primary retires its
buffers). A plain ack (release at the primary, or nothing left unsent) ends the ship at once, so
the client needs no setting: only a primary that saves output ships any, and only then is an ack
unsent. A primary cut off before the ack therefore leaves its output unsent at the standby,
and its re-protection elsewhere (which carries that output) sends it once.

A hello with ``claim`` is a standby taking the unit over at ``term``, claiming that term at a
spare before it restores anything: the spare grants it (a status, and the term is recorded) only
if its own committed image is at most the claim's (term, epoch) of the image the claimant will
restore, and refuses it otherwise (nack newer_commit, recording nothing). See `shim.standby`.

`manifest` is `delta.encode_manifest`; `index` is n entries of (16-byte block digest, u32 LE
length); `data` is the n blocks back to back. A block's digest is its own checksum and the
standby checks it before writing; the frame crc catches damage before any parsing. A transfer is
begin, blocks*, end; the standby acks only after verify and commit, and every end gets exactly
one reply. A failure is reported as soon as it is found (then the rest of the transfer is
dropped and its end gets the same nack).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import json
import logging
import re
import struct
import threading
import time
import zlib
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, TypeVar

import attrs
import zmq
import zmq.asyncio
import zmq.utils.z85

from shim import standby as sm
from shim.delta import (
    BATCH_BYTES,
    BLOCK_SIZE,
    DIGEST_SIZE,
    Base,
    Batch,
    BlockError,
    Delta,
    DeltaError,
    Manifest,
    VerifyError,
    iter_batches,
    make_delta,
    scan,
)
from shim.standby import Code
from shim.store import Checkpoint, Meta, Store, StoreError, output_files

__all__ = [
    "PROTOCOL_VERSION",
    "Ack",
    "Begin",
    "Blocks",
    "ClosedError",
    "Code",
    "Confirm",
    "End",
    "Heartbeat",
    "Hello",
    "Message",
    "Nack",
    "NackedError",
    "Receiver",
    "ReleaseError",
    "Released",
    "ReplicationClient",
    "ReplicationError",
    "ReplicationServer",
    "Shipped",
    "Status",
    "WireError",
    "decode",
    "encode",
]

log = logging.getLogger(__name__)

PROTOCOL_VERSION: Final = 1
MAX_HEADER: Final = 64 << 10
# A manifest of 64 GiB of images is 256 MiB; nothing legitimate is larger.
MAX_FRAME: Final = (256 << 20) + (64 << 10)
_UNIT_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_INDEX = struct.Struct("<16sI")
_ZAP_DOMAIN: Final = "inproc://zeromq.zap.01"


# --- messages ---------------------------------------------------------------------------------


def _check_unit(_inst: object, _attr: object, value: str) -> None:
    if not isinstance(value, str) or not _UNIT_RE.match(value):
        raise ValueError(f"bad unit name {value!r}")


# Bounded because epochs and terms end up in file names and in fixed-width fields downstream.
_COUNT = attrs.validators.and_(
    attrs.validators.instance_of(int), attrs.validators.ge(0), attrs.validators.lt(1 << 63)
)


@attrs.frozen(kw_only=True)
class Message:
    unit: str = attrs.field(validator=_check_unit)
    epoch: int = attrs.field(validator=_COUNT)
    term: int = attrs.field(validator=_COUNT)
    seq: int = attrs.field(validator=_COUNT)


def _check_claim(_inst: object, _attr: object, value: tuple[int, int] | None) -> None:
    if value is None:
        return
    if not isinstance(value, tuple) or len(value) != 2:
        raise ValueError(f"a claim is (term, epoch), not {value!r}")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 1 << 63:
            raise ValueError(f"a claim is (term, epoch) of non-negative integers, not {value!r}")


@attrs.frozen(kw_only=True)
class Hello(Message):
    """The primary announces itself and its term; the standby answers with `Status`.

    With `claim` = (term, epoch) the sender is a standby taking over at `term`, and the
    (term, epoch) is the committed image it will restore (module doc).
    """

    claim: tuple[int, int] | None = attrs.field(default=None, validator=_check_claim)


@attrs.frozen(kw_only=True)
class Status(Message):
    """The standby's answer to `Hello`: its highest term, what it has committed, and up to which
    (term, epoch) it has really sent the held output shipped to it ((0, 0): none)."""

    committed_epoch: int | None = None
    committed_term: int | None = None
    manifest_id: bytes | None = attrs.field(default=None, repr=lambda v: v and v.hex())
    released: tuple[int, int] = attrs.field(default=(0, 0), validator=_check_claim)


@attrs.frozen(kw_only=True)
class Heartbeat(Message):
    pass


def _check_meta(_inst: object, _attr: object, value: Mapping[str, int | str]) -> None:
    for k, v in value.items():
        if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, int | str):
            raise ValueError(f"meta {k!r}: only str keys and int or str values")


@attrs.frozen(kw_only=True)
class Begin(Message):
    manifest: bytes = attrs.field(repr=lambda v: f"<{len(v)} B>")
    base_epoch: int | None = None
    meta: Meta = attrs.field(factory=dict, validator=_check_meta)


@attrs.frozen(kw_only=True)
class Blocks(Message):
    batch: Batch


@attrs.frozen(kw_only=True)
class End(Message):
    first_seq: int = attrs.field(validator=_COUNT)
    messages: int = attrs.field(validator=_COUNT)
    blocks: int = attrs.field(validator=_COUNT)


@attrs.frozen(kw_only=True)
class Ack(Message):
    """Checkpoint `epoch` of `term` is committed. `unsent`: the held output it carries has not
    been sent; the primary answers with `Confirm`."""

    unsent: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))


@attrs.frozen(kw_only=True)
class Confirm(Message):
    """The primary answers an unsent ack: send the held output up to `epoch` of `term`."""


@attrs.frozen(kw_only=True)
class Released(Message):
    """The standby answers `Confirm`: the held output up to `epoch` of `term` has been sent."""


@attrs.frozen(kw_only=True)
class Nack(Message):
    code: Code
    reason: str
    # newer_commit: the (term, epoch) of the committed image that refused the claim.
    committed: tuple[int, int] | None = attrs.field(default=None, validator=_check_claim)


_TYPES: Final[Mapping[str, type[Message]]] = MappingProxyType(
    {
        "hello": Hello,
        "status": Status,
        "heartbeat": Heartbeat,
        "begin": Begin,
        "blocks": Blocks,
        "end": End,
        "ack": Ack,
        "confirm": Confirm,
        "released": Released,
        "nack": Nack,
    }
)
_NAMES: Final = {cls: name for name, cls in _TYPES.items()}
_PAYLOADS: Final = {"begin": 1, "blocks": 2}


# --- codec ------------------------------------------------------------------------------------


class WireError(Exception):
    """A message that cannot be accepted; carries what could be read of its identity."""

    def __init__(self, code: Code, reason: str, ids: Mapping[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason
        self.ids: Mapping[str, Any] = ids or {}

    def nack(self, term: int | None = None) -> Nack:
        """The nack that answers the bad message, addressed as well as it could be read."""
        ids = self.ids

        def count(key: str) -> int:
            v = ids.get(key)
            return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0

        unit = ids.get("unit")
        return Nack(
            unit=unit if isinstance(unit, str) and _UNIT_RE.match(unit) else "unknown",
            epoch=count("epoch"),
            term=count("term") if term is None else term,
            seq=count("seq"),
            code=self.code,
            reason=self.reason[:500],
        )


def encode(msg: Message) -> list[bytes]:
    """The frames of `msg` (without the ROUTER's routing id)."""
    header: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "type": _NAMES[type(msg)],
        "unit": msg.unit,
        "epoch": msg.epoch,
        "term": msg.term,
        "seq": msg.seq,
    }
    payloads: list[bytes] = []
    match msg:
        case Hello() if msg.claim is not None:
            header["claim"] = list(msg.claim)
        case Status():
            header["committed"] = (
                None
                if msg.committed_epoch is None
                else {
                    "epoch": msg.committed_epoch,
                    "term": msg.committed_term,
                    "id": msg.manifest_id.hex() if msg.manifest_id else None,
                }
            )
            header["released"] = list(msg.released)
        case Begin():
            header["base"] = msg.base_epoch
            header["meta"] = dict(msg.meta)
            payloads = [msg.manifest]
        case Blocks():
            b = msg.batch
            header["n"] = len(b)
            index = b"".join(
                _INDEX.pack(b.digests[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE], n)
                for i, n in enumerate(b.lengths)
            )
            payloads = [index, b.data]
        case End():
            header.update(first=msg.first_seq, messages=msg.messages, blocks=msg.blocks)
        case Ack() if msg.unsent:
            header["unsent"] = True
        case Nack():
            header.update(code=str(msg.code), reason=msg.reason)
            if msg.committed is not None:
                header["committed"] = list(msg.committed)
    if payloads:
        header["crc"] = [zlib.crc32(p) for p in payloads]
    return [json.dumps(header, separators=(",", ":")).encode(), *payloads]


def _field(header: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in header:
        raise WireError(Code.BAD_MESSAGE, f"missing field {key!r}", header)
    value = header[key]
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        raise WireError(Code.BAD_MESSAGE, f"field {key!r} has the wrong type", header)
    return value


def _optional_int(header: Mapping[str, Any], key: str) -> int | None:
    return None if header.get(key) is None else int(_field(header, key, int))


def _optional_pair(header: Mapping[str, Any], key: str) -> tuple[int, int] | None:
    """An optional [term, epoch] field: absent or null is None; anything else must be exact."""
    value = header.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != 2:
        raise WireError(Code.BAD_MESSAGE, f"field {key!r} is not [term, epoch]", header)
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 1 << 63:
            raise WireError(Code.BAD_MESSAGE, f"field {key!r} is not [term, epoch]", header)
    return int(value[0]), int(value[1])


def _decode_blocks(header: Mapping[str, Any], index: bytes, data: bytes) -> Batch:
    n = _field(header, "n", int)
    if len(index) != n * _INDEX.size:
        raise WireError(Code.BAD_MESSAGE, f"index holds {len(index)} B for {n} blocks", header)
    digests: list[bytes] = []
    lengths: list[int] = []
    for digest, length in _INDEX.iter_unpack(index):
        if not 0 < length <= BLOCK_SIZE:
            raise WireError(Code.BAD_MESSAGE, f"block length {length}", header)
        digests.append(digest)
        lengths.append(length)
    if sum(lengths) != len(data):
        raise WireError(Code.BAD_MESSAGE, "block lengths do not add up to the data", header)
    return Batch(b"".join(digests), tuple(lengths), data)


def decode(frames: Sequence[bytes]) -> Message:
    """Parse and check one message; raises `WireError` for anything that is not exactly right."""
    if not frames:
        raise WireError(Code.BAD_MESSAGE, "empty message")
    if len(frames[0]) > MAX_HEADER:
        raise WireError(Code.BAD_MESSAGE, f"header longer than {MAX_HEADER} B")
    try:
        header = json.loads(frames[0])
    except (ValueError, UnicodeDecodeError):
        raise WireError(Code.BAD_MESSAGE, "header is not JSON") from None
    if not isinstance(header, dict):
        raise WireError(Code.BAD_MESSAGE, "header is not a JSON object")
    if header.get("v") != PROTOCOL_VERSION:
        raise WireError(Code.BAD_MESSAGE, f"protocol version {header.get('v')!r}", header)
    kind = header.get("type")
    if not isinstance(kind, str) or kind not in _TYPES:
        raise WireError(Code.BAD_MESSAGE, f"unknown message type {kind!r}", header)
    ids = {k: _field(header, k, int) for k in ("epoch", "term", "seq")}
    unit = _field(header, "unit", str)
    payloads = frames[1:]
    if len(payloads) != _PAYLOADS.get(kind, 0):
        raise WireError(Code.BAD_MESSAGE, f"{kind} with {len(payloads)} payload frames", header)
    if payloads:
        crcs = _field(header, "crc", list)
        if len(crcs) != len(payloads):
            raise WireError(Code.BAD_MESSAGE, "crc list does not match the frames", header)
        for i, (crc, frame) in enumerate(zip(crcs, payloads, strict=True), 1):
            if crc != zlib.crc32(frame):
                raise WireError(Code.BAD_CHECKSUM, f"frame {i} of {kind} fails its crc", header)
    try:
        match kind:
            case "hello":
                return Hello(unit=unit, **ids, claim=_optional_pair(header, "claim"))
            case "status":
                released = _optional_pair(header, "released") or (0, 0)
                c = header.get("committed")
                if c is None:
                    return Status(unit=unit, **ids, released=released)
                if not isinstance(c, dict):
                    raise WireError(Code.BAD_MESSAGE, "committed is not an object", header)
                mid = c.get("id")
                return Status(
                    unit=unit,
                    **ids,
                    committed_epoch=_field(c, "epoch", int),
                    committed_term=_field(c, "term", int),
                    manifest_id=bytes.fromhex(mid) if isinstance(mid, str) else None,
                    released=released,
                )
            case "ack":
                unsent = header.get("unsent", False)
                if not isinstance(unsent, bool):
                    raise WireError(Code.BAD_MESSAGE, "field 'unsent' has the wrong type", header)
                return Ack(unit=unit, **ids, unsent=unsent)
            case "begin":
                meta = header.get("meta", {})
                if not isinstance(meta, dict):
                    raise WireError(Code.BAD_MESSAGE, "meta is not an object", header)
                return Begin(
                    unit=unit,
                    **ids,
                    manifest=payloads[0],
                    base_epoch=_optional_int(header, "base"),
                    meta=meta,
                )
            case "blocks":
                return Blocks(unit=unit, **ids, batch=_decode_blocks(header, *payloads))
            case "end":
                return End(
                    unit=unit,
                    **ids,
                    first_seq=_field(header, "first", int),
                    messages=_field(header, "messages", int),
                    blocks=_field(header, "blocks", int),
                )
            case "nack":
                return Nack(
                    unit=unit,
                    **ids,
                    code=Code(_field(header, "code", str)),
                    reason=_field(header, "reason", str),
                    committed=_optional_pair(header, "committed"),
                )
            case _:
                return _TYPES[kind](unit=unit, **ids)
    except (ValueError, TypeError, DeltaError) as e:
        raise WireError(Code.BAD_MESSAGE, f"{kind}: {e}", header) from None


# --- the standby's driver ----------------------------------------------------------------------


def _machine_for(unit: str, store: Store) -> sm.StandbyMachine:
    """A machine that starts from what `store` holds durably, exactly as after a restart."""
    c = store.committed()
    return sm.StandbyMachine(
        unit,
        store.term,
        None if c is None else sm.CommittedImage(c.epoch, c.term, c.manifest),
        promoted=store.promoted,
        released=store.released,
    )


# Sends one held-output file (`dpdk_vhost.heldout` format) from this host's data plane, in full,
# or raises.
Emit = Callable[[str, Path], None]
# Told (unit, term) once a higher term from a primary is recorded durably, before the reply that
# follows it (not on a promotion, which this host's own agent makes).
OnTerm = Callable[[str, int], None]
# Told (unit, checkpoint) after a commit, once its ack is sent (`Receiver.collect`).
OnCommit = Callable[[str, Checkpoint], None]


class ReleaseError(Exception):
    """Held output that rode with a checkpoint could not be sent."""


def _event(msg: Message) -> sm.Event | None:
    """The machine's event for a message a standby receives; None for any other message."""
    match msg:
        case Hello():
            return sm.Greeting(msg.unit, msg.epoch, msg.term, msg.seq, msg.claim)
        case Heartbeat():
            return sm.Greeting(msg.unit, msg.epoch, msg.term, msg.seq)
        case Begin():
            return sm.Manifest(msg.unit, msg.epoch, msg.term, msg.seq, msg.manifest, msg.meta)
        case Blocks():
            return sm.Chunk(msg.unit, msg.epoch, msg.term, msg.seq, msg.batch)
        case End():
            return sm.ImageEnd(
                msg.unit, msg.epoch, msg.term, msg.seq, msg.first_seq, msg.messages, msg.blocks
            )
        case Confirm():
            return sm.Confirm(msg.unit, msg.epoch, msg.term, msg.seq)
    return None


def _readable(ids: Mapping[str, Any], key: str) -> int | None:
    v = ids.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def _nack(msg: Message, term: int, code: Code, reason: str) -> Nack:
    return Nack(unit=msg.unit, epoch=msg.epoch, term=term, seq=msg.seq, code=code, reason=reason)


class Receiver:
    """The standby end of the link without sockets: the I/O driver of `standby.StandbyMachine`.

    Holds one `Store` and one machine per unit it protects; a message for any other unit is
    refused. Each message becomes the machine's event, and the machine's commands are carried out
    in order against the store and turned into replies; the store's verdicts on data go back to
    the machine as `Verified`. The Receiver decides nothing about the protocol itself.

    A store command that fails other than by bad data (an I/O error, a bug) is handled as a crash
    of this unit's standby: the store recovers, a new machine is built from what it holds durably,
    and the message is nacked (store_error or internal). Not thread-safe; `ReplicationServer`
    serializes calls.

    Two notifications for the host's agent, which decide nothing here and whose failures are
    logged, never nacked: `on_term(unit, term)` when a higher term is recorded, and
    `on_commit(unit, checkpoint)` after a commit, off the ack's path (lossless mode keeps the
    standby's input log for the term, trimmed to the committed cut: hamgr.agent.lossless).
    """

    def __init__(
        self,
        stores: Mapping[str, Store],
        *,
        emit: Emit | None = None,
        on_term: OnTerm | None = None,
        on_commit: OnCommit | None = None,
    ) -> None:
        self._stores = dict(stores)
        self._emit = emit
        self._on_term = on_term
        self._on_commit = on_commit
        self._machines = {unit: _machine_for(unit, s) for unit, s in self._stores.items()}
        self._committed: set[str] = set()

    @property
    def units(self) -> frozenset[str]:
        return frozenset(self._stores)

    def add(self, unit: str, store: Store) -> None:
        """Hold `unit` from now on (a standby set up at run time); its machine starts from what
        `store` holds durably, as after a restart."""
        if unit in self._stores:
            raise ValueError(f"already a standby for {unit}")
        self._stores[unit] = store
        self._machines[unit] = _machine_for(unit, store)

    def remove(self, unit: str) -> Store | None:
        """Stop holding `unit`: its messages are refused (unknown_unit) from now on."""
        self._machines.pop(unit, None)
        self._committed.discard(unit)
        return self._stores.pop(unit, None)

    def store(self, unit: str) -> Store:
        return self._stores[unit]

    def machine(self, unit: str) -> sm.StandbyMachine:
        return self._machines[unit]

    def promote(self, unit: str, term: int) -> Checkpoint | None:
        """Fence `unit` at `term` and return the checkpoint to restore.

        Raises `ProtocolError` unless `term` is above every term seen (or repeats the promotion).
        """
        commands = self._machines[unit].handle(sm.Promote(term))
        try:
            self._execute(unit, commands, [], None)
        except Exception:
            self._restart(unit)
            raise
        return self._stores[unit].committed()

    def collect(self) -> None:
        """Tell `on_commit` of each new commit and delete superseded checkpoints; call it once
        the acks are sent, off the ack's path."""
        while self._committed:
            unit = self._committed.pop()
            store = self._stores[unit]
            committed = store.committed()
            if self._on_commit is not None and committed is not None:
                try:
                    self._on_commit(unit, committed)
                except Exception:
                    log.exception("replication: on_commit of %s failed", unit)
            store.collect()

    def receive(self, frames: Sequence[bytes]) -> list[list[bytes]]:
        """Frames in, reply frames out. Never raises."""
        try:
            msg = decode(frames)
        except WireError as e:
            log.warning("replication: refusing message: %s", e)
            unit = e.ids.get("unit")
            machine = self._machines.get(unit) if isinstance(unit, str) else None
            if machine is None:
                return [encode(e.nack())]
            nack = e.nack(machine.term)
            event = sm.Damaged(
                nack.unit,
                _readable(e.ids, "epoch"),
                _readable(e.ids, "term"),
                nack.seq,
                e.code,
                nack.reason,
            )
            return [encode(r) for r in self._run(nack.unit, event, nack)]
        return [encode(r) for r in self.handle(msg)]

    def handle(self, msg: Message) -> list[Message]:
        """Apply one decoded message; never raises."""
        machine = self._machines.get(msg.unit)
        if machine is None:
            return [_nack(msg, msg.term, Code.UNKNOWN_UNIT, f"not a standby for {msg.unit}")]
        event = _event(msg)
        if event is None:
            why = f"{_NAMES[type(msg)]} is not for a standby"
            return [_nack(msg, machine.term, Code.BAD_MESSAGE, why)]
        return self._run(msg.unit, event, msg)

    def _run(self, unit: str, event: sm.Event, msg: Message) -> list[Message]:
        replies: list[Message] = []
        try:
            follow_up: sm.Event | None = event
            while follow_up is not None:
                commands = self._machines[unit].handle(follow_up)
                follow_up = self._execute(unit, commands, replies, msg)
        except Exception as e:
            log.exception("replication: %s of %s failed", _NAMES[type(msg)], unit)
            self._restart(unit)
            if isinstance(e, StoreError):
                code, reason = Code.STORE_ERROR, str(e)
            else:
                code, reason = Code.INTERNAL, f"{type(e).__name__}: {e}"
            return [_nack(msg, self._machines[unit].term, code, reason)]
        return replies

    def _execute(
        self,
        unit: str,
        commands: list[sm.Command],
        replies: list[Message],
        msg: Message | None,
    ) -> sm.Event | None:
        """Carry out `commands` in order; returns the store's verdict if one of them gave one.

        Only `StoreChunk` and `Commit` give one, and each ends its list.
        """
        store = self._stores[unit]
        for command in commands:
            match command:
                case sm.RecordTerm(term=term, promoted=promoted):
                    if promoted:
                        store.promote(term)
                    else:
                        store.observe_term(term)
                        if self._on_term is not None:
                            try:
                                self._on_term(unit, term)
                            except Exception:
                                log.exception("replication: on_term of %s failed", unit)
                case sm.StartAssembly(epoch=epoch, term=term, manifest=manifest, meta=meta):
                    store.begin(epoch, term, manifest, meta)
                case sm.StoreChunk(epoch=epoch, term=term, batch=batch):
                    put = store.put_block
                    try:
                        for digest, data in batch.items():
                            put(digest, data)
                    except BlockError as e:
                        return sm.Verified(epoch, term, ok=False, reason=str(e))
                case sm.DropAssembly():
                    store.abort()
                case sm.Commit(epoch=epoch, term=term):
                    try:
                        store.commit()
                    except VerifyError as e:
                        return sm.Verified(epoch, term, ok=False, reason=str(e))
                    self._committed.add(unit)
                    return sm.Verified(epoch, term, ok=True)
                case sm.ReleaseOutput(term=term, after=after, upto=upto):
                    self._release_output(unit, store, term, after, upto)
                case sm.SendAck(unit=u, epoch=epoch, term=term, seq=seq, unsent=unsent):
                    replies.append(Ack(unit=u, epoch=epoch, term=term, seq=seq, unsent=unsent))
                case sm.SendReleased(unit=u, epoch=epoch, term=term, seq=seq):
                    replies.append(Released(unit=u, epoch=epoch, term=term, seq=seq))
                case sm.Reject(unit=u, epoch=epoch, term=term, seq=seq, code=code, reason=why):
                    replies.append(
                        Nack(
                            unit=u,
                            epoch=epoch,
                            term=term,
                            seq=seq,
                            code=code,
                            reason=why,
                            committed=command.committed,
                        )
                    )
                case sm.SendStatus():
                    replies.append(_status(command, msg))
                case sm.Ignored(event=event, reason=why):
                    log.debug("replication: %s ignored: %s", type(event).__name__, why)
        return None

    def _release_output(self, unit: str, store: Store, term: int, after: int, upto: int) -> None:
        committed = store.committed()
        if committed is None or committed.term != term or committed.epoch < upto:
            raise ReleaseError(
                f"unit {unit}: asked to send the output up to epoch {upto} of term {term}, "
                f"but the committed checkpoint is {committed}"
            )
        files = [path for epoch, path in output_files(committed.path) if after < epoch <= upto]
        if files and self._emit is None:
            raise ReleaseError(
                f"unit {unit}: the checkpoint carries held output to release here, but this "
                "standby has no data plane to send it from; start the standby with one, or "
                "protect the unit with release at the primary"
            )
        for path in files:
            assert self._emit is not None
            self._emit(unit, path)
        store.record_released(term, upto)

    def _restart(self, unit: str) -> None:
        """Start `unit` over from its store's durable state, as a restarted standby would."""
        store = self._stores[unit]
        try:
            store.recover()
        except Exception:
            log.exception("replication: store of %s did not recover", unit)
            store.abort()
        self._machines[unit] = _machine_for(unit, store)


def _status(command: sm.SendStatus, msg: Message | None) -> Message:
    epoch = 0 if command.committed_epoch is None else command.committed_epoch
    if isinstance(msg, Heartbeat):
        return Heartbeat(unit=command.unit, epoch=epoch, term=command.term, seq=command.seq)
    return Status(
        unit=command.unit,
        epoch=epoch,
        term=command.term,
        seq=command.seq,
        committed_epoch=command.committed_epoch,
        committed_term=command.committed_term,
        manifest_id=command.manifest_id,
        released=command.released,
    )


# --- standby socket ---------------------------------------------------------------------------


def _binary_key(key: bytes) -> bytes:
    return zmq.utils.z85.decode(key) if len(key) == 40 else key


class ReplicationServer:
    """The standby's ROUTER socket, served by one thread around a `Receiver`.

    With `secret_key` the socket is a CURVE server; clients must then know its public key. With
    `allowed_clients` as well (public keys, z85 or binary), a ZAP handler on the server's own zmq
    context admits only those clients; a callable is asked at every handshake, so a key added
    to an authorized-keys file is admitted without a restart. Acks are sent only after verify
    and commit. `add_store` and `remove_store` change the units it holds while it serves.
    """

    def __init__(
        self,
        endpoint: str,
        stores: Mapping[str, Store],
        *,
        secret_key: bytes | None = None,
        allowed_clients: Iterable[bytes] | Callable[[], Iterable[bytes]] | None = None,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        poll_ms: int = 50,
        emit: Emit | None = None,
        on_term: OnTerm | None = None,
        on_commit: OnCommit | None = None,
    ) -> None:
        if allowed_clients is not None and secret_key is None:
            raise ValueError("allowed_clients needs CURVE (a secret_key)")
        self._endpoint = endpoint
        self._receiver = Receiver(stores, emit=emit, on_term=on_term, on_commit=on_commit)
        self._secret_key = secret_key
        self._allowed: frozenset[bytes] | Callable[[], Iterable[bytes]] | None = (
            allowed_clients
            if allowed_clients is None or callable(allowed_clients)
            else frozenset(map(_binary_key, allowed_clients))
        )
        self._own_context = context is None
        self._context = context if context is not None else zmq.Context()
        self._poll_ms = poll_ms
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: zmq.Socket[bytes] | None = None
        self._zap: zmq.Socket[bytes] | None = None
        self._bound = ""

    @property
    def endpoint(self) -> str:
        """The bound endpoint, with the real port when bound to `*`."""
        return self._bound

    def start(self) -> str:
        if self._thread is not None:
            raise RuntimeError("already started")
        if self._allowed is not None:
            self._zap = self._context.socket(zmq.REP)
            self._zap.setsockopt(zmq.LINGER, 0)
            self._zap.bind(_ZAP_DOMAIN)
        sock = self._context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME)
        if self._secret_key is not None:
            sock.setsockopt(zmq.CURVE_SERVER, 1)
            sock.setsockopt(zmq.CURVE_SECRETKEY, self._secret_key)
            if self._allowed is not None:
                sock.setsockopt(zmq.ZAP_DOMAIN, b"hamgr")
        try:
            sock.bind(self._endpoint)
        except zmq.ZMQError:
            sock.close()
            self._close_zap()
            raise
        self._bound = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name="hamgr-repl-server", daemon=True)
        self._thread.start()
        return self._bound

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving and release the socket; idempotent."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError("replication server thread did not stop")
        elif self._sock is not None:
            self._sock.close()
        self._sock = None
        self._close_zap()
        if self._own_context:
            self._context.term()

    def __enter__(self) -> ReplicationServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def promote(self, unit: str, term: int) -> Checkpoint | None:
        """Fence `unit` at `term` between two messages; returns the checkpoint to restore."""
        with self._lock:
            return self._receiver.promote(unit, term)

    def committed(self, unit: str) -> Checkpoint | None:
        with self._lock:
            return self._receiver.store(unit).committed()

    def add_store(self, unit: str, store: Store) -> None:
        """Hold `unit` from the next message on (raises ValueError if it is held already)."""
        with self._lock:
            self._receiver.add(unit, store)

    def remove_store(self, unit: str) -> Store | None:
        """Stop holding `unit`, between two messages; returns its store (None if not held)."""
        with self._lock:
            return self._receiver.remove(unit)

    def holds(self, unit: str) -> bool:
        with self._lock:
            return unit in self._receiver.units

    def _close_zap(self) -> None:
        if self._zap is not None:
            self._zap.close()
            self._zap = None

    def _serve(self) -> None:
        sock = self._sock
        assert sock is not None
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        if self._zap is not None:
            poller.register(self._zap, zmq.POLLIN)
        try:
            while not self._stopping.is_set():
                for ready, _ in poller.poll(self._poll_ms):
                    if ready is self._zap:
                        self._answer_zap()
                    else:
                        self._drain(sock)
        except Exception:
            log.exception("replication server failed")
        finally:
            sock.close()

    def _drain(self, sock: zmq.Socket[bytes]) -> None:
        # Bounded, so that ZAP handshakes and stop() are served between bursts.
        for _ in range(64):
            try:
                routing_id, *frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            with self._lock:
                replies = self._receiver.receive(frames)
            for reply in replies:
                try:
                    sock.send_multipart([routing_id, *reply], zmq.NOBLOCK)
                except zmq.Again:
                    log.warning("replication: peer is not reading; reply dropped")
            with self._lock:
                self._receiver.collect()

    def _answer_zap(self) -> None:
        assert self._zap is not None
        assert self._allowed is not None
        request = self._zap.recv_multipart()
        version, request_id, mechanism = request[0], request[1], request[5]
        key = request[6] if len(request) > 6 else b""
        allowed = self._allowed
        if callable(allowed):
            try:
                allowed = frozenset(map(_binary_key, allowed()))
            except Exception:
                log.exception("replication: cannot read the allowed client keys; refusing")
                allowed = frozenset()
        ok = mechanism == b"CURVE" and key in allowed
        if not ok:
            log.warning("replication: refused a client (%s)", mechanism.decode(errors="replace"))
        status = (b"200", b"OK") if ok else (b"400", b"client key not allowed")
        self._zap.send_multipart([version, request_id, *status, b"", b""])


# --- primary socket ---------------------------------------------------------------------------


class ReplicationError(Exception):
    pass


class ClosedError(ReplicationError):
    pass


class NackedError(ReplicationError):
    """The standby refused; `nack.code` says why and `nack.term` is the standby's term."""

    def __init__(self, nack: Nack) -> None:
        super().__init__(f"{nack.unit} epoch {nack.epoch}: {nack.code}: {nack.reason}")
        self.nack = nack


@attrs.frozen
class Shipped:
    """One committed transfer, as the primary saw it."""

    unit: str
    epoch: int
    term: int
    full: bool
    blocks: int
    block_bytes: int
    manifest_bytes: int
    seconds: float


@attrs.frozen
class _ShipRequest:
    unit: str
    epoch: int
    term: int
    source: Path
    manifest: Manifest | None
    full: bool
    meta: Meta
    timeout: float


class _Link:
    """Per unit on one client: the standby's committed base, sequence numbers, one transfer."""

    def __init__(self) -> None:
        self.base: Base | None = None
        self.lock = asyncio.Lock()
        self._seq = itertools.count(1)

    def next_seq(self) -> int:
        return next(self._seq)


_T = TypeVar("_T")


class ReplicationClient:
    """The primary's DEALER socket to one standby, shared by every unit protected there.

    An asyncio loop in a private thread owns the socket. Each unit's transfers run one after
    another (the standby assembles one checkpoint per unit at a time), different units' transfers
    interleave batch by batch, so a large image for one unit does not hold up the others.
    `ship_nowait` returns a `concurrent.futures.Future`; `ship` blocks; `async_ship` can be
    awaited from any event loop.

    Each ship is encoded against the last checkpoint the standby acked on this link, chosen
    when the transfer starts; if the standby has another base (it restarted), the checkpoint is
    sent again in full. A new standby needs a new client, so that its base starts empty.

    CURVE: pass `server_key` (the standby's public key) and optionally `keypair` (public,
    secret); a keypair is generated if only `server_key` is given.

    `tcp_maxrt_ms` bounds how long the kernel retransmits unacknowledged data before it drops
    the connection and its queue (``ZMQ_TCP_MAXRT``), so that a request cannot arrive much
    later than its timeout said it failed.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        server_key: bytes | None = None,
        keypair: tuple[bytes, bytes] | None = None,
        batch_bytes: int = BATCH_BYTES,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        tcp_maxrt_ms: int | None = None,
    ) -> None:
        if batch_bytes < BLOCK_SIZE:
            raise ValueError("batch_bytes must hold at least one block")
        self._tcp_maxrt_ms = tcp_maxrt_ms
        self._endpoint = endpoint
        self._server_key = server_key
        self._keypair = keypair
        self._batch_bytes = batch_bytes
        self._own_context = context is None
        self._context = context if context is not None else zmq.Context()
        self._links: dict[str, _Link] = {}
        # unit -> (epoch, seq of its begin, reply): replies to an earlier attempt at the same
        # epoch carry a lower seq and must not answer this one.
        self._waiting: dict[str, tuple[int, int, asyncio.Future[Message]]] = {}
        self._requests: dict[tuple[str, int], asyncio.Future[Message]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sock: zmq.asyncio.Socket | None = None
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="hamgr-repl-client", daemon=True
        )
        self._thread.start()
        try:
            self._call(self._open()).result(timeout=10)
        except BaseException:
            self._stop_loop()
            raise

    # --- public API ----------------------------------------------------------------------------

    def ship_nowait(
        self,
        unit: str,
        epoch: int,
        term: int,
        source: Path,
        *,
        manifest: Manifest | None = None,
        full: bool = False,
        meta: Meta | None = None,
        timeout: float = 30.0,
    ) -> concurrent.futures.Future[Shipped]:
        """Ship checkpoint directory `source` as epoch `epoch` of `unit` under `term`.

        `manifest` saves the scan if the caller already hashed `source` (e.g. right after the
        dump, while the previous transfer was in flight). The future raises `NackedError`,
        `TimeoutError` (the transfer took longer than `timeout`, counted from its start after any
        earlier transfer of the unit) or `ClosedError`.
        """
        request = _ShipRequest(
            unit, epoch, term, Path(source), manifest, full, dict(meta or {}), timeout
        )
        return self._call(self._ship(request))

    def ship(
        self,
        unit: str,
        epoch: int,
        term: int,
        source: Path,
        *,
        manifest: Manifest | None = None,
        full: bool = False,
        meta: Meta | None = None,
        timeout: float = 30.0,
    ) -> Shipped:
        return self.ship_nowait(
            unit, epoch, term, source, manifest=manifest, full=full, meta=meta, timeout=timeout
        ).result()

    async def async_ship(
        self,
        unit: str,
        epoch: int,
        term: int,
        source: Path,
        *,
        manifest: Manifest | None = None,
        full: bool = False,
        meta: Meta | None = None,
        timeout: float = 30.0,
    ) -> Shipped:
        return await asyncio.wrap_future(
            self.ship_nowait(
                unit, epoch, term, source, manifest=manifest, full=full, meta=meta, timeout=timeout
            )
        )

    def hello(
        self,
        unit: str,
        term: int,
        *,
        claim: tuple[int, int] | None = None,
        timeout: float = 5.0,
    ) -> Status:
        """Announce `term`; learn the standby's term and committed checkpoint.

        If the standby's committed checkpoint is not the base this link remembers, the base is
        forgotten and the next ship is full. Raises `NackedError` if `term` is stale.

        `claim` = (term, epoch) of the committed image this node will restore: a standby taking
        the unit over claims `term` at a spare (module doc). Refused, it raises `NackedError`
        with code newer_commit and the spare's committed (term, epoch) in `nack.committed`.
        """
        return self._call(self._hello(unit, term, timeout, claim)).result()

    async def async_hello(
        self,
        unit: str,
        term: int,
        *,
        claim: tuple[int, int] | None = None,
        timeout: float = 5.0,
    ) -> Status:
        return await asyncio.wrap_future(self._call(self._hello(unit, term, timeout, claim)))

    def heartbeat(self, unit: str, term: int, *, timeout: float = 5.0) -> Heartbeat:
        return self._call(self._heartbeat(unit, term, timeout)).result()

    async def async_heartbeat(self, unit: str, term: int, *, timeout: float = 5.0) -> Heartbeat:
        return await asyncio.wrap_future(self._call(self._heartbeat(unit, term, timeout)))

    def base(self, unit: str) -> Base | None:
        """The committed checkpoint this link encodes `unit` against, if any."""
        return self._call(self._get_base(unit)).result()

    def forget(self, unit: str) -> None:
        """Drop the base of `unit`: its next ship is a full image."""
        self._call(self._set_base(unit, None)).result()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError):
            self._submit(self._shutdown()).result(timeout=10)
        self._stop_loop()

    def __enter__(self) -> ReplicationClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- loop side -----------------------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, _T]) -> concurrent.futures.Future[_T]:
        if self._closed:
            coro.close()
            raise ClosedError("replication client is closed")
        return self._submit(coro)

    def _submit(self, coro: Coroutine[Any, Any, _T]) -> concurrent.futures.Future[_T]:
        return asyncio.run_coroutine_threadsafe(self._tracked(coro), self._loop)

    async def _tracked(self, coro: Coroutine[Any, Any, _T]) -> _T:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            return await coro
        except asyncio.CancelledError:
            if self._closed:
                raise ClosedError("replication client closed") from None
            raise
        finally:
            self._tasks.discard(task)

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.run_until_complete(self._loop.shutdown_default_executor())
            self._loop.close()
        if self._own_context:
            self._context.term()

    async def _open(self) -> None:
        actx = zmq.asyncio.Context(self._context)
        sock = actx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        # Queue only to a connected, handshaken standby: a transfer must not wait in a buffer
        # and reach a standby later than its timeout said it failed.
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.SNDHWM, max(4, (64 << 20) // self._batch_bytes))
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME)
        if self._tcp_maxrt_ms is not None:
            # The kernel drops the connection, and what it still queues, once sent data stays
            # unacknowledged this long: a message cannot reach the standby long after its
            # sender gave up on it (a term claim after a partition heals).
            sock.setsockopt(zmq.TCP_MAXRT, self._tcp_maxrt_ms)
        if self._server_key is not None:
            public, secret = self._keypair or zmq.curve_keypair()
            sock.setsockopt(zmq.CURVE_SERVERKEY, self._server_key)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
            sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
        sock.connect(self._endpoint)
        self._sock = sock
        receiver = asyncio.create_task(self._receive())
        self._tasks.add(receiver)
        receiver.add_done_callback(self._tasks.discard)

    async def _shutdown(self) -> None:
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        # Cancelled transfers and requests surface as ClosedError (see `_tracked`).
        await asyncio.sleep(0)
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def _link(self, unit: str) -> _Link:
        _check_unit(None, None, unit)
        return self._links.setdefault(unit, _Link())

    async def _get_base(self, unit: str) -> Base | None:
        return self._link(unit).base

    async def _set_base(self, unit: str, base: Base | None) -> None:
        self._link(unit).base = base

    async def _send(self, msg: Message) -> None:
        if self._sock is None:
            raise ClosedError("replication client is closed")
        # Copying: zero-copy sends start pyzmq's process-wide garbage thread, which outlives us,
        # and a 4 MiB copy costs well under a millisecond.
        await self._sock.send_multipart(encode(msg))

    async def _receive(self) -> None:
        try:
            await self._receive_forever()
        except Exception:
            # Without the receiver every transfer would only time out; say why, loudly.
            log.exception("replication: client receiver failed")
            raise

    async def _receive_forever(self) -> None:
        assert self._sock is not None
        while True:
            frames = await self._sock.recv_multipart()
            try:
                msg = decode(frames)
            except WireError as e:
                log.warning("replication: undecodable reply: %s", e)
                continue
            request = self._requests.pop((msg.unit, msg.seq), None)
            if request is not None and isinstance(msg, Status | Heartbeat | Released | Nack):
                if not request.done():
                    request.set_result(msg)
                continue
            waiting = self._waiting.get(msg.unit)
            if isinstance(msg, Ack | Nack) and waiting is not None:
                epoch, first_seq, reply = waiting
                if msg.epoch == epoch and msg.seq >= first_seq and not reply.done():
                    reply.set_result(msg)
                    continue
            log.debug("replication: late or unexpected %s", msg)

    async def _request(self, msg: Message, timeout: float) -> Message:
        fut: asyncio.Future[Message] = self._loop.create_future()
        key = (msg.unit, msg.seq)
        self._requests[key] = fut
        try:
            async with asyncio.timeout(timeout):
                await self._send(msg)
                reply = await fut
        finally:
            self._requests.pop(key, None)
        if isinstance(reply, Nack):
            raise NackedError(reply)
        return reply

    async def _hello(
        self, unit: str, term: int, timeout: float, claim: tuple[int, int] | None = None
    ) -> Status:
        link = self._link(unit)
        reply = await self._request(
            Hello(unit=unit, epoch=0, term=term, seq=link.next_seq(), claim=claim), timeout
        )
        assert isinstance(reply, Status)
        if link.base is not None and reply.manifest_id != link.base.id:
            link.base = None
        return reply

    async def _heartbeat(self, unit: str, term: int, timeout: float) -> Heartbeat:
        link = self._link(unit)
        reply = await self._request(
            Heartbeat(unit=unit, epoch=0, term=term, seq=link.next_seq()), timeout
        )
        assert isinstance(reply, Heartbeat)
        return reply

    async def _ship(self, request: _ShipRequest) -> Shipped:
        unit, epoch, term, source = request.unit, request.epoch, request.term, request.source
        manifest, meta, timeout = request.manifest, request.meta, request.timeout
        link = self._link(unit)
        async with link.lock:
            started = time.perf_counter()
            async with asyncio.timeout(timeout):
                if manifest is None:
                    manifest = await self._loop.run_in_executor(None, scan, source, epoch)
                if manifest.epoch != epoch:
                    raise ValueError(f"manifest is for epoch {manifest.epoch}, not {epoch}")
                delta = make_delta(source, manifest, None if request.full else link.base)
                reply = await self._transfer(link, unit, term, delta, meta)
                if (
                    isinstance(reply, Nack)
                    and reply.code is Code.BASE_MISMATCH
                    and delta.base is not None
                ):
                    link.base = None
                    delta = make_delta(source, manifest, None)
                    reply = await self._transfer(link, unit, term, delta, meta)
                if isinstance(reply, Ack):
                    # Committed: the standby's base, whatever the confirm's fate.
                    link.base = Base.of(manifest)
                    if reply.unsent:
                        # Its output waits there for this confirm, and leaves only on it.
                        reply = await self._confirm(link, unit, reply)
            if isinstance(reply, Nack):
                raise NackedError(reply)
            return Shipped(
                unit=unit,
                epoch=epoch,
                term=term,
                full=delta.base is None,
                blocks=len(delta.blocks),
                block_bytes=delta.block_bytes,
                manifest_bytes=len(delta.wire_manifest),
                seconds=time.perf_counter() - started,
            )

    async def _confirm(self, link: _Link, unit: str, ack: Ack) -> Message:
        """Answer an unsent ack: the standby sends the output up to its epoch; its `Released`
        (or `Nack`) comes back."""
        msg = Confirm(unit=unit, epoch=ack.epoch, term=ack.term, seq=link.next_seq())
        fut: asyncio.Future[Message] = self._loop.create_future()
        key = (unit, msg.seq)
        self._requests[key] = fut
        try:
            await self._send(msg)
            reply = await fut
        finally:
            self._requests.pop(key, None)
        if isinstance(reply, Released) and (reply.epoch, reply.term) != (ack.epoch, ack.term):
            raise ReplicationError(f"{unit}: released {reply} answers confirm {msg}")
        return reply

    async def _transfer(
        self, link: _Link, unit: str, term: int, delta: Delta, meta: Meta
    ) -> Message:
        epoch = delta.epoch
        reply: asyncio.Future[Message] = self._loop.create_future()
        first = link.next_seq()
        self._waiting[unit] = (epoch, first, reply)
        try:
            base_epoch = delta.base.manifest.epoch if delta.base is not None else None
            await self._send(
                Begin(
                    unit=unit,
                    epoch=epoch,
                    term=term,
                    seq=first,
                    manifest=delta.wire_manifest,
                    base_epoch=base_epoch,
                    meta=meta,
                )
            )
            messages = blocks = 0
            for batch in iter_batches(delta, self._batch_bytes):
                if reply.done():
                    break
                seq = link.next_seq()
                await self._send(Blocks(unit=unit, epoch=epoch, term=term, seq=seq, batch=batch))
                messages += 1
                blocks += len(batch)
                # Let other units' transfers and the receiver run between batches.
                await asyncio.sleep(0)
            if not reply.done():
                await self._send(
                    End(
                        unit=unit,
                        epoch=epoch,
                        term=term,
                        seq=link.next_seq(),
                        first_seq=first,
                        messages=messages,
                        blocks=blocks,
                    )
                )
            return await reply
        finally:
            self._waiting.pop(unit, None)
