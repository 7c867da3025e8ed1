"""The control channel between the CLI (or a peer agent) and an agent: JSON over CURVE-secured zmq.

Sockets: the agent binds a ROUTER, clients connect a DEALER. Every connection is CURVE-encrypted
and the agent runs a ZAP handler that admits only the public keys in its authorized-keys file;
every refused handshake is logged with the peer's key and address. A client whose key is refused
learns it at once (from its socket monitor), not by timing out.

Every message is one zmq frame holding one JSON object of at most `MAX_MESSAGE` bytes, checked
against the schema of its type below before anything acts on it. A message that fails the check
gets an ``error`` reply naming the field; the server never crashes on input.

Requests (client -> agent), each ``{"v": 1, "id": ID, "type": TYPE, ...fields}``:

=============  ==============================================  ====================================
type           fields                                          reply ``data``
=============  ==============================================  ====================================
ping           -                                               host, pid, version, uptime_s
status         unit?: unit name                                host, units: [unit status, ...]
protect        spec: unit spec (`UnitSpec.to_json`),           unit, role, term, protection
               source?: str (file name, for messages)
unprotect      unit: unit name                                 unit, removed: bool
failover       unit: unit name, planned?: bool (default true;  unit, status, term, old_term,
               false: stop the copy, restore the last          old_pid, new_pid, elapsed_ms,
               commit), term?: int (the term the operator      outage_ms, steps_ms, ... (the
               saw; default the current), lossless?: bool,     attempt's record, whatever its
               reason?: str                                    status)
events         seconds: number in (0, 86400],                  a stream: ``event`` messages, then
               kinds?: [str] (all when absent)                 ``end`` with {events: count}
shutdown       teardown?: bool (also stop units and the        stopping: true
               data plane; default false: leave them running)
standby_add    spec: unit spec, primary: host name (the        unit, role ("standby"), primary,
               agent asking), term: int >= 1, spares?:         term, replication (the endpoint
               [host name] (where a takeover claims its        the primary ships to)
               term), source?: str
standby_remove unit: unit name, primary: host name (the        unit, removed: bool, detail
               agent asking)
spare_add      spec: unit spec, primary: host name (the        unit, role ("spare"), primary,
               agent asking), term: int >= 1, source?: str     term
spare_remove   unit: unit name, primary: host name (the        unit, removed: bool, detail
               agent asking)
spare_join     unit: unit name, host: host name (the agent     unit, joined: true, term (the
               asking, deposed at term), term: int >= 1        term this host runs the unit at)
=============  ==============================================  ====================================

``standby_add``, ``standby_remove``, ``spare_add``, ``spare_remove`` and ``spare_join`` are sent
by one agent to another (docs/agent.md, "Remote standby"); the receiving agent also checks that
the key the request came with is the configured key of `primary` (of `host`, for
``spare_join``).

Replies (agent -> client), with the request's ``id`` (null when it could not be read):
``{"type": "result", "data": {...}}``, ``{"type": "error", "code": C, "message": M}``,
``{"type": "event", "event": {...}}`` and ``{"type": "end", "data": {...}}``. Error codes:
``bad_request`` (not JSON, not an object, wrong version), ``bad_field`` (a field is missing, extra
or of the wrong type), ``unknown_type``, ``bad_spec``, ``no_such_unit``, ``exists``, ``busy``,
``unsupported``, ``failed`` (the operation was tried and failed), ``internal`` (a bug; logged).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final

import attrs
import zmq
import zmq.utils.monitor
import zmq.utils.z85

__all__ = [
    "MAX_MESSAGE",
    "PROTOCOL_VERSION",
    "REQUEST_TYPES",
    "ControlAuthError",
    "ControlClient",
    "ControlError",
    "ControlServer",
    "ControlTimeoutError",
    "Events",
    "Failover",
    "Ping",
    "Protect",
    "Reply",
    "Request",
    "SchemaError",
    "Shutdown",
    "SpareAdd",
    "SpareJoin",
    "SpareRemove",
    "StandbyAdd",
    "StandbyRemove",
    "Status",
    "Unprotect",
    "check_reply",
    "check_request",
    "decode_request",
    "encode",
]

log = logging.getLogger(__name__)

PROTOCOL_VERSION: Final = 1
MAX_MESSAGE: Final = 256 << 10
MAX_EVENT_SECONDS: Final = 86_400
_ID: Final = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_UNIT: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,23}$")
_KIND: Final = re.compile(r"^[a-z_]{1,32}$")
# An agent's host name (hamgr.agent.config).
_HOST: Final = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,30}[A-Za-z0-9])?$")
MAX_SPARES: Final = 8
_ZAP_ENDPOINT: Final = "inproc://zeromq.zap.01"
_ZAP_DOMAIN: Final = b"hamgr-control"


# --- schema -----------------------------------------------------------------------------------


class SchemaError(Exception):
    """A message that does not match its schema; `code` is the error reply's code."""

    def __init__(self, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


def _describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


class _Fields:
    """Reads one message's fields; every problem names `type.field`."""

    def __init__(self, kind: str, obj: Mapping[str, Any], request_id: str | None) -> None:
        self.kind = kind
        self.obj = obj
        self.request_id = request_id
        self.used = {"v", "id", "type"}

    def fail(self, field: str, message: str) -> SchemaError:
        return SchemaError("bad_field", f"{self.kind}.{field}: {message}", self.request_id)

    def _get(self, field: str, required: bool) -> Any:
        self.used.add(field)
        if field not in self.obj:
            if required:
                raise self.fail(field, "is required")
            return None
        value = self.obj[field]
        if value is None and required:
            raise self.fail(field, "is required, got null")
        return value

    def string(
        self,
        field: str,
        *,
        required: bool = True,
        pattern: re.Pattern[str] | None = None,
        max_len: int = 4096,
    ) -> str | None:
        value = self._get(field, required)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.fail(field, f"must be a string, got {_describe(value)}")
        if len(value) > max_len:
            raise self.fail(field, f"must be at most {max_len} characters")
        if pattern is not None and not pattern.match(value):
            raise self.fail(field, f"{value[:64]!r} does not match {pattern.pattern}")
        return value

    def number(self, field: str, *, low: float, high: float, required: bool = True) -> float | None:
        value = self._get(field, required)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(field, f"must be a number, got {_describe(value)}")
        if not low < value <= high:
            raise self.fail(field, f"must be in ({low:g}, {high:g}], got {value}")
        return float(value)

    def integer(self, field: str, *, low: int, high: int, required: bool = False) -> int | None:
        """An integer in [low, high] (optional unless `required`)."""
        value = self._get(field, required)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(field, f"must be an integer, got {_describe(value)}")
        if not low <= value <= high:
            raise self.fail(field, f"must be in [{low}, {high}], got {value}")
        return value

    def boolean(self, field: str, *, default: bool) -> bool:
        value = self._get(field, False)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(field, f"must be true or false, got {_describe(value)}")
        return value

    def obj_field(self, field: str) -> dict[str, Any]:
        value = self._get(field, True)
        if not isinstance(value, dict):
            raise self.fail(field, f"must be an object, got {_describe(value)}")
        return value

    def strings(
        self, field: str, *, pattern: re.Pattern[str], max_items: int = 64
    ) -> tuple[str, ...] | None:
        value = self._get(field, False)
        if value is None:
            return None
        if not isinstance(value, list) or len(value) > max_items:
            raise self.fail(field, f"must be an array of at most {max_items} strings")
        for item in value:
            if not isinstance(item, str) or not pattern.match(item):
                raise self.fail(field, f"item {item!r} does not match {pattern.pattern}")
        return tuple(value)

    def done(self) -> None:
        extra = sorted(set(self.obj) - self.used)
        if extra:
            raise self.fail(extra[0], "is not a field of this message")


@attrs.frozen
class Request:
    id: str


@attrs.frozen
class Ping(Request):
    pass


@attrs.frozen
class Status(Request):
    unit: str | None = None


@attrs.frozen
class Protect(Request):
    spec: Mapping[str, Any] = attrs.field(factory=dict)
    source: str = "<request>"


@attrs.frozen
class Unprotect(Request):
    unit: str = ""


@attrs.frozen
class Failover(Request):
    unit: str = ""
    planned: bool = True
    term: int | None = None
    lossless: bool = False
    reason: str | None = None


@attrs.frozen
class Events(Request):
    seconds: float = 1.0
    kinds: tuple[str, ...] | None = None


@attrs.frozen
class Shutdown(Request):
    teardown: bool = False


@attrs.frozen
class StandbyAdd(Request):
    """Agent to agent: become the standby of the unit `spec` whose primary is `primary`."""

    spec: Mapping[str, Any] = attrs.field(factory=dict)
    primary: str = ""
    term: int = 1
    spares: tuple[str, ...] = ()
    source: str = "<request>"


@attrs.frozen
class StandbyRemove(Request):
    """Agent to agent: drop the standby of `unit` that `primary` set up here."""

    unit: str = ""
    primary: str = ""


@attrs.frozen
class SpareAdd(Request):
    """Agent to agent: keep a store of the unit `spec` (whose primary is `primary`), so that its
    standby can claim a term here at a takeover."""

    spec: Mapping[str, Any] = attrs.field(factory=dict)
    primary: str = ""
    term: int = 1
    source: str = "<request>"


@attrs.frozen
class SpareRemove(Request):
    """Agent to agent: drop the spare role of `unit` that `primary` set up here."""

    unit: str = ""
    primary: str = ""


@attrs.frozen
class SpareJoin(Request):
    """Agent to agent: `host`, deposed as the primary of `unit` at `term`, offers itself to
    this host (the unit's primary now) as a spare (`hamgr.agent.rejoin`)."""

    unit: str = ""
    host: str = ""
    term: int = 1


def _ping(f: _Fields, rid: str) -> Request:
    return Ping(rid)


def _status(f: _Fields, rid: str) -> Request:
    return Status(rid, f.string("unit", required=False, pattern=_UNIT))


def _protect(f: _Fields, rid: str) -> Request:
    spec = f.obj_field("spec")
    source = f.string("source", required=False, max_len=1024) or "<request>"
    return Protect(rid, spec, source)


def _unprotect(f: _Fields, rid: str) -> Request:
    unit = f.string("unit", pattern=_UNIT)
    assert unit is not None
    return Unprotect(rid, unit)


def _failover(f: _Fields, rid: str) -> Request:
    unit = f.string("unit", pattern=_UNIT)
    assert unit is not None
    return Failover(
        rid,
        unit,
        planned=f.boolean("planned", default=True),
        term=f.integer("term", low=1, high=2**62),
        lossless=f.boolean("lossless", default=False),
        reason=f.string("reason", required=False, max_len=256),
    )


def _events(f: _Fields, rid: str) -> Request:
    seconds = f.number("seconds", low=0, high=MAX_EVENT_SECONDS)
    assert seconds is not None
    return Events(rid, seconds, f.strings("kinds", pattern=_KIND))


def _shutdown(f: _Fields, rid: str) -> Request:
    return Shutdown(rid, f.boolean("teardown", default=False))


def _standby_add(f: _Fields, rid: str) -> Request:
    spec = f.obj_field("spec")
    primary = f.string("primary", pattern=_HOST, max_len=32)
    term = f.integer("term", low=1, high=2**62, required=True)
    spares = f.strings("spares", pattern=_HOST, max_items=MAX_SPARES) or ()
    source = f.string("source", required=False, max_len=1024) or "<request>"
    assert primary is not None
    assert term is not None
    if primary in spares:
        raise f.fail("spares", f"{primary!r} is the primary, not a spare")
    if len(set(spares)) != len(spares):
        raise f.fail("spares", "names a host twice")
    return StandbyAdd(rid, spec, primary, term, spares, source)


def _unit_and_primary(f: _Fields) -> tuple[str, str]:
    unit = f.string("unit", pattern=_UNIT)
    primary = f.string("primary", pattern=_HOST, max_len=32)
    assert unit is not None
    assert primary is not None
    return unit, primary


def _standby_remove(f: _Fields, rid: str) -> Request:
    return StandbyRemove(rid, *_unit_and_primary(f))


def _spare_add(f: _Fields, rid: str) -> Request:
    spec = f.obj_field("spec")
    primary = f.string("primary", pattern=_HOST, max_len=32)
    term = f.integer("term", low=1, high=2**62, required=True)
    source = f.string("source", required=False, max_len=1024) or "<request>"
    assert primary is not None
    assert term is not None
    return SpareAdd(rid, spec, primary, term, source)


def _spare_remove(f: _Fields, rid: str) -> Request:
    return SpareRemove(rid, *_unit_and_primary(f))


def _spare_join(f: _Fields, rid: str) -> Request:
    unit = f.string("unit", pattern=_UNIT)
    host = f.string("host", pattern=_HOST, max_len=32)
    term = f.integer("term", low=1, high=2**62, required=True)
    assert unit is not None
    assert host is not None
    assert term is not None
    return SpareJoin(rid, unit, host, term)


REQUEST_TYPES: Final[Mapping[str, Callable[[_Fields, str], Request]]] = {
    "ping": _ping,
    "status": _status,
    "protect": _protect,
    "unprotect": _unprotect,
    "failover": _failover,
    "events": _events,
    "shutdown": _shutdown,
    "standby_add": _standby_add,
    "standby_remove": _standby_remove,
    "spare_add": _spare_add,
    "spare_remove": _spare_remove,
    "spare_join": _spare_join,
}
_REQUEST_NAMES: Final = {
    Ping: "ping",
    Status: "status",
    Protect: "protect",
    Unprotect: "unprotect",
    Failover: "failover",
    Events: "events",
    Shutdown: "shutdown",
    StandbyAdd: "standby_add",
    StandbyRemove: "standby_remove",
    SpareAdd: "spare_add",
    SpareRemove: "spare_remove",
    SpareJoin: "spare_join",
}


def _envelope(obj: Any) -> tuple[str, str | None]:
    if not isinstance(obj, dict):
        raise SchemaError("bad_request", f"a message must be a JSON object, got {_describe(obj)}")
    rid = obj.get("id")
    readable = rid if isinstance(rid, str) and _ID.match(rid) else None
    if obj.get("v") != PROTOCOL_VERSION:
        raise SchemaError(
            "bad_request",
            f"protocol version {obj.get('v')!r}; this agent speaks {PROTOCOL_VERSION}",
            readable,
        )
    if readable is None:
        raise SchemaError("bad_field", f"id must be a string matching {_ID.pattern}", None)
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise SchemaError("bad_field", f"type must be a string, got {_describe(kind)}", readable)
    return kind, readable


def check_request(obj: Any) -> Request:
    """The typed request for a decoded JSON value; raises `SchemaError`."""
    kind, rid = _envelope(obj)
    assert rid is not None
    parse = REQUEST_TYPES.get(kind)
    if parse is None:
        raise SchemaError(
            "unknown_type",
            f"unknown request type {kind[:32]!r}; known: {', '.join(REQUEST_TYPES)}",
            rid,
        )
    fields = _Fields(kind, obj, rid)
    request = parse(fields, rid)
    fields.done()
    return request


def decode_request(frames: list[bytes]) -> Request:
    """Parse one request from its zmq frames; raises `SchemaError`."""
    if len(frames) != 1:
        raise SchemaError("bad_request", f"a request is one frame, got {len(frames)}")
    if len(frames[0]) > MAX_MESSAGE:
        raise SchemaError("bad_request", f"a request is at most {MAX_MESSAGE} bytes")
    try:
        obj = json.loads(frames[0])
    except (ValueError, UnicodeDecodeError) as exc:
        raise SchemaError("bad_request", f"not JSON: {exc}") from None
    return check_request(obj)


def request_json(request: Request) -> dict[str, Any]:
    out: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "id": request.id,
        "type": _REQUEST_NAMES[type(request)],
    }
    for f in attrs.fields(type(request)):
        if f.name == "id":
            continue
        value = getattr(request, f.name)
        if value is None:
            continue
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


@attrs.frozen
class Reply:
    """One reply message, as checked by `check_reply`."""

    id: str | None
    type: str
    data: Mapping[str, Any] = attrs.field(factory=dict)
    code: str | None = None
    message: str | None = None


_REPLY_TYPES: Final = ("result", "error", "event", "end")


def check_reply(obj: Any) -> Reply:
    """The typed reply for a decoded JSON value; raises `SchemaError` (the client's check)."""
    if not isinstance(obj, dict) or obj.get("v") != PROTOCOL_VERSION:
        raise SchemaError("bad_reply", "a reply must be a JSON object with v=1")
    rid = obj.get("id")
    if rid is not None and not (isinstance(rid, str) and _ID.match(rid)):
        raise SchemaError("bad_reply", "reply id must be null or a request id")
    kind = obj.get("type")
    if kind not in _REPLY_TYPES:
        raise SchemaError("bad_reply", f"unknown reply type {kind!r}")
    f = _Fields(kind, obj, rid)
    if kind == "error":
        code = f.string("code", pattern=re.compile(r"^[a-z_]{1,32}$"))
        message = f.string("message", max_len=MAX_MESSAGE)
        f.done()
        return Reply(rid, kind, code=code, message=message)
    data = f.obj_field("event" if kind == "event" else "data")
    f.done()
    return Reply(rid, kind, data=data)


def encode(obj: Mapping[str, Any]) -> bytes:
    data = json.dumps(obj, separators=(",", ":"), default=str).encode()
    if len(data) > MAX_MESSAGE:
        raise ValueError(f"message of {len(data)} bytes is over {MAX_MESSAGE}")
    return data


def _reply(rid: str | None, kind: str, **fields: Any) -> bytes:
    return encode({"v": PROTOCOL_VERSION, "id": rid, "type": kind, **fields})


# --- server -----------------------------------------------------------------------------------


class Responder:
    """Answers one request, from any thread: once with `result`/`error`, or as a stream."""

    def __init__(self, server: ControlServer, routing_id: bytes, request_id: str | None) -> None:
        self._server = server
        self._routing_id = routing_id
        self.request_id = request_id
        self.done = False
        self.peer_key: str | None = None

    def _send(self, payload: bytes, *, final: bool) -> bool:
        if self.done:
            return False
        self.done = final
        self._server.send(self._routing_id, payload)
        return True

    def result(self, data: Mapping[str, Any]) -> bool:
        return self._send(_reply(self.request_id, "result", data=dict(data)), final=True)

    def error(self, code: str, message: str) -> bool:
        return self._send(_reply(self.request_id, "error", code=code, message=message), final=True)

    def event(self, event: Mapping[str, Any]) -> bool:
        return self._send(_reply(self.request_id, "event", event=dict(event)), final=False)

    def end(self, data: Mapping[str, Any]) -> bool:
        return self._send(_reply(self.request_id, "end", data=dict(data)), final=True)


Handler = Callable[[Request, Responder], None]


class ControlServer:
    """The agent's ROUTER socket, served by one thread.

    `handler(request, responder)` runs on the server thread and must not block: anything slow
    keeps the responder and answers from another thread later. `authorized()` returns the
    public keys (z85) to admit; it is asked at every handshake, so edits to the authorized-keys
    file take effect for new connections without a restart. `on_refused(key, address)` is told
    of every refused handshake (after it is logged).
    """

    def __init__(
        self,
        endpoint: str,
        *,
        secret_key: bytes,
        authorized: Callable[[], frozenset[bytes]],
        handler: Handler,
        on_refused: Callable[[str, str], None] | None = None,
        poll_ms: int = 10,
    ) -> None:
        self._endpoint = endpoint
        self._secret = secret_key
        self._authorized = authorized
        self._handler = handler
        self._on_refused = on_refused
        self._poll_ms = poll_ms
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._outbox: queue.SimpleQueue[tuple[bytes, bytes]] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._bound = ""
        self.last_loop = time.monotonic()
        self.requests_total = 0
        self.refused_total = 0
        self.bad_total = 0

    @property
    def endpoint(self) -> str:
        return self._bound

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> str:
        if self._thread is not None:
            raise RuntimeError("already started")
        zap = self._context.socket(zmq.REP)
        zap.setsockopt(zmq.LINGER, 0)
        zap.bind(_ZAP_ENDPOINT)
        sock = self._context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE + 1024)
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self._secret)
        sock.setsockopt(zmq.ZAP_DOMAIN, _ZAP_DOMAIN)
        # Replies to a client that went away are dropped, not queued forever.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        if self._endpoint.startswith("ipc://"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._endpoint.removeprefix("ipc://"))
        try:
            sock.bind(self._endpoint)
        except zmq.ZMQError:
            sock.close()
            zap.close()
            raise
        if self._endpoint.startswith("ipc://"):
            # Only root may connect; CURVE still decides who is admitted.
            os.chmod(self._endpoint.removeprefix("ipc://"), 0o600)
        self._bound = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._thread = threading.Thread(
            target=self._serve, args=(sock, zap), name="hamgr-control", daemon=True
        )
        self._thread.start()
        return self._bound

    def stop(self, timeout: float = 5.0) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._context.term()

    def send(self, routing_id: bytes, payload: bytes) -> None:
        """Queue a reply; thread-safe (the server thread does the sending)."""
        self._outbox.put((routing_id, payload))

    def _serve(self, sock: zmq.Socket[bytes], zap: zmq.Socket[bytes]) -> None:
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(zap, zmq.POLLIN)
        try:
            while not self._stopping.is_set():
                self.last_loop = time.monotonic()
                for ready, _ in poller.poll(self._poll_ms):
                    if ready is zap:
                        self._answer_zap(zap)
                    else:
                        self._drain(sock)
                self._flush(sock)
        except Exception:
            log.exception("control: server loop failed")
        finally:
            self._flush(sock)
            sock.close()
            zap.close()

    def _flush(self, sock: zmq.Socket[bytes]) -> None:
        for _ in range(10_000):
            try:
                routing_id, payload = self._outbox.get_nowait()
            except queue.Empty:
                return
            try:
                sock.send_multipart([routing_id, payload], zmq.NOBLOCK)
            except zmq.Again:
                log.warning("control: a client is not reading; reply dropped")
            except zmq.ZMQError as exc:
                log.warning("control: reply not sent: %s", exc)

    def _drain(self, sock: zmq.Socket[bytes]) -> None:
        # Bounded so that handshakes, replies and stop() are served between bursts.
        for _ in range(64):
            try:
                msg = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            routing_id = msg[0].bytes
            frames = [f.bytes for f in msg[1:]]
            user = msg[-1].get("User-Id") if len(msg) > 1 else None
            peer = user if isinstance(user, str) else None
            self.requests_total += 1
            self._dispatch(routing_id, frames, peer)

    def _dispatch(self, routing_id: bytes, frames: list[bytes], peer: str | None) -> None:
        try:
            request = decode_request(frames)
        except SchemaError as exc:
            self.bad_total += 1
            log.warning(
                "control: refusing a malformed request: %s",
                exc.message,
                extra={"code": exc.code, "peer_key": peer},
            )
            self.send(
                routing_id, _reply(exc.request_id, "error", code=exc.code, message=exc.message)
            )
            return
        responder = Responder(self, routing_id, request.id)
        responder.peer_key = peer
        try:
            self._handler(request, responder)
        except Exception as exc:
            log.exception("control: handling %s failed", type(request).__name__)
            responder.error("internal", f"{type(exc).__name__}: {exc}")

    def _answer_zap(self, zap: zmq.Socket[bytes]) -> None:
        request = zap.recv_multipart()
        # ZAP 1.0: version, request id, domain, address, identity, mechanism, credentials...
        version, request_id = request[0], request[1]
        address = request[3].decode(errors="replace") if len(request) > 3 else ""
        mechanism = request[5] if len(request) > 5 else b""
        key = request[6] if len(request) > 6 else b""
        z85 = zmq.utils.z85.encode(key).decode() if len(key) == 32 else ""
        try:
            allowed = self._authorized()
        except Exception:
            log.exception("control: cannot read the authorized keys; refusing everyone")
            allowed = frozenset()
        ok = mechanism == b"CURVE" and z85.encode() in allowed
        if ok:
            zap.send_multipart([version, request_id, b"200", b"OK", z85.encode(), b""])
            return
        self.refused_total += 1
        log.warning(
            "control: refused a client whose key is not authorized",
            extra={
                "peer_key": z85 or None,
                "peer_address": address or None,
                "mechanism": mechanism.decode(errors="replace"),
            },
        )
        zap.send_multipart([version, request_id, b"400", b"key not authorized", b"", b""])
        if self._on_refused is not None:
            try:
                self._on_refused(z85, address)
            except Exception:
                log.exception("control: on_refused callback failed")


# --- client -----------------------------------------------------------------------------------


class ControlError(Exception):
    """The agent answered with an error, or the exchange failed; `code` says which."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ControlTimeoutError(ControlError):
    """No answer in time. `sent` tells whether the request left this client at all: a request
    that was never sent (no connection) cannot have been carried out."""

    def __init__(self, code: str, message: str, *, sent: bool = True) -> None:
        super().__init__(code, message)
        self.sent = sent


class ControlAuthError(ControlError):
    pass


_ids = itertools.count(1)

_HANDSHAKE_FAILURES: Final = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


class ControlClient:
    """A DEALER connected to one agent. One request at a time; not thread-safe.

    Every request has a timeout; a refused handshake raises `ControlAuthError` at once.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        server_key: bytes,
        keypair: tuple[bytes, bytes],
        timeout: float = 10.0,
    ) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.CURVE_SERVERKEY, server_key)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, keypair[0])
        sock.setsockopt(zmq.CURVE_SECRETKEY, keypair[1])
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE + 1024)
        # Queue nothing for a connection that is not up and authenticated.
        sock.setsockopt(zmq.IMMEDIATE, 1)
        self._monitor = sock.get_monitor_socket(_HANDSHAKE_FAILURES)
        sock.connect(endpoint)
        self._sock = sock

    def close(self) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self._sock.disable_monitor()
        self._monitor.close(linger=0)
        self._sock.close(linger=0)
        self._context.term()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_monitor(self) -> None:
        while True:
            try:
                event = zmq.utils.monitor.recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] & _HANDSHAKE_FAILURES:
                raise ControlAuthError(
                    "refused",
                    f"the agent at {self.endpoint} refused this client's key: add its public "
                    "key to the agent's authorized_keys, or check the agent's public key",
                )

    def _wait(self, flags: int, deadline: float) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, flags)
        poller.register(self._monitor, zmq.POLLIN)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                connecting = flags == zmq.POLLOUT
                what = "connect to" if connecting else "get a reply from"
                raise ControlTimeoutError(
                    "timeout",
                    f"could not {what} the agent at {self.endpoint} within {self.timeout:g} s; "
                    "is it running (`hamgr up`)?",
                    sent=not connecting,
                )
            ready = dict(poller.poll(max(1, int(left * 1000))))
            if self._monitor in ready:
                self._check_monitor()
            if ready.get(self._sock, 0) & flags:
                return

    def send_raw(self, payload: bytes, *, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        self._wait(zmq.POLLOUT, deadline)
        self._sock.send(payload, zmq.NOBLOCK)

    def recv_reply(self, *, timeout: float | None = None) -> Reply:
        """The next reply, checked against the reply schema."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        self._wait(zmq.POLLIN, deadline)
        frames = self._sock.recv_multipart(zmq.NOBLOCK)
        try:
            return check_reply(json.loads(frames[-1]))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ControlError(
                "bad_reply", f"the agent sent a reply that is not JSON: {exc}"
            ) from None
        except SchemaError as exc:
            raise ControlError(exc.code, exc.message) from None

    def _send(self, request: Request, timeout: float | None) -> None:
        self.send_raw(encode(request_json(request)), timeout=timeout)

    def _next(self, request_id: str, deadline: float) -> Reply:
        while True:
            reply = self.recv_reply(timeout=max(0.0, deadline - time.monotonic()))
            if reply.id in (request_id, None):
                return reply
            log.debug("control: dropping a late reply to %s", reply.id)

    def call(self, request: Request, *, timeout: float | None = None) -> Mapping[str, Any]:
        """Send `request` and return its result's data; raises `ControlError`."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        self._send(request, timeout)
        reply = self._next(request.id, deadline)
        if reply.type == "error":
            raise ControlError(reply.code or "error", reply.message or "")
        if reply.type != "result":
            raise ControlError("bad_reply", f"expected a result, got {reply.type}")
        return reply.data

    def stream(self, request: Events) -> Iterator[Mapping[str, Any]]:
        """Yield the events of an `events` request until its end (bounded by its seconds)."""
        deadline = time.monotonic() + request.seconds + self.timeout
        self._send(request, self.timeout)
        while True:
            reply = self._next(request.id, deadline)
            if reply.type == "event":
                yield reply.data
            elif reply.type == "end":
                return
            elif reply.type == "error":
                raise ControlError(reply.code or "error", reply.message or "")
            else:
                raise ControlError("bad_reply", f"unexpected {reply.type} in an event stream")

    # Typed helpers.

    @staticmethod
    def new_id() -> str:
        return f"{os.getpid()}-{next(_ids)}"

    def ping(self) -> Mapping[str, Any]:
        return self.call(Ping(self.new_id()))

    def status(self, unit: str | None = None) -> Mapping[str, Any]:
        return self.call(Status(self.new_id(), unit))

    def protect(
        self, spec: Mapping[str, Any], source: str, *, timeout: float = 120.0
    ) -> Mapping[str, Any]:
        return self.call(Protect(self.new_id(), dict(spec), source), timeout=timeout)

    def unprotect(self, unit: str, *, timeout: float = 60.0) -> Mapping[str, Any]:
        return self.call(Unprotect(self.new_id(), unit), timeout=timeout)

    def failover(
        self,
        unit: str,
        *,
        planned: bool = True,
        term: int | None = None,
        lossless: bool = False,
        reason: str | None = None,
        timeout: float = 120.0,
    ) -> Mapping[str, Any]:
        request = Failover(self.new_id(), unit, planned, term, lossless, reason)
        return self.call(request, timeout=timeout)

    def events(
        self, seconds: float, kinds: tuple[str, ...] | None = None
    ) -> Iterator[Mapping[str, Any]]:
        return self.stream(Events(self.new_id(), seconds, kinds))

    def shutdown(self, *, teardown: bool = False, timeout: float = 120.0) -> Mapping[str, Any]:
        return self.call(Shutdown(self.new_id(), teardown), timeout=timeout)

    def standby_add(
        self,
        spec: Mapping[str, Any],
        *,
        primary: str,
        term: int,
        spares: tuple[str, ...] = (),
        source: str = "<request>",
        timeout: float = 120.0,
    ) -> Mapping[str, Any]:
        request = StandbyAdd(self.new_id(), dict(spec), primary, term, spares, source)
        return self.call(request, timeout=timeout)

    def standby_remove(
        self, unit: str, *, primary: str, timeout: float = 60.0
    ) -> Mapping[str, Any]:
        return self.call(StandbyRemove(self.new_id(), unit, primary), timeout=timeout)

    def spare_add(
        self,
        spec: Mapping[str, Any],
        *,
        primary: str,
        term: int,
        source: str = "<request>",
        timeout: float = 60.0,
    ) -> Mapping[str, Any]:
        return self.call(
            SpareAdd(self.new_id(), dict(spec), primary, term, source), timeout=timeout
        )

    def spare_remove(self, unit: str, *, primary: str, timeout: float = 60.0) -> Mapping[str, Any]:
        return self.call(SpareRemove(self.new_id(), unit, primary), timeout=timeout)
