"""vhost-user ports driven by the generator/sink (two virtio-user ports in another process)."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from dpdk_vhost.client import DataPlaneClient
from dpdk_vhost.process import default_binary, eal_args, remove_dpdk_files
from tests.integration.dp_env import DataPlaneHandle

pytestmark = [
    pytest.mark.root,
    pytest.mark.usefixtures("dataplane_stack"),
]


def gen_argv(tmp: Path, prefix: str, seconds: float, rate: int, server: bool = False) -> list[str]:
    srv = ",server=1" if server else ""
    return [
        str(default_binary("dpdk-vhost-gen")),
        *eal_args(0, prefix),
        "--single-file-segments",
        "--vdev",
        f"net_virtio_user0,path={tmp / 'in.sock'},queue_size=1024{srv}",
        "--vdev",
        f"net_virtio_user1,path={tmp / 'out.sock'},queue_size=1024{srv}",
        "--",
        "--seconds",
        str(seconds),
        "--rate-pps",
        str(rate),
        "--drain-ms",
        "300",
    ]


def run_gen(tmp: Path, seconds: float, rate: int) -> dict[str, object]:
    prefix = f"hvtg{uuid.uuid4().hex[:6]}"
    try:
        r = subprocess.run(
            gen_argv(tmp, prefix, seconds, rate),
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
    finally:
        remove_dpdk_files(prefix)
    assert r.returncode == 0, r.stderr[-2000:]
    result: dict[str, object] = json.loads(r.stdout.strip().splitlines()[-1])
    return result


@pytest.fixture
def dp(tmp_path: Path) -> Iterator[DataPlaneClient]:
    h = DataPlaneHandle("dpv", tmp_path, cpu=1, mbufs=32767)
    try:
        yield h.client
    finally:
        h.stop()


def setup_unit(dp: DataPlaneClient, tmp: Path, mode: str, client: bool = False) -> None:
    dp.add_vhost_port("in", str(tmp / "in.sock"), client=client)
    dp.add_vhost_port("out", str(tmp / "out.sock"), client=client)
    dp.add_loopback_port("nf")
    dp.add_unit("u", wire="in", nf="nf", egress="out", mode=mode, ring_size=65536)


def test_vhost_ha_auto_epochs_lose_nothing_and_keep_order(
    dp: DataPlaneClient, tmp_path: Path
) -> None:
    setup_unit(dp, tmp_path, "ha")
    dp.unit_auto_epoch("u", interval_us=1000)
    r = run_gen(tmp_path, 1.0, 1_000_000)
    u = dp.stats("u").units["u"]
    assert r["tx"] == r["rx"] == u.rx == u.released_pkts, (r, u)
    assert (r["lost"], r["gaps"], r["reordered"]) == (0, 0, 0)
    # Epochs are closed on a 1 ms clock, fewer when the CPU is taken from us.
    assert u.epochs_closed >= 50
    assert u.buffered_pkts == 0
    assert u.dropped == 0
    lat = r["lat_us"]
    assert isinstance(lat, dict)
    # Held until its epoch closes: on average about half an epoch.
    assert lat["mean"] >= 200, lat


def test_vhost_plain_forwarding(dp: DataPlaneClient, tmp_path: Path) -> None:
    setup_unit(dp, tmp_path, "plain")
    r = run_gen(tmp_path, 1.0, 1_000_000)
    u = dp.stats("u").units["u"]
    assert r["tx"] == r["rx"] == u.tx
    assert r["lost"] == r["reordered"] == 0
    assert u.buffered_pkts == 0
    assert u.released_pkts == 0


def test_vhost_client_mode_reconnects_to_a_restarted_nf(
    dp: DataPlaneClient, tmp_path: Path
) -> None:
    """The NF side is the vhost-user server; the data plane reconnects when it comes back."""
    for attempt in range(2):
        prefix = f"hvts{uuid.uuid4().hex[:6]}"
        gen = subprocess.Popen(
            gen_argv(tmp_path, prefix, 1.0, 500_000, server=True),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            stdin=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 10
            # The server-mode generator creates in.sock and waits for a client there
            # before it creates out.sock; the data plane reconnects to that one.
            while not (tmp_path / "in.sock").exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            if attempt == 0:
                setup_unit(dp, tmp_path, "ha", client=True)
                dp.unit_auto_epoch("u", interval_us=1000)
            out, err = gen.communicate(timeout=60)
        finally:
            if gen.poll() is None:
                gen.kill()
                gen.wait()
            remove_dpdk_files(prefix)
        assert gen.returncode == 0, err[-2000:]
        assert out.strip(), err[-2000:]
        r = json.loads(out.strip().splitlines()[-1])
        assert r["tx"] == r["rx"] > 0, r
        assert r["lost"] == r["reordered"] == 0, r
