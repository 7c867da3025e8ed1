"""The data plane's control protocol: encoding and decoding only, no I/O.

One SOCK_SEQPACKET message carries one line:

- request: ``<id> <command> key=value ...``
- reply:   ``<id> ok key=value ...`` or ``<id> err <code> <message>``
- event:   ``* <event> key=value ...`` (only to clients that sent ``subscribe``)

Tokens are printable ASCII without spaces; see docs/dataplane.md.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import attrs

_TOKEN = re.compile(r"[\x21-\x7e]+")
_KEY = re.compile(r"[A-Za-z0-9_.\-]+")
_ID = re.compile(r"[\x21-\x29\x2b-\x7e]{1,32}")  # printable, no '*'
MAX_REQUEST = 4096
# Ethertypes of the frames data planes send each other on their wire ports (dpdk_vhost/src/dp.h,
# DP_ETHERTYPE_PROBE and DP_ETHERTYPE_MIRROR): liveness probes, and mirrored inputs.
ETHERTYPE_PROBE = 0x88B5
ETHERTYPE_MIRROR = 0x88B6


class ProtocolError(ValueError):
    """A message that does not follow the line protocol."""


@attrs.frozen
class Reply:
    id: str
    fields: Mapping[str, str]

    def int(self, key: str) -> int:
        return int(self.fields[key])


@attrs.frozen
class ErrorReply:
    id: str
    code: str
    message: str


@attrs.frozen
class Event:
    name: str
    fields: Mapping[str, str]


@attrs.frozen
class PeerUp:
    peer: str
    port: str
    seq: int
    term: int
    mono_us: int


@attrs.frozen
class PeerDown:
    peer: str
    port: str
    last_rx_mono_us: int
    mono_us: int
    silent_us: int
    last_seq: int


AnyEvent = Event | PeerUp | PeerDown
Message = Reply | ErrorReply | AnyEvent


def _value(v: object) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        if v < 0:
            raise ProtocolError(f"negative value {v}: the protocol carries unsigned integers")
        return str(v)
    if isinstance(v, str):
        if not _TOKEN.fullmatch(v):
            raise ProtocolError(f"value {v!r} must be non-empty printable ASCII without spaces")
        return v
    if isinstance(v, list | tuple):
        return ",".join(_value(x) for x in v)
    raise ProtocolError(f"cannot encode {type(v).__name__} value {v!r}")


def encode_request(req_id: str, command: str, args: Mapping[str, object] | None = None) -> bytes:
    """One request message; arguments whose value is None are left out."""
    if not _ID.fullmatch(req_id):
        raise ProtocolError(f"request id {req_id!r} must be 1-32 printable characters, not '*'")
    if not _KEY.fullmatch(command):
        raise ProtocolError(f"command {command!r} must be a bare word")
    parts = [req_id, command]
    for key, val in (args or {}).items():
        if val is None:
            continue
        if not _KEY.fullmatch(key):
            raise ProtocolError(f"argument name {key!r} must match [A-Za-z0-9_.-]+")
        parts.append(f"{key}={_value(val)}")
    line = (" ".join(parts) + "\n").encode("ascii")
    if len(line) > MAX_REQUEST:
        raise ProtocolError(f"request is {len(line)} bytes; the limit is {MAX_REQUEST}")
    return line


def parse_fields(tokens: list[str]) -> dict[str, str]:
    fields: dict[str, str] = {}
    for tok in tokens:
        key, sep, val = tok.partition("=")
        if not sep or not key:
            raise ProtocolError(f"field {tok!r} is not key=value")
        fields[key] = val
    return fields


def _event(name: str, f: dict[str, str]) -> AnyEvent:
    try:
        if name == "peer_up":
            return PeerUp(
                peer=f["peer"],
                port=f["port"],
                seq=int(f["seq"]),
                term=int(f["term"]),
                mono_us=int(f["mono_us"]),
            )
        if name == "peer_down":
            return PeerDown(
                peer=f["peer"],
                port=f["port"],
                last_rx_mono_us=int(f["last_rx_mono_us"]),
                mono_us=int(f["mono_us"]),
                silent_us=int(f["silent_us"]),
                last_seq=int(f["last_seq"]),
            )
    except (KeyError, ValueError) as exc:
        raise ProtocolError(f"malformed {name} event: {exc}") from exc
    return Event(name=name, fields=f)


def decode_message(data: bytes) -> Message:
    """Decodes one reply or event message."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as exc:
        raise ProtocolError("message is not ASCII") from exc
    text = text.rstrip("\r\n")
    tokens = text.split(" ")
    if len(tokens) < 2 or not tokens[0] or not tokens[1]:
        raise ProtocolError(f"message {text!r} has fewer than two tokens")
    head, kind = tokens[0], tokens[1]
    if head == "*":
        return _event(kind, parse_fields(tokens[2:]))
    if kind == "ok":
        return Reply(id=head, fields=parse_fields([t for t in tokens[2:] if t]))
    if kind == "err":
        if len(tokens) < 3:
            raise ProtocolError(f"error reply {text!r} has no code")
        return ErrorReply(id=head, code=tokens[2], message=" ".join(tokens[3:]))
    raise ProtocolError(f"message {text!r} is neither ok, err nor an event")


@attrs.frozen
class PortStats:
    name: str
    type: str
    port_id: int
    link: bool
    rx: int
    tx: int
    rx_bytes: int
    tx_bytes: int
    rx_missed: int
    rx_nombuf: int
    tx_errors: int
    probe_rx: int
    probe_tx: int
    probe_bad: int
    unowned_drops: int
    # Frames sent by ``xmit``; 0 when the data plane does not report them.
    xmit_pkts: int = 0
    xmit_bytes: int = 0
    # Mirror frames taken by an input log on this port, those with a tag no log here
    # wants, and those too short to carry a mirror header; 0 when not reported.
    mirror_rx: int = 0
    mirror_unknown: int = 0
    mirror_bad: int = 0
    # Frames this unowned port gave to a shadow log (for a lossless unit's NF MAC).
    shadow_rx: int = 0


@attrs.frozen
class UnitStats:
    name: str
    mode: str
    tag: int
    wire: tuple[str, ...]
    nf: str
    egress: str
    mirror: str | None
    paused: bool
    bp: frozenset[str]
    term: int
    epoch: int
    k: int
    budget_bytes: int
    ring_size: int
    epochs_in_flight: int
    rx: int
    in_seq: int
    nf_rx: int
    nf_rx_bytes: int
    tx: int
    tx_bytes: int
    buffered_pkts: int
    buffered_bytes: int
    releasable_pkts: int
    released_pkts: int
    released_bytes: int
    discarded_pkts: int
    discarded_bytes: int
    epochs_closed: int
    epochs_released: int
    epochs_discarded: int
    bp_k: int
    bp_bytes: int
    bp_ring: int
    nf_stalls: int
    refused_stale: int
    hwm_bytes: int
    hwm_pkts: int
    mirror_pkts: int
    stash_to_nf: int
    stash_to_egress: int
    drops: Mapping[str, int]
    # Held output freed by ``retire`` (the standby sent it); 0 when not reported.
    retired_pkts: int = 0
    retired_bytes: int = 0
    epochs_retired: int = 0
    # Inputs delivered by ``replay_input_log`` (also counted in in_seq); 0 when not reported.
    replayed_pkts: int = 0
    # The tag the unit's mirror frames carry; None when the data plane does not report it.
    mirror_tag: int | None = None
    # The wire stash: wire frames read while ingress was stopped (paused or back-pressure),
    # so probes on the port are still heard; frames held now, frames it took, and times it
    # filled up and left the rest in the port's queue. 0 when not reported.
    stash_wire: int = 0
    stash_wire_pkts: int = 0
    stash_wire_full: int = 0

    @property
    def dropped(self) -> int:
        return sum(self.drops.values())


@attrs.frozen
class ProbeStats:
    peer: str
    port: str
    state: str
    interval_us: int
    miss: int
    rx: int
    tx: int
    tx_fail: int
    downs: int
    ups: int


@attrs.frozen
class InputLogStats:
    """One input log. first_seq/last_seq are those of the entries held (0 when empty);
    high_seq is the highest seq logged or trimmed: a frame at or below it is a duplicate.
    gap_seq is the lowest seq found missing (0 = none), overflow_seq and trim_seq the highest
    seq dropped by overflow and by trim."""

    name: str
    port: str
    tag: int
    capacity: int
    max_bytes: int
    frames: int
    bytes: int
    first_seq: int
    last_seq: int
    high_seq: int
    received: int
    gaps: int
    gap_seq: int
    duplicates: int
    too_big: int
    overflow: int
    overflow_seq: int
    trimmed: int
    trim_seq: int
    replayed: int
    # The shadow log, when the log was made with ``shadow_mac``: frames held and their bytes,
    # frames logged, mirror frames that found their copy there (dropping it and everything
    # older) or did not, frames dropped for room, frames replayed, and mirror frames
    # forgotten for room before their copy came (each may be an input replayed twice).
    # 0 without a shadow log.
    shadow: bool = False
    shadow_frames: int = 0
    shadow_bytes: int = 0
    shadow_received: int = 0
    shadow_matched: int = 0
    shadow_unmatched: int = 0
    shadow_overflow: int = 0
    shadow_replayed: int = 0
    shadow_evicted: int = 0


@attrs.frozen
class Stats:
    name: str
    loops: int
    sleeps: int
    ctl_polls: int
    ctl_requests: int
    ctl_errors: int
    events_sent: int
    events_dropped: int
    mbuf_avail: int
    mbuf_in_use: int
    mono_us: int
    busy_loops: int
    busy_cycles: int
    tsc_hz: int
    ports: Mapping[str, PortStats]
    units: Mapping[str, UnitStats]
    probes: Mapping[str, ProbeStats]
    # Absent from data planes that have no input logs.
    input_logs: Mapping[str, InputLogStats] = attrs.field(factory=dict)


def _group(fields: Mapping[str, str], prefix: str) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for key, val in fields.items():
        if not key.startswith(prefix):
            continue
        name, _, attr = key[len(prefix) :].partition(".")
        out.setdefault(name, {})[attr] = val
    return out


def _ints(cls: type) -> list[str]:
    """The required int fields of a stats class; fields with a default are optional."""
    return [
        f.name for f in attrs.fields(cls) if f.type in ("int", int) and f.default is attrs.NOTHING
    ]


def _optional_ints(cls: type) -> list[str]:
    return [
        f.name
        for f in attrs.fields(cls)
        if f.type in ("int", int) and f.default is not attrs.NOTHING
    ]


_PORT_INTS = _ints(PortStats)
_UNIT_INTS = _ints(UnitStats)
_PROBE_INTS = _ints(ProbeStats)
_LOG_INTS = _ints(InputLogStats)
_PORT_OPT_INTS = _optional_ints(PortStats)
_LOG_OPT_INTS = _optional_ints(InputLogStats)
_UNIT_OPT_INTS = _optional_ints(UnitStats)


def _opt(f: Mapping[str, str], keys: list[str]) -> dict[str, int]:
    return {k: int(f[k]) for k in keys if k in f}


def parse_stats(fields: Mapping[str, str]) -> Stats:
    """Builds typed stats from the fields of a ``stats`` reply."""
    try:
        ports = {
            name: PortStats(
                name=name,
                type=f["type"],
                link=f["link"] == "1",
                **{k: int(f[k]) for k in _PORT_INTS},
                **_opt(f, _PORT_OPT_INTS),
            )
            for name, f in _group(fields, "port.").items()
        }
        units = {}
        for name, f in _group(fields, "unit.").items():
            drops = {k[5:]: int(v) for k, v in f.items() if k.startswith("drop_")}
            units[name] = UnitStats(
                name=name,
                mode=f["mode"],
                wire=tuple(f["wire"].split(",")),
                nf=f["nf"],
                egress=f["egress"],
                mirror=None if f["mirror"] == "-" else f["mirror"],
                paused=f["paused"] == "1",
                bp=frozenset() if f["bp"] == "none" else frozenset(f["bp"].split(",")),
                drops=drops,
                mirror_tag=int(f["mirror_tag"]) if "mirror_tag" in f else None,
                **{k: int(f[k]) for k in _UNIT_INTS},
                **_opt(f, _UNIT_OPT_INTS),
            )
        probes = {
            name: ProbeStats(
                peer=name,
                port=f["port"],
                state=f["state"],
                **{k: int(f[k]) for k in _PROBE_INTS},
            )
            for name, f in _group(fields, "probe.").items()
        }
        logs = {
            name: InputLogStats(
                name=name,
                port=f["port"],
                shadow="shadow_frames" in f,
                **{k: int(f[k]) for k in _LOG_INTS},
                **_opt(f, _LOG_OPT_INTS),
            )
            for name, f in _group(fields, "log.").items()
        }
        g = {
            k: int(fields[k])
            for k in (f.name for f in attrs.fields(Stats))
            if k in fields and k != "name"
        }
        return Stats(
            name=fields["name"],
            ports=ports,
            units=units,
            probes=probes,
            input_logs=logs,
            **g,
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise ProtocolError(f"malformed stats reply: {exc!r}") from exc
