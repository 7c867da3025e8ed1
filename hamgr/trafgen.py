"""UDP traffic for benchmarks, the demo and tests: a bounded sender and a recording sink.

Run as separate processes (``python -m hamgr.trafgen send|sink ...``, usually under
``nsenter --net=...``) so that neither competes with the epoch engine for the GIL. Each prints
one JSON object as its last stdout line.

Datagram payload from the sender: sender sequence (u64 BE), send time CLOCK_MONOTONIC ns (u64 BE),
padding. The sequencer NF prepends its own per-flow counter (u64 BE), so the sink reads
(counter, seq, sent_ns) and stamps its own receive time.
"""

from __future__ import annotations

import json
import signal
import socket
import struct
import sys
import time
from pathlib import Path

import attrs
import click

PAYLOAD = struct.Struct("!QQ")
STAMPED = struct.Struct("!QQQ")  # NF counter, sender seq, sent ns
RECORD = struct.Struct("<QQQQ")  # counter, seq, sent_ns, recv_ns
SO_RCVBUFFORCE = 33  # from <asm-generic/socket.h>; the socket module does not export it


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


@click.group()
def cli() -> None:
    """UDP sender and sink for hamgr's benchmarks."""


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
def sink(
    *, port: int, bind_ip: str, seconds: float, out: Path, idle_exit: float, ready: Path | None
) -> None:
    """Record (counter, seq, sent_ns, recv_ns) of every datagram; bounded in time."""
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
    buf = bytearray()
    pack = RECORD.pack
    with out.open("wb") as f:
        while not stop and clock() < deadline:
            try:
                data = sock.recv(2048)
            except TimeoutError:
                if idle_exit and count and clock() - last_rx > idle_exit * 1e9:
                    break
                continue
            now = clock()
            last_rx = now
            if len(data) < STAMPED.size:
                continue
            counter, seq, sent_ns = STAMPED.unpack_from(data)
            buf += pack(counter, seq, sent_ns, now)
            count += 1
            if len(buf) >= 1 << 16:
                f.write(buf)
                buf.clear()
        f.write(buf)
    click.echo(json.dumps({"received": count}))


def main() -> None:
    cli.main(standalone_mode=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
