"""Shared scaffolding for the container backend tests: namespaces, traffic ends, cleanup.

Topology (all addresses from 198.18.0.0/15, only inside namespaces made here)::

    client netns  <p>-cl   <p>c 198.18.0.1/24 --veth-- <p>n 198.18.0.2/24   <p>-nfN netns (the NF)

The test process itself stays in the root netns. Sockets for the traffic ends are opened from a
short-lived thread that has joined the client netns: a socket belongs to the netns it was created
in, so the test can then use it from any thread.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import statistics
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs

from shim import netns
from shim.container import CheckpointEngine, Container, RuncBackend, remove_cgroup_parent
from shim.oci import ContainerSpec

CLIENT_IP = "198.18.0.1"
NF_IP = "198.18.0.2"
PREFIX = 24
# Fixed MACs, so a restored NF behind a new veth is reachable without waiting for ARP to expire.
CLIENT_MAC = "02:00:c6:12:00:01"
NF_MAC = "02:00:c6:12:00:02"
# Sockets made inside a netns stay there whichever thread uses them later.
in_netns = netns.run_in_netns


@attrs.define
class Topology:
    """A client netns and the NF netns currently wired to it."""

    prefix: str
    generation: int = 0
    made_netns: list[str] = attrs.Factory(list)

    @property
    def client(self) -> str:
        return f"{self.prefix}-cl"

    @property
    def nf(self) -> str:
        return f"{self.prefix}-nf{self.generation}"

    def setup(self) -> None:
        netns.create_netns(self.client)
        self.made_netns.append(self.client)
        self.add_nf_netns()

    def add_nf_netns(self, *, up: bool = True) -> str:
        """Make a fresh NF netns (a standby's prepared netns) wired to the client.

        With ``up=False`` the client's end stays down until `plug_nf`, as a standby's data
        plane attaches the NF's port only after the restore: a TCP segment that reached the
        netns before the NF's sockets were back would be answered with a RST. The NF's own end
        is up, because CRIU reconnects restored TCP sockets and needs the route for that.
        """
        name = self.nf
        netns.create_netns(name)
        self.made_netns.append(name)
        cl_if, nf_if = f"{self.prefix}c", f"{self.prefix}n"
        netns.create_veth(netns.VethEnd(cl_if, self.client), netns.VethEnd(nf_if, name))
        netns.set_mac_address(cl_if, CLIENT_MAC, self.client)
        netns.set_mac_address(nf_if, NF_MAC, name)
        netns.add_address(cl_if, f"{CLIENT_IP}/{PREFIX}", self.client)
        netns.add_address(nf_if, f"{NF_IP}/{PREFIX}", name)
        netns.set_up(nf_if, name)
        if up:
            self.plug_nf()
        return name

    def plug_nf(self) -> None:
        netns.set_up(f"{self.prefix}c", self.client)

    def unplug_nf(self) -> None:
        """What a dead host looks like to the client: its link vanishes, nothing is sent."""
        netns.delete_link(f"{self.prefix}n", self.nf)

    def next_nf(self, *, up: bool = True) -> str:
        """Retire the current NF netns and prepare the next one, as a standby would."""
        self.unplug_nf()
        netns.delete_netns(self.nf)
        self.generation += 1
        return self.add_nf_netns(up=up)

    def teardown(self) -> None:
        for name in reversed(self.made_netns):
            with contextlib.suppress(netns.NetnsError):
                netns.delete_netns(name)


def make_prefix(tag: str) -> str:
    # Interface names get one more character, and the kernel allows 15.
    return f"h{tag}{os.getpid() % 100000}"


# --------------------------------------------------------------------------- UDP ends

SEQ_HDR = struct.Struct("!QQ")  # stamped counter (from the NF), then the sender's own sequence


@attrs.define
class UdpSink:
    """Collects (stamped counter, sender sequence, arrival time) from the NF's output.

    Behind a chain of `stamps` sequencers each datagram carries one counter per member, the
    last member's first: a record is then (last counter, ..., first counter, sender sequence,
    arrival time).
    """

    sock: socket.socket
    stamps: int = 1
    records: list[tuple[Any, ...]] = attrs.Factory(list)
    _stop: threading.Event = attrs.Factory(threading.Event)
    _thread: threading.Thread | None = None
    _lock: threading.Lock = attrs.Factory(threading.Lock)

    @staticmethod
    def open(netns_name: str, port: int, *, stamps: int = 1) -> UdpSink:
        def make() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            s.bind((CLIENT_IP, port))
            s.settimeout(0.05)
            return s

        sink = UdpSink(in_netns(netns_name, make), stamps=stamps)
        sink._thread = threading.Thread(target=sink._run, daemon=True, name="udp-sink")
        sink._thread.start()
        return sink

    def _run(self) -> None:
        header = SEQ_HDR if self.stamps == 1 else struct.Struct(f"!{self.stamps + 1}Q")
        while not self._stop.is_set():
            try:
                data = self.sock.recv(2048)
            except TimeoutError:
                continue
            except OSError:
                return
            if len(data) >= header.size:
                values = header.unpack_from(data)
                with self._lock:
                    self.records.append((*values, time.monotonic()))

    def snapshot(self) -> list[tuple[Any, ...]]:
        with self._lock:
            return list(self.records)

    def wait_count(self, n: int, timeout: float = 5.0) -> list[tuple[Any, ...]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            snap = self.snapshot()
            if len(snap) >= n:
                return snap
            time.sleep(0.01)
        return self.snapshot()

    def wait_quiet(self, quiet: float = 0.1, timeout: float = 5.0) -> list[tuple[Any, ...]]:
        """Wait until nothing has arrived for `quiet` seconds."""
        deadline = time.monotonic() + timeout
        last = len(self.snapshot())
        since = time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.01)
            now = len(self.snapshot())
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet:
                break
        return self.snapshot()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        self.sock.close()


@attrs.define
class UdpSender:
    sock: socket.socket
    dest: tuple[str, int]
    next_seq: int = 1
    _stream_stop: threading.Event = attrs.Factory(threading.Event)
    _stream: threading.Thread | None = None
    _seq_lock: threading.Lock = attrs.Factory(threading.Lock)

    @staticmethod
    def open(netns_name: str, dest_port: int) -> UdpSender:
        def make() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((CLIENT_IP, 0))
            return s

        return UdpSender(in_netns(netns_name, make), (NF_IP, dest_port))

    def send(self, count: int, gap: float = 0.0) -> range:
        """Send `count` datagrams carrying consecutive sender sequence numbers."""
        first = self.next_seq
        for _ in range(count):
            with self._seq_lock:
                self.sock.sendto(struct.pack("!Q", self.next_seq) + b"x" * 24, self.dest)
                self.next_seq += 1
            if gap:
                time.sleep(gap)
        return range(first, first + count)

    def start_stream(
        self, interval: float, max_count: int = 20000, max_seconds: float = 30
    ) -> None:
        """Send one datagram per `interval` from a thread, bounded in count and time."""
        self._stream_stop.clear()

        def loop() -> None:
            deadline = time.monotonic() + max_seconds
            for _ in range(max_count):
                if self._stream_stop.is_set() or time.monotonic() > deadline:
                    return
                with contextlib.suppress(OSError):  # no route while the NF is unplugged
                    self.send(1)
                time.sleep(interval)

        self._stream = threading.Thread(target=loop, daemon=True, name="udp-stream")
        self._stream.start()

    def stop_stream(self) -> None:
        self._stream_stop.set()
        if self._stream is not None:
            self._stream.join(timeout=5)
            self._stream = None

    def close(self) -> None:
        self.stop_stream()
        self.sock.close()


# --------------------------------------------------------------------------- TCP ends


def tcp_connect(netns_name: str, port: int, timeout: float = 5.0) -> socket.socket:
    def make() -> socket.socket:
        s = socket.create_connection((NF_IP, port), timeout=timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    return in_netns(netns_name, make)


@attrs.define
class LineClient:
    """A request/response client over one TCP socket; each reply starts with a counter."""

    sock: socket.socket
    _buf: bytes = b""

    def request(self, line: str, timeout: float = 5.0) -> tuple[int, str]:
        self.sock.settimeout(timeout)
        self.sock.sendall(line.encode() + b"\n")
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no reply to {line!r} within {timeout}s")
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("peer closed the connection")
            self._buf += chunk
        reply, _, self._buf = self._buf.partition(b"\n")
        counter, _, rest = reply.decode().partition(" ")
        return int(counter), rest


@attrs.define
class CounterServer:
    """A TCP server in a netns answering each line with '<per-connection counter> <line>'.

    It is the backend behind the socat relay; it lives in the client netns, which survives
    the NF's failover, so its connection to the relay must survive too.
    """

    listener: socket.socket
    _stop: threading.Event = attrs.Factory(threading.Event)
    _threads: list[threading.Thread] = attrs.Factory(list)
    _conns: list[socket.socket] = attrs.Factory(list)

    @staticmethod
    def open(netns_name: str, port: int) -> CounterServer:
        def make() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((CLIENT_IP, port))
            s.listen(8)
            s.settimeout(0.1)
            return s

        server = CounterServer(in_netns(netns_name, make))
        t = threading.Thread(target=server._accept_loop, daemon=True, name="counter-srv")
        server._threads.append(t)
        t.start()
        return server

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._conns.append(conn)
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(0.1)
        counter = 0
        buf = b""
        while not self._stop.is_set():
            try:
                chunk = conn.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            while b"\n" in buf:
                line, _, buf = buf.partition(b"\n")
                counter += 1
                conn.sendall(f"{counter} ".encode() + line + b"\n")

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        for t in self._threads:
            t.join(timeout=2)
        for c in self._conns:
            c.close()


# --------------------------------------------------------------------------- misc


def p50(samples: list[float]) -> float:
    return statistics.median(samples)


@contextlib.contextmanager
def scratch_dir(base: Path, name: str) -> Iterator[Path]:
    path = base / name
    path.mkdir(parents=True, exist_ok=False)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def wait_port(pid: int, port: int, proto: str = "udp", timeout: float = 10.0) -> None:
    """Wait until the process's netns has a socket bound to `port` (TCP: listening).

    The NF binds after it started (and after touching its memory), so traffic sent right after
    `start` could meet a closed port.
    """
    suffix = f":{port:04X}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/net/{proto}") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[1].endswith(suffix) and (proto != "tcp" or fields[3] == "0A"):
                    return
        time.sleep(0.005)
    raise TimeoutError(f"pid {pid} did not bind {proto} port {port} within {timeout}s")


def have_container_stack() -> str | None:
    """Why the container tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (namespaces, cgroups, runc, CRIU)"
    return None


@attrs.define
class ContainerEnv:
    """Everything one container test makes, so one `close` removes all of it."""

    topo: Topology
    backend: RuncBackend
    images: Path  # checkpoint images, on tmpfs like the real primary's
    cgroup_parent: str
    containers: list[Container] = attrs.Factory(list)
    closers: list[Callable[[], object]] = attrs.Factory(list)

    @staticmethod
    def open(tag: str, work: Path, engine: CheckpointEngine = "criu") -> ContainerEnv:
        prefix = make_prefix(tag)
        images = Path("/dev/shm") / f"hamgr-test-{prefix}"
        images.mkdir(mode=0o700)
        env = ContainerEnv(
            topo=Topology(prefix),
            backend=RuncBackend(state_dir=work / "state", engine=engine),
            images=images,
            cgroup_parent=f"/hamgr-test-{prefix}",
        )
        try:
            env.topo.setup()
        except BaseException:
            env.close()
            raise
        return env

    def spec(self, name: str, image: Path, args: tuple[str, ...]) -> ContainerSpec:
        return ContainerSpec(
            name=f"{self.topo.prefix}-{name}",
            image=image,
            args=args,
            netns=self.topo.nf,
            cgroup_parent=self.cgroup_parent,
        )

    def start(self, spec: ContainerSpec) -> Container:
        c = self.backend.start(spec)
        self.containers.append(c)
        return c

    def restore(self, image: Path, name: str | None = None) -> Container:
        c = self.backend.restore(image, self.topo.nf, name=name)
        self.containers.append(c)
        return c

    def track(self, closer: Callable[[], object]) -> None:
        self.closers.append(closer)

    def close(self) -> None:
        errors: list[BaseException] = []
        for closer in reversed(self.closers):
            try:
                closer()
            except Exception as exc:
                errors.append(exc)
        for c in reversed(self.containers):
            try:
                c.destroy()
            except Exception as exc:
                errors.append(exc)
        self.topo.teardown()
        remove_cgroup_parent(self.cgroup_parent)
        shutil.rmtree(self.images, ignore_errors=True)
        shutil.rmtree(self.backend.state_dir, ignore_errors=True)
        if errors:
            raise errors[0]
