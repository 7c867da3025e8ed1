"""A container NF protected end to end on the real stack: dpdk_vhost holds its output, the epoch
engine checkpoints it with CRIU each epoch, the replication link ships the checkpoint to a
standby store, and output leaves only after the standby committed it.

Topology (every netns made here, addresses from 198.18.0.0/15):

    client netns                    data-plane netns             NF netns
    w  198.18.0.1 ── veth ── dw  (wire, af_packet)
                                  dn  (nf, af_packet)  ── veth ── n 198.18.0.2  sequencer
    s  (sink side) ── veth ── ds  (egress, af_packet)

The sequencer forwards every datagram to 198.18.0.1:9000 through the data plane's egress, which
arrives on `s` in the client netns, where the sink listens.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from dpdk_vhost.client import DataPlaneClient
from dpdk_vhost.process import DataPlaneConfig, DataPlaneProcess
from hamgr.nfs import images
from policies.epoch import FixedEpoch
from shim import epoch as ep
from shim import netns
from shim.container import Container, RuncBackend
from shim.engine import PrimaryEngine
from shim.oci import ContainerSpec
from shim.replication import ReplicationClient, ReplicationServer
from shim.store import Store
from tests.integration.container_env import (
    CLIENT_IP,
    CLIENT_MAC,
    NF_IP,
    NF_MAC,
    UdpSender,
    UdpSink,
    make_prefix,
    wait_port,
)

pytestmark = pytest.mark.root

NF_PORT = 7000
SINK_PORT = 9000
SINK_MAC = "02:00:c6:12:00:03"
UNIT = "seq0"
EPOCH_US = 50_000


def _sysctl(ns: str, *settings: str) -> None:
    subprocess.run(
        ["ip", "netns", "exec", ns, "sysctl", "-q", "-w", *settings], check=True, timeout=10
    )


def _neigh(ns: str, ip: str, mac: str, dev: str) -> None:
    subprocess.run(
        ["ip", "-n", ns, "neigh", "replace", ip, "lladdr", mac, "dev", dev, "nud", "permanent"],
        check=True,
        timeout=10,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@attrs.define
class Testbed:
    __test__ = False

    prefix: str
    work: Path
    made: list[str] = attrs.Factory(list)
    dp: DataPlaneProcess | None = None
    client: DataPlaneClient | None = None
    nf: Container | None = None
    closers: list[contextlib.AbstractContextManager[object]] = attrs.Factory(list)

    @property
    def cl(self) -> str:
        return f"{self.prefix}-cl"

    @property
    def dpns(self) -> str:
        return f"{self.prefix}-dp"

    @property
    def nfns(self) -> str:
        return f"{self.prefix}-nf"

    def build(self) -> None:
        for ns in (self.cl, self.dpns, self.nfns):
            netns.create_netns(ns)
            self.made.append(ns)
            # No IPv6 chatter (router solicitations would be NF output too) and no reverse-path
            # filter: the sink receives on `s` traffic whose source is routed via `w`.
            _sysctl(
                ns,
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
            )
        p = self.prefix
        pairs = [
            (f"{p}w", self.cl, f"{p}dw", CLIENT_MAC),
            (f"{p}s", self.cl, f"{p}ds", SINK_MAC),
            (f"{p}n", self.nfns, f"{p}dn", NF_MAC),
        ]
        for outer, ns, inner, mac in pairs:
            netns.create_veth(netns.VethEnd(outer, ns), netns.VethEnd(inner, self.dpns))
            netns.set_mac_address(outer, mac, ns)
            netns.set_up(outer, ns)
            netns.set_up(inner, self.dpns)
            netns.disable_checksum_offload(outer, ns)
        netns.add_address(f"{p}w", f"{CLIENT_IP}/24", self.cl)
        netns.add_address(f"{p}n", f"{NF_IP}/24", self.nfns)
        _neigh(self.cl, NF_IP, NF_MAC, f"{p}w")
        _neigh(self.nfns, CLIENT_IP, SINK_MAC, f"{p}n")

    def start_dataplane(self) -> DataPlaneClient:
        self.dp = DataPlaneProcess(
            DataPlaneConfig(
                name="hostA",
                ctl_path=str(self.work / "dp.sock"),
                netns=self.dpns,
                log_path=str(self.work / "dp.log"),
            )
        )
        client = self.dp.start()
        self.client = client
        p = self.prefix
        for port in ("dw", "dn", "ds"):
            client.add_af_packet_port(port, f"{p}{port}")
        client.add_unit(UNIT, wire="dw", nf="dn", egress="ds", mode="ha", term=1, epoch=1)
        return client

    def close(self) -> None:
        for closer in reversed(self.closers):
            with contextlib.suppress(Exception):
                closer.__exit__(None, None, None)
        if self.nf is not None:
            with contextlib.suppress(Exception):
                self.nf.destroy()
        if self.client is not None:
            self.client.close()
        if self.dp is not None:
            self.dp.stop()
        for ns in reversed(self.made):
            with contextlib.suppress(netns.NetnsError):
                netns.delete_netns(ns)


@pytest.fixture
def bed(tmp_path: Path) -> Iterator[Testbed]:
    b = Testbed(make_prefix("p"), tmp_path)
    try:
        b.build()
        yield b
    finally:
        b.close()


@pytest.fixture
def images_dir() -> Iterator[Path]:
    # Checkpoints go to tmpfs, as on a real primary.
    path = Path("/dev/shm") / f"hamgr-test-protect-{make_prefix('i')}"
    path.mkdir()
    try:
        yield path
    finally:
        subprocess.run(["rm", "-rf", str(path)], check=False, timeout=30)


def test_output_leaves_only_after_the_standby_commits(
    bed: Testbed, tmp_path: Path, images_dir: Path
) -> None:
    dp = bed.start_dataplane()
    image = images.build_image("sequencer")
    backend = RuncBackend(state_dir=tmp_path / "runc")
    spec = ContainerSpec(
        name=f"{bed.prefix}-seq",
        image=image,
        args=(
            "/usr/local/bin/sequencer",
            "--listen",
            str(NF_PORT),
            "--dest",
            f"{CLIENT_IP}:{SINK_PORT}",
        ),
        netns=bed.nfns,
        cgroup_parent=f"/hamgr-test-{bed.prefix}",
    )
    bed.nf = backend.start(spec)
    wait_port(bed.nf.pid, NF_PORT)

    sink = UdpSink.open(bed.cl, SINK_PORT)
    bed.closers.append(contextlib.closing(sink))
    sender = UdpSender.open(bed.cl, NF_PORT)
    bed.closers.append(contextlib.closing(sender))

    # The standby is not listening yet: the primary ships into a queue and nothing is acked.
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    shipper = ReplicationClient(endpoint)
    bed.closers.append(contextlib.closing(shipper))
    machine = ep.PrimaryMachine(UNIT, term=1, config=ep.PrimaryConfig(epoch=FixedEpoch(EPOCH_US)))
    engine = PrimaryEngine(
        UNIT, machine, dp, bed.nf, shipper, image_root=images_dir, ship_timeout=60.0
    )

    sent = sender.send(100, gap=0.002)
    engine.run(seconds=1.5)
    stats = dp.stats(UNIT).units[UNIT]
    # I1: the NF produced output (the data plane holds it), and none of it reached the sink.
    assert stats.nf_rx >= len(sent)
    assert sink.snapshot() == []
    assert stats.released_pkts == 0
    taken = stats.epochs_closed
    assert taken >= 1

    store = Store(tmp_path / "standby" / UNIT)
    server = ReplicationServer(endpoint, {UNIT: store})
    server.start()
    bed.closers.append(contextlib.closing(_Stopper(server)))
    assert engine.drain(timeout=30.0), "shipped epochs were not acked"
    records = sink.wait_count(len(sent), timeout=10.0)

    # Everything is released after the commit, in order, with the NF's counter unbroken.
    assert [seq for _, seq, _ in records] == list(sent)
    assert [counter for counter, _, _ in records] == list(range(1, len(sent) + 1))
    committed = server.committed(UNIT)
    assert committed is not None
    assert engine.last_committed == committed.epoch
    # The standby's cut covers every input the NF saw before the last committed epoch closed.
    assert int(committed.meta["cut_seq"]) == len(sent)

    # I5: an idle unit takes no more checkpoints.
    closed_before = dp.stats(UNIT).units[UNIT].epochs_closed
    engine.run(seconds=0.5)
    assert dp.stats(UNIT).units[UNIT].epochs_closed == closed_before
    assert [r.epoch for r in engine.stats.epochs] == sorted(r.epoch for r in engine.stats.epochs)


@attrs.define
class _Stopper:
    server: ReplicationServer

    def close(self) -> None:
        self.server.stop()


def test_pause_is_bounded_and_epochs_flow_under_load(
    bed: Testbed, tmp_path: Path, images_dir: Path
) -> None:
    """With the standby present, output flows with at most a few epochs of delay."""
    dp = bed.start_dataplane()
    image = images.build_image("sequencer")
    backend = RuncBackend(state_dir=tmp_path / "runc")
    bed.nf = backend.start(
        ContainerSpec(
            name=f"{bed.prefix}-seq",
            image=image,
            args=(
                "/usr/local/bin/sequencer",
                "--listen",
                str(NF_PORT),
                "--dest",
                f"{CLIENT_IP}:{SINK_PORT}",
            ),
            netns=bed.nfns,
            cgroup_parent=f"/hamgr-test-{bed.prefix}",
        )
    )
    wait_port(bed.nf.pid, NF_PORT)
    sink = UdpSink.open(bed.cl, SINK_PORT)
    bed.closers.append(contextlib.closing(sink))
    sender = UdpSender.open(bed.cl, NF_PORT)
    bed.closers.append(contextlib.closing(sender))
    store = Store(tmp_path / "standby" / UNIT)
    server = ReplicationServer("tcp://127.0.0.1:*", {UNIT: store})
    endpoint = server.start()
    bed.closers.append(contextlib.closing(_Stopper(server)))
    shipper = ReplicationClient(endpoint)
    bed.closers.append(contextlib.closing(shipper))
    machine = ep.PrimaryMachine(UNIT, term=1, config=ep.PrimaryConfig(epoch=FixedEpoch(EPOCH_US)))
    engine = PrimaryEngine(UNIT, machine, dp, bed.nf, shipper, image_root=images_dir)

    sender.start_stream(interval=0.005, max_count=400, max_seconds=2.0)
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        engine.step()
        time.sleep(0.0002)
    sender.stop_stream()
    assert engine.drain(timeout=20.0)
    sent = sender.next_seq - 1
    records = sink.wait_count(sent, timeout=10.0)
    assert [seq for _, seq, _ in records] == list(range(1, sent + 1))
    assert [c for c, _, _ in records] == list(range(1, sent + 1))
    assert len(engine.stats.epochs) >= 5
    # Old images are dropped once a newer epoch commits; the newest committed one stays.
    kept = sorted(p.name for p in (images_dir / UNIT).iterdir())
    assert kept[0] == f"epoch-{engine.last_committed:08d}"
