"""`hamgr demo`: protect a stateful NF on a 3-host testbed, kill the primary host, report.

The NF is the sequencer: it stamps a per-flow counter into every datagram, so the sink can tell a
visible rollback (a duplicate or a gap in the counter) from plain input loss. Host A runs it,
host B holds its standby, host C is the spare that B re-protects onto after the takeover.
"""

from __future__ import annotations

import html
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import click

from hamgr import plot
from hamgr.bench.failover import outage_ms, run_remote_failover
from hamgr.trafgen import check_sequence, tcp_survived

WINDOW_MS = 1000  # the plot shows this long before and after the kill


def _timeline(record: dict[str, Any], kill_us: int, last_a_ns: int, first_b_ns: int) -> list[str]:
    """The takeover as the sink and host B saw it, in time order (one clock for all)."""
    events = [
        (last_a_ns / 1000, "last output of host A's NF reaches the sink (released by B)"),
        (kill_us, "host A killed: every process SIGKILLed, fabric links down"),
        (record["last_rx_us"], "host B's data plane receives A's last probe"),
        (record["peer_down_us"], "host B's data plane reports peer_down"),
    ]
    t = record["started_us"] or record["peer_down_us"]
    events.append((t, "host B confirms the failure and starts the takeover"))
    # Step end times are the start plus the durations so far: the steps run back to back.
    for step, took in record["steps_us"].items():
        t += took
        events.append((t, f"{step} done ({took / 1000:.1f} ms)"))
    events.append((first_b_ns / 1000, "first output of the NF restored on B reaches the sink"))
    return [f"{(at - kill_us) / 1000:+9.1f} ms  {text}" for at, text in sorted(events)]


def write_report(out_dir: Path, result: dict[str, Any], timeline: list[str], note: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = "\n".join(
        f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>"
        for k, v in result.items()
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>hamgr demo</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}
td{{padding:2px 12px}} img{{border:1px solid #ccc}} pre{{background:#f6f6f6;padding:1em}}</style>
</head><body>
<h1>hamgr demo: the primary host dies</h1>
<p>The sequencer NF runs on host A, protected by epoch checkpoints shipped to host B. The
sender streams numbered UDP datagrams through it; the sink checks the NF's counter for
duplicates and gaps. Host A is killed mid-stream.</p>
<table>{rows}</table>
<h2>Timeline (relative to the kill)</h2>
<pre>{html.escape(chr(10).join(timeline))}</pre>
<h2>Packets per millisecond at the sink</h2>
<p>{WINDOW_MS} ms before to {WINDOW_MS} ms after the kill, one pixel per millisecond; the red
line is the kill, the green line the first output of the NF restored on host B. Grid lines are
quarters of the peak.</p>
<img src="pps.png" alt="packets per millisecond around the failover">
<h2>Latency CDF (sender to sink, whole run)</h2>
<p>{html.escape(note)}</p>
<img src="latency_cdf.png" alt="latency CDF">
</body></html>
"""
    index = out_dir / "index.html"
    index.write_text(page)
    return index


@click.command("demo")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (last line).")
@click.option("--report-dir", type=click.Path(path_type=Path), default=Path("demo-report"))
@click.option("--pps", type=int, default=1000, show_default=True)
@click.option("--epoch-ms", type=int, default=50, show_default=True)
def command(as_json: bool, report_dir: Path, pps: int, epoch_ms: int) -> None:
    """Protect the sequencer on host A, kill A under traffic, and report B's takeover."""
    click.echo("building a 3-host testbed and protecting the sequencer on host A ...", err=True)
    with tempfile.TemporaryDirectory(prefix="hamgr-demo-") as tmp:
        run = run_remote_failover(Path(tmp), pps=pps, epoch_ms=epoch_ms, seed=7)
    records = run.records
    kill_ns = run.kill_us * 1000
    before = [r.recv_ns for r in records if r.recv_ns <= kill_ns]
    after = [r.recv_ns for r in records if r.recv_ns > kill_ns]
    if not before or not after:
        raise click.ClickException(
            "the sink saw no output on one side of the kill; the failover did not complete "
            f"(host B's record: {run.record.get('status')} {run.record.get('detail', '')})"
        )
    check = check_sequence(records)
    failover = outage_ms(records, run.kill_us)
    resumed_us = run.record.get("resumed_us")
    tcp_ok = (
        run.tcp is not None
        and resumed_us is not None
        and tcp_survived(run.tcp, int(resumed_us) * 1000)
    )
    timeline = _timeline(run.record, run.kill_us, max(before), min(after))
    for line in timeline:
        click.echo(line)

    report_dir.mkdir(parents=True, exist_ok=True)
    start_ns = kill_ns - WINDOW_MS * 1_000_000
    per_ms = [0.0] * (2 * WINDOW_MS)
    for r in records:
        slot = (r.recv_ns - start_ns) // 1_000_000
        if 0 <= slot < len(per_ms):
            per_ms[slot] += 1
    first_b = min((min(after) - start_ns) // 1_000_000, len(per_ms) - 1)
    plot.bars(
        per_ms,
        report_dir / "pps.png",
        markers=[(WINDOW_MS, plot.RED), (int(first_b), plot.GREEN)],
    )
    latencies = [(r.recv_ns - r.sent_ns) / 1e6 for r in records]
    top = plot.cdf(latencies, report_dir / "latency_cdf.png")
    note = (
        f"x axis 0 to {top:.1f} ms; median {statistics.median(latencies):.1f} ms. Output waits "
        f"for its epoch ({epoch_ms} ms) to be checkpointed and committed on the standby."
    )
    result = {
        "failover_ms": round(failover, 1) if failover is not None else None,
        "duplicates": check.duplicates,
        "gaps": check.gaps,
        # One TCP connection through the NF, opened before the kill, still answering after B
        # resumed, as the same connection (`trafgen.tcp_survived`).
        "tcp_survived": tcp_ok,
        "report": str(report_dir / "index.html"),
    }
    table = {
        **result,
        "sent": run.sent,
        "received": check.received,
        "detect_ms": run.record["detect_us"] / 1000,
        "takeover_status": run.record["status"],
    }
    write_report(report_dir, table, timeline, note)
    (report_dir / "result.json").write_text(json.dumps(table, indent=2) + "\n")
    click.echo(f"report: {report_dir / 'index.html'}", err=True)
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(
            f"failover {result['failover_ms']} ms, duplicates {check.duplicates}, gaps {check.gaps}"
        )
