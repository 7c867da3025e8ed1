"""`destroy_tcp_sockets` and `links_down`: netns operations on a failover's or a kill's critical
path, done from a thread in the netns instead of a spawned `ip`/`ss`.

`destroy_tcp_sockets` closes the TCP sockets a dead process left in a netns, over netlink.

A local failover calls it between the NF's death and the restore: a connection the dead NF
left behind still holds the 4-tuple its restored copy must rebind (CRIU: "Cannot assign
requested address").
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim import netns

ADDR = "198.18.7.1"


def tcp_states(ns: str) -> list[str]:
    """The state column of every TCP socket in `ns` (hex, as in /proc/net/tcp)."""

    def read() -> list[str]:
        lines = Path("/proc/thread-self/net/tcp").read_text().splitlines()[1:]
        return [line.split()[3] for line in lines]

    return netns.run_in_netns(ns, read)


@pytest.fixture
def ns() -> Iterator[str]:
    name = f"hsk{os.getpid() % 100000}"
    netns.create_netns(name)
    try:
        netns.run_in_netns(name, lambda: None)
        netns.add_address("lo", f"{ADDR}/32", name)
        yield name
    finally:
        netns.delete_netns(name)


def lingering_connections(ns: str, n: int) -> list[socket.socket]:
    """`n` connections to a listener in `ns` whose client ends were closed with unsent data
    outstanding: the kernel keeps those client sockets (FIN-WAIT) after their fds are gone.
    Returns the server ends, which the caller keeps open so the FIN-WAITs last."""

    def make() -> list[socket.socket]:
        lst = socket.socket()
        lst.bind((ADDR, 0))
        lst.listen(n)
        servers = []
        for _ in range(n):
            c = socket.socket()
            c.connect(lst.getsockname())
            servers.append(lst.accept()[0])
            c.close()  # the server never reads nor closes: the client end lingers in FIN-WAIT-2
        lst.close()
        return servers

    return netns.run_in_netns(ns, make)


def test_every_tcp_socket_of_the_netns_is_closed(ns: str) -> None:
    kept = lingering_connections(ns, 3)
    try:
        before = tcp_states(ns)
        # 3 orphaned client ends (FIN-WAIT-1/2: 04/05) and the 3 server ends (CLOSE-WAIT: 08).
        assert len(before) == 6, before
        assert before.count("08") == 3, before
        assert set(before) <= {"04", "05", "08"}, before
        # Each destroyed end resets its peer, which may be gone before its own turn.
        assert 3 <= netns.destroy_tcp_sockets(ns) <= 6
        assert tcp_states(ns) == []
        # Nothing left: a second call closes nothing and does not fail.
        assert netns.destroy_tcp_sockets(ns) == 0
    finally:
        for s in kept:
            s.close()


def test_a_missing_netns_is_named_in_the_error() -> None:
    with pytest.raises(netns.NetnsError, match="hsk-none"):
        netns.destroy_tcp_sockets("hsk-none")


def test_links_down_takes_every_named_link_down_at_once(ns: str) -> None:
    a, b = f"{ns}a", f"{ns}b"
    netns.create_veth(netns.VethEnd(a, ns), netns.VethEnd(b, ns))
    netns.set_up(a, ns)
    netns.set_up(b, ns)

    def up(name: str) -> bool:
        out = subprocess.run(
            ["ip", "-n", ns, "-o", "link", "show", name], capture_output=True, text=True, check=True
        ).stdout
        return ",UP" in out or "<UP" in out

    assert (up(a), up(b)) == (True, True)
    netns.links_down(ns, a, b)
    assert (up(a), up(b)) == (False, False)
    with pytest.raises(netns.NetnsError, match="nolink"):
        netns.links_down(ns, "nolink")
