"""`hamgr bench overhead`: the sequencer NF protected with epochs against the same NF unprotected.

One testbed, one NF, one data plane, one standby store, all in the same run. Phases alternate
(plain, protected, plain, protected, ...) and the medians are reported, because this machine is
noisy. In each phase a sender pushes numbered, timestamped UDP datagrams through the NF as fast
as it can for a fixed time, and a sink records what leaves the data plane's egress.

- plain: the unit's output passes the data plane unbuffered; no checkpoints.
- protected: the real epoch engine runs: pause ingress, freeze, close the epoch, CRIU dump, thaw,
  resume, ship the delta to the standby store over zmq, release on its ack.

The offered load is fixed (``--pps``, default 20000) rather than "as fast as possible": on a
2-CPU machine an open-loop sender shares the CPUs with the NF, the data plane and the sink, so
in the plain phase the busy NF slows the sender and in the protected phase the pauses speed it
up, and at saturation the Python sink itself drops datagrams. Saturation measured the
scheduler, not protection (it gave ratios above 1 and sink-side gaps).

`plain_pps`/`protected_pps` are datagrams delivered to the sink per second of sending. Latency is
sink receive time minus sender timestamp (one clock, one machine); the added latency is the
protected phase's percentile minus the plain phase's.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from hamgr.testbed import NF_IP, NF_PORT, SINK_PORT, UNIT, UnitBed, wait_udp_bound
from hamgr.trafgen import check_sequence, read_records
from policies.epoch import FixedEpoch
from shim import epoch as ep
from shim.engine import PrimaryEngine
from shim.replication import ReplicationClient


def _info(msg: str) -> None:
    click.echo(msg, err=True)


def _drain_all(engine: PrimaryEngine, bed: UnitBed, timeout: float) -> bool:
    """Step until every held packet is released, including the last, partly filled epoch.

    The unit can only be switched back to plain forwarding with nothing buffered.
    """
    assert bed.client is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        remaining = deadline - time.monotonic()
        if not engine.drain(timeout=remaining):
            return False
        if bed.client.stats(UNIT).units[UNIT].buffered_pkts == 0:
            return True
        time.sleep(0.005)
    return False


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _phase(
    bed: UnitBed,
    work: Path,
    name: str,
    seconds: float,
    engine: PrimaryEngine | None,
    *,
    pps: int,
) -> dict[str, Any]:
    out = work / f"{name}.rec"
    ready = work / f"{name}.ready"
    py = sys.executable
    sink = subprocess.Popen(
        bed.in_client(
            [
                py,
                "-m",
                "hamgr.trafgen",
                "sink",
                "--port",
                str(SINK_PORT),
                "--out",
                str(out),
                "--seconds",
                str(seconds + 30),
                "--idle-exit",
                "1.5",
                "--ready",
                str(ready),
            ]
        ),
        stdout=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while not ready.exists():
            if time.monotonic() > deadline or sink.poll() is not None:
                raise RuntimeError("the sink did not start")
            time.sleep(0.01)
        sender = subprocess.Popen(
            bed.in_client(
                [
                    py,
                    "-m",
                    "hamgr.trafgen",
                    "send",
                    "--dest",
                    f"{NF_IP}:{NF_PORT}",
                    "--seconds",
                    str(seconds),
                    "--pps",
                    str(pps),
                ]
            ),
            stdout=subprocess.PIPE,
        )
        try:
            while sender.poll() is None:
                if engine is not None:
                    engine.step()
                time.sleep(0.0002)
            if engine is not None and not _drain_all(engine, bed, timeout=30.0):
                m = engine.machine
                raise RuntimeError(
                    f"shipped epochs were not acked within 30 s: state {m.state.name}, "
                    f"protection {m.protection.name}, held {m.held_epochs}, "
                    f"last released {m.last_released}, alarms {engine.stats.alarms[-3:]}"
                )
            sent = json.loads(sender.communicate(timeout=10)[0].decode().strip().splitlines()[-1])
        finally:
            if sender.poll() is None:
                sender.kill()
                sender.wait()
        sink.wait(timeout=seconds + 40)
    finally:
        if sink.poll() is None:
            sink.terminate()
            sink.wait(timeout=10)
    records = read_records(out)
    latencies = [(r.recv_ns - r.sent_ns) / 1e6 for r in records]
    seq = check_sequence(records)
    result = {
        "phase": name,
        "sent": sent["sent"],
        "send_seconds": sent["seconds"],
        "received": len(records),
        "pps": len(records) / sent["seconds"],
        "lat_ms_p50": _percentile(latencies, 0.50),
        "lat_ms_p99": _percentile(latencies, 0.99),
        "duplicates": seq.duplicates,
        "gaps": seq.gaps,
    }
    if engine is not None:
        pauses = [r.pause_us / 1000 for r in engine.stats.epochs]
        result["epochs"] = len(pauses)
        result["pause_ms_p50"] = statistics.median(pauses) if pauses else float("nan")
    _info(json.dumps(result))
    return result


@click.command("overhead")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (last line).")
@click.option("--epoch-ms", type=int, default=100, show_default=True)
@click.option("--seconds", type=float, default=4.0, show_default=True, help="Per phase.")
@click.option("--rounds", type=int, default=2, show_default=True, help="Plain+protected pairs.")
@click.option(
    "--pps",
    type=int,
    default=20_000,
    show_default=True,
    help="Offered load; 0 sends as fast as the sender can (see the module docstring).",
)
def command(as_json: bool, epoch_ms: int, seconds: float, rounds: int, pps: int) -> None:
    """Throughput and added latency of protection, against the same NF unprotected."""
    with tempfile.TemporaryDirectory(prefix="hamgr-bench-overhead-") as tmp:
        work = Path(tmp)
        with UnitBed(work) as bed:
            dp = bed.start_dataplane(mode="plain")
            nf = bed.start_nf()
            wait_udp_bound(nf.pid, NF_PORT)
            shipper = ReplicationClient(bed.start_standby())
            assert bed.images is not None
            plain: list[dict[str, Any]] = []
            protected: list[dict[str, Any]] = []
            try:
                for i in range(rounds):
                    dp.set_mode(UNIT, "plain")
                    plain.append(_phase(bed, work, f"plain{i}", seconds, None, pps=pps))
                    dp.set_mode(UNIT, "ha")
                    open_epoch = dp.stats(UNIT).units[UNIT].epoch
                    machine = ep.PrimaryMachine(
                        UNIT,
                        term=1,
                        config=ep.PrimaryConfig(epoch=FixedEpoch(epoch_ms * 1000)),
                        first_epoch=open_epoch,
                    )
                    engine = PrimaryEngine(UNIT, machine, dp, nf, shipper, image_root=bed.images)
                    protected.append(_phase(bed, work, f"protected{i}", seconds, engine, pps=pps))
            finally:
                shipper.close()
    plain_pps = statistics.median(p["pps"] for p in plain)
    protected_pps = statistics.median(p["pps"] for p in protected)
    result = {
        "epoch_ms": epoch_ms,
        "plain_pps": round(plain_pps, 1),
        "protected_pps": round(protected_pps, 1),
        "ratio": round(protected_pps / plain_pps, 3) if plain_pps else 0.0,
        "added_latency_ms_p50": round(
            statistics.median(p["lat_ms_p50"] for p in protected)
            - statistics.median(p["lat_ms_p50"] for p in plain),
            2,
        ),
        "added_latency_ms_p99": round(
            statistics.median(p["lat_ms_p99"] for p in protected)
            - statistics.median(p["lat_ms_p99"] for p in plain),
            2,
        ),
    }
    duplicates = sum(p["duplicates"] for p in plain + protected)
    gaps = sum(p["gaps"] for p in plain + protected)
    _info(f"sequence check over all phases: duplicates={duplicates} gaps={gaps}")
    if as_json:
        click.echo(json.dumps(result))
    else:
        for key, value in result.items():
            click.echo(f"{key:24} {value}")
    if duplicates or gaps:
        # A visible rollback or lost output makes every other figure meaningless.
        _info("FAILED: the sink saw duplicates or gaps in the NF's counter")
        sys.exit(1)
