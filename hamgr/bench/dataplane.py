"""`hamgr bench dataplane`: plain forwarding against HA epoch buffering, 64 B over vhost-user.

A generator/sink process (``dpdk-vhost-gen``, two virtio-user ports) sends into the data
plane's vhost-user port ``in``; a loopback port plays the NF; the unit's output leaves
through vhost-user port ``out`` back to the sink. The data plane runs on one CPU and the
generator on the other.

- Throughput runs push as fast as the path takes; plain and HA runs alternate and the
  medians are reported.
- HA mode closes an epoch every ``--epoch-us`` and releases it at once (a simulated
  zero-delay ack) with the data plane's ``unit_auto_epoch``: a Python loop on a loaded
  2-CPU machine cannot keep a 1 ms clock.
- Added latency comes from runs at a fixed rate below saturation (``--latency-pps``), where
  queueing in the vrings does not dominate: HA percentile minus plain percentile of the
  generator-to-sink latency (TSC stamped in the payload).
- ``--soak-seconds`` runs HA at full rate that long and samples the data plane's RSS.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import click

from dpdk_vhost.client import DataPlaneClient
from dpdk_vhost.process import (
    DataPlaneConfig,
    DataPlaneProcess,
    default_binary,
    eal_args,
    remove_dpdk_files,
)

PKT = 60  # bytes handed to DPDK; 64 B on the wire with the FCS


def _info(msg: str) -> None:
    click.echo(msg, err=True)


def _mem_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, HugetlbPages) of a process; hugepage memory is not part of VmRSS."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["VmRSS"].split()[0]), int(fields.get("HugetlbPages", "0 kB").split()[0])


def _loadavg() -> str:
    return Path("/proc/loadavg").read_text().split(" ", 3)[0]


class Rig:
    """Data plane + vhost ports + loopback NF; runs the generator against it."""

    def __init__(self, tmp: Path, dp_cpu: int, gen_cpu: int, ring_size: int) -> None:
        self.tmp = tmp
        self.gen_cpu = gen_cpu
        self.proc = DataPlaneProcess(
            DataPlaneConfig(
                name="bench",
                ctl_path=str(tmp / "ctl.sock"),
                cpu=dp_cpu,
                mbufs=131071,
                log_path=str(tmp / "dp.log"),
            )
        )
        self.dp: DataPlaneClient = self.proc.start()
        self.dp.add_vhost_port("in", str(tmp / "in.sock"))
        self.dp.add_vhost_port("out", str(tmp / "out.sock"))
        self.dp.add_loopback_port("nf")
        self.dp.add_unit("u", wire="in", nf="nf", egress="out", mode="plain", ring_size=ring_size)
        self.mode = "plain"

    def set_mode(self, mode: str, epoch_us: int) -> None:
        if mode == self.mode:
            return
        if mode == "plain":
            self.dp.unit_auto_epoch("u", 0)
            self.dp.close_epoch("u", self.dp.stats("u").units["u"].epoch)
            self.dp.release("u", self.dp.stats("u").units["u"].epoch - 1, term=0)
            deadline = time.monotonic() + 5
            while self.dp.stats("u").units["u"].buffered_pkts and time.monotonic() < deadline:
                time.sleep(0.01)
            self.dp.set_mode("u", "plain")
        else:
            self.dp.set_mode("u", "ha")
            self.dp.unit_auto_epoch("u", epoch_us, 0)
        self.mode = mode

    def run_gen(self, seconds: float, rate_pps: int = 0) -> dict[str, Any]:
        before = self.dp.stats("u")
        result = self._run_gen(seconds, rate_pps)
        after = self.dp.stats("u")
        pkts = after.units["u"].rx - before.units["u"].rx
        busy = after.busy_cycles - before.busy_cycles
        # Cycles the data plane spent per packet in iterations that moved packets:
        # unlike Mpps, this barely moves when the generator or a neighbour is slow.
        result["dp_cycles_per_pkt"] = round(busy / pkts, 1) if pkts else 0.0
        return result

    def _run_gen(self, seconds: float, rate_pps: int) -> dict[str, Any]:
        prefix = f"hvgen{uuid.uuid4().hex[:8]}"
        # Same priority as the data plane: other work on the shared CPU must not make
        # the generator the bottleneck being measured.
        argv = [
            "nice",
            "-n",
            "-10",
            str(default_binary("dpdk-vhost-gen")),
            *eal_args(self.gen_cpu, prefix),
            "--single-file-segments",
            "--vdev",
            f"net_virtio_user0,path={self.tmp / 'in.sock'},queue_size=1024",
            "--vdev",
            f"net_virtio_user1,path={self.tmp / 'out.sock'},queue_size=1024",
            "--",
            "--seconds",
            str(seconds),
            "--rate-pps",
            str(rate_pps),
            "--pkt-size",
            str(PKT),
        ]
        try:
            r = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=seconds + 60,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        finally:
            remove_dpdk_files(prefix)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
        if r.returncode != 0 or not lines:
            raise click.ClickException(f"generator failed ({r.returncode}): {r.stderr[-1500:]}")
        result: dict[str, Any] = json.loads(lines[-1])
        return result

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.dp.close()
        self.proc.stop()


def _soak(rig: Rig, epoch_us: int, seconds: int) -> None:
    """HA at full rate for ``seconds``; memory sampled every 5 s, reported on stderr."""
    rig.set_mode("ha", epoch_us)
    pid = rig.proc.pid
    samples: list[tuple[int, int]] = []
    out: dict[str, Any] = {}
    th = threading.Thread(target=lambda: out.update(rig.run_gen(float(seconds))))
    th.start()
    while th.is_alive():
        samples.append(_mem_kib(pid))
        th.join(timeout=5)
    samples.append(_mem_kib(pid))
    u = rig.dp.stats()
    # The first sample is taken while the generator is still starting.
    start, end = samples[1] if len(samples) > 2 else samples[0], samples[-1]
    _info(
        f"soak {seconds}s HA: {out.get('rx_mpps', 0):.2f} Mpps lost={out.get('lost')} "
        f"rss_kib start={start[0]} end={end[0]} hugetlb_kib start={start[1]} end={end[1]} "
        f"mbuf_in_use={u.mbuf_in_use} samples={samples}"
    )
    _info(
        json.dumps(
            {
                "soak_seconds": seconds,
                "soak_rss_kib_start": start[0],
                "soak_rss_kib_end": end[0],
                "soak_rx_mpps": out.get("rx_mpps"),
                "soak_lost": out.get("lost"),
            }
        )
    )


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else 0.0


@click.command("dataplane")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object as the last line.")
@click.option("--seconds", default=2.0, show_default=True, help="Length of each run.")
@click.option("--epoch-us", default=1000, show_default=True, help="HA epoch length.")
@click.option("--rounds", default=3, show_default=True, help="Plain/HA pairs, interleaved.")
@click.option(
    "--latency-pps",
    default=1_000_000,
    show_default=True,
    help="Fixed rate of the latency runs (0: skip them, use the throughput runs).",
)
@click.option(
    "--soak-seconds",
    default=0,
    show_default=True,
    help="Then run HA at full rate this long and report RSS at start and end.",
)
@click.option("--dp-cpu", default=1, show_default=True)
@click.option("--gen-cpu", default=0, show_default=True)
def command(
    *,
    as_json: bool,
    seconds: float,
    epoch_us: int,
    rounds: int,
    latency_pps: int,
    soak_seconds: int,
    dp_cpu: int,
    gen_cpu: int,
) -> None:
    """Throughput and added latency of HA buffering against plain forwarding."""
    if os.geteuid() != 0:
        raise click.ClickException("needs root (hugepages, vhost-user sockets)")
    for b in ("dpdk-vhost", "dpdk-vhost-gen"):
        if not default_binary(b).exists():
            raise click.ClickException(f"{default_binary(b)} missing; run `make -C dpdk_vhost`")
    with tempfile.TemporaryDirectory(prefix="hvbench") as tmpdir:
        rig = Rig(Path(tmpdir), dp_cpu, gen_cpu, ring_size=131072)
        try:
            result = _bench(
                rig,
                seconds=seconds,
                epoch_us=epoch_us,
                rounds=rounds,
                latency_pps=latency_pps,
                soak_seconds=soak_seconds,
            )
        finally:
            rig.close()
    if as_json:
        click.echo(json.dumps(result["summary"]))
    else:
        for k, v in result["summary"].items():
            click.echo(f"{k:>24}: {v}")


def _bench(
    rig: Rig, *, seconds: float, epoch_us: int, rounds: int, latency_pps: int, soak_seconds: int
) -> dict[str, Any]:
    mpps: dict[str, list[float]] = {"plain": [], "ha": []}
    lat: dict[str, list[dict[str, Any]]] = {"plain": [], "ha": []}
    _info(f"load average before: {_loadavg()}")
    rig.run_gen(0.5)  # warms up both vhost connections
    for i in range(rounds):
        for mode in ("plain", "ha"):
            rig.set_mode(mode, epoch_us)
            r = rig.run_gen(seconds)
            mpps[mode].append(r["rx_mpps"])
            if not latency_pps:
                lat[mode].append(r["lat_us"])
            _info(
                f"round {i + 1} {mode:5}: {r['rx_mpps']:.2f} Mpps "
                f"dp_cycles/pkt={r['dp_cycles_per_pkt']} lost={r['lost']} "
                f"reordered={r['reordered']} lat_us={r['lat_us']} load={_loadavg()}"
            )
    if latency_pps:
        for i in range(rounds):
            for mode in ("plain", "ha"):
                rig.set_mode(mode, epoch_us)
                r = rig.run_gen(seconds, latency_pps)
                lat[mode].append(r["lat_us"])
                _info(
                    f"latency {i + 1} {mode:5} @ {latency_pps} pps: got "
                    f"{r['rx_mpps']:.2f} Mpps lost={r['lost']} lat_us={r['lat_us']}"
                )
    u = rig.dp.stats("u").units["u"]
    _info(
        f"unit counters: epochs_closed={u.epochs_closed} released={u.released_pkts} "
        f"hwm_pkts={u.hwm_pkts} bp_ring={u.bp_ring} bp_k={u.bp_k} drops={dict(u.drops)}"
    )

    plain, ha = _median(mpps["plain"]), _median(mpps["ha"])

    def pct(mode: str, key: str) -> float:
        return _median([float(x[key]) for x in lat[mode]])

    summary = {
        "pkt_size": PKT + 4,
        "plain_mpps": round(plain, 3),
        "ha_mpps": round(ha, 3),
        "ratio": round(ha / plain, 3) if plain else 0.0,
        "epoch_us": epoch_us,
        "added_latency_us_p50": round(pct("ha", "p50") - pct("plain", "p50"), 1),
        "added_latency_us_p99": round(pct("ha", "p99") - pct("plain", "p99"), 1),
    }
    if soak_seconds:
        _soak(rig, epoch_us, soak_seconds)
    _info(
        json.dumps(
            {
                "plain_runs_mpps": mpps["plain"],
                "ha_runs_mpps": mpps["ha"],
                "latency_us": lat,
                "load_after": _loadavg(),
            }
        )
    )
    return {"summary": summary}
