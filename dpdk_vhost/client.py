"""Blocking client for the data plane's control socket."""

from __future__ import annotations

import collections
import itertools
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType

import attrs

from dpdk_vhost.protocol import (
    AnyEvent,
    ErrorReply,
    Reply,
    Stats,
    decode_message,
    encode_request,
    parse_stats,
)

_HINTS = {
    "stale_term": "a newer term exists: this caller has been fenced off and must stop",
    "term_ahead": "call set_term with the new term before using it",
    "bad_epoch": "close the epoch that stats reports as open (unit.<U>.epoch)",
    "epoch_limit": "release (or discard) an epoch first, or raise k with configure_unit",
    "not_closed": "close_epoch the epoch before releasing it",
    "port_busy": "remove the units and probes that use the port first",
    "probe_failed": "check the socket path or interface name, and that it is in this netns",
    "no_such_unit": "add_unit it first (names are case-sensitive)",
    "no_such_port": "add_port it first (names are case-sensitive)",
    "bad_path": "use an absolute path in an existing, writable directory",
    "save_failed": "the epoch is closed and still buffered: release, retire or discard it, "
    "or write it again with save_epoch",
    "bad_file": "the held-output file is malformed; nothing was sent",
    "tx_timeout": "the port kept refusing frames; the message says how many were sent",
    "no_such_log": "add_input_log it first (names are case-sensitive)",
    "not_paused": "pause_ingress the unit before replaying into it",
    "log_incomplete": "the log lacks an input after the cut (gap, overflow or trim); "
    "nothing was delivered, and a lossless replay from this cut is impossible",
}


class DataPlaneError(Exception):
    """The data plane refused a request; ``code`` is machine-readable."""

    def __init__(self, code: str, message: str) -> None:
        hint = _HINTS.get(code)
        super().__init__(f"{code}: {message}" + (f" ({hint})" if hint else ""))
        self.code = code
        self.message = message


class DataPlaneUnavailableError(DataPlaneError):
    """The control socket cannot be reached or stopped answering."""


@attrs.frozen
class Cut:
    """The input cut returned by ``pause_ingress``."""

    unit: str
    cut: int
    rx: int
    nf_rx: int
    epoch: int
    term: int


@attrs.frozen
class EpochClosed:
    unit: str
    epoch: int
    pkts: int
    drained: int
    in_flight: int
    buffered_pkts: int
    saved: int | None = None
    """Frames written to the ``save`` file; None when the epoch was closed without one."""
    saved_bytes: int | None = None


@attrs.frozen
class Retired:
    """What ``retire`` freed without sending (the standby sent it)."""

    unit: str
    epoch: int
    retired_epochs: int
    retired_pkts: int
    retired_bytes: int
    releasable_pkts: int
    in_flight: int


@attrs.frozen
class Xmitted:
    """What ``xmit`` sent from a held-output file; epoch and term come from its header."""

    sent: int
    bytes: int
    epoch: int
    term: int


@attrs.frozen
class Replayed:
    """What ``replay_input_log`` delivered: the seqs of the first and last frame (0 and 0
    when there was nothing after the cut)."""

    delivered: int
    first: int
    last: int


class DataPlaneClient:
    """One connection to a data plane. Not thread-safe; use one per thread."""

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.path = path
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._events: collections.deque[AnyEvent] = collections.deque()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(path)
        except OSError as exc:
            self._sock.close()
            raise DataPlaneUnavailableError(
                "unreachable",
                f"cannot connect to {path}: {exc}; is the data plane running?",
            ) from exc

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> DataPlaneClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _recv(self, timeout: float | None) -> bytes | None:
        self._sock.settimeout(timeout)
        try:
            data = self._sock.recv(1 << 20)
        except TimeoutError:
            return None
        except OSError as exc:
            raise DataPlaneUnavailableError("unreachable", f"{self.path}: {exc}") from exc
        if not data:
            raise DataPlaneUnavailableError(
                "closed", f"{self.path}: the data plane closed the socket"
            )
        return data

    def request(self, command: str, **args: object) -> Mapping[str, str]:
        """Sends one command and returns the reply's fields; raises DataPlaneError."""
        req_id = str(next(self._ids))
        try:
            self._sock.settimeout(self.timeout)
            self._sock.send(encode_request(req_id, command, args))
        except OSError as exc:
            raise DataPlaneUnavailableError("unreachable", f"{self.path}: {exc}") from exc
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            data = self._recv(max(left, 0.001)) if left > 0 else None
            if data is None:
                raise DataPlaneUnavailableError(
                    "timeout", f"no reply to {command} within {self.timeout}s from {self.path}"
                )
            msg = decode_message(data)
            if isinstance(msg, Reply | ErrorReply) and msg.id != req_id:
                continue
            if isinstance(msg, ErrorReply):
                raise DataPlaneError(msg.code, msg.message)
            if isinstance(msg, Reply):
                return msg.fields
            self._events.append(msg)

    # events

    def subscribe(self) -> None:
        self.request("subscribe")

    def next_event(self, timeout: float) -> AnyEvent | None:
        """The next event, or None when none arrives within ``timeout`` seconds."""
        if self._events:
            return self._events.popleft()
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            data = self._recv(left)
            if data is None:
                return None
            msg = decode_message(data)
            if not isinstance(msg, Reply | ErrorReply):
                return msg
        return None

    def events(self, timeout: float) -> Iterator[AnyEvent]:
        """Yields events until ``timeout`` seconds pass without one."""
        while (ev := self.next_event(timeout)) is not None:
            yield ev

    # commands

    def ping(self) -> Mapping[str, str]:
        return self.request("ping")

    def stats(self, unit: str | None = None) -> Stats:
        return parse_stats(self.request("stats", unit=unit))

    def quit(self) -> None:
        self.request("quit")

    def add_vhost_port(self, name: str, path: str, *, client: bool = False) -> int:
        """A vhost-user port; ``client=True`` connects (and reconnects) to a server socket."""
        return int(
            self.request("add_port", name=name, type="vhost", path=path, client=client)["port_id"]
        )

    def add_af_packet_port(self, name: str, iface: str) -> int:
        return int(self.request("add_port", name=name, type="af_packet", iface=iface)["port_id"])

    def add_tap_port(self, name: str, iface: str) -> int:
        return int(self.request("add_port", name=name, type="tap", iface=iface)["port_id"])

    def add_loopback_port(self, name: str) -> int:
        """An in-process port whose TX comes back as its RX: a loopback NF."""
        return int(self.request("add_port", name=name, type="loopback")["port_id"])

    def remove_port(self, name: str) -> None:
        self.request("remove_port", name=name)

    def add_unit(
        self,
        unit: str,
        *,
        wire: str | Sequence[str],
        nf: str,
        egress: str,
        mode: str = "ha",
        k: int | None = None,
        budget_bytes: int | None = None,
        ring_size: int | None = None,
        term: int | None = None,
        epoch: int | None = None,
        mirror: str | None = None,
        tag: int | None = None,
        paused: bool | None = None,
    ) -> None:
        """Adds a unit; ``paused=True`` starts it with ingress paused (before a replay)."""
        self.request(
            "add_unit",
            unit=unit,
            wire=[wire] if isinstance(wire, str) else list(wire),
            nf=nf,
            egress=egress,
            mode=mode,
            k=k,
            budget_bytes=budget_bytes,
            ring_size=ring_size,
            term=term,
            epoch=epoch,
            mirror=mirror,
            tag=tag,
            paused=paused,
        )

    def remove_unit(self, unit: str) -> int:
        """Removes a unit; returns how many buffered packets were dropped."""
        return int(self.request("remove_unit", unit=unit)["dropped"])

    def set_mode(self, unit: str, mode: str) -> None:
        self.request("set_mode", unit=unit, mode=mode)

    def configure_unit(
        self, unit: str, *, k: int | None = None, budget_bytes: int | None = None
    ) -> None:
        self.request("configure_unit", unit=unit, k=k, budget_bytes=budget_bytes)

    def pause_ingress(self, unit: str, term: int | None = None) -> Cut:
        f = self.request("pause_ingress", unit=unit, term=term)
        return Cut(
            unit=unit,
            cut=int(f["cut"]),
            rx=int(f["rx"]),
            nf_rx=int(f["nf_rx"]),
            epoch=int(f["epoch"]),
            term=int(f["term"]),
        )

    def resume_ingress(self, unit: str, term: int | None = None) -> None:
        self.request("resume_ingress", unit=unit, term=term)

    def close_epoch(
        self, unit: str, epoch: int, term: int | None = None, save: str | None = None
    ) -> EpochClosed:
        """Closes the open epoch; with ``save`` (an absolute path) also writes its frames there.

        Save errors: ``bad_path`` when ``save`` cannot be created (the epoch stays open);
        ``save_failed`` when writing failed after the close (the epoch is closed and its
        output still buffered, as without ``save``). Neither leaves ``save + ".tmp"``.
        """
        f = self.request("close_epoch", unit=unit, epoch=epoch, term=term, save=save)
        return EpochClosed(
            unit=unit,
            epoch=int(f["epoch"]),
            pkts=int(f["pkts"]),
            drained=int(f["drained"]),
            in_flight=int(f["in_flight"]),
            buffered_pkts=int(f["buffered_pkts"]),
            saved=int(f["saved"]) if "saved" in f else None,
            saved_bytes=int(f["saved_bytes"]) if "saved_bytes" in f else None,
        )

    def save_epoch(self, unit: str, epoch: int, path: str, term: int | None = None) -> int:
        """Writes a closed, still held epoch's frames to ``path`` again; returns the count."""
        f = self.request("save_epoch", unit=unit, epoch=epoch, path=path, term=term)
        return int(f["saved"])

    def release(self, unit: str, epoch: int, term: int) -> int:
        """Releases every closed epoch up to ``epoch``; returns how many were released."""
        return int(self.request("release", unit=unit, epoch=epoch, term=term)["released_epochs"])

    def retire(self, unit: str, epoch: int, term: int) -> int:
        """Frees every closed epoch up to ``epoch`` without sending it; returns how many.

        Cumulative and fenced like ``release``; for epochs the standby has sent.
        """
        return self.retire_detail(unit, epoch, term).retired_epochs

    def retire_detail(self, unit: str, epoch: int, term: int) -> Retired:
        f = self.request("retire", unit=unit, epoch=epoch, term=term)
        return Retired(
            unit=unit,
            epoch=int(f["epoch"]),
            retired_epochs=int(f["retired_epochs"]),
            retired_pkts=int(f["retired_pkts"]),
            retired_bytes=int(f["retired_bytes"]),
            releasable_pkts=int(f["releasable_pkts"]),
            in_flight=int(f["in_flight"]),
        )

    def xmit(self, port: str, path: str, *, src_mac: str = "own") -> Xmitted:
        """Sends the frames of the held-output file ``path`` on ``port``, in order.

        ``src_mac="own"`` rewrites each frame's source MAC to the port's own; ``"keep"``
        sends them as saved. A malformed file (``bad_file``) sends nothing.
        """
        if src_mac not in ("own", "keep"):
            raise ValueError(f"src_mac must be 'own' or 'keep', not {src_mac!r}")
        f = self.request("xmit", port=port, path=path, src_mac=src_mac)
        return Xmitted(
            sent=int(f["sent"]), bytes=int(f["bytes"]), epoch=int(f["epoch"]), term=int(f["term"])
        )

    def discard(self, unit: str, from_epoch: int, term: int | None = None) -> int:
        """Drops the output of epochs >= ``from_epoch``; returns packets dropped."""
        return int(
            self.request("discard", unit=unit, term=term, **{"from": from_epoch})["discarded"]
        )

    def set_term(self, unit: str, term: int, epoch: int | None = None) -> int:
        """Raises the unit's term; returns how many buffered packets of the old term died."""
        return int(self.request("set_term", unit=unit, term=term, epoch=epoch)["discarded"])

    def unit_auto_epoch(self, unit: str, interval_us: int, ack_delay_us: int = 0) -> None:
        """Bench/test mode: the data plane closes and acks epochs by itself."""
        self.request(
            "unit_auto_epoch", unit=unit, interval_us=interval_us, ack_delay_us=ack_delay_us
        )

    def set_mirror(self, unit: str, port: str | None, *, tag: int | None = None) -> None:
        """Copies every input the unit's NF port accepts to ``port`` (None: stop).

        The copies carry ``tag`` (default: the unit's own tag) and the input's sequence
        number; a standby's ``add_input_log`` with the same tag logs them.
        """
        self.request("set_mirror", unit=unit, port=port or "-", tag=tag)

    def add_input_log(
        self,
        name: str,
        port: str,
        tag: int,
        *,
        capacity: int | None = None,
        max_bytes: int | None = None,
        shadow_mac: str | None = None,
    ) -> None:
        """Logs the mirror frames with ``tag`` that arrive on ``port``, in sequence order.

        ``capacity`` (frames, default 65536) and ``max_bytes`` (default 64 MiB) bound the
        log; beyond them the oldest entries are dropped and counted as overflow.
        With ``shadow_mac`` (the NF's MAC) the log also keeps a shadow log, bounded the same
        way: the other frames for that MAC that reach ``port`` while no unit owns it, less
        those a mirror frame shows the primary delivered (`replay_shadow_log`).
        """
        self.request(
            "add_input_log",
            name=name,
            port=port,
            tag=tag,
            capacity=capacity,
            max_bytes=max_bytes,
            shadow_mac=shadow_mac,
        )

    def trim_input_log(self, name: str, upto: int) -> int:
        """Drops the entries with seq <= ``upto`` (a committed cut); returns how many."""
        return int(self.request("trim_input_log", name=name, upto=upto)["dropped"])

    def replay_input_log(
        self, name: str, unit: str, after: int, *, term: int | None = None
    ) -> Replayed:
        """Delivers the logged inputs with seq > ``after`` to the unit's NF, in order.

        The unit's ingress must be paused (``not_paused``). When the log lacks any seq after
        ``after`` nothing is delivered (``log_incomplete``, naming the first missing seq).
        A NF port that keeps refusing fails the call with ``tx_timeout`` after 200 ms; what
        was delivered by then stays delivered, and the message says the seq to replay after.
        """
        f = self.request("replay_input_log", name=name, unit=unit, after=after, term=term)
        return Replayed(delivered=int(f["delivered"]), first=int(f["first"]), last=int(f["last"]))

    def replay_shadow_log(self, name: str, unit: str, *, term: int | None = None) -> Replayed:
        """Delivers the shadow log's frames to the unit's NF, in arrival order, and drops them.

        Call it after `replay_input_log`: these are the inputs no mirror frame carried. The
        unit's ingress must be paused (``not_paused``); a log without a shadow log fails with
        ``no_shadow``. ``first``/``last`` count arrivals at this port, not the primary's seqs.
        """
        f = self.request("replay_shadow_log", name=name, unit=unit, term=term)
        return Replayed(delivered=int(f["delivered"]), first=int(f["first"]), last=int(f["last"]))

    def remove_input_log(self, name: str) -> int:
        """Removes a log; returns how many entries it still held."""
        return int(self.request("remove_input_log", name=name)["dropped"])

    def add_probe(
        self, peer: str, port: str, *, interval_us: int = 1000, miss: int = 3, term: int = 0
    ) -> None:
        self.request(
            "add_probe", peer=peer, port=port, interval_us=interval_us, miss=miss, term=term
        )

    def remove_probe(self, peer: str) -> None:
        self.request("remove_probe", peer=peer)


DataPlane = DataPlaneClient
