"""TCP connections through a container NF survive kill + restore in a fresh netns.

The client keeps the very same socket across the failover. The NF's host disappears without a
FIN or RST (its link goes first, as when a host dies), and the standby restores the NF with
CRIU's TCP repair into a netns that has the same addresses.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hamgr.nfs import images
from shim.container import Container
from tests.integration.container_env import (
    CLIENT_IP,
    ContainerEnv,
    CounterServer,
    LineClient,
    tcp_connect,
    wait_port,
)

pytestmark = [
    pytest.mark.root,
    pytest.mark.usefixtures("container_stack"),
]


NF_PORT = 8000
BACKEND_PORT = 9001


@pytest.fixture
def env(tmp_path: Path) -> Iterator[ContainerEnv]:
    e = ContainerEnv.open("t", tmp_path)
    try:
        yield e
    finally:
        e.close()


def _fail_over(env: ContainerEnv, primary: Container, epoch: int) -> Container:
    primary.freeze()
    try:
        image = primary.checkpoint(epoch, env.images / f"e{epoch}")
    finally:
        primary.thaw()
    env.topo.unplug_nf()
    primary.kill()
    # The standby's netns gets its link only once the NF is back, as the data plane attaches
    # the ports only after a restore: earlier, a retransmission would meet no socket and a RST.
    env.topo.next_nf(up=False)
    restored = env.restore(image.path, name=f"{primary.name}-r")
    env.topo.plug_nf()
    return restored


def _exchange(client: LineClient, first: int, count: int) -> None:
    for n in range(first, first + count):
        assert client.request(f"req-{n}") == (n, f"req-{n}")


def test_tcpnf_connection_survives_restore(env: ContainerEnv) -> None:
    image = images.build_image("tcpnf")
    primary = env.start(env.spec("tcp", image, ("/usr/local/bin/tcpnf", "--listen", str(NF_PORT))))
    wait_port(primary.pid, NF_PORT, "tcp")
    sock = tcp_connect(env.topo.client, NF_PORT)
    env.track(sock.close)
    client = LineClient(sock)
    _exchange(client, 1, 5)

    restored = _fail_over(env, primary, 1)

    # Same socket, counter continues with no gap and no repeat.
    _exchange(client, 6, 5)
    assert not restored.exited()


def test_socat_relay_keeps_both_connections(env: ContainerEnv) -> None:
    image = images.build_image("socat")
    backend = CounterServer.open(env.topo.client, BACKEND_PORT)
    env.track(backend.close)
    primary = env.start(
        env.spec(
            "socat",
            image,
            (
                "/usr/bin/socat",
                f"TCP-LISTEN:{NF_PORT},reuseaddr,fork",
                f"TCP:{CLIENT_IP}:{BACKEND_PORT}",
            ),
        )
    )
    wait_port(primary.pid, NF_PORT, "tcp")
    sock = tcp_connect(env.topo.client, NF_PORT)
    env.track(sock.close)
    client = LineClient(sock)
    _exchange(client, 1, 5)

    restored = _fail_over(env, primary, 1)

    # The backend's counter lives outside the NF; it continuing proves the relay's upstream
    # connection was restored too, not just re-dialled (a new connection would restart at 1).
    _exchange(client, 6, 5)
    assert not restored.exited()
