"""Chains on the real stack: two sequencers in one NF netns (`hamgr.testbed.chain_args`), member 0
stamping and forwarding to member 1 over loopback, member 1 stamping and sending to the sink
through the data plane's egress. The sink sees (member 1's counter, member 0's counter, sender
sequence) for every datagram.

- The chain is protected by the epoch engine and checkpointed at one cut: each committed image
  holds both members.
- Killing either member makes the whole chain fail over locally (`LocalFailover` watching every
  member), and neither member's counter shows a duplicate or a gap at the sink across the run.
- A dump that fails for one member fails the whole cut: no image, and the chain runs on.
"""

from __future__ import annotations

import statistics
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hamgr.testbed import NF_PORT, UNIT, UnitBed, chain_args, wait_udp_bound
from shim import failover as fo
from shim.chain import CHAIN_META, Chain, ChainBackend, ChainImage, member_dir, member_name
from shim.container import (
    CheckpointError,
    RestoreAbortedError,
    mount_image_tmpfs,
    remove_cgroup_parent,
)
from shim.criu import is_tmpfs
from shim.local_failover import FailoverRecord
from tests.integration.test_local_failover import Rig, protected_rig

pytestmark = pytest.mark.root

STREAM_INTERVAL_S = 0.002
MEMBERS = 2


@pytest.fixture
def bed(tmp_path: Path) -> Iterator[UnitBed]:
    with UnitBed(tmp_path) as b:
        yield b
    remove_cgroup_parent(f"/hamgr-bed-{b.prefix}")


def wait_chain_bound(chain: Chain) -> None:
    for i, m in enumerate(chain.members):
        wait_udp_bound(m.pid, NF_PORT + i)


@pytest.fixture
def rig(bed: UnitBed, tmp_path: Path) -> Iterator[Rig]:
    dp = bed.start_dataplane()
    chain = bed.start_chain(chain_args(MEMBERS))
    wait_chain_bound(chain)
    assert bed.backend is not None
    yield from protected_rig(bed, dp, chain, ChainBackend(bed.backend), tmp_path, stamps=MEMBERS)


def assert_no_visible_rollback(arrivals: list[tuple[int, int, int, float]]) -> None:
    """I4 for both members: each one's counter has no duplicate and no gap, and the inputs
    that survived keep their order (inputs may be lost: this is not lossless mode)."""
    last = [a[0] for a in arrivals]
    first = [a[1] for a in arrivals]
    assert first == list(range(1, len(first) + 1)), "member 0's counter repeats or skips"
    assert last == list(range(1, len(last) + 1)), "member 1's counter repeats or skips"
    seqs = [a[2] for a in arrivals]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == len(seqs)


def test_a_chain_is_checkpointed_at_one_cut(rig: Rig) -> None:
    rig.steady(0.5)
    engine = rig.driver.engine
    assert engine is not None
    committed = engine.last_committed
    assert committed is not None
    image = ChainImage.load(engine.image_dir(committed))
    chain = rig.driver.nf
    # One image, one directory per member, each a complete CRIU image of that member.
    assert image.epoch == committed
    assert [m.spec.name for m in image.members] == [m.name for m in chain.members]
    assert [m.path.name for m in image.members] == [member_dir(i) for i in range(MEMBERS)]
    for m in image.members:
        assert any(name.startswith("pages-") for name, _ in m.files)
        assert m.epoch == committed
    assert (image.path / CHAIN_META).is_file()
    arrivals = rig.finish()
    assert arrivals
    assert_no_visible_rollback(arrivals)


def test_killing_either_member_fails_the_whole_chain_over_without_a_visible_rollback(
    rig: Rig,
) -> None:
    chains = [rig.driver.nf]
    # Member 0 between two steps, then member 1 of the restored chain while frozen for a cut.
    for n, (index, frozen) in enumerate([(0, False), (1, True)]):
        rig.steady(1.0)
        member = rig.driver.nf.members[index]
        if frozen:
            rig.kill_when_frozen(member)
        else:
            rig.kill(member)
        assert rig.until(lambda n=n: rig.recovered(n), 15.0), (
            f"failure {n + 1}: output did not resume; {rig.driver.records}, {rig.driver.alarms}"
        )
        chains.append(rig.driver.nf)
    rig.steady(1.0)
    arrivals = rig.finish()

    assert [r.status for r in rig.driver.records] == [fo.Status.FINISHED] * 2
    assert [r.term for r in rig.driver.records] == [2, 3]
    assert rig.driver.machine.term == rig.term_file.read() == 3
    assert rig.dp.stats(UNIT).units[UNIT].term == 3
    # Every member of every incarnation is a process of its own; the failed chains are gone
    # whole (the member that did not die was killed too) and reaped.
    pids = [m.pid for c in chains for m in c.members]
    assert len(set(pids)) == len(pids) == 3 * MEMBERS
    rig.driver.close()
    for victim in rig.victims:
        for m in victim.members:
            assert m.exited()
            assert not m.work_dir.exists()
            assert not m.bundle.path.exists()
    assert all(not m.exited() for m in rig.driver.nf.members)
    assert [m.name for m in rig.driver.nf.members] == [f"{chains[0].name}-t3-m{i}" for i in (0, 1)]
    assert_no_visible_rollback(arrivals)
    sent = rig.sender.next_seq - 1
    print(f"\nchain: {sent} sent, {len(arrivals)} received, {sent - len(arrivals)} inputs lost")
    for rec in rig.driver.records:
        steps = ", ".join(f"{k} {v / 1e3:.1f}" for k, v in rec.steps_us.items())
        outage = rec.to_json()["outage_ms"]
        print(f"chain failover to term {rec.term}: detect -> resume {outage} ms; steps ms: {steps}")
    engine = rig.driver.engine
    assert engine is not None
    pauses = sorted(e.pause_us / 1e3 for e in engine.stats.epochs)
    if pauses:
        print(f"chain cut pause p50 {statistics.median(pauses):.1f} ms over {len(pauses)} epochs")


def test_a_failed_dump_of_one_member_fails_the_whole_cut(bed: UnitBed) -> None:
    # Member 1 keeps 16 MiB: its image does not fit the 12 MiB tmpfs, member 0's does.
    args = chain_args(MEMBERS)
    args[1] = (*args[1], "--mem-mb", "16")
    chain = bed.start_chain(args)
    wait_chain_bound(chain)
    images = bed.work / "images"
    assert mount_image_tmpfs(images, size_mb=12)
    try:
        dest = images / "epoch-00000001"
        with pytest.raises(CheckpointError, match="member 1") as err:
            chain.checkpoint(1, dest)
        assert "no member's image is kept" in str(err.value)
        # Nothing that could be taken for a checkpoint, nor any part of one, is left.
        assert list(images.iterdir()) == []
        # The chain runs on, thawed, and a later cut that fits works.
        assert all(not m.freezer.is_frozen() for m in chain.members)
        assert not chain.exited()
    finally:
        # Lazily: the retired CRIU workers may still be leaving it (as in test_container_swrk).
        subprocess.run(["umount", "-l", str(images)], check=False)
    assert not is_tmpfs(images)
    image = chain.checkpoint(2, bed.work / "big" / "epoch-00000002")
    assert ChainImage.load(image.path).epoch == 2


def test_a_chain_restore_given_up_midway_leaves_nothing(bed: UnitBed) -> None:
    # A copy restored ahead for a peer that proved alive stops between members
    # (hamgr.agent.remote, StandbySteps._prestore); what it had restored must not hold the
    # members' names or the NF's ports against the restore that follows.
    chain = bed.start_chain(chain_args(MEMBERS))
    wait_chain_bound(chain)
    chain.freeze()
    image = chain.checkpoint(1, bed.work / "images" / "epoch-00000001")
    chain.destroy()
    assert bed.backend is not None
    backend = ChainBackend(bed.backend)
    asked = []

    def abort() -> bool:
        asked.append(True)
        return True

    name = f"{bed.prefix}-copy"
    with pytest.raises(RestoreAbortedError, match="before member 0"):
        backend.restore(image.path, bed.nfns, name=name, abort=abort)
    assert asked == [True], "abort was asked other than once, between the two members"
    runc = bed.backend._runner()
    assert [runc.state(member_name(name, i)) for i in range(MEMBERS)] == [None, None]
    restored = backend.restore(image.path, bed.nfns, name=name, abort=lambda: False)
    try:
        wait_chain_bound(restored)
        assert not restored.exited()
    finally:
        restored.destroy()


def test_a_planned_switchover_of_a_chain_loses_no_input(rig: Rig) -> None:
    """The quiesce's last cut freezes and dumps every member; the restored chain gets the
    inputs queued meanwhile, so every input sent comes out once, through both members."""
    rig.steady(1.0)
    old = rig.driver.nf
    rec = rig.driver.request("maintenance", planned=True)
    assert isinstance(rec, FailoverRecord), rec
    assert (rec.status, rec.planned, rec.term) == (fo.Status.FINISHED, True, 2), rec.detail
    assert rec.quiesced_epoch == rec.restored_epoch
    assert all(m.exited() for m in old.members)
    assert rig.until(lambda: rig.recovered(0), 15.0), rig.driver.records
    rig.steady(1.0)
    # The last inputs still have two members to cross: keep cutting until they are out.
    rig.sender.stop_stream()
    sent = rig.sender.next_seq - 1
    rig.until(lambda: len(rig.sink.snapshot()) >= sent, 5.0)
    arrivals = rig.finish()
    assert_no_visible_rollback(arrivals)
    assert [a[2] for a in arrivals] == list(range(1, sent + 1)), "an input was lost"
