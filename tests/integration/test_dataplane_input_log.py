"""Input logs and replay (lossless mode, DESIGN.md I7) on real data-plane processes.

The primary's unit mirrors its inputs (``set_mirror``); the standby's data plane logs the
mirror frames of one tag (``add_input_log``), trims them at a committed cut and replays
what follows the cut into a restored unit's NF port (``replay_input_log``).

Topology: veth pairs in two netns the test creates, one per host (layer 2 only, no
addresses). Two data planes in one netns can collide: the af_packet PMD names its fanout
group after ``getpid() ^ ifindex``, and close pids make that likely with many ports.
- primary netns: wire ``w0`` <-> ``w0p`` (test source), NF ``n0`` <-> ``n0p`` (the test
  plays the NF), egress ``o0`` <-> ``o0p``; mirror ``m0`` <-> ``m1`` crosses to the standby;
- standby netns: ``m1`` (the log port), wire ``sw0`` <-> ``sw0p``, NF ``sn0`` <-> ``sn0p``
  (the restored NF, played by the test), egress ``so0`` <-> ``so0p``, mirror
  ``sm0`` <-> ``sm0p``, and ``i0`` <-> ``i0p``, into which the test injects crafted mirror
  frames.
"""

from __future__ import annotations

import re
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dpdk_vhost.client import DataPlaneClient, DataPlaneError, Replayed
from dpdk_vhost.heldout import read_frames
from dpdk_vhost.protocol import ETHERTYPE_MIRROR
from tests.integration import test_dataplane as dataplane_env
from tests.integration.dp_env import (
    DataPlaneHandle,
    Netns,
    RawPort,
    frame,
    parse,
    sh,
    wait_for,
)
from tests.integration.test_dataplane import ha_unit

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("dataplane_stack")]

TAG = 0xA5A50001
INJECT_SRC = bytes.fromhex("020000000009")


class Env(dataplane_env.Env):
    """The primary's netns (``w0``, ``n0``, ``o0``) plus the standby's, joined by the
    mirror link."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        try:
            self.ns2 = Netns("hvs")
        except BaseException:
            super().close()
            raise
        try:
            sh(
                *("ip", "-n", self.ns.name, "link", "add", "m0", "type", "veth"),
                *("peer", "name", "m1", "netns", self.ns2.name),
            )
            sh("ip", "-n", self.ns.name, "link", "set", "m0", "up")
            sh("ip", "-n", self.ns2.name, "link", "set", "m1", "up")
            for a in ("sw0", "sn0", "so0", "sm0", "i0"):
                self.ns2.veth(a, a + "p")
            self.s_src = self.raw2("sw0p")
            self.s_nf = self.raw2("sn0p")
            self.s_sink = self.raw2("so0p")
            self.s_mirror = self.raw2("sm0p")
            self.inject = self.raw2("i0p")
        except BaseException:
            self.close()
            raise

    def raw2(self, iface: str) -> RawPort:
        r = self.ns2.raw(iface)
        self.raws.append(r)
        return r

    def standby(self) -> DataPlaneClient:
        h = DataPlaneHandle("stby", self.tmp, cpu=0, netns=self.ns2.name)
        self.dps.append(h)
        return h.client

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.ns2.delete()


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    try:
        yield e
    finally:
        e.close()


def mirror_frame(tag: int, seq: int, inner: bytes) -> bytes:
    """A mirror frame as the primary's data plane builds it."""
    return b"\xff" * 6 + INJECT_SRC + struct.pack("!HIQ", ETHERTYPE_MIRROR, tag, seq) + inner


def inner_frames(seqs: range, size: int | None = None) -> dict[int, bytes]:
    """Test frames of varying sizes keyed by seq, so lengths are checked too."""
    return {s: frame(s, size=size or 60 + (s * 37) % 900) for s in seqs}


def standby_unit(dp: DataPlaneClient, *, paused: bool = True, nf: str = "sn0") -> None:
    for p in ("sw0", "so0"):
        dp.add_af_packet_port(p, p)
    if nf == "sn0":
        dp.add_af_packet_port("sn0", "sn0")
    dp.add_unit("s1", wire="sw0", nf=nf, egress="so0", paused=paused)


def inject_log(env: Env, dp: DataPlaneClient, log: str, tag: int, frames: dict[int, bytes]) -> None:
    """Sends crafted mirror frames for ``frames`` (in dict order) on ``i0p``; returns once
    the data plane has taken them (logged, duplicate or too big)."""
    before = dp.stats().ports["i0"].mirror_rx
    for seq, inner in frames.items():
        env.inject.send(mirror_frame(tag, seq, inner))
    assert wait_for(lambda: dp.stats().ports["i0"].mirror_rx == before + len(frames)), (
        dp.stats().ports["i0"]
    )


def injection_standby(env: Env, **log_kw: int) -> DataPlaneClient:
    dp = env.standby()
    dp.add_af_packet_port("i0", "i0")
    dp.add_input_log("L", "i0", TAG, **log_kw)
    return dp


def test_standby_log_holds_exactly_the_primarys_inputs_in_order(env: Env) -> None:
    primary = env.dataplane("prim", cpu=1)
    standby = env.standby()
    standby.add_af_packet_port("mlog", "m1")
    standby.add_input_log("L", "mlog", TAG)
    ha_unit(primary)
    primary.add_af_packet_port("mir", "m0")
    primary.set_mirror("u1", "mir", tag=TAG)
    standby_unit(standby)

    sent = inner_frames(range(1, 101))
    for f in sent.values():
        env.src.send(f)
    assert env.nf.recv_all(quiet=0.3) == list(sent.values())
    assert wait_for(lambda: standby.stats().input_logs["L"].received == 100)
    s = standby.stats()
    log = s.input_logs["L"]
    assert (log.frames, log.first_seq, log.last_seq, log.high_seq) == (100, 1, 100, 100)
    assert log.bytes == sum(map(len, sent.values()))
    assert (log.gaps, log.duplicates, log.overflow, log.too_big) == (0, 0, 0, 0)
    assert (log.port, log.tag) == ("mlog", TAG)
    assert (s.ports["mlog"].mirror_rx, s.ports["mlog"].unowned_drops) == (100, 0)
    u = primary.stats().units["u1"]
    assert (u.mirror_pkts, u.mirror_tag, u.in_seq) == (100, TAG, 100)

    # What the log holds, as the restored NF sees it: every (seq, frame), in order.
    r = standby.replay_input_log("L", "s1", after=0)
    assert r == Replayed(delivered=100, first=1, last=100)
    assert env.s_nf.recv_all(quiet=0.3) == list(sent.values())
    assert env.s_sink.recv_all(quiet=0.1) == []


def test_trim_at_the_cut_then_replay_delivers_exactly_what_follows_it(env: Env) -> None:
    primary = env.dataplane("prim", cpu=1)
    standby = env.standby()
    standby.add_af_packet_port("mlog", "m1")
    standby.add_input_log("L", "mlog", TAG)
    ha_unit(primary)
    primary.add_af_packet_port("mir", "m0")
    primary.set_mirror("u1", "mir", tag=TAG)
    standby_unit(standby)
    standby.add_af_packet_port("smir", "sm0")
    standby.set_mirror("s1", "smir")

    sent = inner_frames(range(1, 101))
    for s in range(1, 61):
        env.src.send(sent[s])
    assert wait_for(lambda: primary.stats().units["u1"].in_seq == 60)
    cut = primary.pause_ingress("u1")
    assert cut.cut == 60
    primary.resume_ingress("u1")
    for s in range(61, 101):
        env.src.send(sent[s])
    assert env.nf.recv_all(quiet=0.3) == list(sent.values())
    assert wait_for(lambda: standby.stats().input_logs["L"].received == 100)

    # The standby commits the checkpoint whose input cut is 60.
    assert standby.trim_input_log("L", cut.cut) == 60
    assert standby.trim_input_log("L", cut.cut) == 0
    log = standby.stats().input_logs["L"]
    assert (log.frames, log.first_seq, log.last_seq, log.trimmed, log.trim_seq) == (
        40,
        61,
        100,
        60,
        60,
    )
    assert log.bytes == sum(len(sent[s]) for s in range(61, 101))

    # A replay that needs trimmed inputs fails and delivers nothing.
    with pytest.raises(DataPlaneError) as err:
        standby.replay_input_log("L", "s1", after=50)
    assert err.value.code == "log_incomplete"
    assert "seq 51 is missing" in err.value.message
    assert "trimmed" in err.value.message
    assert env.s_nf.recv_all(quiet=0.3) == []

    r = standby.replay_input_log("L", "s1", after=cut.cut)
    assert (r.delivered, r.first, r.last) == (40, 61, 100)
    assert env.s_nf.recv_all(quiet=0.3) == [sent[s] for s in range(61, 101)]
    u = standby.stats().units["s1"]
    # Replayed inputs count as input (so the next cut covers them), not as wire RX, and
    # are not mirrored again.
    assert (u.in_seq, u.replayed_pkts, u.rx, u.mirror_pkts) == (40, 40, 0, 0)
    assert env.s_mirror.recv_all(quiet=0.2) == []
    assert standby.stats().input_logs["L"].replayed == 40

    # Live input follows the replay once ingress resumes, and is mirrored as usual.
    standby.resume_ingress("s1")
    env.s_src.send_seq(range(500, 503))
    assert env.s_nf.recv_seqs(quiet=0.3) == [500, 501, 502]
    mirrored = env.s_mirror.recv_all(quiet=0.3)
    assert [int.from_bytes(f[18:26], "big") for f in mirrored] == [41, 42, 43]
    assert standby.pause_ingress("s1").cut == 43


def test_replay_without_paused_ingress_is_refused(env: Env) -> None:
    dp = injection_standby(env)
    standby_unit(dp, paused=False)
    frames = inner_frames(range(1, 6))
    inject_log(env, dp, "L", TAG, frames)
    with pytest.raises(DataPlaneError) as err:
        dp.replay_input_log("L", "s1", after=0)
    assert err.value.code == "not_paused"
    assert env.s_nf.recv_all(quiet=0.3) == []
    u = dp.stats().units["s1"]
    assert (u.in_seq, u.replayed_pkts) == (0, 0)
    assert dp.stats().input_logs["L"].replayed == 0

    dp.pause_ingress("s1", term=0)
    with pytest.raises(DataPlaneError) as err:
        dp.replay_input_log("L", "s1", after=0, term=1)
    assert err.value.code == "term_ahead"
    assert dp.replay_input_log("L", "s1", after=0, term=0) == Replayed(5, 1, 5)
    assert env.s_nf.recv_all(quiet=0.3) == list(frames.values())


def test_a_gap_makes_a_replay_across_it_fail_and_deliver_nothing(env: Env) -> None:
    dp = injection_standby(env)
    standby_unit(dp)
    frames = inner_frames(range(1, 11))
    del frames[6]  # the mirror frame for input 6 was lost
    inject_log(env, dp, "L", TAG, frames)
    log = dp.stats().input_logs["L"]
    assert (log.frames, log.gaps, log.gap_seq, log.first_seq, log.last_seq) == (9, 1, 6, 1, 10)

    for after in (0, 3, 5):
        with pytest.raises(DataPlaneError) as err:
            dp.replay_input_log("L", "s1", after=after)
        assert err.value.code == "log_incomplete"
        assert "seq 6 is missing" in err.value.message
        assert "gap" in err.value.message
    assert env.s_nf.recv_all(quiet=0.3) == []
    u = dp.stats().units["s1"]
    assert (u.in_seq, u.replayed_pkts) == (0, 0)

    # After the gap, the log is whole.
    assert dp.replay_input_log("L", "s1", after=6) == Replayed(4, 7, 10)
    assert env.s_nf.recv_all(quiet=0.3) == [frames[s] for s in range(7, 11)]
    # Nothing after the cut: nothing to do.
    assert dp.replay_input_log("L", "s1", after=10) == Replayed(0, 0, 0)
    assert dp.replay_input_log("L", "s1", after=99) == Replayed(0, 0, 0)
    assert env.s_nf.recv_all(quiet=0.2) == []


def test_a_log_that_starts_late_cannot_replay_before_its_first_frame(env: Env) -> None:
    dp = injection_standby(env)
    standby_unit(dp)
    frames = inner_frames(range(50, 55))
    inject_log(env, dp, "L", TAG, frames)
    log = dp.stats().input_logs["L"]
    assert (log.frames, log.gaps, log.first_seq) == (5, 0, 50)
    with pytest.raises(DataPlaneError) as err:
        dp.replay_input_log("L", "s1", after=10)
    assert err.value.code == "log_incomplete"
    assert "seq 11 is missing" in err.value.message
    assert dp.replay_input_log("L", "s1", after=49).delivered == 5
    assert env.s_nf.recv_all(quiet=0.3) == list(frames.values())


def test_duplicates_unknown_tags_and_runts_are_counted_and_freed(env: Env) -> None:
    dp = injection_standby(env)
    dp.add_input_log("other", "i0", TAG + 1)
    standby_unit(dp)
    idle_mbufs = dp.stats().mbuf_in_use
    frames = inner_frames(range(1, 6))
    inject_log(env, dp, "L", TAG, frames)
    inject_log(env, dp, "L", TAG, {3: frame(3, stream=9), 5: frame(5, stream=9)})
    for seq in (1, 2, 3):
        env.inject.send(mirror_frame(99, seq, frame(seq, stream=7)))
    env.inject.send(mirror_frame(TAG, 6, b""))  # header only
    env.inject.send(b"\xff" * 6 + INJECT_SRC + struct.pack("!HI", ETHERTYPE_MIRROR, TAG))
    assert wait_for(lambda: dp.stats().ports["i0"].mirror_bad == 2)
    assert wait_for(lambda: dp.stats().ports["i0"].mirror_unknown == 3)
    s = dp.stats()
    log = s.input_logs["L"]
    assert (log.frames, log.received, log.duplicates, log.last_seq, log.gaps) == (5, 5, 2, 5, 0)
    assert s.input_logs["other"].received == 0
    p = s.ports["i0"]
    assert (p.mirror_rx, p.mirror_unknown, p.mirror_bad, p.unowned_drops) == (7, 3, 2, 0)
    assert s.mbuf_in_use <= idle_mbufs  # every mirror frame was freed

    # The first copy of each seq is the one kept.
    assert dp.replay_input_log("L", "s1", after=0) == Replayed(5, 1, 5)
    assert env.s_nf.recv_all(quiet=0.3) == list(frames.values())


def test_overflow_drops_the_oldest_and_a_replay_needing_them_fails(env: Env) -> None:
    dp = injection_standby(env, capacity=8)
    standby_unit(dp)
    frames = inner_frames(range(1, 21))
    inject_log(env, dp, "L", TAG, frames)
    log = dp.stats().input_logs["L"]
    assert (log.frames, log.first_seq, log.last_seq) == (8, 13, 20)
    assert (log.overflow, log.overflow_seq, log.gaps) == (12, 12, 0)
    assert log.bytes == sum(len(frames[s]) for s in range(13, 21))

    for after in (0, 5, 11):
        with pytest.raises(DataPlaneError) as err:
            dp.replay_input_log("L", "s1", after=after)
        assert err.value.code == "log_incomplete"
        assert f"seq {after + 1} is missing" in err.value.message
        assert "overflow" in err.value.message
    assert env.s_nf.recv_all(quiet=0.3) == []
    assert dp.replay_input_log("L", "s1", after=12) == Replayed(8, 13, 20)
    assert env.s_nf.recv_all(quiet=0.3) == [frames[s] for s in range(13, 21)]


def test_the_byte_bound_wraps_the_arena_and_keeps_the_newest_frames(env: Env) -> None:
    """200 frames of 60..1400 bytes through an 8 KiB log: the arena wraps dozens of times;
    what it keeps is always the newest frames, byte for byte."""
    max_bytes = 8192
    dp = injection_standby(env, max_bytes=max_bytes)
    standby_unit(dp)
    frames = {s: frame(s, size=60 + (s * 389) % 1341) for s in range(1, 201)}
    inject_log(env, dp, "L", TAG, frames)
    log = dp.stats().input_logs["L"]
    first = log.first_seq
    held = [frames[s] for s in range(first, 201)]
    assert (log.frames, log.last_seq, log.overflow, log.overflow_seq) == (
        len(held),
        200,
        first - 1,
        first - 1,
    )
    assert log.bytes == sum(map(len, held)) <= max_bytes
    # Lost to the layout: the skipped tail at the arena's end and the room that was too
    # small for the next frame, each less than a frame.
    assert log.bytes + 3 * 1400 > max_bytes
    assert dp.replay_input_log("L", "s1", after=first - 1) == Replayed(len(held), first, 200)
    assert env.s_nf.recv_all(quiet=0.3) == held


def test_mirror_frames_on_a_wire_port_with_a_log_are_logged_not_delivered(env: Env) -> None:
    """A unit's wire port can carry the mirror stream too; only ports with a log filter it."""
    dp = env.standby()
    standby_unit(dp, paused=False)
    dp.add_input_log("L", "sw0", TAG)
    inner = inner_frames(range(1, 11))
    for seq in range(1, 11):
        env.s_src.send(frame(1000 + seq, stream=1))
        env.s_src.send(mirror_frame(TAG, seq, inner[seq]))
        env.s_src.send(mirror_frame(TAG + 7, seq, inner[seq]))
    assert env.s_nf.recv_seqs(quiet=0.3) == [1000 + seq for seq in range(1, 11)]
    s = dp.stats()
    assert s.units["s1"].rx == 10
    assert (s.input_logs["L"].frames, s.input_logs["L"].last_seq) == (10, 10)
    assert (s.ports["sw0"].mirror_rx, s.ports["sw0"].mirror_unknown) == (10, 10)

    # Without a log the port is unfiltered again: mirror frames are ordinary input.
    assert dp.remove_input_log("L") == 10
    env.s_src.send(mirror_frame(TAG, 11, frame(11)))
    got = env.s_nf.recv_all(quiet=0.3)
    assert got == [mirror_frame(TAG, 11, frame(11))]
    assert dp.stats().units["s1"].rx == 11


def replay_some(dp: DataPlaneClient, after: int) -> int:
    """Frames delivered by one replay, whether the NF port took them all or not."""
    try:
        return dp.replay_input_log("L", "s1", after=after).delivered
    except DataPlaneError as e:
        m = re.search(r"took (\d+) of", e.message)
        if e.code != "tx_timeout" or m is None:
            raise
        return int(m.group(1))


def test_replay_into_an_nf_port_that_refuses_fails_after_200ms_and_can_resume(
    env: Env,
) -> None:
    """A loopback NF port stops taking frames when its ring is full (ingress is paused, so
    nothing reads it). The replay gives up, says how far it got, and a second replay after
    that seq delivers the rest: the unit's buffer ends up with every input once, in order."""
    dp = injection_standby(env)
    dp.add_loopback_port("lb")
    standby_unit(dp, nf="lb")
    frames = inner_frames(range(1, 3001), size=64)
    inject_log(env, dp, "L", TAG, frames)

    t0 = time.monotonic()
    with pytest.raises(DataPlaneError) as err:
        dp.replay_input_log("L", "s1", after=0)
    took = time.monotonic() - t0
    assert err.value.code == "tx_timeout"
    m = re.search(r"took (\d+) of 3000 frames \(up to seq (\d+)\).*after=(\d+)", err.value.message)
    assert m is not None, err.value.message
    done = int(m.group(1))
    assert 0 < done < 3000
    assert int(m.group(2)) == int(m.group(3)) == done
    assert 0.2 <= took < 3
    u = dp.stats().units["s1"]
    assert (u.in_seq, u.replayed_pkts) == (done, done)

    # The NF drains its port; the rest is replayed after the seq the error named.
    delivered = done
    for _ in range(10):
        dp.resume_ingress("s1")
        assert wait_for(lambda d=delivered: dp.stats().units["s1"].nf_rx == d)
        dp.pause_ingress("s1")
        delivered += replay_some(dp, after=delivered)
        if delivered == 3000:
            break
    assert delivered == 3000
    dp.resume_ingress("s1")
    assert wait_for(lambda: dp.stats().units["s1"].nf_rx == 3000)
    dp.close_epoch("s1", 1, save=str(env.tmp / "all.out"))
    assert read_frames(env.tmp / "all.out") == (1, 0, list(frames.values()))
    u = dp.stats().units["s1"]
    assert (u.in_seq, u.replayed_pkts, u.rx) == (3000, 3000, 0)
    assert dp.stats().input_logs["L"].replayed == 3000


def test_set_mirror_tag_defaults_to_the_units_tag(env: Env) -> None:
    env.ns.veth("mx", "mxp")
    tap = env.raw("mxp")
    dp = env.dataplane()
    dp.add_af_packet_port("mir", "mx")
    ha_unit(dp, tag=7)
    assert dp.stats().units["u1"].mirror_tag == 7

    def tags_of(seqs: range) -> list[tuple[int, int, int]]:
        env.src.send_seq(seqs)
        got = tap.recv_all(quiet=0.3)
        out = []
        for f in got:
            assert f[12:14] == b"\x88\xb6"
            p = parse(f[26:])
            assert p is not None
            out.append((int.from_bytes(f[14:18], "big"), int.from_bytes(f[18:26], "big"), p[1]))
        return out

    dp.set_mirror("u1", "mir")
    assert tags_of(range(1, 3)) == [(7, 1, 1), (7, 2, 2)]
    dp.set_mirror("u1", "mir", tag=0xFFFFFFFF)
    assert dp.stats().units["u1"].mirror_tag == 0xFFFFFFFF
    assert tags_of(range(3, 5)) == [(0xFFFFFFFF, 3, 3), (0xFFFFFFFF, 4, 4)]
    dp.set_mirror("u1", "mir")
    assert tags_of(range(5, 6)) == [(7, 5, 5)]
    for kw in ({"port": "-", "tag": 1}, {"port": "mir", "tag": 1 << 32}):
        with pytest.raises(DataPlaneError) as err:
            dp.request("set_mirror", unit="u1", **kw)
        assert err.value.code == "bad_arg"
    dp.set_mirror("u1", None)
    assert tags_of(range(6, 7)) == []
    assert dp.stats().units["u1"].mirror is None
    env.nf.drain()


def test_log_commands_refuse_what_they_cannot_do(env: Env) -> None:
    dp = injection_standby(env)
    standby_unit(dp)
    inject_log(env, dp, "L", TAG, inner_frames(range(1, 4)))

    with pytest.raises(DataPlaneError) as err:
        dp.remove_port("i0")
    assert err.value.code == "port_busy"
    assert "input log" in err.value.message

    def refused(code: str, cmd: str, **args: object) -> None:
        with pytest.raises(DataPlaneError) as err:
            dp.request(cmd, **args)
        assert err.value.code == code, (cmd, args, err.value)

    refused("exists", "add_input_log", name="L", port="sw0", tag=1)
    refused("exists", "add_input_log", name="L2", port="i0", tag=TAG)
    refused("port_busy", "add_input_log", name="L2", port="sn0", tag=1)
    refused("no_such_port", "add_input_log", name="L2", port="nope", tag=1)
    refused("missing_arg", "add_input_log", name="L2", port="i0")
    refused("bad_arg", "add_input_log", name="L2", port="i0", tag=1 << 32)
    refused("bad_arg", "add_input_log", name="L2", port="i0", tag=1, capacity=0)
    refused("bad_arg", "add_input_log", name="L2", port="i0", tag=1, max_bytes=100)
    refused("bad_arg", "add_input_log", name="a.b", port="i0", tag=1)
    refused("no_such_log", "trim_input_log", name="L2", upto=1)
    refused("no_such_log", "replay_input_log", name="L2", unit="s1", after=0)
    refused("no_such_log", "remove_input_log", name="L2")
    refused("no_such_unit", "replay_input_log", name="L", unit="nope", after=0)
    refused("missing_arg", "replay_input_log", name="L", unit="s1")
    # An NF port's RX is the NF's output: it can neither feed a log nor become an NF port
    # while it does.
    dp.add_af_packet_port("x0", "sm0")
    dp.add_input_log("X", "x0", 1)
    refused("port_busy", "add_unit", unit="s2", wire="i0", nf="x0", egress="so0")

    log = dp.stats().input_logs["L"]
    assert (log.frames, log.replayed) == (3, 0)
    assert env.s_nf.recv_all(quiet=0.2) == []
    assert dp.remove_input_log("L") == 3
    assert dp.remove_input_log("X") == 0
    dp.remove_port("i0")
    dp.remove_port("x0")
    assert dp.stats().input_logs == {}


NF_MAC = "02:00:00:00:00:02"  # DST_MAC of the test frames: the NF's


def test_shadow_log_keeps_the_flooded_inputs_no_mirror_frame_covered(env: Env) -> None:
    """The bridge floods every input for the NF's MAC to the standby too. The shadow log keeps
    those; each mirror frame drops its copy and everything older (the primary delivered
    them), also when it overtakes the copy. At a takeover the shadow log replays, after the
    mirrored inputs, exactly the inputs the primary never delivered."""
    dp = env.standby()
    dp.add_af_packet_port("i0", "i0")
    dp.add_input_log("L", "i0", TAG, shadow_mac=NF_MAC)
    standby_unit(dp)
    f = inner_frames(range(1, 14))
    stranger = b"\x02\x00\x00\x00\x00\x99" + f[1][6:]

    def flood(*seqs: int) -> None:
        before = dp.stats().ports["i0"].shadow_rx
        for s in seqs:
            env.inject.send(f[s])
        assert wait_for(lambda: dp.stats().ports["i0"].shadow_rx == before + len(seqs))

    flood(*range(1, 11))
    env.inject.send(stranger)  # another MAC: not the NF's input
    assert wait_for(lambda: dp.stats().ports["i0"].unowned_drops == 1)
    log = dp.stats().input_logs["L"]
    assert (log.shadow, log.shadow_frames, log.shadow_received) == (True, 10, 10)
    assert log.shadow_bytes == sum(len(f[s]) for s in range(1, 11))

    # The primary delivered 1..6: their mirror frames drop them from the shadow log.
    inject_log(env, dp, "L", TAG, {s: f[s] for s in range(1, 7)})
    log = dp.stats().input_logs["L"]
    assert (log.shadow_frames, log.shadow_matched, log.shadow_unmatched) == (4, 6, 0)
    # ... then 7..10, and 11 whose mirror frame comes before its flooded copy.
    inject_log(env, dp, "L", TAG, {s: f[s] for s in range(7, 12)})
    log = dp.stats().input_logs["L"]
    assert (log.shadow_frames, log.shadow_matched, log.shadow_unmatched) == (0, 10, 1)
    before = dp.stats().ports["i0"].shadow_rx
    env.inject.send(f[11])
    assert wait_for(lambda: dp.stats().ports["i0"].shadow_rx == before + 1)
    log = dp.stats().input_logs["L"]
    assert (log.shadow_frames, log.shadow_matched) == (0, 11)
    # The primary dies: 12 and 13 reach only the standby.
    flood(12, 13)

    # The takeover: the mirrored inputs after the image's cut (8), then the shadow log.
    with pytest.raises(DataPlaneError) as err:
        dp.replay_shadow_log("L", "s1", term=1)
    assert err.value.code == "term_ahead"
    assert dp.replay_input_log("L", "s1", after=8) == Replayed(3, 9, 11)
    r = dp.replay_shadow_log("L", "s1")
    assert r.delivered == 2
    assert env.s_nf.recv_all(quiet=0.3) == [f[s] for s in range(9, 14)]
    u = dp.stats().units["s1"]
    assert (u.in_seq, u.replayed_pkts) == (5, 5)
    log = dp.stats().input_logs["L"]
    assert (log.shadow_frames, log.shadow_replayed) == (0, 2)
    assert dp.replay_shadow_log("L", "s1").delivered == 0
    assert env.s_nf.recv_all(quiet=0.2) == []


def test_shadow_log_replays_no_input_whose_mirror_frame_overtook_its_copy(env: Env) -> None:
    """Mirror frames can overtake their flooded copies, a burst at a time, with frames for
    other MACs among them (the standby's released output, flooded to the primary for a sink
    the fabric never learned, comes back mirrored). Each copy is still dropped when it comes,
    so a takeover right after replays none of those inputs a second time."""
    dp = env.standby()
    dp.add_af_packet_port("i0", "i0")
    dp.add_input_log("L", "i0", TAG, shadow_mac=NF_MAC)
    standby_unit(dp)
    f = inner_frames(range(1, 45))
    mirrors: dict[int, bytes] = {}
    for k in range(1, 41):
        mirrors[2 * k - 1] = f[k]
        # A frame for another MAC that the primary's wire port took and mirrored.
        mirrors[2 * k] = b"\x02\x00\x00\x00\x00\x99" + frame(k, stream=1, size=90)[6:]
    inject_log(env, dp, "L", TAG, mirrors)
    log = dp.stats().input_logs["L"]
    assert (log.shadow_frames, log.shadow_matched, log.shadow_unmatched) == (0, 0, 40)

    # The 40 copies come late, then 41..44, which the primary never delivered.
    for s in range(1, 45):
        env.inject.send(f[s])
    assert wait_for(lambda: dp.stats().ports["i0"].shadow_rx == 44)
    log = dp.stats().input_logs["L"]
    assert (log.shadow_frames, log.shadow_matched, log.shadow_evicted) == (4, 40, 0)

    # The primary dies: the takeover replays the mirrored inputs, then the shadow log.
    assert dp.replay_input_log("L", "s1", after=0) == Replayed(80, 1, 80)
    assert dp.replay_shadow_log("L", "s1").delivered == 4
    got = env.s_nf.recv_all(quiet=0.3)
    assert got == [*mirrors.values(), *(f[s] for s in range(41, 45))]


def test_shadow_log_is_bounded_and_stays_out_of_a_units_wire_port(env: Env) -> None:
    dp = env.standby()
    dp.add_af_packet_port("i0", "i0")
    dp.add_input_log("L", "i0", TAG, shadow_mac=NF_MAC, capacity=4)
    standby_unit(dp)
    f = inner_frames(range(1, 8))
    for s in range(1, 8):
        env.inject.send(f[s])
    assert wait_for(lambda: dp.stats().ports["i0"].shadow_rx == 7)
    log = dp.stats().input_logs["L"]
    assert (log.shadow_frames, log.shadow_overflow) == (4, 3)
    assert dp.replay_shadow_log("L", "s1").delivered == 4
    assert env.s_nf.recv_all(quiet=0.3) == [f[s] for s in range(4, 8)]

    # Once a unit owns the port, its input is the unit's, not the shadow log's.
    dp.remove_unit("s1")
    dp.add_unit("s2", wire="i0", nf="sn0", egress="so0")
    env.inject.send(f[1])
    assert env.s_nf.recv_all(quiet=0.3) == [f[1]]
    assert dp.stats().input_logs["L"].shadow_received == 7


def test_shadow_commands_refuse_what_they_cannot_do(env: Env) -> None:
    dp = injection_standby(env)
    standby_unit(dp)
    for bad in ("nope", "ff:ff:ff:ff:ff:ff", "00:00:00:00:00:00", "01:00:5e:00:00:01"):
        with pytest.raises(DataPlaneError) as err:
            dp.add_input_log("L2", "sw0", 7, shadow_mac=bad)
        assert err.value.code == "bad_arg", bad
        assert "shadow_mac" in err.value.message
    with pytest.raises(DataPlaneError) as err:
        dp.replay_shadow_log("L", "s1")
    assert err.value.code == "no_shadow"
    dp.add_input_log("L3", "sw0", 8, shadow_mac=NF_MAC)
    dp.resume_ingress("s1")
    with pytest.raises(DataPlaneError) as err:
        dp.replay_shadow_log("L3", "s1")
    assert err.value.code == "not_paused"
    assert dp.stats().input_logs["L"].shadow is False
