"""Named network namespaces and veth pairs that hamgr owns.

A unit's netns outlives the NF inside it: the container joins ``/run/netns/NAME`` instead of
creating its own, so CRIU can treat the netns as external and a restore can join a netns that
the standby prepared in advance. Everything goes through ``ip`` because it is always installed
and it creates the ``/run/netns`` bind mounts the same way every other tool expects.

Deletes are idempotent: cleanup paths call them after partial failures.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import ipaddress
import os
import re
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import attrs

NETNS_DIR = Path("/run/netns")
IP_TIMEOUT_S = 10.0
_NETNS_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_IFNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")


class NetnsError(Exception):
    """An ``ip`` command failed; the message names the command, its error and a fix."""


def _check_netns_name(name: str) -> str:
    if not _NETNS_NAME.match(name):
        raise NetnsError(
            f"bad netns name {name!r}: use 1-64 characters from [A-Za-z0-9_.-], "
            "starting with a letter or digit"
        )
    return name


def _check_ifname(name: str) -> str:
    if not _IFNAME.match(name):
        raise NetnsError(
            f"bad interface name {name!r}: the kernel allows at most 15 characters "
            "from [A-Za-z0-9_.-]"
        )
    return name


def _ip(*args: str, netns: str | None = None, ok_codes: tuple[int, ...] = (0,)) -> str:
    cmd = ["ip"]
    if netns is not None:
        # `ip -n` enters only the netns; it does not need the mount-namespace games of
        # `ip netns exec`, so nothing else about the caller changes.
        cmd += ["-n", netns]
    cmd += list(args)
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=IP_TIMEOUT_S, check=False
        )
    except FileNotFoundError as exc:
        raise NetnsError("`ip` not found: install iproute2 (apt-get install iproute2)") from exc
    except subprocess.TimeoutExpired as exc:
        raise NetnsError(
            f"`{' '.join(cmd)}` did not finish in {IP_TIMEOUT_S:.0f}s; the rtnl lock may be "
            "held by a stuck process (check `ps` for hung ip/runc/criu)"
        ) from exc
    if proc.returncode not in ok_codes:
        raise NetnsError(
            f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr.strip()}; "
            "hamgr needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN)"
        )
    return proc.stdout


def netns_path(name: str) -> Path:
    """The bind-mounted netns file that OCI configs and CRIU refer to."""
    return NETNS_DIR / _check_netns_name(name)


def netns_exists(name: str) -> bool:
    return netns_path(name).exists()


def netns_inode(name: str) -> int:
    """The inode CRIU calls the netns by (``--external net[INODE]:KEY``)."""
    return os.stat(netns_path(name)).st_ino


def create_netns(name: str, *, loopback_up: bool = True) -> Path:
    """Create a netns; fails if it exists, because two owners of one netns is a bug."""
    path = netns_path(name)
    if path.exists():
        raise NetnsError(
            f"netns {name} already exists; delete it first (delete_netns) or pick another name"
        )
    _ip("netns", "add", name)
    if loopback_up:
        _ip("link", "set", "lo", "up", netns=name)
    return path


def delete_netns(name: str) -> None:
    """Delete a netns and with it every interface inside it; a missing netns is fine."""
    if not netns_path(name).exists():
        return
    _ip("netns", "del", name)


def link_exists(ifname: str, netns: str | None = None) -> bool:
    out = _ip("-o", "link", "show", "dev", _check_ifname(ifname), netns=netns, ok_codes=(0, 1))
    return bool(out.strip())


def delete_link(ifname: str, netns: str | None = None) -> None:
    """Delete a link (for a veth, both ends go); a missing link or netns is fine."""
    if netns is not None and not netns_exists(netns):
        return
    if link_exists(ifname, netns):
        _ip("link", "del", "dev", ifname, netns=netns)


@attrs.frozen
class VethEnd:
    """One end of a veth pair, and the netns it lives in (None = the caller's own)."""

    ifname: str = attrs.field(validator=lambda _i, _a, v: _check_ifname(v))
    netns: str | None = None


@attrs.frozen
class VethPair:
    a: VethEnd
    b: VethEnd


def create_veth(a: VethEnd, b: VethEnd) -> VethPair:
    """Create a veth pair with each end already in its netns, both ends down."""
    args = ["link", "add", a.ifname, "type", "veth", "peer", "name", b.ifname]
    if b.netns is not None:
        args += ["netns", b.netns]
    _ip(*args, netns=a.netns)
    return VethPair(a, b)


def move_link(ifname: str, to_netns: str, from_netns: str | None = None) -> None:
    _ip("link", "set", "dev", _check_ifname(ifname), "netns", to_netns, netns=from_netns)


def add_address(ifname: str, cidr: str, netns: str | None = None) -> None:
    """Add an address; adding one that is already there is fine."""
    iface = ipaddress.ip_interface(cidr)
    current = _ip("-o", "addr", "show", "dev", _check_ifname(ifname), netns=netns)
    if f" {iface.with_prefixlen} " in current:
        return
    _ip("addr", "add", iface.with_prefixlen, "dev", ifname, netns=netns)


def set_up(ifname: str, netns: str | None = None) -> None:
    _ip("link", "set", "dev", _check_ifname(ifname), "up", netns=netns)


def set_down(ifname: str, netns: str | None = None) -> None:
    _ip("link", "set", "dev", _check_ifname(ifname), "down", netns=netns)


def add_route(dest: str, via: str, netns: str | None = None) -> None:
    _ip("route", "replace", str(ipaddress.ip_network(dest)), "via", via, netns=netns)


def mac_address(ifname: str, netns: str | None = None) -> str:
    out = _ip("-o", "link", "show", "dev", _check_ifname(ifname), netns=netns)
    match = re.search(r"link/ether ([0-9a-f:]{17})", out)
    if match is None:
        raise NetnsError(f"{ifname} has no Ethernet address (is it a veth?): {out.strip()}")
    return match.group(1)


def set_mac_address(ifname: str, mac: str, netns: str | None = None) -> None:
    """Give a link a fixed MAC, so a restored NF's peers need no new ARP entry."""
    _ip("link", "set", "dev", _check_ifname(ifname), "address", mac, netns=netns)


def disable_checksum_offload(ifname: str, netns: str | None = None) -> None:
    """Make a veth end compute full checksums itself.

    A veth hands checksum work to its peer (CHECKSUM_PARTIAL). When the peer is read by the data
    plane through AF_PACKET, the frame leaves the host with the checksum never filled in, and the
    NF's kernel drops it. Every veth whose traffic crosses the data plane needs this.
    """
    argv = ["ethtool", "-K", _check_ifname(ifname), "tx", "off"]
    if netns is not None:
        argv = ["ip", "netns", "exec", _check_netns_name(netns), *argv]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    if proc.returncode != 0:
        raise NetnsError(
            f"{' '.join(argv)} failed: {proc.stderr.strip()}; install ethtool (make setup)"
        )


_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_T = TypeVar("_T")


def run_in_netns(name: str, fn: Callable[[], _T]) -> _T:
    """Run `fn` on a short-lived thread that joined netns `name`; return its result.

    Sockets made by `fn` stay in that netns for their whole life, whichever thread uses them
    later, so traffic tools can open their sockets here and run anywhere.
    """
    result: list[_T] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            fd = os.open(netns_path(name), os.O_RDONLY)
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({name}): {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=body, name=f"netns-{name}")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def sysctl(netns: str, *settings: str) -> None:
    """Set `key=value` sysctls inside a netns (per-namespace ones such as net.ipv4.conf.*)."""
    argv = ["ip", "netns", "exec", _check_netns_name(netns), "sysctl", "-q", "-w", *settings]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    if proc.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")


# sock_diag (linux/sock_diag.h, linux/inet_diag.h): dump a netns's TCP sockets, destroy each.
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_SOCK_DESTROY = 21
_NLM_F_REQUEST, _NLM_F_ACK, _NLM_F_DUMP = 0x1, 0x4, 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_NLMSG_HDR = struct.Struct("=IHHII")
# inet_diag_req_v2: family, protocol, ext, pad, states, then the 48-byte inet_diag_sockid.
_DIAG_REQ = struct.Struct("=BBBxI48s")
_SOCKID_LEN = 48
_ALL_STATES = 0xFFFFFFFF


def _diag_request(kind: int, flags: int, seq: int, family: int, sockid: bytes) -> bytes:
    body = _DIAG_REQ.pack(family, socket.IPPROTO_TCP, 0, _ALL_STATES, sockid)
    return _NLMSG_HDR.pack(_NLMSG_HDR.size + len(body), kind, flags, seq, 0) + body


def _netlink_messages(data: bytes) -> Iterator[tuple[int, bytes]]:
    off = 0
    while off + _NLMSG_HDR.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSG_HDR.unpack_from(data, off)
        if length < _NLMSG_HDR.size:
            return
        yield kind, data[off + _NLMSG_HDR.size : off + length]
        off += (length + 3) & ~3


def _tcp_socket_ids(sock: socket.socket, family: int) -> list[bytes]:
    """The inet_diag_sockid of every TCP socket of `family` in the caller's netns."""
    sock.send(
        _diag_request(_SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST | _NLM_F_DUMP, 1, family, bytes(48))
    )
    ids: list[bytes] = []
    while True:
        for kind, payload in _netlink_messages(sock.recv(65536)):
            if kind == _NLMSG_DONE:
                return ids
            if kind == _NLMSG_ERROR:
                err = -struct.unpack_from("=i", payload)[0]
                if err == errno.EAFNOSUPPORT:  # no such family in this netns (IPv6 off)
                    return ids
                raise OSError(err, f"sock_diag dump: {os.strerror(err)}")
            if kind == _SOCK_DIAG_BY_FAMILY:
                # inet_diag_msg: family, state, timer, retrans, then the sockid.
                ids.append(payload[4 : 4 + _SOCKID_LEN])


def _destroy_tcp_sockets_here() -> int:
    destroyed = 0
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as sock:
        for family in (socket.AF_INET, socket.AF_INET6):
            for seq, sockid in enumerate(_tcp_socket_ids(sock, family), start=2):
                sock.send(
                    _diag_request(_SOCK_DESTROY, _NLM_F_REQUEST | _NLM_F_ACK, seq, family, sockid)
                )
                for kind, payload in _netlink_messages(sock.recv(65536)):
                    if kind != _NLMSG_ERROR:
                        continue
                    err = -struct.unpack_from("=i", payload)[0]
                    if err == errno.EOPNOTSUPP:
                        raise OSError(
                            err,
                            "SOCK_DESTROY is not supported; closing sockets needs a kernel with "
                            "CONFIG_INET_DIAG_DESTROY=y",
                        )
                    # ENOENT: it went away meanwhile; others (a TIME-WAIT entry) are left as
                    # `ss -K` leaves them.
                    destroyed += err == 0
    return destroyed


def destroy_tcp_sockets(netns: str) -> int:
    """Close every TCP socket left in a netns (the kernel's SOCK_DESTROY, as ``ss -K`` does);
    returns how many were closed.

    A killed process's connections linger in the netns (FIN-WAIT while their peer's answers are
    held), still bound to the addresses a restored copy of the process must reconnect from:
    CRIU's restore then fails with "Cannot assign requested address". Only for a netns whose
    every process is dead; the resets the kernel sends for them are the caller's to drop.
    Done over netlink from a thread in the netns: spawning ``ip netns exec ss -K`` cost 4-5 ms
    of a local failover's critical path.
    """
    try:
        return run_in_netns(_check_netns_name(netns), _destroy_tcp_sockets_here)
    except OSError as exc:
        raise NetnsError(f"closing the TCP sockets of netns {netns} failed: {exc}") from exc


_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1
_IFREQ_FLAGS = struct.Struct("16sH22x")  # struct ifreq: the name, then ifr_flags


def links_down(netns: str, *ifnames: str) -> None:
    """Take links of a netns down at once: SIOCSIFFLAGS from a thread in it, no process spawned
    (two ``ip link set down`` cost 5-20 ms between the first link and the last)."""

    def body() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for name in ifnames:
                req = _IFREQ_FLAGS.pack(_check_ifname(name).encode(), 0)
                flags = _IFREQ_FLAGS.unpack(fcntl.ioctl(sock, _SIOCGIFFLAGS, req))[1]
                down = _IFREQ_FLAGS.pack(name.encode(), flags & ~_IFF_UP)
                fcntl.ioctl(sock, _SIOCSIFFLAGS, down)

    try:
        run_in_netns(_check_netns_name(netns), body)
    except OSError as exc:
        raise NetnsError(
            f"taking {', '.join(ifnames)} down in netns {netns} failed: {exc}"
        ) from exc


def quiet_host_netns(netns: str) -> None:
    """No IPv6 chatter and no reverse-path filter in a netns whose traffic crosses the data plane.

    Router solicitations would be NF output held in epoch buffers like any other, and the testbed's
    sinks receive on one link traffic whose source is routed via another.
    """
    sysctl(
        netns,
        "net.ipv6.conf.all.disable_ipv6=1",
        "net.ipv6.conf.default.disable_ipv6=1",
        "net.ipv4.conf.all.rp_filter=0",
        "net.ipv4.conf.default.rp_filter=0",
    )


def add_static_neighbor(ip: str, mac: str, dev: str, netns: str | None = None) -> None:
    """A permanent neighbour entry: ARP replies would otherwise be NF output held in buffers."""
    _ip(
        "neigh",
        "replace",
        str(ipaddress.ip_address(ip)),
        "lladdr",
        mac,
        "dev",
        _check_ifname(dev),
        "nud",
        "permanent",
        netns=netns,
    )
