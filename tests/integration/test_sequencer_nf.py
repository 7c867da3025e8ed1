"""The sequencer NF's own behaviour (hamgr/nfs/src/sequencer.c), on the loopback interface: its
UDP output does not change with the optional TCP listener, and the listener answers every line
with its connection's number and line count. Needs gcc (as the image builder does), not root."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hamgr.bench.failover import wait_tcp_listening
from hamgr.nfs import images
from hamgr.testbed import wait_udp_bound

LOOPBACK = "127.0.0.1"


def free_port(kind: socket.SocketKind) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def sequencer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return images.compile_nf("sequencer", tmp_path_factory.mktemp("nfbin"))


@pytest.fixture
def sink() -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((LOOPBACK, 0))
    s.settimeout(2.0)
    with s:
        yield s


def start(binary: Path, udp: int, dest: socket.socket, *extra: str) -> subprocess.Popen[bytes]:
    host, port = dest.getsockname()
    proc = subprocess.Popen([str(binary), "--listen", str(udp), "--dest", f"{host}:{port}", *extra])
    wait_udp_bound(proc.pid, udp)
    if "--tcp-listen" in extra:
        wait_tcp_listening(proc.pid, int(extra[extra.index("--tcp-listen") + 1]))
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(5)


def udp_outputs(binary: Path, sink: socket.socket, *extra: str) -> list[bytes]:
    port = free_port(socket.SOCK_DGRAM)
    proc = start(binary, port, sink, *extra)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as src:
            for payload in (b"a" * 16, b"bb", b"c" * 100):
                src.sendto(payload, (LOOPBACK, port))
            return [sink.recv(4096) for _ in range(3)]
    finally:
        stop(proc)


def test_the_tcp_listener_leaves_the_udp_output_unchanged(
    sequencer: Path, sink: socket.socket
) -> None:
    plain = udp_outputs(sequencer, sink)
    assert plain == [
        (1).to_bytes(8, "big") + b"a" * 16,
        (2).to_bytes(8, "big") + b"bb",
        (3).to_bytes(8, "big") + b"c" * 100,
    ]
    tcp = str(free_port(socket.SOCK_STREAM))
    assert udp_outputs(sequencer, sink, "--tcp-listen", tcp) == plain


def test_without_the_option_the_nf_opens_no_tcp_socket(
    sequencer: Path, sink: socket.socket
) -> None:
    proc = start(sequencer, free_port(socket.SOCK_DGRAM), sink)
    try:
        fds = [
            os.readlink(f"/proc/{proc.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{proc.pid}/fd")
        ]
    finally:
        stop(proc)
    assert len([fd for fd in fds if fd.startswith("socket:")]) == 1


def test_the_tcp_listener_counts_connections_and_lines(
    sequencer: Path, sink: socket.socket
) -> None:
    tcp = free_port(socket.SOCK_STREAM)
    proc = start(sequencer, free_port(socket.SOCK_DGRAM), sink, "--tcp-listen", str(tcp))
    try:
        first = socket.create_connection((LOOPBACK, tcp), timeout=2).makefile("rwb")
        second = socket.create_connection((LOOPBACK, tcp), timeout=2).makefile("rwb")
        answers = []
        for f, line in ((first, b"1"), (first, b"2"), (second, b"x y"), (first, b"3")):
            f.write(line + b"\n")
            f.flush()
            answers.append(f.readline())
        first.close()
        second.close()
    finally:
        stop(proc)
    assert answers == [b"1 1 1\n", b"1 2 2\n", b"2 1 x y\n", b"1 3 3\n"]
