"""`hamgr bench failover`: kill the primary host under a steady UDP stream; measure the takeover.

Each run builds the three-host testbed (`hamgr.fabric`), protects the sequencer on host A with
its standby on B and a spare on C, sends a steady numbered UDP stream through it
(`hamgr.trafgen`), SIGKILLs everything of host A at a random moment and takes its links down,
and waits until B has taken over and re-protected the unit onto C.

Measured per run:
- ``failover_ms``: at the sink, from the last packet the old primary released to the first one
  the new primary released (the two arrivals around the kill);
- ``detect_ms``: B's data plane, from the last probe it got from A to its ``peer_down``;
- ``restore_ms``: ``RuncBackend.restore`` on B;
- duplicates and gaps in the NF's counter (`trafgen.check_sequence`), and ``lost_packets``:
  inputs sent but never reflected in any output.

A gap is the known design limit (docs/failover.md): A died after B acked epoch e but before its
data plane released e, so B restored outputs that never left. ``gap_runs`` counts those runs.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs
import click

from hamgr.fabric import NF_IP, NF_PORT, SINK_PORT, Fabric
from hamgr.trafgen import Record, check_sequence, read_records


def _info(msg: str) -> None:
    click.echo(msg, err=True)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def outage_ms(records: list[Record], kill_us: int) -> float | None:
    """Sink time from the last arrival before the kill to the first after it."""
    kill_ns = kill_us * 1000
    before = [r.recv_ns for r in records if r.recv_ns <= kill_ns]
    after = [r.recv_ns for r in records if r.recv_ns > kill_ns]
    if not before or not after:
        return None
    return (min(after) - max(before)) / 1e6


def start_traffic(
    fab: Fabric, work: Path, *, seconds: float, pps: int
) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes], Path]:
    """A sink (ready once it is bound) and a bounded sender; returns both and the record file."""
    out, ready = work / "sink.rec", work / "sink.ready"
    py = sys.executable
    sink = subprocess.Popen(
        fab.in_ns(
            fab.sk,
            [py, "-m", "hamgr.trafgen", "sink", "--port", str(SINK_PORT), "--out", str(out),
             "--seconds", str(seconds + 30), "--idle-exit", "2", "--ready", str(ready)],
        ),
        stdout=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while not ready.exists():
        if time.monotonic() > deadline or sink.poll() is not None:
            sink.kill()
            raise RuntimeError("the sink did not start")
        time.sleep(0.01)
    sender = subprocess.Popen(
        fab.in_ns(
            fab.cl,
            [py, "-m", "hamgr.trafgen", "send", "--dest", f"{NF_IP}:{NF_PORT}",
             "--seconds", str(seconds), "--pps", str(pps)],
        ),
        stdout=subprocess.PIPE,
    )  # fmt: skip
    return sink, sender, out


def finish_traffic(
    sink: subprocess.Popen[bytes], sender: subprocess.Popen[bytes], timeout: float = 60
) -> dict[str, Any]:
    sent: dict[str, Any] = json.loads(sender.communicate(timeout=timeout)[0].splitlines()[-1])
    sink.communicate(timeout=timeout)
    return sent


@attrs.frozen
class FailoverRun:
    """Everything one remote failover left behind: the sink's records and B's account."""

    records: list[Record]
    kill_us: int
    record: dict[str, Any]  # B's failover_record event
    sent: int


def run_remote_failover(work: Path, *, pps: int, epoch_ms: int, seed: int) -> FailoverRun:
    """Protect the sequencer on A, stream through it, kill host A, wait for B to take over."""
    rng = random.Random(seed)
    with Fabric(work, epoch_ms=epoch_ms) as fab:
        fab.start()
        warm = 1.0 + rng.random()
        sink, sender, out = start_traffic(fab, work, seconds=warm + 5.0, pps=pps)
        try:
            # An idle unit takes no checkpoints (I5): the first commit follows the first output.
            fab.wait_event("A", "first_commit", timeout=10)
            time.sleep(warm)
            kill_us = fab.kill_host("A")
            done = fab.wait_event("B", "failover_record", timeout=30, after_us=kill_us)
            fab.wait_event("B", "first_commit", timeout=30, after_us=kill_us)
        finally:
            sent = finish_traffic(sink, sender)
        records = read_records(out)
    return FailoverRun(records, kill_us, done, int(sent["sent"]))


def remote_run(work: Path, *, pps: int, epoch_ms: int, seed: int) -> dict[str, Any]:
    """One remote failover on a fresh testbed; returns its measures."""
    run = run_remote_failover(work, pps=pps, epoch_ms=epoch_ms, seed=seed)
    check = check_sequence(run.records)
    seen = {r.seq for r in run.records}
    done = run.record
    return {
        "status": done["status"],
        "failover_ms": outage_ms(run.records, run.kill_us),
        "detect_ms": done["detect_us"] / 1000,
        "restore_ms": done["steps_us"].get("restore", 0) / 1000,
        "steps_ms": {k: v / 1000 for k, v in done["steps_us"].items()},
        "duplicates": check.duplicates,
        "gaps": check.gaps,
        "lost_packets": run.sent - len(seen),
        "received": check.received,
        "sent": run.sent,
    }


@click.command()
@click.option("--scope", type=click.Choice(["remote", "local"]), default="remote")
@click.option("--runs", type=click.IntRange(1, 50), default=5, show_default=True)
@click.option("--pps", type=click.IntRange(1, 20000), default=1000, show_default=True)
@click.option("--epoch-ms", type=click.IntRange(5, 1000), default=50, show_default=True)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object as the last line.")
def command(*, scope: str, runs: int, pps: int, epoch_ms: int, seed: int, as_json: bool) -> None:
    """Fail the sequencer's host over under a steady UDP stream, RUNS times."""
    if scope == "local":
        raise click.UsageError(
            "--scope local is not wired into this bench yet; "
            "tests/integration/test_local_failover.py measures it (docs/failover.md)"
        )
    results = []
    with tempfile.TemporaryDirectory(
        prefix="hamgr-bench-failover-", dir=os.environ.get("HAMGR_BENCH_KEEP")
    ) as tmp:
        for i in range(runs):
            r = remote_run(Path(tmp) / f"run{i}", pps=pps, epoch_ms=epoch_ms, seed=seed + i)
            results.append(r)
            _info(f"run {i}: {json.dumps(r)}")
    fo = [r["failover_ms"] for r in results if r["failover_ms"] is not None]
    summary = {
        "scope": scope,
        "runs": runs,
        "failover_ms_p50": round(statistics.median(fo), 1) if fo else None,
        "failover_ms_max": round(max(fo), 1) if fo else None,
        "detect_ms_p50": round(_percentile([r["detect_ms"] for r in results], 0.5), 2),
        "restore_ms_p50": round(_percentile([r["restore_ms"] for r in results], 0.5), 1),
        "duplicates": sum(r["duplicates"] for r in results),
        "gaps": sum(r["gaps"] for r in results),
        "lost_packets": sum(r["lost_packets"] for r in results),
        "tcp_survived": 0,
    }
    gap_runs = sum(1 for r in results if r["gaps"])
    failed = sum(1 for r in results if r["status"] != "finished")
    _info(f"gap runs (ack before release, the known design limit): {gap_runs}/{runs}")
    _info(f"failed failovers: {failed}/{runs}; tcp_survived is not measured yet (0)")
    click.echo(
        json.dumps(summary) if as_json else "\n".join(f"{k}: {v}" for k, v in summary.items())
    )
