"""A container NF protected end to end on the real stack: dpdk_vhost holds its output, the epoch
engine checkpoints it with CRIU each epoch, the replication link ships the checkpoint to a
standby store, and output leaves only after the standby committed it.

The topology is `hamgr.testbed.UnitBed`: client, data-plane and NF namespaces made by the test.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hamgr.testbed import NF_PORT, SINK_PORT, UNIT, UnitBed, wait_udp_bound
from policies.epoch import FixedEpoch
from shim import epoch as ep
from shim.engine import PrimaryEngine
from shim.replication import ReplicationClient
from tests.integration.container_env import UdpSender, UdpSink

pytestmark = pytest.mark.root

EPOCH_US = 50_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def bed(tmp_path: Path) -> Iterator[UnitBed]:
    with UnitBed(tmp_path) as b:
        yield b


def _engine(bed: UnitBed, shipper: ReplicationClient, ship_timeout: float = 5.0) -> PrimaryEngine:
    assert bed.client is not None
    assert bed.nf is not None
    assert bed.images is not None
    machine = ep.PrimaryMachine(UNIT, term=1, config=ep.PrimaryConfig(epoch=FixedEpoch(EPOCH_US)))
    return PrimaryEngine(
        UNIT,
        machine,
        bed.client,
        bed.nf,
        shipper,
        image_root=bed.images,
        ship_timeout=ship_timeout,
    )


def _traffic(bed: UnitBed) -> tuple[UdpSink, UdpSender]:
    sink = UdpSink.open(bed.cl, SINK_PORT)
    sender = UdpSender.open(bed.cl, NF_PORT)
    return sink, sender


def test_output_leaves_only_after_the_standby_commits(bed: UnitBed) -> None:
    dp = bed.start_dataplane()
    nf = bed.start_nf()
    wait_udp_bound(nf.pid, NF_PORT)
    sink, sender = _traffic(bed)
    # The standby is not listening yet: the primary ships into a queue and nothing is acked.
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    shipper = ReplicationClient(endpoint)
    try:
        engine = _engine(bed, shipper, ship_timeout=60.0)
        sent = sender.send(100, gap=0.002)
        engine.run(seconds=1.5)
        stats = dp.stats(UNIT).units[UNIT]
        # I1: the NF produced output (the data plane holds it), and none of it reached the sink.
        assert stats.nf_rx >= len(sent)
        assert sink.snapshot() == []
        assert stats.released_pkts == 0
        assert stats.epochs_closed >= 1

        bed.start_standby(endpoint)
        assert bed.server is not None
        assert engine.drain(timeout=30.0), "shipped epochs were not acked"
        records = sink.wait_count(len(sent), timeout=10.0)

        # Everything is released after the commit, in order, with the NF's counter unbroken.
        assert [seq for _, seq, _ in records] == list(sent)
        assert [counter for counter, _, _ in records] == list(range(1, len(sent) + 1))
        committed = bed.server.committed(UNIT)
        assert committed is not None
        assert engine.last_committed == committed.epoch
        # The committed checkpoint's cut covers every input the NF was given.
        assert int(committed.meta["cut_seq"]) == len(sent)

        # I5: an idle unit takes no more checkpoints.
        closed_before = dp.stats(UNIT).units[UNIT].epochs_closed
        engine.run(seconds=0.5)
        assert dp.stats(UNIT).units[UNIT].epochs_closed == closed_before
    finally:
        shipper.close()
        sender.close()
        sink.close()


def test_epochs_flow_under_steady_load(bed: UnitBed) -> None:
    """With the standby present, output keeps flowing, in order, epoch after epoch."""
    dp = bed.start_dataplane()
    nf = bed.start_nf()
    wait_udp_bound(nf.pid, NF_PORT)
    sink, sender = _traffic(bed)
    shipper = ReplicationClient(bed.start_standby())
    try:
        engine = _engine(bed, shipper)
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
        assert dp.stats(UNIT).units[UNIT].released_pkts == sent
        # Old images are dropped once a newer epoch commits; the newest committed one stays.
        assert bed.images is not None
        kept = sorted(p.name for p in (bed.images / UNIT).iterdir())
        assert kept[0] == f"epoch-{engine.last_committed:08d}"
    finally:
        shipper.close()
        sender.close()
        sink.close()
