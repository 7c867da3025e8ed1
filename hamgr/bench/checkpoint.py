"""`hamgr bench checkpoint`: what protecting an unmodified container NF costs per epoch.

The sequencer NF runs in a runc container with ``--mem-mb`` MiB touched and ``--dirty-pct`` % of
those pages rewritten every epoch (its ``--dirty-ms`` is the epoch length). Every epoch is what
the epoch engine does to a container (docs/containers.md), timed:

- **pause**: from the freeze to the end of the thaw, the time the NF does not run: cgroup
  freeze, CRIU dump into tmpfs (with the tree left running) plus hamgr's copy of the NF's
  /dev and /dev/shm (``--dev-mounts carried``, the default; ``criu`` lets CRIU tar them as
  before), image sealing, thaw.
- **image**: the full image CRIU wrote.
- **shipped**: what the replication link sent for the epoch (`Shipped.block_bytes` plus
  `manifest_bytes`) to a real `ReplicationServer` whose `Store` is on tmpfs, over TCP on
  127.0.0.1. Only blocks the standby lacks travel (`shim/delta.py`).
- **commit**: from the end of the checkpoint to the standby's ack (scan, delta, transfer,
  verify, store).

Epochs are taken one at a time, each after the previous one was acked, at the next multiple of
``--epoch-ms`` (so ``--epoch-ms`` should exceed the commit time, or an epoch spans more than one
round of page rewrites). The first ``--warmup`` epochs (the first ships the full image) are not
counted. Nothing else runs in the NF's netns: it has no link, so no traffic can arrive during a
dump, which is what the engine guarantees by pausing ingress first; hence ``--network-lock skip``
by default, as the engine's backend uses it.

Everything made here (netns, container, cgroups, tmpfs mounts, directories, processes) is removed
on exit, also on Ctrl-C or SIGTERM. Host settings are read, never changed: what the run depends on
(CRIU's kernel-feature cache, the conntrack table size) is reported on stderr.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import attrs
import click

from hamgr.testbed import wait_udp_bound

NF_ADDR = "198.18.0.2"
NF_PORT = 7000
SINK = "198.18.0.1:9000"
UNIT = "bench0"
TERM = 1
MIB = 1 << 20


def _info(msg: str) -> None:
    click.echo(msg, err=True)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1): the smallest value with at least q of all at or
    below it. With fewer than 100 samples, p99 is the maximum."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered) - 1e-9))
    return ordered[rank - 1]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


@contextlib.contextmanager
def _signals_as_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP unwind like Ctrl-C, so every cleanup below runs."""

    def interrupt(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _mount_tmpfs(path: Path, size_mb: int) -> None:
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0700", "hamgr-bench", str(path)],
        check=True,
        capture_output=True,
        timeout=30,
    )


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True, timeout=30)


def _host_report(criu: str) -> dict[str, Any]:
    from shim.criu import CONNTRACK_BUCKETS_FOR_DUMPS, conntrack_buckets, ensure_kdat_cache

    buckets = conntrack_buckets()
    report: dict[str, Any] = {
        "kdat_cache": ensure_kdat_cache(criu),
        "conntrack_buckets": buckets,
    }
    if buckets is not None and buckets > CONNTRACK_BUCKETS_FOR_DUMPS:
        report["warning"] = (
            f"nf_conntrack_buckets is {buckets}: CRIU walks that whole table twice per dump "
            f"(~{2 * buckets * 37 / 1e6:.0f} ms here); `make setup` sets it to "
            f"{CONNTRACK_BUCKETS_FOR_DUMPS} (shim.criu.set_conntrack_buckets)"
        )
    return report


@click.command("checkpoint")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (last line).")
@click.option("--epochs", type=click.IntRange(1), default=30, show_default=True)
@click.option("--warmup", type=click.IntRange(1), default=5, show_default=True)
@click.option("--mem-mb", type=click.IntRange(1), default=64, show_default=True)
@click.option("--dirty-pct", type=click.FloatRange(0, 100), default=1.0, show_default=True)
@click.option(
    "--epoch-ms",
    type=click.IntRange(20),
    default=500,
    show_default=True,
    help="Epoch length, and the NF's page-rewrite period; keep it above the commit time.",
)
@click.option("--criu-mode", type=click.Choice(["swrk", "exec"]), default="swrk", show_default=True)
@click.option(
    "--network-lock",
    type=click.Choice(["skip", "nftables", "iptables"]),
    default="skip",
    show_default=True,
)
@click.option(
    "--huge",
    type=click.Choice(["within_size", "always", "never"]),
    default="within_size",
    show_default=True,
    help="Transparent huge pages for the images tmpfs.",
)
@click.option(
    "--dev-mounts",
    type=click.Choice(["carried", "criu"]),
    default="carried",
    show_default=True,
    help="Who saves the NF's /dev and /dev/shm: hamgr (external to CRIU) or CRIU's tar.",
)
def command(*, as_json: bool, **settings: Any) -> None:
    """Pause, image size, shipped bytes and commit time of a container NF, per epoch."""
    if os.geteuid() != 0:
        raise click.ClickException("needs root (namespaces, cgroups, runc, CRIU, mounts)")
    with _signals_as_interrupt():
        result = _run(Settings(**settings))
    if as_json:
        click.echo(json.dumps(result))
    else:
        for key, value in result.items():
            click.echo(f"{key:16} {value}")


@attrs.frozen
class Settings:
    epochs: int = 30
    warmup: int = 5
    mem_mb: int = 64
    dirty_pct: float = 1.0
    epoch_ms: int = 500
    criu_mode: str = "swrk"
    network_lock: str = "skip"
    huge: str = "within_size"
    dev_mounts: str = "carried"


def _run(cfg: Settings) -> dict[str, float]:
    from hamgr.nfs import images
    from shim import netns
    from shim.container import RuncBackend, mount_image_tmpfs, remove_cgroup_parent
    from shim.oci import ContainerSpec
    from shim.replication import ReplicationClient, ReplicationServer
    from shim.store import Store

    tag = f"hbc{os.getpid() % 100000}"
    with contextlib.ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="hamgr-bench-checkpoint-"))
        stack.callback(shutil.rmtree, work, True)
        # Images: tmpfs, as on a real primary; huge pages make CRIU's page writes ~2x faster.
        # Room for the newest committed image, the next one, and slack.
        image_root = work / "images"
        if mount_image_tmpfs(image_root, size_mb=cfg.mem_mb * 3 + 256, huge=cfg.huge):
            stack.callback(_umount, image_root)
        # The standby's store, on tmpfs too (another tmpfs: another host's memory).
        standby = work / "standby"
        standby.mkdir()
        _mount_tmpfs(standby, cfg.mem_mb * 3 + 256)
        stack.callback(_umount, standby)

        ns = f"{tag}-nf"
        netns.create_netns(ns)
        stack.callback(netns.delete_netns, ns)
        netns.add_address("lo", f"{NF_ADDR}/32", ns)

        backend = RuncBackend(
            state_dir=work / "state",
            network_lock=cfg.network_lock,  # type: ignore[arg-type]
            criu_mode=cfg.criu_mode,  # type: ignore[arg-type]
            carry_dev_mounts=cfg.dev_mounts == "carried",
        )
        cgroup_parent = f"/hamgr-bench-{tag}"
        stack.callback(remove_cgroup_parent, cgroup_parent)
        spec = ContainerSpec(
            name=f"{tag}-seq",
            image=images.build_image("sequencer"),
            args=(
                *("/usr/local/bin/sequencer", "--listen", str(NF_PORT), "--dest", SINK),
                *("--mem-mb", str(cfg.mem_mb), "--dirty-pct", str(cfg.dirty_pct)),
                *("--dirty-ms", str(cfg.epoch_ms)),
            ),
            netns=ns,
            cgroup_parent=cgroup_parent,
        )
        nf = backend.start(spec)
        stack.callback(nf.destroy)
        wait_udp_bound(nf.pid, NF_PORT, timeout=30 + cfg.mem_mb / 10)

        server = ReplicationServer("tcp://127.0.0.1:*", {UNIT: Store(standby / UNIT)})
        endpoint = server.start()
        stack.callback(server.stop)
        client = ReplicationClient(endpoint)
        stack.callback(client.close)

        host = _host_report(backend.criu_path)
        fixed = nf.dump_facts()
        _info(
            f"checkpoint bench: sequencer {cfg.mem_mb} MiB, {cfg.dirty_pct}% of pages per "
            f"{cfg.epoch_ms} ms epoch, {cfg.warmup}+{cfg.epochs} epochs; criu {cfg.criu_mode}, "
            f"network lock {cfg.network_lock}, images on tmpfs huge={cfg.huge}, "
            f"cgroup yard {fixed.cgroup_yard}, "
            f"masked dirs external {list(fixed.masked_dirs)}, "
            f"carried by hamgr {list(fixed.carried)}, kdat cache {host['kdat_cache']}, "
            f"conntrack buckets {host['conntrack_buckets']}"
        )
        if "warning" in host:
            _info(f"warning: {host['warning']}")
        return _epochs(nf, client, image_root, cfg)
    raise AssertionError("unreachable")  # pragma: no cover (ExitStack does not swallow)


def _epochs(nf: Any, client: Any, image_root: Path, cfg: Settings) -> dict[str, float]:
    nf.prepare_checkpoint()
    warmup = cfg.warmup
    period = cfg.epoch_ms / 1000
    rows: list[dict[str, float]] = []
    previous: Path | None = None
    next_tick = time.monotonic() + period
    for epoch in range(1, warmup + cfg.epochs + 1):
        now = time.monotonic()
        if next_tick < now:  # the last commit took longer than an epoch: skip to the next tick
            next_tick += period * (int((now - next_tick) / period) + 1)
        time.sleep(next_tick - now)
        next_tick += period

        t0 = time.monotonic()
        nf.freeze()
        t1 = time.monotonic()
        try:
            image = nf.checkpoint(epoch, image_root / f"epoch-{epoch:08d}")
        finally:
            t2 = time.monotonic()
            nf.thaw()
            t3 = time.monotonic()
        shipped = client.ship(UNIT, epoch, TERM, image.path, full=previous is None, timeout=60.0)
        t4 = time.monotonic()
        row = {
            "pause_ms": (t3 - t0) * 1000,
            "freeze_ms": (t1 - t0) * 1000,
            "dump_ms": image.dump_seconds * 1000,
            "seal_ms": (t2 - t1 - image.dump_seconds) * 1000,
            "thaw_ms": (t3 - t2) * 1000,
            "image_mb": image.size_bytes / MIB,
            "shipped_mb": (shipped.block_bytes + shipped.manifest_bytes) / MIB,
            "commit_ms": (t4 - t2) * 1000,
            "rss_mb": _rss_mb(nf.pid),
        }
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
        previous = image.path
        counted = epoch > warmup
        _info(
            f"epoch {epoch:3d}{'' if counted else ' (warm-up)'}: pause {row['pause_ms']:6.1f} ms "
            f"(dump {row['dump_ms']:5.1f}), image {row['image_mb']:5.1f} MiB, shipped "
            f"{row['shipped_mb']:6.3f} MiB{' (full)' if shipped.full else ''}, commit "
            f"{row['commit_ms']:6.1f} ms"
        )
        if counted:
            rows.append(row)

    def col(key: str) -> list[float]:
        return [r[key] for r in rows]

    _info(
        "p50 breakdown of the pause: "
        + ", ".join(
            f"{k.removesuffix('_ms')} {statistics.median(col(k)):.2f} ms"
            for k in ("freeze_ms", "dump_ms", "seal_ms", "thaw_ms")
        )
    )
    rss = statistics.median(col("rss_mb"))
    result = {
        "rss_mb": round(rss, 1),
        "pause_ms_p50": round(statistics.median(col("pause_ms")), 1),
        "pause_ms_p99": round(percentile(col("pause_ms"), 0.99), 1),
        "image_mb": round(statistics.median(col("image_mb")), 1),
        "shipped_mb_p50": round(statistics.median(col("shipped_mb")), 3),
        "commit_ms_p50": round(statistics.median(col("commit_ms")), 1),
    }
    pause_ok = result["pause_ms_p50"] <= 30
    ship_ok = result["shipped_mb_p50"] <= 0.05 * rss
    _info(
        f"targets: pause_ms_p50 <= 30: {'met' if pause_ok else 'MISSED'}; shipped_mb_p50 <= 5% "
        f"of rss_mb ({0.05 * rss:.2f}): {'met' if ship_ok else 'MISSED'}"
    )
    return result
