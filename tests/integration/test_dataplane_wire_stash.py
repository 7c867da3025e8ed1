"""A unit whose ingress is stopped still has its wire port read: the wire stash.

Peer data planes probe each other on the same wire ports that carry a unit's input. While
the unit is paused for a cut, or back-pressured, its input must not reach the NF; the data
plane reads the port anyway, takes the probes (and mirror frames for an input log) out,
and keeps the rest in a bounded stash that is delivered in order once ingress resumes.

Topology: the test data plane ``hosta`` owns ``w0`` (wire), ``n0`` (the test plays the
NF on ``n0p``), ``o0`` (egress, sink ``o0p``) and ``m0`` (mirror, tap ``m0p``). For the
probe tests, ``w0p`` moves into a second netns where data plane ``hostb`` probes through
it and the test sends the unit's input on it too.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dpdk_vhost.client import DataPlaneClient
from dpdk_vhost.protocol import UnitStats
from tests.integration import test_dataplane as dataplane_env
from tests.integration import test_dataplane_input_log as input_log_env
from tests.integration.dp_env import RawPort, parse, wait_for
from tests.integration.test_dataplane import ha_unit
from tests.integration.test_dataplane_input_log import (
    TAG,
    inject_log,
    injection_standby,
    inner_frames,
    standby_unit,
)

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("dataplane_stack")]

STASH = 512  # DP_WIRE_STASH in dpdk_vhost/src/dp.h


class Env(dataplane_env.Env):
    """The data-plane test topology plus a mirror link ``m0`` <-> ``m0p``."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        try:
            self.ns.veth("m0", "m0p")
            self.mirror = self.raw("m0p")
        except BaseException:
            self.close()
            raise

    def with_peer(self) -> tuple[DataPlaneClient, DataPlaneClient, RawPort]:
        """hosta with unit u1 (mirrored to m0), and hostb behind w0p; both probe each
        other through w0, every 1 ms with 3 misses. Returns them and the unit's source,
        which now sends from hostb's netns."""
        # Real-time, as in the peer-down test: on this shared machine a descheduled data
        # plane would miss 3 ms of probes for reasons that have nothing to do with pausing.
        a = self.dataplane("hosta", cpu=1, rt_priority=10)
        peer_ns = self.other_host("w0p")
        b = self.dataplane("hostb", cpu=0, rt_priority=10, netns=peer_ns)
        src = self.others[-1].raw("w0p")
        self.raws.append(src)
        ha_unit(a, k=1)
        a.add_af_packet_port("m0", "m0")
        a.set_mirror("u1", "m0")
        b.add_af_packet_port("fab", "w0p")
        a.add_probe("hostb", "w0")
        b.add_probe("hosta", "fab")
        assert wait_for(
            lambda: (
                a.stats().probes["hostb"].state == "up" and b.stats().probes["hosta"].state == "up"
            )
        )
        return a, b, src


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    try:
        yield e
    finally:
        e.close()


def mirrored(env: Env) -> list[tuple[int, int]]:
    """(mirror seq, inner test seq) of every mirror frame received on m0p."""
    out = []
    for f in env.mirror.recv_all(quiet=0.3):
        inner = parse(f[26:])
        assert inner is not None, f
        out.append((struct.unpack("!Q", f[18:26])[0], inner[1]))
    return out


def no_downs(a: DataPlaneClient, b: DataPlaneClient) -> None:
    for dp, peer in ((a, "hostb"), (b, "hosta")):
        p = dp.stats().probes[peer]
        assert (p.state, p.downs, p.ups) == ("up", 0, 1), (dp, p)


def stopped_for_300ms(
    env: Env, a: DataPlaneClient, b: DataPlaneClient, src: RawPort, seqs: range
) -> UnitStats:
    """While u1's ingress is stopped, sends ``seqs`` on its wire port at 1000/s. Checks
    that they all wait in the stash and none reaches the NF, for at least 300 ms, while
    hostb's probes keep arriving through the same port and neither side reports a
    peer down. Returns u1's stats then."""
    heard = a.stats().probes["hostb"].rx
    t0 = time.monotonic()
    src.send_seq(seqs, pps=1000)
    assert wait_for(lambda: a.stats("u1").units["u1"].stash_wire == len(seqs))
    # I2: nothing reaches the NF while stopped. This also makes the stop last 300 ms.
    assert env.nf.recv_seqs(quiet=max(0.2, 0.3 - (time.monotonic() - t0))) == []
    stopped_s = time.monotonic() - t0
    s = a.stats()
    # One probe a millisecond came in through the wire port all through the stop.
    assert s.probes["hostb"].rx - heard >= stopped_s * 1000 / 2
    no_downs(a, b)
    return s.units["u1"]


def test_a_paused_unit_keeps_hearing_probes_and_delivers_its_input_after_resume(
    env: Env,
) -> None:
    a, b, src = env.with_peer()
    src.send_seq(range(1, 101))
    assert env.nf.recv_seqs(quiet=0.3) == list(range(1, 101))
    assert a.pause_ingress("u1").cut == 100

    u = stopped_for_300ms(env, a, b, src, range(101, 401))
    assert (u.in_seq, u.rx, u.stash_wire, u.stash_wire_pkts, u.stash_wire_full) == (
        100,
        100,
        300,
        300,
        0,
    )
    assert a.pause_ingress("u1").cut == 100  # the stash is not input yet

    a.resume_ingress("u1")
    assert env.nf.recv_seqs(quiet=0.3) == list(range(101, 401))
    u = a.stats().units["u1"]
    assert (u.in_seq, u.rx, u.stash_wire, u.stash_wire_pkts, u.dropped) == (400, 400, 0, 300, 0)
    assert a.pause_ingress("u1").cut == 400
    # The mirror numbers the inputs as the NF port took them: one sequence, no gaps.
    assert mirrored(env) == [(s, s) for s in range(1, 401)]
    no_downs(a, b)


def test_a_backpressured_unit_keeps_hearing_probes_and_delivers_after_release(
    env: Env,
) -> None:
    a, b, src = env.with_peer()
    env.nf.send_seq(range(1, 6))
    assert wait_for(lambda: a.stats("u1").units["u1"].nf_rx == 5)
    a.close_epoch("u1", 1)
    assert a.stats("u1").units["u1"].bp == frozenset({"k"})

    u = stopped_for_300ms(env, a, b, src, range(1, 201))
    assert (u.in_seq, u.rx, u.stash_wire, u.bp) == (0, 0, 200, frozenset({"k"}))

    a.release("u1", 1, term=0)
    assert env.nf.recv_seqs(quiet=0.3) == list(range(1, 201))
    assert env.sink.recv_seqs(quiet=0.2) == list(range(1, 6))
    u = a.stats().units["u1"]
    assert (u.in_seq, u.rx, u.stash_wire, u.bp, u.dropped) == (200, 200, 0, frozenset(), 0)
    assert mirrored(env) == [(s, s) for s in range(1, 201)]
    no_downs(a, b)


def test_a_full_stash_leaves_the_rest_in_the_port_queue_and_loses_nothing(env: Env) -> None:
    dp = env.dataplane()
    ha_unit(dp)
    dp.pause_ingress("u1")
    # More than the stash holds, fewer than it plus the af_packet ring (512 frames).
    env.src.send_seq(range(1, 801), pps=5000)
    assert wait_for(lambda: dp.stats("u1").units["u1"].stash_wire == STASH)
    assert env.nf.recv_seqs(quiet=0.2) == []
    u = dp.stats("u1").units["u1"]
    assert (u.stash_wire, u.stash_wire_pkts, u.stash_wire_full, u.in_seq, u.rx) == (
        STASH,
        STASH,
        1,
        0,
        0,
    )

    dp.resume_ingress("u1")
    assert env.nf.recv_seqs(quiet=0.3) == list(range(1, 801))
    s = dp.stats()
    u = s.units["u1"]
    assert (u.in_seq, u.rx, u.stash_wire, u.stash_wire_pkts, u.stash_wire_full, u.dropped) == (
        800,
        800,
        0,
        STASH,
        1,
        0,
    )
    assert (s.ports["w0"].rx_missed, s.ports["w0"].rx_nombuf) == (0, 0)
    assert dp.pause_ingress("u1").cut == 800

    # What a removed unit still stashed is freed and counted, like the rest of its frames.
    env.src.send_seq(range(801, 811))
    assert wait_for(lambda: dp.stats("u1").units["u1"].stash_wire == 10)
    assert dp.remove_unit("u1") == 10
    assert env.nf.recv_seqs(quiet=0.2) == []


def test_wire_input_that_arrives_before_a_replay_is_delivered_after_it(
    tmp_path: Path,
) -> None:
    """A restored unit starts paused; the wire input that reaches it before the replay is
    stashed, and follows the replayed inputs once ingress resumes."""
    env = input_log_env.Env(tmp_path)
    try:
        dp = injection_standby(env)
        standby_unit(dp)
        env.s_src.send_seq(range(1001, 1021), stream=1)
        assert wait_for(lambda: dp.stats("s1").units["s1"].stash_wire == 20)
        logged = inner_frames(range(1, 31))
        inject_log(env, dp, "L", TAG, logged)
        assert dp.replay_input_log("L", "s1", after=0).delivered == 30
        dp.resume_ingress("s1")
        got = env.s_nf.recv_all(quiet=0.3)
        assert got[:30] == list(logged.values())
        assert [parse(f) for f in got[30:]] == [(1, s) for s in range(1001, 1021)]
        u = dp.stats("s1").units["s1"]
        assert (u.in_seq, u.replayed_pkts, u.rx, u.stash_wire, u.dropped) == (50, 30, 20, 0, 0)
    finally:
        env.close()
