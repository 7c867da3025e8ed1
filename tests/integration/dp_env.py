"""Test helpers for the data-plane integration tests: namespaces, veths, raw frames.

Everything made here is named with a random suffix and removed by its owner.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import select
import socket
import struct
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from dpdk_vhost.client import DataPlaneClient
from dpdk_vhost.process import DataPlaneConfig, DataPlaneProcess, default_binary

ETH_P_ALL = 0x0003
ETH_P_TEST = 0x88B7
PACKET_OUTGOING = 4
CLONE_NEWNET = 0x40000000
MAGIC = b"HVT1"
SRC_MAC = bytes.fromhex("020000000001")
DST_MAC = bytes.fromhex("020000000002")

_libc = ctypes.CDLL(None, use_errno=True)


@functools.cache
def ensure_built() -> str | None:
    """Builds the data plane once if it is missing; returns why it could not."""
    if default_binary().exists() and default_binary("dpdk-vhost-gen").exists():
        return None
    r = subprocess.run(
        ["make", "-C", str(default_binary().parent.parent)],
        capture_output=True,
        text=True,
        check=False,
    )
    return None if r.returncode == 0 else f"make -C dpdk_vhost failed: {r.stderr[-300:]}"


def have_root_stack() -> str | None:
    """Why the real-DPDK tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root"
    if (err := ensure_built()) is not None:
        return err
    if subprocess.run(["ip", "netns", "list"], capture_output=True, check=False).returncode != 0:
        return "iproute2 with netns support is missing"
    return None


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


class Netns:
    """A network namespace with veth pairs inside it; IPv6 off so the kernel stays quiet."""

    def __init__(self, prefix: str = "hvt") -> None:
        self.name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        sh("ip", "netns", "add", self.name)
        for key in ("all", "default"):
            sh(
                "ip",
                "netns",
                "exec",
                self.name,
                "sysctl",
                "-qw",
                f"net.ipv6.conf.{key}.disable_ipv6=1",
            )
        sh("ip", "-n", self.name, "link", "set", "lo", "up")

    def veth(self, a: str, b: str) -> None:
        sh("ip", "-n", self.name, "link", "add", a, "type", "veth", "peer", "name", b)
        for dev in (a, b):
            sh("ip", "-n", self.name, "link", "set", dev, "up")

    def delete_link(self, a: str) -> None:
        sh("ip", "-n", self.name, "link", "del", a)

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "delete", self.name], capture_output=True, check=False)

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Runs the block in this netns (this thread only), e.g. to open sockets there."""
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            if _libc.setns(target, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns into test netns failed")
            try:
                yield
            finally:
                if _libc.setns(own, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns back failed")
        finally:
            os.close(own)
            os.close(target)

    def raw(self, iface: str) -> RawPort:
        with self.entered():
            return RawPort(iface)


def frame(seq: int, stream: int = 0, size: int = 60) -> bytes:
    payload = MAGIC + struct.pack("!IQ", stream, seq)
    body = DST_MAC + SRC_MAC + struct.pack("!H", ETH_P_TEST) + payload
    return body + bytes(max(0, size - len(body)))


def parse(data: bytes) -> tuple[int, int] | None:
    """(stream, seq) of a test frame, None for anything else."""
    if len(data) < 30 or data[12:14] != struct.pack("!H", ETH_P_TEST) or data[14:18] != MAGIC:
        return None
    stream, seq = struct.unpack("!IQ", data[18:30])
    return stream, seq


class RawPort:
    """An AF_PACKET socket on one interface: sends frames, receives incoming ones."""

    def __init__(self, iface: str) -> None:
        self.iface = iface
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind((iface, 0))
        self.sock.setblocking(False)

    def send(self, data: bytes) -> None:
        while True:
            try:
                self.sock.send(data)
                return
            except BlockingIOError:
                select.select([], [self.sock], [], 0.1)

    def send_seq(self, seqs: range, stream: int = 0, size: int = 60, pps: int = 0) -> None:
        t0 = time.monotonic()
        for i, s in enumerate(seqs):
            self.send(frame(s, stream, size))
            if pps and i % 32 == 31:
                ahead = (i + 1) / pps - (time.monotonic() - t0)
                if ahead > 0:
                    time.sleep(ahead)

    def recv_all(self, quiet: float = 0.2, limit: float = 5.0) -> list[bytes]:
        """Incoming frames until ``quiet`` seconds pass without one (at most ``limit``)."""
        out: list[bytes] = []
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            r, _, _ = select.select([self.sock], [], [], quiet)
            if not r:
                break
            while True:
                try:
                    data, addr = self.sock.recvfrom(65536)
                except BlockingIOError:
                    break
                if addr[2] != PACKET_OUTGOING:
                    out.append(data)
        return out

    def recv_seqs(
        self, quiet: float = 0.2, limit: float = 5.0, stream: int | None = None
    ) -> list[int]:
        seqs = []
        for d in self.recv_all(quiet, limit):
            p = parse(d)
            if p is not None and (stream is None or p[0] == stream):
                seqs.append(p[1])
        return seqs

    def drain(self) -> None:
        self.recv_all(quiet=0.05, limit=1.0)

    def close(self) -> None:
        self.sock.close()


class DataPlaneHandle:
    """A data plane process plus a client to it, for one test."""

    def __init__(
        self,
        name: str,
        tmp: Path,
        *,
        cpu: int = 1,
        netns: str | None = None,
        mbufs: int = 8191,
        idle_sleep_max_us: int = 1000,
        rt_priority: int | None = None,
    ) -> None:
        self.config = DataPlaneConfig(
            name=name,
            ctl_path=str(tmp / f"{name}.sock"),
            cpu=cpu,
            netns=netns,
            mbufs=mbufs,
            idle_sleep_max_us=idle_sleep_max_us,
            rt_priority=rt_priority,
            log_path=str(tmp / f"{name}.log"),
        )
        self.proc = DataPlaneProcess(self.config)
        self.client: DataPlaneClient = self.proc.start()

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()
        self.proc.stop()


@contextlib.contextmanager
def realtime(priority: int = 5) -> Iterator[None]:
    """Runs the block with this thread at SCHED_FIFO, as the agent consuming events would.

    Without it, measuring when an event arrives measures this test's own wake-up delay on
    a busy machine.
    """
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    try:
        yield
    finally:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def wait_for(pred: object, timeout: float = 5.0, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(pred) and pred():
            return True
        time.sleep(step)
    return False
