"""The provisioned CRIU against the real kernel: it passes `criu check`, the probe dumps live TCP
state, and a TCP server in an external netns survives a dump + restore without its client
noticing anything but a pause."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from shim.criu import CriuRuntime, log_tail

pytestmark = pytest.mark.root

DEFAULT_CRIU = "/opt/hamgr/criu/bin/criu"
EXT_KEY = "extnet"
SERVER_ADDR = "198.19.7.1"
CLIENT_ADDR = "198.19.7.2"
PORT = 7411
# Hard upper bound on how long any helper process may live, even if teardown never runs.
LIFETIME_S = 120

# Echoes a counter: the n-th request line on the connection gets "n". The counter lives only in
# the server's memory, so after a restore the next reply proves the memory and the TCP stream
# (sequence numbers, queues) both came back exactly where the dump left them.
SERVER = """
import signal, socket, sys
addr, port, lifetime = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
signal.alarm(lifetime)
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((addr, port))
srv.listen(1)
conn, _ = srv.accept()
counter = 0
while True:
    data = conn.recv(4096)
    if not data:
        break
    for _ in range(data.count(b"\\n")):
        counter += 1
        conn.sendall(b"%d\\n" % counter)
"""

# Keeps one connection open and does one request/reply per "req" line on stdin, printing the
# reply (or the error) so the test can drive it from outside the client netns.
CLIENT = """
import socket, sys, time
addr, port = sys.argv[1], int(sys.argv[2])
sock = None
for _ in range(200):
    try:
        sock = socket.create_connection((addr, port), timeout=1)
        break
    except OSError:
        time.sleep(0.05)
if sock is None:
    print("error connect", flush=True)
    sys.exit(1)
sock.settimeout(15)
print("connected %d" % sock.getsockname()[1], flush=True)
reader = sock.makefile("rb")
for line in sys.stdin:
    if line.strip() != "req":
        break
    try:
        sock.sendall(b"n\\n")
        print(reader.readline().decode().strip() or "error eof", flush=True)
    except OSError as exc:
        print("error %s" % exc, flush=True)
"""


def criu_path() -> str:
    path = os.environ.get("HAMGR_CRIU") or DEFAULT_CRIU
    if not os.access(path, os.X_OK):
        pytest.fail(f"no criu at {path}: run scripts/provision-criu.sh or set HAMGR_CRIU")
    return path


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def pid_gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def kill_pid(pid: int) -> None:
    """SIGKILL one process we started, and wait (bounded) until it is dead."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    for _ in range(200):
        if pid_gone(pid):
            return
        time.sleep(0.01)


class LineReader:
    """Line reads with a deadline from a pipe, without blocking past it."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""

    def readline(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no line within {timeout}s (have {self.buf!r})")
            readable, _, _ = select.select([self.fd], [], [], left)
            if readable:
                chunk = os.read(self.fd, 4096)
                if not chunk:
                    raise EOFError(f"pipe closed (have {self.buf!r})")
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()


@attrs.define
class NetnsPair:
    server_ns: str
    client_ns: str
    procs: list[subprocess.Popen[bytes]] = attrs.field(factory=list)
    # Processes we did not fork ourselves (restored by CRIU), killed by PID in teardown.
    pids: list[int] = attrs.field(factory=list)

    def spawn(self, netns: str, argv: list[str], *, piped: bool) -> subprocess.Popen[bytes]:
        """Start argv in netns; piped gives it stdin/stdout pipes, else it gets its own session
        and /dev/null, leaving CRIU nothing external to dump (no --shell-job needed)."""
        stdio = subprocess.PIPE if piped else subprocess.DEVNULL
        # nsenter --net keeps the host mount namespace, so CRIU has no mounts to dump.
        proc = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{netns}", *argv],
            stdin=stdio,
            stdout=stdio,
            stderr=subprocess.DEVNULL,
            start_new_session=not piped,
        )
        self.procs.append(proc)
        return proc

    def cleanup(self) -> None:
        for pid in reversed(self.pids):
            kill_pid(pid)
        for proc in reversed(self.procs):
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()


@pytest.fixture
def netns_pair() -> Iterator[NetnsPair]:
    tag = os.getpid()
    bed = NetnsPair(server_ns=f"hamgr-t-srv-{tag}", client_ns=f"hamgr-t-cli-{tag}")
    made: list[str] = []
    try:
        for ns in (bed.server_ns, bed.client_ns):
            ip("netns", "add", ns)
            made.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        # Both ends are created directly inside the test namespaces and die with them.
        ip(
            "link", "add", "hsrv0", "netns", bed.server_ns, "type", "veth",
            "peer", "name", "hcli0", "netns", bed.client_ns,
        )  # fmt: skip
        ip("-n", bed.server_ns, "addr", "add", f"{SERVER_ADDR}/24", "dev", "hsrv0")
        ip("-n", bed.client_ns, "addr", "add", f"{CLIENT_ADDR}/24", "dev", "hcli0")
        ip("-n", bed.server_ns, "link", "set", "hsrv0", "up")
        ip("-n", bed.client_ns, "link", "set", "hcli0", "up")
        yield bed
    finally:
        bed.cleanup()
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10, check=False)


def test_provisioned_criu_is_new_enough() -> None:
    assert CriuRuntime(criu_path()).version() >= (4, 2, 0)


def test_provisioned_criu_passes_check() -> None:
    result = CriuRuntime(criu_path()).check()
    assert result.ok, result.detail


def test_wrapper_works_inside_a_netns_from_any_cwd(netns_pair: NetnsPair) -> None:
    res = subprocess.run(
        ["nsenter", f"--net=/run/netns/{netns_pair.server_ns}", criu_path(), "check"],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_pycriu_talks_to_criu_over_swrk() -> None:
    import pycriu

    client = pycriu.criu()
    client.use_binary(criu_path())
    client.check()


def test_probe_tcp_dump_succeeds(tmp_path: Path) -> None:
    before = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    result = CriuRuntime(criu_path()).probe_tcp_dump(tmp_path)
    assert result.ok, result.detail
    assert result.dump_seconds is not None
    after = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    assert {n for n in after - before if n.startswith("hamgr-probe-")} == set()
    assert list(tmp_path.iterdir()) == []


def test_tcp_server_survives_dump_and_restore(netns_pair: NetnsPair, tmp_path: Path) -> None:
    criu = criu_path()
    images = tmp_path / "images"
    images.mkdir()
    server = netns_pair.spawn(
        netns_pair.server_ns,
        [sys.executable, "-c", SERVER, SERVER_ADDR, str(PORT), str(LIFETIME_S)],
        piped=False,
    )
    client = netns_pair.spawn(
        netns_pair.client_ns, [sys.executable, "-c", CLIENT, SERVER_ADDR, str(PORT)], piped=True
    )
    assert client.stdin is not None
    assert client.stdout is not None
    replies = LineReader(client.stdout.fileno())

    def send_request() -> None:
        assert client.stdin is not None
        client.stdin.write(b"req\n")
        client.stdin.flush()

    def request(timeout: float = 20) -> str:
        send_request()
        return replies.readline(timeout)

    connected = replies.readline(20)
    assert connected.startswith("connected "), connected
    assert [request() for _ in range(3)] == ["1", "2", "3"]

    netns_ino = os.stat(f"/run/netns/{netns_pair.server_ns}").st_ino
    started = time.monotonic()
    dump = subprocess.run(
        [
            criu, "dump", "-t", str(server.pid), "-D", str(images), "-o", "dump.log", "-v4",
            "--tcp-established", "--network-lock", "nftables",
            "--external", f"net[{netns_ino}]:{EXT_KEY}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )  # fmt: skip
    dump_ms = (time.monotonic() - started) * 1000
    assert dump.returncode == 0, log_tail(images / "dump.log")
    # The restored task must get the same PID back, so the dumped one has to be reaped first.
    assert server.wait(timeout=10) == -signal.SIGKILL

    # A request sent while the server is gone must neither be lost nor answered with a RST: the
    # network lock CRIU leaves in the server netns drops it, and TCP retransmits it after restore.
    send_request()
    time.sleep(0.2)

    netns_fd = os.open(f"/run/netns/{netns_pair.server_ns}", os.O_RDONLY)
    pidfile = tmp_path / "restored.pid"
    try:
        started = time.monotonic()
        restore = subprocess.run(
            [
                criu, "restore", "-D", str(images), "-o", "restore.log", "-v4",
                "--tcp-established", "--network-lock", "nftables",
                "--inherit-fd", f"fd[{netns_fd}]:{EXT_KEY}",
                "--restore-detached", "--pidfile", str(pidfile),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            pass_fds=(netns_fd,),
        )  # fmt: skip
        restore_ms = (time.monotonic() - started) * 1000
    finally:
        os.close(netns_fd)
    if pidfile.exists():
        netns_pair.pids.append(int(pidfile.read_text().strip()))
    assert restore.returncode == 0, log_tail(images / "restore.log")
    restored_pid = int(pidfile.read_text().strip())
    assert restored_pid == server.pid
    assert os.readlink(f"/proc/{restored_pid}/ns/net") == f"net:[{netns_ino}]"
    print(f"\ncriu dump {dump_ms:.0f} ms, restore {restore_ms:.0f} ms")

    # Same client process, same socket: no reconnect, no lost or repeated request.
    assert replies.readline(20) == "4"
    assert [request() for _ in range(3)] == ["5", "6", "7"]
