"""Traffic for benchmarks, the demo and tests: a bounded UDP sender, a recording UDP sink, and
a bounded TCP client that keeps one connection.

Run as separate processes (``python -m hamgr.trafgen send|sink|tcp ...``, usually under
``nsenter --net=...``) so that none competes with the epoch engine for the GIL. Each prints
one JSON object as its last stdout line.

Datagram payload from the sender: sender sequence (u64 BE), send time CLOCK_MONOTONIC ns (u64 BE),
padding. The sequencer NF prepends its own per-flow counter (u64 BE), so the sink reads
(counter, seq, sent_ns) and stamps its own receive time. Behind a chain of N sequencers
(``sink --stamps N``) each datagram carries N counters, the last member's first; the sink then
also writes member i's counters to `member_records(out, i)` for every member but the last.

TCP (``tcp``, against the sequencer's ``--tcp-listen``): one connection, request ``n`` is the line
``"<n>\\n"``, sent every ``--interval-ms`` whether or not earlier ones were answered, and the
NF answers ``"<conn> <count> <n>\\n"`` (see hamgr/nfs/src/sequencer.c). `TcpLedger` checks every
answer; the client never reconnects, so a connection that did not survive shows as a reset or
as answers that stop.
"""

from __future__ import annotations

import contextlib
import errno
import json
import select
import signal
import socket
import statistics
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import click

PAYLOAD = struct.Struct("!QQ")
STAMPED = struct.Struct("!QQQ")  # NF counter, sender seq, sent ns
RECORD = struct.Struct("<QQQQ")  # counter, seq, sent_ns, recv_ns
SO_RCVBUFFORCE = 33  # from <asm-generic/socket.h>; the socket module does not export it


def member_records(out: Path, member: int) -> Path:
    """The record file of chain member `member`'s counters, next to the sink's `out`."""
    return out.with_name(f"{out.name}.member{member}")


@attrs.frozen
class Record:
    counter: int
    seq: int
    sent_ns: int
    recv_ns: int


def read_records(path: Path) -> list[Record]:
    data = path.read_bytes()
    return [Record(*RECORD.unpack_from(data, off)) for off in range(0, len(data), RECORD.size)]


@attrs.frozen
class SequenceCheck:
    """What an outside observer of the NF's output saw."""

    received: int
    duplicates: int
    gaps: int
    reordered: int


def check_sequence(records: list[Record]) -> SequenceCheck:
    """Duplicates and gaps in the NF's stamped counter, as the sink saw them.

    A rollback that became visible shows up as a counter seen twice (duplicate) or skipped (gap).
    Lost inputs do not: the NF never counted them.
    """
    seen: set[int] = set()
    duplicates = reordered = 0
    last = 0
    for r in records:
        if r.counter in seen:
            duplicates += 1
            continue
        seen.add(r.counter)
        if r.counter < last:
            reordered += 1
        last = max(last, r.counter)
    gaps = (max(seen) - min(seen) + 1 - len(seen)) if seen else 0
    return SequenceCheck(len(records), duplicates, gaps, reordered)


def inputs_twice(records: list[Record]) -> int:
    """Inputs the NF counted more than once: a sender seq reflected with two or more
    different counters (an input replayed twice at a takeover, I7). The counter check does
    not see it (each output has a counter of its own), nor does a count of lost inputs."""
    counters: dict[int, set[int]] = {}
    for r in records:
        counters.setdefault(r.seq, set()).add(r.counter)
    return sum(len(c) - 1 for c in counters.values())


def missing_outside_takeover(records: list[Record], kill_ns: int) -> set[int]:
    """Counters missing anywhere but between the old primary's last and the new one's first output.

    The known limit (docs/failover.md): output the standby committed but the dead primary had not
    released yet is lost, so a gap can open exactly at the takeover. Any other missing counter is
    a different defect.
    """
    before = [r.counter for r in records if r.recv_ns <= kill_ns]
    after = [r.counter for r in records if r.recv_ns > kill_ns]
    seen = {r.counter for r in records}
    if not seen:
        return set()
    missing = set(range(min(seen), max(seen) + 1)) - seen
    if not before or not after:
        return missing
    last_old, first_new = max(before), min(after)
    return {c for c in missing if not last_old < c < first_new}


# -- TCP ------------------------------------------------------------------------------------

TCP_LINE_MAX = 4096  # longer than any answer the sequencer writes


@attrs.frozen
class TcpSummary:
    """What the TCP client saw of its one connection."""

    connected: bool
    requests: int  # requests sent
    answered: int  # requests answered correctly, in order
    errors: int  # answers that were wrong, repeated, unasked for or unreadable
    resets: int  # the connection failed: reset, closed by the peer, or a socket error
    max_stall_ms: float  # longest wait with a request outstanding and no answer coming
    # Request to answer, over the answered requests. Answers are NF output, held by the data
    # plane until the epoch that produced them is committed, so these are far above a direct
    # path's (about 0.1 ms between namespaces).
    rtt_ms_p50: float | None = None
    rtt_ms_min: float | None = None
    conn: int | None = None  # the NF's number for this connection (from its first answer)
    last_answered_sent_ns: int | None = None  # send time of the last request answered right
    detail: str = ""  # the first error or the reset's reason

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @staticmethod
    def from_json(data: dict[str, Any]) -> TcpSummary:
        fields = {f.name for f in attrs.fields(TcpSummary)}
        return TcpSummary(**{k: v for k, v in data.items() if k in fields})


def tcp_survived(summary: TcpSummary, after_ns: int) -> bool:
    """The connection kept working across a takeover at `after_ns` (CLOCK_MONOTONIC ns).

    It was connected and never failed, every answer was right and every request was answered,
    and requests sent after `after_ns` were answered too: the connection served after the
    takeover, not only before it.
    """
    return (
        summary.connected
        and summary.resets == 0
        and summary.errors == 0
        and summary.requests > 0
        and summary.answered == summary.requests
        and summary.last_answered_sent_ns is not None
        and summary.last_answered_sent_ns > after_ns
    )


@attrs.define
class TcpLedger:
    """Checks the answers of one connection to numbered requests; no I/O, clock passed in.

    Request ``n`` (from `first_seq`) must be answered with ``"<conn> <count> <n>"``, in order,
    where ``count`` is ``n - first_seq + 1`` (the NF counts the lines of this connection) and
    ``conn`` never changes. A connection rebuilt behind the client's back would restart
    ``count`` at 1 and carry another ``conn``; a rollback visible on the connection repeats or
    skips an answer. Each counts as an error.
    """

    first_seq: int = 1
    connected: bool = False
    closed: bool = False
    answered: int = 0
    errors: int = 0
    resets: int = 0
    conn: int | None = None
    detail: str = ""
    last_answered_sent_ns: int | None = None
    max_stall_ns: int = 0
    _next_seq: int = 0
    _sent: dict[int, int] = attrs.Factory(dict)  # outstanding: seq -> send time, in order
    _rtts: list[int] = attrs.Factory(list)  # ns, of the requests answered right
    _last_answer_ns: int = 0
    _buf: bytes = b""

    def __attrs_post_init__(self) -> None:
        self._next_seq = self.first_seq

    @property
    def requests(self) -> int:
        return self._next_seq - self.first_seq

    @property
    def outstanding(self) -> int:
        return len(self._sent)

    def connect(self, now_ns: int) -> None:
        self.connected = True
        self._last_answer_ns = now_ns

    def request(self, now_ns: int) -> bytes:
        """Record the next request as sent at `now_ns`; return its bytes."""
        seq = self._next_seq
        self._next_seq += 1
        self._sent[seq] = now_ns
        return f"{seq}\n".encode()

    def receive(self, data: bytes, now_ns: int) -> None:
        if self.closed:
            return
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            self._answer(line, now_ns)
        if len(self._buf) > TCP_LINE_MAX:
            self._error(f"an answer longer than {TCP_LINE_MAX} bytes")
            self._buf = b""

    def reset(self, now_ns: int, reason: str) -> None:
        """The connection failed; nothing more is read from it."""
        if self.closed:
            return
        self.resets += 1
        self.closed = True
        self._note_stall(now_ns)
        if not self.detail:
            self.detail = reason

    def summary(self, now_ns: int) -> TcpSummary:
        self._note_stall(now_ns)
        return TcpSummary(
            connected=self.connected,
            requests=self.requests,
            answered=self.answered,
            errors=self.errors,
            resets=self.resets,
            max_stall_ms=round(self.max_stall_ns / 1e6, 1),
            rtt_ms_p50=round(statistics.median(self._rtts) / 1e6, 2) if self._rtts else None,
            rtt_ms_min=round(min(self._rtts) / 1e6, 2) if self._rtts else None,
            conn=self.conn,
            last_answered_sent_ns=self.last_answered_sent_ns,
            detail=self.detail,
        )

    def _note_stall(self, now_ns: int) -> None:
        """The wait so far for the oldest outstanding request, if any."""
        if self._sent and self.connected:
            oldest = next(iter(self._sent.values()))
            self.max_stall_ns = max(self.max_stall_ns, now_ns - max(self._last_answer_ns, oldest))

    def _error(self, what: str) -> None:
        self.errors += 1
        if not self.detail:
            self.detail = what

    def _answer(self, line: bytes, now_ns: int) -> None:
        try:
            conn, count, seq = (int(x) for x in line.split(b" "))
        except ValueError:
            self._error(f"unreadable answer {line[:80]!r}")
            return
        if not self._sent:
            self._error(f"answer {seq} to no outstanding request")
            return
        expected = next(iter(self._sent))
        if seq != expected:
            self._error(f"answer {seq} where {expected} was due")
            self._sent.pop(seq, None)
            return
        self._note_stall(now_ns)
        sent_ns = self._sent.pop(seq)
        self._last_answer_ns = now_ns
        if self.conn is None:
            self.conn = conn
        if conn != self.conn:
            self._error(f"answer {seq} came on NF connection {conn}, not {self.conn}")
        elif count != seq - self.first_seq + 1:
            self._error(f"answer {seq} counted {count} on its connection")
        else:
            self.answered += 1
            self.last_answered_sent_ns = sent_ns
            self._rtts.append(now_ns - sent_ns)


def run_tcp_client(
    sock: socket.socket,
    *,
    seconds: float,
    interval_ms: float,
    drain: float,
    max_count: int,
    clock: Callable[[], int] = time.monotonic_ns,
) -> TcpLedger:
    """Drive one connected socket: a request every `interval_ms` for `seconds` (at most
    `max_count`), then up to `drain` more seconds for the outstanding answers. Never
    reconnects: the first failure ends the run."""
    ledger = TcpLedger()
    ledger.connect(clock())
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    start = clock()
    send_until = start + int(seconds * 1e9)
    hard_end = send_until + int(drain * 1e9)
    interval = max(1, int(interval_ms * 1e6))
    next_at = start
    pending = b""
    while not ledger.closed:
        now = clock()
        sending = now < send_until and ledger.requests < max_count
        if now >= hard_end or (not sending and not pending and not ledger.outstanding):
            break
        if sending and now >= next_at:
            pending += ledger.request(now)
            next_at += interval
        if pending:
            try:
                pending = pending[sock.send(pending) :]
            except BlockingIOError:
                pass
            except OSError as exc:
                ledger.reset(clock(), f"send: {exc}")
                break
        until = min(next_at, hard_end) if sending else hard_end
        timeout = max(0.0, (until - clock()) / 1e9)
        readable, _, _ = select.select([sock], [sock] if pending else [], [], timeout)
        if not readable:
            continue
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            continue
        except OSError as exc:
            ledger.reset(clock(), f"recv: {errno.errorcode.get(exc.errno or 0, exc)}")
            break
        if not data:
            ledger.reset(clock(), "closed by the peer")
            break
        ledger.receive(data, clock())
    return ledger


@click.group()
def cli() -> None:
    """UDP sender and sink, and a TCP client, for hamgr's benchmarks."""


@cli.command()
@click.option("--dest", required=True, help="IP:PORT of the NF.")
@click.option("--bind", "bind_ip", default="0.0.0.0", show_default=True)
@click.option("--seconds", type=float, required=True, help="Stop after this long.")
@click.option("--pps", type=int, default=0, help="Rate; 0 sends as fast as possible.")
@click.option("--max-count", type=int, default=5_000_000, show_default=True)
@click.option("--size", type=int, default=64, show_default=True, help="Payload bytes.")
@click.option("--first-seq", type=int, default=1, show_default=True)
def send(
    *,
    dest: str,
    bind_ip: str,
    seconds: float,
    pps: int,
    max_count: int,
    size: int,
    first_seq: int,
) -> None:
    """Send numbered, timestamped datagrams; bounded in time and count."""
    host, _, port = dest.rpartition(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((bind_ip, 0))
    sock.connect((host, int(port)))
    pad = b"\0" * max(0, size - PAYLOAD.size)
    pack = PAYLOAD.pack
    clock = time.monotonic_ns
    start = clock()
    deadline = start + int(seconds * 1e9)
    interval = int(1e9 / pps) if pps else 0
    seq = first_seq
    sent = errors = 0
    next_at = start
    while sent < max_count:
        now = clock()
        if now >= deadline:
            break
        if interval:
            if now < next_at:
                time.sleep(min(0.001, (next_at - now) / 1e9))
                continue
            next_at += interval
        try:
            sock.send(pack(seq, clock()) + pad)
            sent += 1
            seq += 1
        except OSError:  # e.g. ENOBUFS on a full qdisc: counted, not retried
            errors += 1
    elapsed = (clock() - start) / 1e9
    click.echo(
        json.dumps(
            {
                "sent": sent,
                "errors": errors,
                "first_seq": first_seq,
                "last_seq": seq - 1,
                "seconds": elapsed,
                "pps": sent / elapsed if elapsed else 0.0,
            }
        )
    )


@cli.command()
@click.option("--port", type=int, required=True)
@click.option("--bind", "bind_ip", default="0.0.0.0", show_default=True)
@click.option("--seconds", type=float, required=True, help="Stop after this long at most.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Record file.")
@click.option("--idle-exit", type=float, default=0.0, help="Stop after this long with no data.")
@click.option("--ready", type=click.Path(path_type=Path), help="Touch this file once bound.")
@click.option("--stamps", type=click.IntRange(1, 3), default=1, help="NF counters per datagram.")
def sink(
    *,
    port: int,
    bind_ip: str,
    seconds: float,
    out: Path,
    idle_exit: float,
    ready: Path | None,
    stamps: int,
) -> None:
    """Record (counter, seq, sent_ns, recv_ns) of every datagram; bounded in time.

    Behind a chain of sequencers each datagram carries one counter per member (`--stamps`):
    the last member's go to `--out`, member i's to `member_records(out, i)`.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    # SO_RCVBUF is capped by net.core.rmem_max (about 200 KiB); a released epoch arrives as one
    # burst of thousands of datagrams, so ask past the cap (root only) and fall back if refused.
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 << 20)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 20)
    sock.bind((bind_ip, port))
    sock.settimeout(0.05)
    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    if ready is not None:
        ready.touch()
    clock = time.monotonic_ns
    deadline = clock() + int(seconds * 1e9)
    last_rx = clock()
    count = 0
    # One record file per counter: `out` for the first (the last member's), then the others.
    paths = [out, *(member_records(out, stamps - 2 - i) for i in range(stamps - 1))]
    bufs = [bytearray() for _ in paths]
    stamped = STAMPED if stamps == 1 else struct.Struct(f"!{stamps + 2}Q")
    pack = RECORD.pack
    with contextlib.ExitStack() as files:
        outs = [files.enter_context(p.open("wb")) for p in paths]
        while not stop and clock() < deadline:
            try:
                data = sock.recv(2048)
            except TimeoutError:
                if idle_exit and count and clock() - last_rx > idle_exit * 1e9:
                    break
                continue
            now = clock()
            last_rx = now
            if len(data) < stamped.size:
                continue
            *counters, seq, sent_ns = stamped.unpack_from(data)
            for buf, counter in zip(bufs, counters, strict=True):
                buf.extend(pack(counter, seq, sent_ns, now))
            count += 1
            if len(bufs[0]) >= 1 << 16:
                for f, buf in zip(outs, bufs, strict=True):
                    f.write(buf)
                    buf.clear()
        for f, buf in zip(outs, bufs, strict=True):
            f.write(buf)
    click.echo(json.dumps({"received": count}))


@cli.command("tcp")
@click.option("--dest", required=True, help="IP:PORT of the NF's TCP listener.")
@click.option("--seconds", type=float, required=True, help="Send requests for this long.")
@click.option("--interval-ms", type=float, default=20.0, show_default=True)
@click.option(
    "--drain",
    type=float,
    default=5.0,
    show_default=True,
    help="Then wait at most this long for outstanding answers.",
)
@click.option("--max-count", type=int, default=100_000, show_default=True)
@click.option("--connect-timeout", type=float, default=5.0, show_default=True)
@click.option("--ready", type=click.Path(path_type=Path), help="Touch this file once connected.")
@click.option("--out", type=click.Path(path_type=Path), help="Also write the summary here.")
def tcp(
    *,
    dest: str,
    seconds: float,
    interval_ms: float,
    drain: float,
    max_count: int,
    connect_timeout: float,
    ready: Path | None,
    out: Path | None,
) -> None:
    """Keep one TCP connection, send numbered requests, check every answer; bounded in time."""
    host, _, port = dest.rpartition(":")
    clock = time.monotonic_ns
    try:
        sock = socket.create_connection((host, int(port)), timeout=connect_timeout)
    except OSError as exc:
        ledger = TcpLedger()
        ledger.detail = f"connect: {exc}"
        summary = ledger.summary(clock())
    else:
        with sock:
            if ready is not None:
                ready.touch()
            ledger = run_tcp_client(
                sock, seconds=seconds, interval_ms=interval_ms, drain=drain, max_count=max_count
            )
            summary = ledger.summary(clock())
    text = json.dumps(summary.to_json())
    if out is not None:
        out.write_text(text + "\n")
    click.echo(text)


def main() -> None:
    cli.main(standalone_mode=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
