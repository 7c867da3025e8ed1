"""Held output for release at the standby, on real data-plane processes.

The primary's data plane saves a closed epoch's frames to a file (``close_epoch save=``),
the standby's data plane sends that file (``xmit``), and the primary frees its copy
without sending it (``retire``). Topology: wire ``w0`` <-> ``w0p`` (test source), NF port
``n0`` <-> ``n0p`` (the test plays an af_packet NF), egress ``o0`` <-> ``o0p`` (test sink),
all in a netns the test creates; addresses are never assigned (layer 2 only).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from dpdk_vhost.client import DataPlaneClient, DataPlaneError
from dpdk_vhost.heldout import HEADER, MAGIC, MAX_FILE, encode_frames, read_frames, write_frames
from dpdk_vhost.protocol import Reply, decode_message, encode_request
from tests.integration import test_dataplane as dataplane_env
from tests.integration.dp_env import (
    SRC_MAC,
    frame,
    wait_for,
)
from tests.integration.test_dataplane import ha_unit

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("dataplane_stack")]


class Env(dataplane_env.Env):
    """The data-plane test topology plus a receiver ``x0`` <-> ``x0p`` for ``xmit``."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        self.ns.veth("x0", "x0p")
        self.rcv = self.raw("x0p")

    def mac(self, iface: str) -> bytes:
        out = subprocess.run(
            ["ip", "-n", self.ns.name, "-j", "link", "show", iface],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return bytes.fromhex(json.loads(out)[0]["address"].replace(":", ""))


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    try:
        yield e
    finally:
        e.close()


def emit(env: Env, dp: DataPlaneClient, frames: list[bytes]) -> None:
    """The NF emits ``frames``; returns once the data plane has buffered all of them."""
    before = dp.stats("u1").units["u1"].nf_rx
    for f in frames:
        env.nf.send(f)
    assert wait_for(lambda: dp.stats("u1").units["u1"].nf_rx == before + len(frames))


def seq_frames(first: int, n: int, stream: int = 0) -> list[bytes]:
    """Test frames of varying sizes, so lengths and byte totals are checked too."""
    return [frame(s, stream, size=60 + (s * 37) % 900) for s in range(first, first + n)]


def accounted(dp: DataPlaneClient) -> None:
    """Every packet the NF emitted is buffered, released, retired, discarded (which counts
    term and discard drops) or refused by a full ring."""
    u = dp.stats("u1").units["u1"]
    assert u.nf_rx == (
        u.buffered_pkts + u.released_pkts + u.retired_pkts + u.discarded_pkts + u.drops["ring_full"]
    ), u


def no_tmp(d: Path) -> list[str]:
    return [p.name for p in d.iterdir() if p.name.endswith(".tmp")]


def test_save_writes_the_closed_epochs_frames_in_order_and_keeps_them_buffered(
    env: Env,
) -> None:
    dp = env.dataplane()
    ha_unit(dp, term=0)
    e1, e2 = seq_frames(1, 50), seq_frames(51, 30)
    emit(env, dp, e1)
    closed = dp.close_epoch("u1", 1, save=str(env.tmp / "e1.out"))
    assert (closed.pkts, closed.saved, closed.saved_bytes) == (50, 50, sum(map(len, e1)))
    emit(env, dp, e2)
    assert dp.close_epoch("u1", 2, term=0, save=str(env.tmp / "e2.out")).saved == 30
    assert dp.close_epoch("u1", 3, save=str(env.tmp / "e3.out")).saved == 0
    assert dp.close_epoch("u1", 4).saved is None

    assert read_frames(env.tmp / "e1.out") == (1, 0, e1)
    assert read_frames(env.tmp / "e2.out") == (2, 0, e2)
    assert read_frames(env.tmp / "e3.out") == (3, 0, [])
    assert (env.tmp / "e3.out").stat().st_size == HEADER.size
    assert no_tmp(env.tmp) == []

    # Saving only peeked: the buffer still holds and releases everything, in order.
    assert env.sink.recv_all(quiet=0.3) == []
    assert dp.release("u1", 4, term=0) == 4
    assert env.sink.recv_all(quiet=0.3) == e1 + e2
    u = dp.stats("u1").units["u1"]
    assert (u.released_pkts, u.buffered_pkts, u.dropped) == (80, 0, 0)
    accounted(dp)


def test_saved_file_carries_the_units_term(env: Env) -> None:
    dp = env.dataplane()
    ha_unit(dp, term=7, epoch=40)
    frames = seq_frames(1, 3)
    emit(env, dp, frames)
    dp.close_epoch("u1", 40, term=7, save=str(env.tmp / "e40.out"))
    assert read_frames(env.tmp / "e40.out") == (40, 7, frames)


def test_retire_frees_without_sending_and_clears_back_pressure(env: Env) -> None:
    dp = env.dataplane()
    ha_unit(dp, k=2)
    idle_mbufs = dp.stats().mbuf_in_use
    e1, e2, e3 = seq_frames(1, 40), seq_frames(41, 25), seq_frames(66, 5)
    emit(env, dp, e1)
    dp.close_epoch("u1", 1)
    emit(env, dp, e2)
    dp.close_epoch("u1", 2)
    u = dp.stats("u1").units["u1"]
    assert "k" in u.bp
    env.src.send_seq(range(1, 11))
    assert env.nf.recv_seqs(quiet=0.3) == []  # ingress is held at k

    r = dp.retire_detail("u1", 2, term=0)
    assert (r.retired_epochs, r.retired_pkts, r.in_flight) == (2, 65, 0)
    assert r.retired_bytes == sum(map(len, e1 + e2))
    assert env.sink.recv_all(quiet=0.4) == []
    assert env.nf.recv_seqs(quiet=0.3) == list(range(1, 11))  # back-pressure cleared
    s = dp.stats()
    u = s.units["u1"]
    assert (u.retired_pkts, u.retired_bytes, u.epochs_retired) == (65, r.retired_bytes, 2)
    assert (u.buffered_pkts, u.buffered_bytes, u.epochs_in_flight) == (0, 0, 0)
    assert (u.released_pkts, u.tx, u.epochs_released, u.dropped) == (0, 0, 0, 0)
    assert u.bp == frozenset()
    assert s.mbuf_in_use <= idle_mbufs + 10  # freed (the 10 wire packets went to the NF)
    assert s.ports["o0"].tx == 0

    # Cumulative and idempotent, like release; a retired epoch cannot be discarded.
    assert dp.retire("u1", 2, term=0) == 0
    assert dp.release("u1", 1, term=0) == 0
    with pytest.raises(DataPlaneError) as err:
        dp.discard("u1", 2)
    assert err.value.code == "bad_epoch"
    with pytest.raises(DataPlaneError) as err:
        dp.retire("u1", 3, term=0)
    assert err.value.code == "not_closed"

    # The next epoch is released locally as before: only its frames leave.
    emit(env, dp, e3)
    dp.close_epoch("u1", 3)
    dp.release("u1", 3, term=0)
    assert env.sink.recv_all(quiet=0.3) == e3
    accounted(dp)


def _pipelined(dp: DataPlaneClient, *requests: tuple[str, dict[str, object]]) -> list[Reply]:
    """Sends every request before reading any reply, so the data plane handles them in one
    control poll, with no loop iteration (and no transmission) in between."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(dp.path)
    sock.settimeout(5)
    try:
        for i, (cmd, args) in enumerate(requests, start=1):
            sock.send(encode_request(str(i), cmd, args))
        replies = []
        for _ in requests:
            msg = decode_message(sock.recv(65536))
            assert isinstance(msg, Reply), msg
            replies.append(msg)
        return replies
    finally:
        sock.close()


def test_retire_behind_released_packets_keeps_the_fifo(env: Env) -> None:
    """Released packets still waiting in the ring go out; the retired epoch behind them
    does not; the epoch after it can still be saved and is released in its turn.
    Repeated until the retire has
    landed while released packets were still queued (the data plane reports them as
    releasable in its reply)."""
    dp = env.dataplane()
    ha_unit(dp, k=8)
    behind = 0
    epoch = 1
    # Up to 12 rounds: on a busy 2-CPU machine the TX can drain the whole release before the
    # retire is read in 4 rounds running (one fresh-clone CI run saw that).
    for rnd in range(12):
        base = 10000 * (rnd + 1)
        released, retired, later = (
            seq_frames(base, 3000, stream=1),
            seq_frames(base + 4000, 40, stream=2),
            seq_frames(base + 5000, 20, stream=3),
        )
        emit(env, dp, released)
        dp.close_epoch("u1", epoch)
        emit(env, dp, retired)
        dp.close_epoch("u1", epoch + 1)
        emit(env, dp, later)
        dp.close_epoch("u1", epoch + 2)
        # Saving the epoch after the retired one finds it in the ring even then. The data
        # plane reads 8 requests per poll, so the pings push the save into the next poll,
        # 64 loop iterations into the release, when some released packets are staged.
        saved = env.tmp / f"e{epoch + 2}.out"
        rel, ret, *_, sav = _pipelined(
            dp,
            ("release", {"unit": "u1", "epoch": epoch, "term": 0}),
            ("retire", {"unit": "u1", "epoch": epoch + 1, "term": 0}),
            *[("ping", {})] * 6,
            ("save_epoch", {"unit": "u1", "epoch": epoch + 2, "path": str(saved)}),
        )
        assert rel.int("released_epochs") == 1
        assert (ret.int("retired_epochs"), ret.int("retired_pkts")) == (1, 40)
        assert sav.int("saved") == 20
        assert read_frames(saved) == (epoch + 2, 0, later)
        behind = max(behind, ret.int("releasable_pkts"))
        dp.release("u1", epoch + 2, term=0)
        got = env.sink.recv_all(quiet=0.4, limit=10)
        assert got == released + later, (rnd, len(got))
        accounted(dp)
        u = dp.stats("u1").units["u1"]
        assert (u.buffered_pkts, u.epochs_in_flight, u.bp) == (0, 0, frozenset())
        epoch += 3
        if behind > 128:  # more than the staging array holds: some were in the ring
            break
    assert behind > 128, "the retire never arrived while released packets were queued"


def test_retire_is_fenced_by_the_term(env: Env) -> None:
    dp = env.dataplane()
    ha_unit(dp)
    emit(env, dp, seq_frames(1, 5))
    dp.close_epoch("u1", 1)
    assert dp.set_term("u1", 1) == 5
    with pytest.raises(DataPlaneError) as err:
        dp.retire("u1", 1, term=0)
    assert err.value.code == "stale_term"
    with pytest.raises(DataPlaneError) as err:
        dp.retire("u1", 1, term=2)
    assert err.value.code == "term_ahead"
    with pytest.raises(DataPlaneError) as err:
        dp.request("retire", unit="u1", epoch=1)
    assert err.value.code == "missing_arg"
    u = dp.stats("u1").units["u1"]
    assert (u.refused_stale, u.retired_pkts, u.epochs_retired) == (1, 0, 0)

    emit(env, dp, seq_frames(6, 4))
    dp.close_epoch("u1", 2, term=1)
    assert dp.retire("u1", 2, term=1) == 1
    assert dp.stats("u1").units["u1"].retired_pkts == 4
    assert env.sink.recv_all(quiet=0.3) == []
    accounted(dp)


def test_xmit_sends_the_files_frames_in_order_with_own_or_kept_source_mac(env: Env) -> None:
    dp = env.dataplane()
    dp.add_af_packet_port("x0", "x0")
    frames = seq_frames(1, 100)
    path = env.tmp / "e9.out"
    write_frames(path, 9, 3, frames)
    own = env.mac("x0")
    assert own != SRC_MAC

    sent = dp.xmit("x0", str(path))
    assert (sent.sent, sent.bytes, sent.epoch, sent.term) == (100, sum(map(len, frames)), 9, 3)
    got = env.rcv.recv_all(quiet=0.3)
    assert [f[6:12] for f in got] == [own] * 100
    assert [f[:6] + f[12:] for f in got] == [f[:6] + f[12:] for f in frames]

    assert dp.xmit("x0", str(path), src_mac="keep").sent == 100
    assert env.rcv.recv_all(quiet=0.3) == frames
    p = dp.stats().ports["x0"]
    assert (p.xmit_pkts, p.xmit_bytes) == (200, 2 * sent.bytes)

    # An empty epoch's file sends nothing and succeeds.
    write_frames(env.tmp / "empty.out", 10, 3, [])
    assert dp.xmit("x0", str(env.tmp / "empty.out")).sent == 0
    with pytest.raises(DataPlaneError) as err:
        dp.request("xmit", port="x0", path=str(path), src_mac="other")
    assert err.value.code == "bad_arg"
    assert env.rcv.recv_all(quiet=0.3) == []


def _malformed(tmp: Path) -> dict[str, tuple[Path | str, str]]:
    frames = seq_frames(1, 20)
    good = encode_frames(5, 1, frames)
    body = good[HEADER.size :]
    total = sum(map(len, frames))
    cases = {
        "short_header": good[:30],
        "bad_magic": b"HMGROUT0" + good[8:],
        "last_frame_truncated": good[:-5],
        "count_too_high": HEADER.pack(MAGIC, 5, 1, 21, total) + body,
        "count_too_low": HEADER.pack(MAGIC, 5, 1, 19, total) + body,
        "trailing_bytes": good + b"\x00\x00",
        "byte_total_wrong": HEADER.pack(MAGIC, 5, 1, 20, total + 1) + body,
        "zero_length_frame": HEADER.pack(MAGIC, 5, 1, 21, total) + body + struct.pack("<I", 0),
        "oversized_frame": HEADER.pack(MAGIC, 5, 1, 21, total + 70000)
        + body
        + struct.pack("<I", 70000)
        + bytes(70000),
    }
    out: dict[str, tuple[Path | str, str]] = {}
    for name, data in cases.items():
        p = tmp / f"{name}.out"
        p.write_bytes(data)
        out[name] = (p, "bad_file")
    big = tmp / "too_big.out"
    with big.open("wb") as f:
        f.write(good)
        f.truncate(MAX_FILE + 1)  # sparse
    out["too_big"] = (big, "bad_file")
    out["missing"] = (tmp / "nope.out", "bad_file")
    out["directory"] = (tmp, "bad_file")
    out["relative"] = ("e5.out", "bad_path")
    return out


def test_malformed_files_are_refused_and_nothing_is_sent(env: Env) -> None:
    dp = env.dataplane()
    dp.add_af_packet_port("x0", "x0")
    for name, (path, code) in _malformed(env.tmp).items():
        with pytest.raises(DataPlaneError) as err:
            dp.xmit("x0", str(path))
        assert err.value.code == code, (name, err.value)
        assert str(path) in err.value.message, (name, err.value)
    assert env.rcv.recv_all(quiet=0.4) == []
    p = dp.stats().ports["x0"]
    assert (p.xmit_pkts, p.xmit_bytes, p.tx) == (0, 0, 0)


def test_save_to_a_bad_path_is_refused_before_the_epoch_closes(env: Env) -> None:
    dp = env.dataplane()
    ha_unit(dp)
    frames = seq_frames(1, 10)
    emit(env, dp, frames)
    (env.tmp / "a_file").write_bytes(b"")
    for bad in (
        str(env.tmp / "no" / "such" / "dir" / "e1.out"),
        str(env.tmp / "a_file" / "e1.out"),
        "relative/e1.out",
    ):
        with pytest.raises(DataPlaneError) as err:
            dp.close_epoch("u1", 1, save=bad)
        assert err.value.code == "bad_path", err.value
        assert bad in err.value.message
        assert "epoch 1 was not closed" in err.value.message
    u = dp.stats("u1").units["u1"]
    assert (u.epoch, u.epochs_closed, u.epochs_in_flight, u.buffered_pkts) == (1, 0, 0, 10)
    assert no_tmp(env.tmp) == []
    # The same epoch then closes and saves normally.
    assert dp.close_epoch("u1", 1, save=str(env.tmp / "e1.out")).saved == 10
    assert read_frames(env.tmp / "e1.out") == (1, 0, frames)


@contextlib.contextmanager
def tiny_tmpfs(where: Path, size: str = "8k") -> Iterator[Path]:
    where.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "hvtfull", str(where)], check=True
    )
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)
        with contextlib.suppress(OSError):
            where.rmdir()


def test_a_failed_write_leaves_the_epoch_closed_and_no_tmp(env: Env) -> None:
    dp = env.dataplane()
    ha_unit(dp)
    frames = [frame(s, size=1000) for s in range(1, 41)]  # 40 kB: cannot fit in 8 kB
    emit(env, dp, frames)
    with tiny_tmpfs(env.tmp / "full") as full:
        target = full / "e1.out"
        with pytest.raises(DataPlaneError) as err:
            dp.close_epoch("u1", 1, save=str(target))
        assert err.value.code == "save_failed", err.value
        assert str(target) in err.value.message
        assert os.strerror(28) in err.value.message  # ENOSPC
        assert "epoch 1 is closed" in err.value.message
        assert list(full.iterdir()) == []  # neither the file nor its .tmp
    u = dp.stats("u1").units["u1"]
    assert (u.epoch, u.epochs_in_flight, u.buffered_pkts) == (2, 1, 40)

    # The closed epoch can be saved again, and is then released (or retired) as usual.
    assert dp.save_epoch("u1", 1, str(env.tmp / "again.out")) == 40
    assert read_frames(env.tmp / "again.out") == (1, 0, frames)
    with pytest.raises(DataPlaneError) as err:
        dp.save_epoch("u1", 2, str(env.tmp / "open.out"))
    assert err.value.code == "not_closed"
    assert dp.release("u1", 1, term=0) == 1
    assert env.sink.recv_all(quiet=0.3) == frames
    assert no_tmp(env.tmp) == []
    accounted(dp)


def test_multi_segment_frames_survive_xmit_and_save(env: Env) -> None:
    """Frames longer than one mbuf (2 KiB): xmit builds chains, save flattens them. The
    xmit goes into a loopback NF port, so the chained mbufs land in the unit's buffer."""
    dp = env.dataplane()
    for p in ("w0", "o0"):
        dp.add_af_packet_port(p, p)
    dp.add_loopback_port("lb")
    dp.add_unit("u1", wire="w0", nf="lb", egress="o0")
    idle_mbufs = dp.stats().mbuf_in_use
    frames = [frame(s, size=size) for s, size in enumerate((60, 2100, 5000, 4096, 61), 1)]
    write_frames(env.tmp / "in.out", 1, 0, frames)
    assert dp.xmit("lb", str(env.tmp / "in.out"), src_mac="keep").sent == 5
    assert wait_for(lambda: dp.stats("u1").units["u1"].nf_rx == 5)
    dp.close_epoch("u1", 1, save=str(env.tmp / "out.out"))
    assert read_frames(env.tmp / "out.out") == (1, 0, frames)
    assert dp.retire("u1", 1, term=0) == 1
    u = dp.stats("u1").units["u1"]
    assert (u.retired_pkts, u.retired_bytes, u.buffered_pkts) == (5, sum(map(len, frames)), 0)
    assert dp.stats().mbuf_in_use <= idle_mbufs  # every segment of every chain was freed


def test_release_at_the_standby_end_to_end(env: Env) -> None:
    """The whole scheme with two data planes: the primary saves epoch 1 and later retires it;
    the standby sends the file. The sink sees epoch 1 exactly once, in order, from the
    standby, and then epoch 2 released by the primary."""
    primary = env.dataplane("prim", cpu=1)
    standby = env.dataplane("stby", cpu=0, netns=env.other_host("x0"))
    for p in ("w0", "o0"):
        primary.add_af_packet_port(p, p)
    primary.add_loopback_port("lb")
    primary.add_unit("u1", wire="w0", nf="lb", egress="o0", term=2)
    standby.add_af_packet_port("x0", "x0")

    env.src.send_seq(range(1, 201), size=200)
    assert wait_for(lambda: primary.stats("u1").units["u1"].nf_rx == 200)
    primary.pause_ingress("u1", term=2)
    saved = primary.close_epoch("u1", 1, term=2, save=str(env.tmp / "u1-e1.out"))
    primary.resume_ingress("u1", term=2)
    assert saved.saved == 200
    env.src.send_seq(range(201, 221), size=200)
    assert wait_for(lambda: primary.stats("u1").units["u1"].nf_rx == 220)

    x = standby.xmit("x0", str(env.tmp / "u1-e1.out"))
    assert (x.sent, x.epoch, x.term) == (200, 1, 2)
    assert env.rcv.recv_seqs(quiet=0.3) == list(range(1, 201))
    assert primary.retire("u1", 1, term=2) == 1
    assert env.sink.recv_all(quiet=0.3) == []

    primary.close_epoch("u1", 2, term=2)
    primary.release("u1", 2, term=2)
    assert env.sink.recv_seqs(quiet=0.3) == list(range(201, 221))
    assert env.rcv.recv_all(quiet=0.1) == []
    u = primary.stats("u1").units["u1"]
    assert (u.retired_pkts, u.released_pkts, u.buffered_pkts) == (200, 20, 0)
