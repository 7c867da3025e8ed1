"""Remote roles of a host's agent: primary with a remote standby, standby, spare.

``python -m hamgr.agent.remote run --plan FILE`` runs one host's agent for these roles, inside
the host's netns (the fabric starts it under ``nsenter --net``): the roles come from a *plan*
file written by whoever builds the cluster (`hamgr.fabric`). The same class also runs inside
``hamgr agent run``, where ``hamgr protect`` sets the roles up (end of this docstring).

What the agent does, per role of a unit U:

- **primary**: builds the NF's netns and veth, adds the data plane's NF port and the unit
  (wire and egress are both the host's data link ``fab``), starts the NF, and runs the epoch
  engine (`hamgr.agent.primary.UnitRunner`) shipping each epoch to the standby's
  `ReplicationServer` over the management network (CURVE, the standby's public key from the
  plan). It probes the standby's data plane; when the standby is confirmed dead it re-protects U
  onto the first spare: a recovery cut, shipped in full, then the engine goes on there. Output
  is released at the standby (`remote_config`): each checkpoint carries the held output, the
  standby commits it and sends it from its own data plane once this primary's replication
  client confirms the commit, and its released answer only frees the buffers here.
  While the standby is lost and not replaced it tries again every `RECHECK_S` (spares, then the
  lost standby). A reply with a higher term (its re-protection refused with stale_term, or its
  engine fenced by a standby's reply) means it was deposed: the unit's ``on_fenced`` policy
  ("stop": held output discarded, NF stopped, unit removed; event ``fenced``).
- **standby**: holds U's store in this host's ReplicationServer, prepares U's NF netns (same IP,
  MAC, neighbours; the veth end on the host stays out of the data plane), probes the primary, and
  runs a `shim.failover.FailoverMachine` through `shim.remote_failover.RemoteFailover`. The
  steps are `StandbySteps` below. Before it restores anything, it claims the new term at U's
  spares (`StandbySteps.raise_term`); a refusal, or no spare answering, makes it stand down.
- **spare**: holds a store for U, so that U can be re-protected here.

Standbys and spares send the held output of each checkpoint they commit on the data link
(``xmit``, with the link's own source MAC, so the bridge does not learn the NF's MAC at a host
that does not run it).

**Lossless units** (``protection.lossless = true``, DESIGN.md I7; `hamgr.agent.lossless`): the
primary mirrors every input of the unit to the data link with the tag of (unit, its term), set
before its engine's first cut. A standby or spare keeps an input log of that tag on its data
link: made when the store records the term (the primary's hello, or a new primary's term claim),
trimmed at each commit to the checkpoint's ``cut_seq``. A takeover replays the log after the
restored image's cut into the unit, still paused, before the resume; a replay that fails leaves
the unit resumed without those inputs, with an alarm naming them (`fo.ReplayFailure.RESUME`).
The log is removed once the unit resumed. The re-protected unit mirrors at the new term, and
its new standby logs that.

Every host answers ``ping`` on its control endpoint (a zmq ROUTER on the management IP, CURVE);
that ping is the `Confirm` check of a suspect peer. ``failover`` requests (an operator's
`FailoverRequested`) and ``status`` go to the same endpoint.

The agent writes ``status.json`` (its PIDs, the data plane's, each NF's) whenever they change,
so the testbed can kill the host at once, and ``events.jsonl``: one JSON object per line with
``kind`` and ``mono_us`` (CLOCK_MONOTONIC), for benchmarks and tests.

**Inside the host's main agent** (`hamgr.agent.daemon`, docs/agent.md "Remote standby"). The
same class runs the remote roles of ``hamgr agent run``, built with the main agent's data plane,
container backend, peer links over `hamgr.control` (`hamgr.agent.peers.ControlLinks`) and a
`RoleHooks` that records every change in ``state.db``. Its plan then has no units: roles are
added and removed while it runs (`add_standby`, `add_primary`, `remove`), each change carried
out on the agent's loop thread (`call`), which owns the failover drivers. That agent's own
control server answers the peers' requests (``ping``, ``standby_add``, ``standby_remove``), so
this class serves no control endpoint of its own and asks no ``watch``: a standby is set up by
``standby_add`` before the primary's first ship.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import json
import logging
import os
import queue
import select
import shutil
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import attrs
import click
import zmq

from dpdk_vhost.client import DataPlaneClient, DataPlaneError
from dpdk_vhost.protocol import PeerDown, PeerUp, ProbeStats
from hamgr.agent.dataplane import OwnedDataPlane
from hamgr.agent.handoff import Answer, Fence, GiveUp, Handoff, HandoffDriver
from hamgr.agent.lossless import InputLogs, ReplayError, log_name, mirror_tag, replay_loss
from hamgr.agent.primary import Observed, UnitRunner, primary_config, take_over
from hamgr.agent.rejoin import Joined, Refused, Rejoin, RejoinDriver, spare_join_answer
from hamgr.agent.unitnet import NF_IFNAME, UnitNames, nf_container_spec
from hamgr.agent.unitnf import prepare_unit_images, restore_unit_nf, start_unit_nf
from hamgr.unitspec import UnitSpec, loads
from policies.detection import Dampening, DetectionPolicy, StandbyWatch, Verdict
from policies.placement import HostFacts
from policies.standby_loss import StandbyLossAction, StandbyLossPolicy
from shim import epoch as ep
from shim import failover as fo
from shim import netns
from shim.container import RestoreAbortedError, RuncBackend
from shim.engine import PrimaryEngine
from shim.local_failover import ProtectedNf, TermFile
from shim.remote_failover import RemoteFailover
from shim.replication import NackedError, ReplicationClient, ReplicationServer
from shim.store import Checkpoint, Store, link_copy

__all__ = [
    "Detached",
    "HostPlan",
    "Links",
    "PeerPlan",
    "PlanError",
    "RemoteAgent",
    "RoleHooks",
    "UnitPlan",
    "ping",
    "request",
]

log = logging.getLogger(__name__)

FABRIC_PORT = "fab"
SURVEY_PING_S = 0.05
ETH_P_ARP = 0x0806
# A term claim waits this long for each spare (in parallel), at most half the raise-term step's
# timeout; the claim link's kernel gives up on unacknowledged data soon after (TCP_MAXRT), so a
# claim held up by a partition is dropped instead of reaching the spare after the standby gave
# up on it.
CLAIM_TIMEOUT_S = 0.5
CLAIM_MAXRT_MS = 600
# How long closing a standby's steps waits for a copy restored ahead to be destroyed.
PRESTORE_CLOSE_S = 10.0
# The longest a restore ahead waits for its `not_before_us` (a bound against a bad clock).
PRESTORE_WAIT_MAX_S = 1.0
# The same bound on a primary's replication link: when a partition cuts it, what the kernel
# still holds of a transfer (up to a whole checkpoint) is dropped with the connection instead
# of reaching a standby that stood down after the partition heals. That standby would commit
# it and send its output, which this primary's recovery cut may already have released. A
# live standby acknowledges at the TCP level within milliseconds, however busy its agent is.
SHIP_MAXRT_MS = 2000
# How often a primary whose standby is lost and not replaced tries again (its spares, then the
# lost standby): when a link heals it re-protects, or learns the higher term and is fenced.
RECHECK_S = 1.0
# A change of roles handed to the loop thread (`RemoteAgent.call`) waits at most this long; the
# longest is a primary's first hello to its standby (5 s) plus a recovery cut's ship (20 s).
CALL_TIMEOUT_S = 60.0
# How long a peer whose host is up but whose agent does not answer (it restarts, or is busy)
# counts as alive for the main agent's check of a suspect peer (`RemoteAgent.confirm_peer`).
AGENT_GRACE_S = 15.0
# What a deposed primary may do (`UnitPlan.on_fenced`).
ON_FENCED = ("stop", "standby")

_T = TypeVar("_T")


@attrs.frozen
class PeerPlan:
    mgmt_ip: str
    control_port: int
    repl_port: int
    public_key: str

    @property
    def control(self) -> str:
        return f"tcp://{self.mgmt_ip}:{self.control_port}"

    @property
    def replication(self) -> str:
        return f"tcp://{self.mgmt_ip}:{self.repl_port}"


class PlanError(ValueError):
    """A plan this agent refuses to run; the message says why and what to use instead."""


class Links(Protocol):
    """Requests to peer agents: `PeerLinks` (a plan's agents), or
    `hamgr.agent.peers.ControlLinks` (the main agent's control channel)."""

    def request(self, peer: str, body: dict[str, Any], timeout_s: float) -> dict[str, Any] | None:
        """The reply (``{"error": ...}`` for a refusal), or None without one in `timeout_s`."""
        ...

    def ping(self, peer: str, timeout_s: float) -> bool: ...
    def close(self) -> None: ...


class RoleHooks:
    """What the host's main agent records of the remote roles (`hamgr.agent.daemon`).

    A plan's agent records nothing: every method here does nothing. They are called from the
    loop thread and from the failover steps' worker threads, and must not block for long.
    """

    def event(self, kind: str, fields: Mapping[str, Any]) -> None:
        """Every event, as written to ``events.jsonl``."""

    def restored(self, unit: str, term: int, nf: ProtectedNf) -> None:
        """A takeover restored `nf`, before it gets any traffic."""

    def destroyed(self, unit: str, nf: ProtectedNf) -> None:
        """A restored NF was destroyed (a takeover that failed, or a late restore)."""

    def attached(self, unit: str, term: int) -> None:
        """A takeover added the unit to this host's data plane."""

    def report(self, unit: str, report: fo.Report, record: Mapping[str, Any] | None) -> None:
        """A takeover's report; once FINISHED this host is the unit's primary at its term."""

    def add_standby(self, spec: UnitSpec, standby: str, term: int, spares: Sequence[str]) -> None:
        """Make `standby` the standby of `spec` at `term`, with the primary's `spares` (a
        re-protection in the main agent: its `standby_add`). A plan's agent has spares instead:
        refused."""
        raise RuntimeError(f"{standby} holds no store for {spec.name}: it is not a spare")

    def standby_changed(self, unit: str, standby: str, term: int) -> None:
        """The primary `unit` ships to `standby` now."""

    def fenced(self, unit: str, term: int | None, cause: str) -> None:
        """This primary was deposed: its NF is stopped and the unit left the data plane."""

    def became_spare(self, unit: str, primary: str, term: int) -> None:
        """The deposed primary keeps a spare's store of `unit`, whose primary is likely
        `primary` at `term` now (on_fenced = "standby"), after `fenced`."""

    def offering(self, unit: str, candidates: Sequence[str], term: int) -> None:
        """This host, deposed at `term`, offers itself as a spare of `unit` to `candidates`
        until one takes it (`offer_ended`): a restart resumes the offer (`add_spare`)."""

    def offer_ended(self, unit: str) -> None:
        """The offer `offering` recorded ended: taken, refused, or this host became the
        standby."""

    def spare_of(self, unit: str, primary: str, term: int) -> None:
        """This host, a deposed primary's spare of `unit`, learned its primary: `primary`."""

    def spare_joined(self, unit: str, spare: str, term: int) -> None:
        """`spare`, a deposed primary, is a spare of `unit`, whose primary this host is."""


@attrs.frozen
class Detached:
    """What `RemoteAgent.remove` took out of its roles, for the caller to stop and destroy."""

    unit: str
    runner: UnitRunner | None  # the primary's epoch loop, still running (its drain is the caller's)
    nfs: tuple[ProtectedNf, ...]  # the unit's NFs on this host: the primary's, restored ones
    store: Path | None  # the standby store's directory, no longer served
    # The peers the unit's roles probed: their probes stay until `forget_probes`, so that the
    # other side does not see this host go silent before it dropped its own role.
    peers: tuple[str, ...] = ()


def _check_spec(_inst: object, _attr: object, value: str) -> None:
    if loads(value).protection.on_standby_loss == StandbyLossAction.RUN_UNPROTECTED.value:
        raise PlanError(
            'on_standby_loss = "run-unprotected" is refused with a remote standby: a primary '
            "cannot tell a dead standby from a partitioned one, and a partitioned standby takes "
            "the unit over (with a spare's grant) while this primary would release output no "
            'standby committed: duplicates at the sink. Use "stall" (docs/failover.md, '
            '"Partitions").'
        )


def _check_on_fenced(_inst: object, _attr: object, value: str) -> None:
    if value not in ON_FENCED:
        raise PlanError(
            f"on_fenced must be one of {', '.join(map(repr, ON_FENCED))}, not {value!r}"
        )


@attrs.frozen
class UnitPlan:
    spec: str = attrs.field(validator=_check_spec)  # the unit spec, TOML
    role: str  # primary | standby | spare
    primary: str = ""
    standby: str = ""
    spares: tuple[str, ...] = attrs.field(default=())
    # What a primary does once it learns of a higher term (it was deposed): "stop" discards its
    # held output, stops the NF and removes the unit from its data plane; "standby" does the
    # same, then keeps an empty store of the unit and offers itself to the new primary as a
    # spare (`hamgr.agent.rejoin`), so that its next re-protection may choose this host. The
    # policy of the host a role is on: a standby that takes the unit over keeps it.
    on_fenced: str = attrs.field(default="stop", validator=_check_on_fenced)


@attrs.frozen
class HostPlan:
    host: str
    work: Path = attrs.field(converter=Path)
    runtime: Path = attrs.field(converter=Path)
    data_iface: str
    mgmt_ip: str
    control_port: int
    repl_port: int
    public_key: str
    secret_key: str
    peers: dict[str, PeerPlan]
    units: tuple[UnitPlan, ...]
    cpu: int = 1
    probe_interval_us: int = 1000
    probe_miss: int = 3
    # The agent's own check of a suspect peer (`RemoteAgent.confirm_peer`): its agent's answer
    # or its kernel's to a TCP connection attempt. A dead host never answers (its link is
    # down, no RST comes), so the window is paid on every real failure. It need only cover
    # the kernel's handshake, not a busy Python agent's answer: over ~9,000 handshakes from B
    # to A's agent port during 12 remote bench runs, p50 0.045 ms, p99 0.9, max 5.0 ms.
    confirm_window_us: int = 10_000

    @staticmethod
    def load(path: Path) -> HostPlan:
        data = json.loads(path.read_text())
        data["peers"] = {k: PeerPlan(**v) for k, v in data["peers"].items()}
        data["units"] = tuple(
            UnitPlan(**{**u, "spares": tuple(u["spares"])}) for u in data["units"]
        )
        return HostPlan(**data)

    def dump(self, path: Path) -> None:
        data = attrs.asdict(self, recurse=True)
        data["work"], data["runtime"] = str(self.work), str(self.runtime)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)


def _now_us() -> int:
    return time.monotonic_ns() // 1000


# --- the control endpoint: ping (the Confirm check), failover, status -----------------------


class ControlEndpoint:
    """A ROUTER on the management IP answering JSON requests from peer agents (CURVE)."""

    def __init__(self, endpoint: str, secret_key: bytes, handler: Any) -> None:
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.CURVE_SERVER, 1)
        self._sock.setsockopt(zmq.CURVE_SECRETKEY, secret_key)
        self._sock.bind(endpoint)
        self._handler = handler
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="remote-control", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(50):
                continue
            frames = self._sock.recv_multipart()
            try:
                reply = self._handler(json.loads(frames[-1]))
            except Exception as exc:
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            self._sock.send_multipart([frames[0], b"", json.dumps(reply).encode()])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()
        self._ctx.term()


class PeerLinks:
    """One DEALER per peer, connected once (the CURVE handshake is not on the confirm path)."""

    def __init__(self, peers: dict[str, PeerPlan], public: bytes, secret: bytes) -> None:
        self._ctx = zmq.Context()
        self._socks: dict[str, zmq.Socket[bytes]] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._seq = 0
        for name, p in peers.items():
            s = self._ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.CURVE_SERVERKEY, p.public_key.encode())
            s.setsockopt(zmq.CURVE_PUBLICKEY, public)
            s.setsockopt(zmq.CURVE_SECRETKEY, secret)
            s.connect(p.control)
            self._socks[name] = s
            self._locks[name] = threading.Lock()

    def request(self, peer: str, body: dict[str, Any], timeout_s: float) -> dict[str, Any] | None:
        with self._locks[peer]:
            self._seq += 1
            seq = self._seq
            sock = self._socks[peer]
            # DEALER has no REQ lock-step: send even if an earlier reply never came.
            try:
                sock.send_multipart([b"", json.dumps({**body, "seq": seq}).encode()], zmq.NOBLOCK)
            except zmq.Again:
                return None
            deadline = time.monotonic() + timeout_s
            while (left := deadline - time.monotonic()) > 0:
                if not sock.poll(max(1, int(left * 1000))):
                    continue
                frames = sock.recv_multipart()
                reply: dict[str, Any] = json.loads(frames[-1])
                if reply.get("seq") == seq:
                    return reply
            return None

    def ping(self, peer: str, timeout_s: float) -> bool:
        reply = self.request(peer, {"type": "ping"}, timeout_s)
        return reply is not None and "error" not in reply

    def close(self) -> None:
        for s in self._socks.values():
            s.close()
        self._ctx.term()


def agent_check_verdict(
    answered: bool, host: str, since: float | None, now: float, grace_s: float
) -> tuple[bool, float | None]:
    """Whether a suspect peer is alive, from its agent's answer and a connection attempt to
    its agent's port (`TcpProbe`); returns (alive, since when its host has been up with its
    agent silent, None once the agent answered). `RemoteAgent.confirm_peer` says why."""
    if answered:
        return True, None
    if host == "silent":
        return False, since
    since = now if since is None else since
    return now - since <= grace_s, since


class TcpProbe:
    """A connection attempt to a peer's agent port, started now and judged later: "open"
    (something listens), "refused" (a reset: the host is up, nothing listens), or "silent"
    (no answer yet: a dead host, a cut link, or a kernel too busy to answer in time)."""

    def __init__(self, ip: str, port: int) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        self._error = self._sock.connect_ex((ip, port))

    def result(self, wait_s: float = 0.0) -> str:
        try:
            if self._error == errno.ECONNREFUSED:
                return "refused"
            if self._error not in (0, errno.EINPROGRESS):
                return "silent"
            _r, writable, _x = select.select([], [self._sock], [], max(0.0, wait_s))
            if not writable:
                return "silent"
            error = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error == 0:
                return "open"
            return "refused" if error == errno.ECONNREFUSED else "silent"
        finally:
            self._sock.close()


def ping(endpoint: str, server_key: str, timeout_s: float = 1.0) -> dict[str, Any] | None:
    """One request to an agent's control endpoint (tests, benchmarks)."""
    mgmt_ip, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    links = PeerLinks({"x": PeerPlan(mgmt_ip, int(port), 0, server_key)}, *zmq.curve_keypair())
    try:
        return links.request("x", {"type": "ping"}, timeout_s)
    finally:
        links.close()


def request(
    endpoint: str, server_key: str, body: dict[str, Any], timeout_s: float = 1.0
) -> dict[str, Any] | None:
    mgmt_ip, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    links = PeerLinks({"x": PeerPlan(mgmt_ip, int(port), 0, server_key)}, *zmq.curve_keypair())
    try:
        return links.request("x", body, timeout_s)
    finally:
        links.close()


# --- unit networking ------------------------------------------------------------------------


def prepare_nf_netns(spec: UnitSpec, names: UnitNames) -> None:
    """The NF's netns and veth (address, MAC, static neighbours), its host end not attached."""
    ns = names.nf_netns
    netns.create_netns(ns)
    netns.quiet_host_netns(ns)
    netns.create_veth(netns.VethEnd(names.host_veth), netns.VethEnd(NF_IFNAME, ns))
    netns.set_mac_address(NF_IFNAME, spec.nf.mac, ns)
    netns.disable_checksum_offload(NF_IFNAME, ns)
    netns.disable_checksum_offload(names.host_veth)
    netns.add_address(NF_IFNAME, spec.nf.address, ns)
    netns.set_up(NF_IFNAME, ns)
    netns.set_up(names.host_veth)
    for ip, mac in spec.nf.neighbors.items():
        netns.add_static_neighbor(ip, mac, NF_IFNAME, ns)


def nf_image(spec: UnitSpec) -> Path:
    """The NF's image on this host: a built-in one is built here, a path must exist here."""
    if spec.nf.builtin:
        from hamgr.nfs import images

        return images.build_image(spec.nf.image)
    path = Path(spec.nf.image)
    if not path.exists():
        raise FileNotFoundError(f"nf.image: {path} does not exist on this host")
    return path


def attach_unit(
    dp: DataPlaneClient,
    spec: UnitSpec,
    names: UnitNames,
    *,
    term: int,
    paused: bool,
    mode: str = "ha",
) -> None:
    """The NF port joins the data plane and the unit is added (wire = egress = the data link).

    `paused`: the unit is born with ingress paused, so that no input reaches the NF before a
    lossless replay (which must come first, in order) or the resume.
    """
    if names.nf_port not in dp.stats().ports:
        dp.add_af_packet_port(names.nf_port, names.host_veth)
    dp.add_unit(
        spec.name,
        wire=[FABRIC_PORT],
        nf=names.nf_port,
        egress=FABRIC_PORT,
        mode=mode,
        k=spec.protection.max_inflight,
        budget_bytes=spec.protection.memory_budget_bytes,
        term=term,
        epoch=1,
        paused=True if paused else None,
    )


def gratuitous_arp_frame(mac: str, ip: str) -> bytes:
    """A gratuitous ARP reply from `mac`: the fabric's bridge learns where `mac` lives now."""
    hw = bytes.fromhex(mac.replace(":", ""))
    addr = socket.inet_aton(ip.split("/", maxsplit=1)[0])
    frame = (
        b"\xff" * 6
        + hw
        + struct.pack("!H", ETH_P_ARP)
        + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 2)
        + hw
        + addr
        + b"\xff" * 6
        + addr
    )
    return frame.ljust(60, b"\0")


class Announcer:
    """Sends gratuitous ARPs on one interface through a packet socket opened once (`open`, when
    a standby is prepared) and kept: closing a packet socket waits for an RCU grace period
    (``synchronize_net``, 7.7-12.9 ms measured here), which a takeover must not wait for."""

    def __init__(self, iface: str) -> None:
        self.iface = iface
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def open(self) -> None:
        with self._lock:
            if self._sock is None:
                sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
                try:
                    sock.bind((self.iface, 0))
                except OSError:
                    sock.close()
                    raise
                self._sock = sock

    def announce(self, mac: str, ip: str) -> None:
        self.open()
        assert self._sock is not None
        self._sock.send(gratuitous_arp_frame(mac, ip))

    def close(self) -> None:
        with self._lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


def remote_config(spec: UnitSpec) -> ep.PrimaryConfig:
    """The unit's epoch configuration with a remote standby: output is released at the standby.

    A primary that releases its own output after the standby's ack takes the output of every
    epoch the standby committed but it had not yet released with it when its host dies, and the
    restored unit continues after that output: a gap at the sink. Released by the standby (on
    this primary's confirm of its commit, or at its own promotion), that output is out before
    anyone could restore past it (docs/failover.md).
    """
    return attrs.evolve(primary_config(spec), release_at=ep.ReleasePoint.STANDBY)


# --- the unprotected window after a takeover -------------------------------------------------

SEEDING_CAUSE = "re-protection target has no image yet"


def unprotected_machine(
    unit: str, term: int, config: ep.PrimaryConfig, now_us: int
) -> tuple[ep.PrimaryMachine, ep.Alarm]:
    """A new primary's epoch machine born with its standby lost, running unprotected.

    After a takeover no standby holds any image of the unit, so holding output adds no
    consistency (docs/failover.md). The machine gets the RUN_UNPROTECTED policy for this one
    `StandbyLost` and commands ``SetOutputCommit(False)``; the unit is attached in plain mode, so
    the command only confirms it. `seed` turns output commit back on. Returns the machine and
    its alarm (the reason the unit is unprotected). `config` is the unit's own configuration.
    """
    born = attrs.evolve(config, standby_loss=StandbyLossPolicy(StandbyLossAction.RUN_UNPROTECTED))
    machine = ep.PrimaryMachine(unit, term, born, first_epoch=1, now_us=now_us)
    commands = machine.handle(ep.StandbyLost(SEEDING_CAUSE))
    alarms = [c for c in commands if isinstance(c, ep.Alarm)]
    if ep.SetOutputCommit(False) not in commands or len(alarms) != 1:
        raise RuntimeError(f"unit {unit}: unexpected commands for an unseeded standby: {commands}")
    return machine, alarms[0]


def seed(machine: ep.PrimaryMachine, config: ep.PrimaryConfig, now_us: int) -> list[ep.Command]:
    """The new standby answers: `StandbyBack`, then the unit's own standby-loss policy again.

    The machine commands ``SetOutputCommit(True)`` and, as it holds nothing, ships nothing yet:
    its first cut is shipped as a full image (no ship base), and that ack is the first commit.
    """
    commands = machine.handle(ep.Tick(now_us))
    commands += machine.handle(ep.StandbyBack())
    machine.config = config
    return commands


def set_mode_retrying(dp: DataPlaneClient, unit: str, mode: str, timeout_s: float = 0.5) -> None:
    """``set_mode``, retried while the data plane has output in flight (``busy``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            dp.set_mode(unit, mode)
            return
        except DataPlaneError as exc:
            if "busy" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.001)


# --- roles ----------------------------------------------------------------------------------


@attrs.define
class PrimaryRole:
    spec: UnitSpec
    names: UnitNames
    nf: ProtectedNf  # one container, or a chain
    term: int
    standby: str
    spares: list[str]
    runner: UnitRunner | None = None
    # "unprotected" while no standby holds an image (after a takeover, until the new standby's
    # first ack); "protected" after.
    protection: str = "protected"
    # The standby confirmed lost and not replaced yet: RECHECK_S retries its re-protection.
    lost_standby: str | None = None
    on_fenced: str = "stop"
    # The NF died (its pidfd): the standby is asked to take the unit over (`_nf_died`), and no
    # re-protection or recovery runs on the dead NF meanwhile. `handoff` is what status shows.
    nf_died: bool = False
    handoff: dict[str, Any] | None = None


def _drained(q: queue.SimpleQueue[_T]) -> Iterator[_T]:
    """What `q` holds now, without waiting."""
    while True:
        try:
            yield q.get_nowait()
        except queue.Empty:
            return


class RemoteAgent:
    """One host's agent for remote roles (module doc).

    Alone (``python -m hamgr.agent.remote run``) it starts its own data plane and serves its own
    control endpoint, and its roles come from the plan. Given `dp` (the main agent's data plane),
    it is part of ``hamgr agent run``: `links`, `hooks` and `allowed_clients` (the keys its
    replication server admits) then come from that agent, and roles come and go at run time.
    """

    def __init__(
        self,
        plan: HostPlan,
        *,
        dp: OwnedDataPlane | None = None,
        backend: RuncBackend | None = None,
        links: Links | None = None,
        hooks: RoleHooks | None = None,
        allowed_clients: Callable[[], frozenset[bytes]] | None = None,
    ) -> None:
        self.plan = plan
        self.host = plan.host
        self.embedded = dp is not None
        plan.work.mkdir(parents=True, exist_ok=True)
        plan.runtime.mkdir(parents=True, exist_ok=True)
        self.public = plan.public_key.encode()
        self.secret = plan.secret_key.encode()
        self.backend = backend or RuncBackend(
            state_dir=plan.work / "containers", network_lock="skip"
        )
        self.hooks = hooks or RoleHooks()
        self._allowed = allowed_clients
        self.events_path = plan.work / "events.jsonl"
        self._events = self.events_path.open("a", buffering=1)
        self._lock = threading.Lock()
        self.dp: OwnedDataPlane | None = dp
        self.server: ReplicationServer | None = None
        self.stores: dict[str, Store] = {}
        self.specs: dict[str, UnitSpec] = {loads(u.spec).name: loads(u.spec) for u in plan.units}
        self.primaries: dict[str, PrimaryRole] = {}
        # Units this host is a spare of (a store only, inside the main agent): their primary
        # and the term it asked at.
        self.spare_of: dict[str, tuple[str, int]] = {}
        self.drivers: dict[str, RemoteFailover] = {}
        self.steps: dict[str, StandbySteps] = {}
        self.requests: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self.links: Links = links or PeerLinks(plan.peers, self.public, self.secret)
        # Lossless units this host keeps a store for (standby or spare), and their input logs.
        self.lossless: set[str] = set()
        self.inputs = InputLogs(self.dp_client, FABRIC_PORT)
        self.control: ControlEndpoint | None = None
        self._stop = threading.Event()
        self._watching: dict[str, str] = {}  # peer -> unit whose standby it is (primary side)
        self.detection = DetectionPolicy(
            interval_us=plan.probe_interval_us,
            misses=plan.probe_miss,
            confirm_window_us=plan.confirm_window_us,
            # Disputes lengthen the window to twice the configured one at most: a kernel that
            # answers twice as late as the window allows still counts (docs/failover.md).
            dampen_max_us=2 * plan.confirm_window_us,
        )
        # Disputed verdicts on each standby (primary side), which lengthen the next check.
        # Each standby's watch (`policies.detection.StandbyWatch`), and the silence being judged.
        self._standby_watch: dict[str, StandbyWatch] = {}
        self._standby_silence: dict[str, PeerDown] = {}
        # Units whose epoch machine a standby fenced (from the runners' threads).
        self._fenced: queue.SimpleQueue[str] = queue.SimpleQueue()
        # Units whose NF died, handed to their standby (`_nf_died`), and how each ended.
        self._handoffs: dict[str, HandoffDriver] = {}
        self._handed: queue.SimpleQueue[tuple[str, Fence | GiveUp]] = queue.SimpleQueue()
        # Deposed primaries' offers to be a spare of the new primary (on_fenced = "standby"),
        # and how each ended (`_become_spare`).
        self._rejoins: dict[str, RejoinDriver] = {}
        self._rejoined: queue.SimpleQueue[tuple[str, Joined | Refused]] = queue.SimpleQueue()
        # The plan's on_fenced per unit: a primary this host becomes by a takeover keeps it.
        self._on_fenced = {loads(u.spec).name: u.on_fenced for u in plan.units}
        self._recheck_at = 0.0
        # Peers whose probes arrived at least once: silence from a peer that never spoke is
        # a peer still starting, not a failure.
        self._seen: set[str] = set()
        # Role changes handed to the loop thread (`call`), and that thread once it runs.
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any]]]
        self._calls = queue.SimpleQueue()
        self._loop: threading.Thread | None = None
        # Peers whose host is up but whose agent did not answer: since when (`confirm_peer`).
        self._agent_silent_since: dict[str, float] = {}
        self.announcer = Announcer(plan.data_iface)

    # -- bookkeeping for the testbed -----------------------------------------------------

    def event(self, kind: str, **fields: Any) -> None:
        line = json.dumps({"kind": kind, "host": self.host, "mono_us": _now_us(), **fields})
        with self._lock:
            self._events.write(line + "\n")
        try:
            self.hooks.event(kind, fields)
        except Exception:
            log.exception("the event hook failed for %s", kind)

    def write_status(self, ready: bool = True) -> None:
        nfs = {u: r.nf.pid for u, r in list(self.primaries.items())}
        for u, s in list(self.steps.items()):
            nfs.update({f"{u}-t{t}": c.pid for t, c in list(s.restored.items())})
        status = {
            "host": self.host,
            "agent_pid": os.getpid(),
            "dp_pid": self.dp.pid if self.dp else None,
            "dp_prefix": self.dp.row.file_prefix if self.dp else None,
            "nf_pids": nfs,
            "ready": ready,
        }
        with self._lock:
            tmp = self.plan.work / ".status.json"
            tmp.write_text(json.dumps(status))
            tmp.replace(self.plan.work / "status.json")

    def dp_client(self) -> DataPlaneClient:
        assert self.dp is not None
        return self.dp.client()

    def _emit_output(self, unit: str, path: Path) -> None:
        """Release at the standby: send a committed epoch's held output on the data link.

        Called by the replication server's thread (and by a promotion); a connection of its
        own, so it never interleaves with another thread's requests.
        """
        with self.dp_client() as dp:
            sent = dp.xmit(FABRIC_PORT, str(path))
        log.debug("unit %s: released %d frames of epoch %d", unit, sent.sent, sent.epoch)

    def _on_term(self, unit: str, term: int) -> None:
        """The store recorded a higher term: a lossless unit's log now takes that term's mirror
        (the replication server's thread, before its reply, so it exists before the mirror)."""
        if unit in self.lossless and self.inputs.ensure(unit, term):
            self.event("input_log", unit=unit, term=term, tag=mirror_tag(unit, term))

    def _on_commit(self, unit: str, checkpoint: Checkpoint) -> None:
        """A commit: the log keeps only the inputs after the checkpoint's cut."""
        if unit in self.lossless:
            self.inputs.trim(unit, checkpoint)

    # -- start ---------------------------------------------------------------------------

    def start(self) -> None:
        """Plan mode: the data plane, stores, control endpoint, then the plan's roles.

        Inside the main agent: the data link joins its data plane (once: an adopted data plane
        has it already) and the replication server starts with no unit; roles come later.
        """
        plan = self.plan
        if self.dp is None:
            self.dp = OwnedDataPlane.start(
                host=self.host, work=plan.work / "dataplane", cpu=plan.cpu
            )
        self.write_status(ready=False)
        with self.dp_client() as dp:
            if FABRIC_PORT not in dp.stats().ports:
                dp.add_af_packet_port(FABRIC_PORT, plan.data_iface)
        stores: dict[str, Store] = {}
        for u in plan.units:
            if u.role in ("standby", "spare"):
                spec = loads(u.spec)
                stores[spec.name] = Store(plan.runtime / "standby" / spec.name)
                if spec.protection.lossless:
                    self.lossless.add(spec.name)
                    self.inputs.shadow(spec.name, spec.nf.mac)
        # A deposed primary with on_fenced = "standby" keeps a store then (`_become_spare`).
        if stores or self.embedded or "standby" in self._on_fenced.values():
            self.stores = stores
            allowed: Callable[[], frozenset[bytes]] | list[bytes] = (
                self._allowed
                if self._allowed is not None
                else [p.public_key.encode() for p in plan.peers.values()]
            )
            self.server = ReplicationServer(
                f"tcp://{plan.mgmt_ip}:{plan.repl_port}",
                stores,
                secret_key=self.secret,
                allowed_clients=allowed,
                emit=self._emit_output,
                on_term=self._on_term,
                on_commit=self._on_commit,
            )
            self.server.start()
        if not self.embedded:
            self.control = ControlEndpoint(
                f"tcp://{plan.mgmt_ip}:{plan.control_port}", self.secret, self._handle
            )
        for u in plan.units:
            spec = loads(u.spec)
            if u.role == "standby":
                self._start_standby(spec, u.primary, 1, list(u.spares))
        for u in plan.units:
            spec = loads(u.spec)
            if u.role == "primary":
                self._start_primary(spec, u)
        self.write_status()
        self.event("ready", pid=os.getpid())

    def _start_standby(self, spec: UnitSpec, primary: str, term: int, spares: list[str]) -> None:
        if spec.protection.lossless:
            # The primary's hello records its term here too; a restarted standby whose store
            # already holds it gets no new one.
            self._on_term(spec.name, max(term, self.stores[spec.name].term))
        # Busy, whoever set it up: the primary seeds this standby with a full image and its
        # first cuts now (at protection, at a re-protection, or re-ships after a restart), and
        # B's checks of A ran late then (loaded bench and e2e runs saw B take a live A over in
        # that warm-up).
        self._watch(spec, primary, term, spares, busy=True)

    def _watch_request(self, req: dict[str, Any]) -> None:
        """A primary made this host its standby (re-protection): watch it from now on.

        Without this, the spare that a re-protection chose would hold the unit's checkpoints
        but take nothing over, and a second failure in a row would end the unit. Runs on the
        agent's loop, which owns the failover drivers.
        """
        unit, primary = str(req.get("unit")), str(req.get("primary"))
        spec = self.specs.get(unit)
        if spec is None or unit not in self.stores or primary not in self.plan.peers:
            self.event("watch_refused", unit=unit, primary=primary)
            return
        driver = self.drivers.get(unit)
        if driver is not None and driver.machine.peer == primary:
            return  # already its standby (the plan said so, or a repeated request)
        if unit in self.primaries:
            self.event("watch_refused", unit=unit, primary=primary, reason="primary here")
            return
        spares = [str(x) for x in req.get("spares", []) if str(x) in self.plan.peers]
        self._end_rejoin(unit)
        self._watch(spec, primary, int(req["term"]), spares, busy=True)
        self.event("watching", unit=unit, primary=primary, term=int(req["term"]), spares=spares)

    def prepare_standby(self, spec: UnitSpec) -> None:
        """What a takeover of `spec` needs ready on this host: the NF's netns (same IP, MAC,
        neighbours), its rootfs unpacked, its port in the data plane. Idempotent; it touches no
        role, so the main agent calls it off the loop thread (it takes hundreds of ms)."""
        names = UnitNames(self.host, spec.name)
        if not netns.netns_exists(names.nf_netns):
            prepare_nf_netns(spec, names)
        # The image's rootfs is unpacked now, not by the takeover's restore (~35 ms), and so is
        # the backend's one-time work (CRIU's version check, runc's base spec: ~16 ms).
        prepare_unit_images(self.backend, spec, nf_container_spec(spec, names, nf_image(spec)))
        self.backend.warm_up()
        self.announcer.open()
        with self.dp_client() as dp:
            # The NF port joins the data plane now, not at the takeover: an af_packet hotplug
            # costs tens of milliseconds. Until a unit owns it, the data plane drains it (it
            # carries nothing: the prepared netns is silent).
            if names.nf_port not in dp.stats().ports:
                dp.add_af_packet_port(names.nf_port, names.host_veth)

    def _watch(
        self, spec: UnitSpec, primary: str, term: int, spares: list[str], *, busy: bool = False
    ) -> None:
        """Prepare `spec`'s NF netns, probe `primary`, and run a failover machine for it.

        `busy`: the primary has just chosen this host (it is seeding it with a full image, and
        may have just taken the unit over): its probes and its agent's answers run late then, so
        detection starts dampened by two doublings, which decay in 20 s."""
        names = UnitNames(self.host, spec.name)
        self.prepare_standby(spec)
        with self.dp_client() as dp:
            with contextlib.suppress(DataPlaneError):  # a probe left from an earlier role
                dp.remove_probe(primary)
            dp.add_probe(
                primary,
                FABRIC_PORT,
                interval_us=self.plan.probe_interval_us,
                miss=self.plan.probe_miss,
                term=term,
            )
        lossless = spec.protection.lossless
        config = fo.FailoverConfig(
            detection=self.detection,
            lossless=lossless,
            # A log that cannot replay (a gap, an overflow, a trim past the cut) costs the
            # inputs after the cut, as without lossless mode; the unit had better be up.
            replay_failure=fo.ReplayFailure.RESUME,
            prestore=spec.protection.prestore,
        )
        claim_s = min(CLAIM_TIMEOUT_S, config.timeouts.raise_term_us / 2e6)
        steps = StandbySteps(self, spec, names, spares, claim_timeout_s=claim_s, primary=primary)
        now = _now_us()
        machine = fo.FailoverMachine(
            spec.name,
            term,
            config,
            peer=primary,
            now_us=now,
            dampening=Dampening(level=2, at_us=now) if busy else None,
        )
        old = self.steps.get(spec.name)
        if old is not None:  # an earlier watch of this unit (a repeated request): its links go
            old.close()
        self.steps[spec.name] = steps
        self.drivers[spec.name] = RemoteFailover(machine, steps, on_report=self._on_report)

    def _start_primary(self, spec: UnitSpec, u: UnitPlan) -> None:
        names = UnitNames(self.host, spec.name)
        prepare_nf_netns(spec, names)
        with self.dp_client() as dp:
            attach_unit(dp, spec, names, term=1, paused=False)
        nf = start_unit_nf(self.backend, spec, nf_container_spec(spec, names, nf_image(spec)))
        role = PrimaryRole(spec, names, nf, 1, u.standby, list(u.spares), on_fenced=u.on_fenced)
        self.primaries[spec.name] = role
        self.write_status(ready=False)
        self.protect(role, u.standby, first=True)

    # -- roles at run time (the main agent) ----------------------------------------------

    def start_loop(self) -> None:
        """Run `run` on a thread of its own (the main agent's); `close` stops it."""
        if self._loop is not None:
            raise RuntimeError("the loop runs already")
        self._loop = threading.Thread(target=self._run_loop, name="hamgr-remote", daemon=True)
        self._loop.start()

    def _run_loop(self) -> None:
        try:
            self.run()
        except Exception:
            log.exception("the remote roles' loop failed")
            raise

    def loop_alive(self) -> bool:
        return self._loop is not None and self._loop.is_alive()

    def call(self, fn: Callable[[], _T], timeout: float = CALL_TIMEOUT_S) -> _T:
        """`fn()` on the loop thread, which owns the roles; in place while no loop runs."""
        loop = self._loop
        if loop is None or threading.current_thread() is loop or not loop.is_alive():
            return fn()
        future: concurrent.futures.Future[_T] = concurrent.futures.Future()
        self._calls.put((fn, future))
        return future.result(timeout)

    def _run_calls(self) -> None:
        while True:
            try:
                fn, future = self._calls.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

    def confirm_peer(self, peer: str, timeout_s: float) -> bool:
        """The agent's own check of a suspect peer: True if it is alive.

        Its agent answers a ping within `timeout_s`: alive. A peer whose host is up but
        whose agent does not answer also counts as alive, for
        `AGENT_GRACE_S` from the first such check until its agent answers again: the host's
        kernel refuses a connection to the agent's port (a TCP reset: nothing listens, the
        agent restarts) or accepts it (the agent listens but is busy: adopting its units, a
        recovery cut). An agent that restarts (``hamgr down``/``up``, systemd) leaves its data
        plane and NFs running, and its probes' flaps on a busy host must not turn the restart
        into a takeover; an agent that stays silent past the grace is as good as dead. A dead
        host or a cut link neither refuses nor accepts: no answer at all, and no grace. The
        connection attempt runs alongside the ping, within the same window. A plan's agent
        checks the same way: on a loaded host its agent, busy with a cut, missed the window
        while its kernel accepted at once, and a live primary was taken over and fenced.
        """
        p = self.plan.peers.get(peer)
        if p is None:
            return self.links.ping(peer, timeout_s)
        probe = TcpProbe(p.mgmt_ip, p.control_port)
        # The whole window: the driver gives a check its window plus a margin
        # (`shim.remote_failover.CONFIRM_LATE_US`). A ping cut to 80 % of it turned answers a
        # loaded host sent late in the window into "dead".
        answered = self.links.ping(peer, timeout_s)
        host = probe.result()
        before = self._agent_silent_since.get(peer)
        alive, since = agent_check_verdict(answered, host, before, time.monotonic(), AGENT_GRACE_S)
        if since is None:
            self._agent_silent_since.pop(peer, None)
        else:
            self._agent_silent_since[peer] = since
            if before is None:
                self.event("peer_agent_silent", peer=peer, check=host, grace_s=AGENT_GRACE_S)
        return alive

    def holds(self, unit: str) -> bool:
        """A role of `unit` runs here (standby, primary, or a takeover's restored copy)."""
        return unit in self.primaries or unit in self.drivers or unit in self.stores

    def _open_store(self, spec: UnitSpec) -> Store:
        """Serve `spec`'s store (reopened from what an earlier incarnation left, if any)."""
        unit = spec.name
        assert self.server is not None
        store = Store(self.plan.runtime / "standby" / unit)
        self.server.add_store(unit, store)
        self.stores[unit] = store
        self.specs[unit] = spec
        if spec.protection.lossless:
            self.lossless.add(unit)
            self.inputs.shadow(unit, spec.nf.mac)
        return store

    def add_spare(self, spec: UnitSpec, primary: str, term: int, offer: Sequence[str] = ()) -> None:
        """Keep a store for `spec`, whose primary is `primary` (loop thread): a standby's term
        claim is granted or refused here, and the primary may re-protect the unit onto it.

        With `offer`, this host is a deposed primary whose offer to be a spare no one had
        taken when its agent stopped: it offers itself to those peers again."""
        unit = spec.name
        if self.holds(unit):
            raise ValueError(f"unit {unit} already has a role on {self.host}")
        if primary not in self.plan.peers:
            raise ValueError(f"{primary} is not a peer of {self.host}")
        store = self._open_store(spec)
        self.spare_of[unit] = (primary, term)
        self.event("spare", unit=unit, primary=primary, term=max(term, store.term))
        candidates = tuple(p for p in dict.fromkeys(offer) if p in self.plan.peers)
        if candidates:
            self._offer(unit, candidates, term)

    def add_standby(
        self,
        spec: UnitSpec,
        primary: str,
        term: int,
        spares: list[str],
    ) -> None:
        """Become `spec`'s standby for `primary` at `term` (loop thread; `prepare_standby`
        first, off it). The store reopens what an earlier incarnation of this agent left.
        Detection starts dampened (`_start_standby`): the primary seeds this host now.

        A spare of the unit becomes its standby with the store it holds (a re-protection chose
        it): at a term no lower than the one its store recorded (a takeover's claim), and a
        failure leaves it the spare it was."""
        unit = spec.name
        was_spare = self.spare_of.get(unit)
        if (self.holds(unit) and was_spare is None) or unit in self.drivers:
            raise ValueError(f"unit {unit} already has a role on {self.host}")
        if primary not in self.plan.peers:
            raise ValueError(f"{primary} is not a peer of {self.host}")
        if was_spare is None:
            store = self._open_store(spec)
        else:
            store = self.stores[unit]
            if term < store.term:
                raise ValueError(
                    f"{primary} asks at term {term}, and the spare's store of {unit} recorded "
                    f"term {store.term}: a newer primary exists"
                )
            self.specs[unit] = spec
        try:
            self._start_standby(spec, primary, max(term, store.term), spares)
        except BaseException:
            if was_spare is None:
                self._drop_standby(unit)
            raise
        self.spare_of.pop(unit, None)
        self._end_rejoin(unit)
        self.event("watching", unit=unit, primary=primary, term=term, spares=spares)

    def add_primary(
        self,
        spec: UnitSpec,
        nf: ProtectedNf,
        standby: str,
        *,
        term: int = 1,
        first: bool = True,
        spares: tuple[str, ...] = (),
    ) -> None:
        """Run `spec`'s epoch engine on its NF `nf`, shipping to `standby` (loop thread).

        The unit is in the data plane already (`hamgr.agent.unitnet.build_remote_network`).
        `first`: a unit just started; otherwise one an earlier agent ran, taken over with a
        recovery cut (`take_over`). `spares`: where the unit is re-protected if `standby` is
        lost."""
        unit = spec.name
        role = self._register_primary(spec, nf, standby, term, spares)
        try:
            self.protect(role, standby, first=first)
        except BaseException:
            self.primaries.pop(unit, None)
            with self.dp_client() as c, contextlib.suppress(DataPlaneError):
                if not self._peer_in_use(standby):
                    c.remove_probe(standby)
            self._watching.pop(standby, None)
            raise
        self.write_status()

    def add_dead_primary(
        self,
        spec: UnitSpec,
        nf: ProtectedNf,
        standby: str,
        *,
        term: int,
        spares: tuple[str, ...] = (),
        cause: str,
    ) -> None:
        """A primary whose NF died while no agent watched it (an agent that restarts finds it
        so): the unit is handed to `standby` as when the pidfd reports the death (`_nf_died`).
        No engine runs: the NF is gone, and what it left held in the data plane is the
        standby's to release or the fence's to discard. `nf` is a handle on what is left of it
        (`hamgr.agent.unitnet.dead_container`)."""
        unit = spec.name
        role = self._register_primary(spec, nf, standby, term, spares)
        self._watching[standby] = unit
        self.event("nf_found_dead", unit=unit, pid=nf.pid, term=term, cause=cause)
        self._nf_died(role, nf.pid)
        self.write_status()

    def _register_primary(
        self, spec: UnitSpec, nf: ProtectedNf, standby: str, term: int, spares: tuple[str, ...]
    ) -> PrimaryRole:
        unit = spec.name
        if self.holds(unit):
            raise ValueError(f"unit {unit} already has a role on {self.host}")
        kept = [s for s in spares if s not in (standby, self.host)]
        role = PrimaryRole(
            spec, UnitNames(self.host, unit), nf, term, standby, kept, on_fenced=self._policy(spec)
        )
        self.primaries[unit] = role
        self.specs[unit] = spec
        return role

    def _policy(self, spec: UnitSpec) -> str:
        """What this host does with `spec` once deposed: the plan says (a plan's agent), or
        the spec (the main agent's, whose plan has no units)."""
        return self._on_fenced.get(spec.name, spec.standby.on_fenced)

    def add_unprotected(self, spec: UnitSpec, nf: ProtectedNf, term: int) -> None:
        """A unit this host took over and runs without a standby, found again after a restart:
        its output is not held (plain mode), so it needs no epoch engine."""
        unit = spec.name
        if self.holds(unit):
            raise ValueError(f"unit {unit} already has a role on {self.host}")
        role = PrimaryRole(spec, UnitNames(self.host, unit), nf, term, "", [])
        role.protection = "unprotected"
        self.primaries[unit] = role
        self.specs[unit] = spec
        self.write_status()

    def remove(self, unit: str) -> Detached:
        """Take every role of `unit` out of this agent (loop thread).

        Refused (RuntimeError) while a takeover of the unit runs. The primary's runner keeps
        running, for the caller to stop with the drain it wants; the NFs and the store's files
        are left for the caller to destroy, and the probes of its peers for `forget_probes`
        once the peer dropped its own role (a primary that stopped probing its standby first
        would look dead to it)."""
        driver = self.drivers.get(unit)
        if driver is not None and driver.machine.state not in (
            fo.State.WATCHING,
            fo.State.FAILED,
        ):
            raise RuntimeError(
                f"a takeover of {unit} is running ({driver.machine.state.value}); try again "
                "once it ended"
            )
        nfs: list[ProtectedNf] = []
        runner: UnitRunner | None = None
        role = self.primaries.pop(unit, None)
        peers: set[str] = set()
        handoff = self._handoffs.pop(unit, None)
        if handoff is not None:
            handoff.stop()
        if role is not None:
            runner, role.runner = role.runner, None
            nfs.append(role.nf)
            for peer in (role.standby, role.lost_standby):
                if peer:
                    peers.add(peer)
                    if self._watching.get(peer) == unit:
                        del self._watching[peer]
        if driver is not None:
            del self.drivers[unit]
            driver.close()
            if driver.machine.peer:
                peers.add(driver.machine.peer)
        steps = self.steps.pop(unit, None)
        if steps is not None:
            steps.close()
            nfs.extend(c for c in steps.restored.values() if c not in nfs)
        store = self._drop_standby(unit)
        self.specs.pop(unit, None)
        self.spare_of.pop(unit, None)  # a spare probes nobody
        self.write_status()
        return Detached(unit, runner, tuple(nfs), store, tuple(sorted(peers)))

    def forget_probes(self, peers: tuple[str, ...]) -> None:
        """Stop probing each of `peers` that no role watches any more (loop thread)."""
        with self.dp_client() as c:
            for peer in peers:
                if not self._peer_in_use(peer):
                    with contextlib.suppress(DataPlaneError):
                        c.remove_probe(peer)

    def _drop_standby(self, unit: str) -> Path | None:
        """Stop serving `unit`'s store; returns its directory (None if it had none)."""
        store = self.stores.pop(unit, None)
        if self.server is not None:
            self.server.remove_store(unit)
        if unit in self.lossless:
            self.lossless.discard(unit)
            with contextlib.suppress(DataPlaneError, KeyError):
                self.inputs.remove(unit)
        return None if store is None else store.root

    def _peer_in_use(self, peer: str) -> bool:
        """Some role still watches `peer` (its probe must stay)."""
        return any(d.machine.peer == peer for d in list(self.drivers.values())) or any(
            peer in (r.standby, r.lost_standby) for r in list(self.primaries.values())
        )

    def snapshot(self) -> list[dict[str, Any]]:
        """One entry per (unit, role) in `hamgr status`'s form; from any thread."""
        out: list[dict[str, Any]] = []
        primaries = dict(self.primaries)
        for unit, role in sorted(primaries.items()):
            runner = role.runner
            snap = runner.snapshot() if runner is not None else {}
            protection = snap.get("protection") or role.protection
            if role.protection == "unprotected":
                protection = "unprotected"
            elif role.lost_standby is not None:
                protection = "stalled"
            out.append(
                {
                    **snap,
                    "unit": unit,
                    "role": "primary",
                    "peer": role.standby or "",
                    "term": role.term,
                    "state": snap.get("state", "running"),
                    "protection": protection,
                    "nf_pid": role.nf.pid,
                    "lost_standby": role.lost_standby,
                    "handoff": None if role.handoff is None else dict(role.handoff),
                    **({"error": role.handoff["detail"]} if role.handoff else {}),
                }
            )
        for unit, steps in sorted(dict(self.steps).items()):
            if unit in primaries or not steps.unprotected:
                continue
            term = max(steps.unprotected)
            nf = steps.restored.get(term)
            out.append(
                {
                    "unit": unit,
                    "role": "primary",
                    "peer": "",
                    "term": term,
                    "state": "running",
                    "protection": "unprotected",
                    "nf_pid": None if nf is None else nf.pid,
                }
            )
        promoted = {u["unit"] for u in out}
        for unit, (primary, term) in sorted(dict(self.spare_of).items()):
            out.append(self._store_entry(unit, "spare", primary, term, "spare"))
        for unit, driver in sorted(dict(self.drivers).items()):
            if unit in promoted:
                continue  # it took the unit over: the primary's entry says so
            m = driver.machine
            out.append(self._store_entry(unit, "standby", m.peer or "", m.term, m.state.value))
        return out

    def _store_entry(
        self, unit: str, role: str, peer: str, term: int, state: str
    ) -> dict[str, Any]:
        """The status of a role that holds `unit`'s store: its term (the store's, if higher)
        and its last commit."""
        server = self.server
        committed = server.committed(unit) if server is not None and unit in self.stores else None
        store = self.stores.get(unit)
        return {
            "unit": unit,
            "role": role,
            "peer": peer,
            "term": max(term, store.term if store is not None else 0),
            "state": state,
            "protection": None,
            "last_committed": None if committed is None else committed.epoch,
            "committed_term": None if committed is None else committed.term,
        }

    # -- the primary side ----------------------------------------------------------------

    def _shipper(self, standby: str, *, tcp_maxrt_ms: int | None = None) -> ReplicationClient:
        p = self.plan.peers[standby]
        return ReplicationClient(
            p.replication,
            server_key=p.public_key.encode(),
            keypair=(self.public, self.secret),
            tcp_maxrt_ms=tcp_maxrt_ms,
        )

    def protect(
        self,
        role: PrimaryRole,
        standby: str,
        *,
        first: bool,
        unprotected: ep.PrimaryMachine | None = None,
    ) -> None:
        """Run `role`'s epoch engine shipping to `standby` (its first ship is a full image).

        `unprotected` is the machine of a unit taken over and running unprotected (output in
        plain mode): once `standby` answers, output commit goes back on and the unit counts as
        protected from `standby`'s first ack on.
        """
        unit, term = role.spec.name, role.term
        dp = self.dp_client()
        shipper = self._shipper(standby, tcp_maxrt_ms=SHIP_MAXRT_MS)
        try:
            hello = shipper.hello(unit, term, timeout=5.0)
            if role.spec.protection.lossless:
                # After the hello (the standby's log for this term exists) and before the first
                # cut: every input after any cut this standby commits is mirrored to it.
                tag = mirror_tag(unit, term)
                dp.set_mirror(unit, FABRIC_PORT, tag=tag)
                self.event("mirror", unit=unit, term=term, standby=standby, tag=tag)
            if unprotected is not None:
                engine = self._seed(role, dp, shipper, unprotected, standby)
            else:
                if first:
                    s = dp.stats(unit).units[unit]
                    first_epoch, closed = int(s.epoch), 0
                else:
                    handover = take_over(
                        dp,
                        role.nf,
                        shipper,
                        unit=unit,
                        term=term,
                        committed=None,
                        # What this standby has sent at this term (it releases, on this
                        # primary's confirm): those epochs are retired here, never sent again.
                        # A standby that comes back after its agent restarted, or a partition,
                        # may have sent epochs whose released answer never arrived; epochs it
                        # committed but never sent ride in the recovery cut and leave once.
                        sent=(hello.released[1] if hello.released[0] == term else None),
                        image_dir=lambda e: self.plan.runtime / "images" / unit / f"epoch-{e:08d}",
                        # Released at the standby: the held output rides in the recovery image.
                        outputs=self.plan.runtime / "images" / unit / "outputs",
                    )
                    first_epoch, closed = handover.first_epoch, handover.closed_total
                engine = self._engine(role, dp, shipper, first_epoch=first_epoch, nf_rx_base=closed)
        except BaseException:
            shipper.close()
            dp.close()
            raise
        role.standby = standby
        role.runner = UnitRunner(
            unit,
            engine,
            dp,
            role.nf,
            shipper,
            commits_base=0,
            observed=self._observed(role),
            standby=standby,
        )
        role.runner.start()
        with self.dp_client() as c, contextlib.suppress(DataPlaneError):
            c.add_probe(
                standby,
                FABRIC_PORT,
                interval_us=self.plan.probe_interval_us,
                miss=self.plan.probe_miss,
                term=term,
            )
        self._watching[standby] = unit
        # Seeding it with a full image keeps it busy: its first checks are dampened, as its
        # watch of this primary is (`_watch`, busy).
        self._standby_watch_of(standby).busy(_now_us())
        if self.embedded:
            # Its standby_add made the standby watch this primary before the first ship.
            self._announce_protection(role, standby)
            return
        # The new standby must also watch this primary, or a second failure would end the unit.
        # Its spares are ours but itself: the hosts it must claim the next term at.
        reply = self.links.request(
            standby,
            {
                "type": "watch",
                "unit": unit,
                "primary": self.host,
                "term": term,
                "spares": [s for s in role.spares if s != standby],
            },
            timeout_s=1.0,
        )
        if reply is None or not reply.get("queued"):
            self.event("alarm", unit=unit, reason=f"{standby} did not confirm it watches {unit}")
        self._announce_protection(role, standby)

    def _announce_protection(self, role: PrimaryRole, standby: str) -> None:
        unit, term = role.spec.name, role.term
        if role.protection == "protected":
            self.event("protected", unit=unit, term=term, standby=standby, nf_pid=role.nf.pid)
        else:
            self.event("seeding", unit=unit, term=term, standby=standby, nf_pid=role.nf.pid)

    def _engine(
        self,
        role: PrimaryRole,
        dp: DataPlaneClient,
        shipper: ReplicationClient,
        *,
        first_epoch: int,
        nf_rx_base: int,
    ) -> PrimaryEngine:
        machine = ep.PrimaryMachine(
            role.spec.name,
            role.term,
            remote_config(role.spec),
            first_epoch=first_epoch,
            now_us=_now_us(),
        )
        return PrimaryEngine(
            role.spec.name,
            machine,
            dp,
            role.nf,
            shipper,
            image_root=self.plan.runtime / "images",
            nf_rx_base=nf_rx_base,
        )

    def _seed(
        self,
        role: PrimaryRole,
        dp: DataPlaneClient,
        shipper: ReplicationClient,
        machine: ep.PrimaryMachine,
        standby: str,
    ) -> PrimaryEngine:
        """`standby` answered: output commit back on (StandbyBack), an engine on `machine`."""
        unit = role.spec.name
        for command in seed(machine, remote_config(role.spec), _now_us()):
            match command:
                case ep.SetOutputCommit(enabled=enabled):
                    set_mode_retrying(dp, unit, "ha" if enabled else "plain")
                case ep.Ship() | ep.Release() | ep.Discard():
                    raise RuntimeError(f"unit {unit}: {command!r} while seeding {standby}")
                case _:
                    log.info("unit %s: seeding %s: %r", unit, standby, command)
        s = dp.stats(unit).units[unit]
        if int(s.epoch) != machine.open_epoch:
            raise RuntimeError(
                f"unit {unit}: the data plane's open epoch is {s.epoch}, "
                f"the machine's {machine.open_epoch}"
            )
        # Output commit is on and nothing is closed yet: what the open epoch buffers is the NF's
        # output since the switch, everything before it left in plain mode.
        return PrimaryEngine(
            unit,
            machine,
            dp,
            role.nf,
            shipper,
            image_root=self.plan.runtime / "images",
            nf_rx_base=int(s.nf_rx) - int(s.buffered_pkts),
        )

    def _observed(self, role: PrimaryRole) -> Observed:
        first = [True]
        term = role.term

        def on_commit(unit: str, epoch: int, commit_ms: float) -> None:
            if first[0]:
                first[0] = False
                self.event("first_commit", unit=unit, term=term, epoch=epoch)
                if role.protection != "protected":
                    role.protection = "protected"
                    self.event("protected", unit=unit, term=term, standby=role.standby, epoch=epoch)

        def on_alarm(unit: str, reason: str) -> None:
            self.event("alarm", unit=unit, reason=reason)

        def on_nf_died(_unit: str, pid: int) -> None:
            self._nf_died(role, pid)

        return Observed(
            on_commit,
            on_alarm,
            lambda _u, _s: None,
            on_fenced=self._fenced.put,
            on_nf_died=on_nf_died,
        )

    # -- the NF died (a remote standby takes the unit over) ------------------------------

    def _nf_died(self, role: PrimaryRole, pid: int) -> None:
        """The NF of `role` died while this host lives (the runner's thread, which has stopped
        stepping the engine): ask the standby to take the unit over (`hamgr.agent.handoff`).

        Not restored here: output is released at the standby, so only the standby knows what of
        this primary's output left, and its promotion sends what it committed and was never
        confirmed exactly once (docs/failover.md, "NF death with a remote standby").
        """
        unit, term, standby = role.spec.name, role.term, role.standby
        role.nf_died = True
        self.event("nf_died", unit=unit, pid=pid, term=term, standby=standby)
        if not standby:
            reason = f"the NF (pid {pid}) died and no standby holds unit {unit}: it is down"
            role.handoff = {"status": "failed", "pid": pid, "term": term, "detail": reason}
            self.event("alarm", unit=unit, reason=reason)
            return
        asked = f"the NF (pid {pid}) died; {standby} was asked to take the unit over"
        role.handoff = {
            "status": "requesting",
            "standby": standby,
            "pid": pid,
            "term": term,
            "detail": asked,
        }

        def on_answer(attempt: int, answer: Answer, detail: str) -> None:
            if role.handoff is not None and role.handoff.get("status") == "requesting":
                role.handoff["detail"] = f"{asked} (request {attempt}: {detail})"
            self.event(
                "failover_asked",
                unit=unit,
                standby=standby,
                term=term,
                attempt=attempt,
                answer=answer.value,
                detail=detail,
            )

        driver = HandoffDriver(
            Handoff(unit, term, standby),
            request=lambda body, timeout_s: self.links.request(standby, body, timeout_s),
            store=self._shipper(standby),
            reason=f"the NF of {unit} (pid {pid}) died on {self.host}",
            done=lambda command: self._handed.put((unit, command)),
            on_answer=on_answer,
        )
        self._handoffs[unit] = driver
        driver.start()

    def _handed_over(self, unit: str, command: Fence | GiveUp) -> None:
        """How the handoff of `unit` ended (loop thread)."""
        driver = self._handoffs.pop(unit, None)
        role = self.primaries.get(unit)
        if driver is not None:
            driver.stop()
        if role is None or role.handoff is None:
            return
        pid = role.handoff.get("pid")
        match command:
            case Fence(term=term):
                detail = (
                    f"the NF (pid {pid}) died; {role.standby} took the unit over at term {term}"
                )
                role.handoff.update(status="taken_over", new_term=term, detail=detail)
                self.event("handed_over", unit=unit, standby=role.standby, pid=pid, term=term)
                self._fence(role, term, detail)
            case GiveUp(reason=reason):
                detail = f"the NF (pid {pid}) died and the unit is down here: {reason}"
                role.handoff.update(status="failed", detail=detail)
                self.event("handoff_failed", unit=unit, standby=role.standby, reason=reason)
                self.event("alarm", unit=unit, reason=detail)

    def _standby_watch_of(self, peer: str) -> StandbyWatch:
        watch = self._standby_watch.get(peer)
        if watch is None:
            watch = self._standby_watch[peer] = StandbyWatch(self.detection)
        return watch

    def _standby_lost(self, peer: str, down: PeerDown) -> None:
        unit = self._watching.get(peer)
        role = self.primaries.get(unit or "")
        if role is None or role.standby != peer or role.nf_died:
            return  # a dead NF's unit is being handed to its standby, not re-protected
        if self.embedded and role.lost_standby == peer:
            return  # lost already: `_recheck` retries it
        # Dampened as a standby's watch of its primary is (`policies.detection.dampened`): a
        # standby whose probes keep stopping while it answers is overloaded, not dead, and a
        # false verdict costs a needless re-protection and its full image. The same check as a
        # standby's of its primary (`confirm_peer`): at load 7 a bare ping missed the window of
        # a live standby right after it was seeded, and the unit moved its protection for
        # nothing.
        watch = self._standby_watch_of(peer)
        now = _now_us()
        window_us = watch.window_us(now)
        self._standby_silence[peer] = down
        verdict = watch.answered(self.confirm_peer(peer, window_us / 1e6), _now_us(), window_us)
        if verdict is Verdict.DISPUTED:
            self.event("standby_disputed", unit=unit, standby=peer, window_us=window_us)
        if verdict is not Verdict.FAILED:
            return
        del self._standby_silence[peer]
        self.event("standby_lost", unit=unit, standby=peer, last_rx_us=down.last_rx_mono_us)
        role.lost_standby = peer
        self._recheck_at = time.monotonic() + RECHECK_S
        if not self._reprotect(role, [s for s in role.spares if s != peer]):
            self.event("alarm", unit=unit, reason="standby lost and no spare answers; stalled")

    def _reprotect(self, role: PrimaryRole, candidates: list[str]) -> bool:
        """Re-protect `role` onto the first candidate that answers: a recovery cut, shipped in
        full, whose held output the candidate sends on its commit and this primary's confirm
        (`take_over`), then the engine goes on there.

        True once re-protected, or once fenced: a candidate that answers with a higher term
        (stale_term: a standby took the unit over and claimed its term there first) deposes
        this primary, and nothing it holds may leave (`_fence`). False if no candidate did.
        """
        unit = role.spec.name
        for candidate in candidates:
            if not self.links.ping(candidate, SURVEY_PING_S):
                continue
            if role.runner is not None:
                role.runner.stop(drain_seconds=0)
                role.runner = None
            lost = role.lost_standby
            # The main agent keeps probing a lost standby it protects the unit onto again:
            # a pause in the probes would look like this host's death to it.
            if lost is not None and not (self.embedded and lost == candidate):
                with self.dp_client() as c, contextlib.suppress(DataPlaneError):
                    c.remove_probe(lost)
                self._watching.pop(lost, None)
            try:
                self.protect(role, candidate, first=False)
            except NackedError as exc:
                if exc.nack.term > role.term:
                    self._fence(
                        role,
                        exc.nack.term,
                        f"{candidate} refused term {role.term}: {exc.nack.code}: {exc.nack.reason}",
                    )
                    return True
                self.event("alarm", unit=unit, reason=f"re-protection on {candidate}: {exc}")
                continue
            except Exception as exc:
                self.event("alarm", unit=unit, reason=f"re-protection on {candidate}: {exc}")
                continue
            role.spares = [s for s in role.spares if s != candidate]
            role.lost_standby = None
            self.event("reprotected", unit=unit, standby=candidate, term=role.term)
            if self.embedded and candidate != lost:
                # The spare holds the image now; its standby_add makes it watch this primary
                # (its store stays), so that this host's death is covered again.
                try:
                    self.hooks.add_standby(role.spec, candidate, role.term, role.spares)
                except Exception as exc:
                    self.event(
                        "alarm",
                        unit=unit,
                        reason=f"{candidate} holds the unit's image but does not watch "
                        f"{self.host}: {exc}",
                    )
            try:
                self.hooks.standby_changed(unit, candidate, role.term)
            except Exception:
                log.exception("unit %s: recording the new standby %s failed", unit, candidate)
            return True
        return False

    def _recheck(self) -> None:
        """Retry the re-protection of every unit whose standby is lost and not replaced.

        Its spares first, then the lost standby itself: whichever answers again after a
        partition heals either takes the unit (if no one took it over) or answers with the
        higher term that fences this primary.

        Inside the main agent, a standby counts as lost, too, once the unit's engine stalled
        because its checkpoints went unacknowledged (`ep.StandbyLost`) without a probe saying
        so: the probe was down already (a flap the standby's agent disputed, then a real
        death), or the standby's agent restarted and a transfer in flight was lost with it.
        The engine alone never recovers from that; a re-protection does (onto the same
        standby, once it answers: what it committed and sent is retired, not sent again).
        """
        for role in list(self.primaries.values()) if self.embedded else []:
            runner = role.runner
            if runner is None or role.lost_standby is not None or not role.standby:
                continue
            if role.nf_died:
                continue
            machine = runner.engine.machine
            if machine.protection is ep.Protection.STALLED and machine.state is not ep.State.FENCED:
                unit = role.spec.name
                self.event("standby_lost", unit=unit, standby=role.standby, cause="no ack: stalled")
                role.lost_standby = role.standby
        for role in list(self.primaries.values()):
            lost = role.lost_standby
            if lost is None or role.nf_died:
                continue
            self._reprotect(role, [s for s in role.spares if s != lost] + [lost])

    # -- fencing (this primary was deposed) ----------------------------------------------

    def _deposed(self, unit: str) -> None:
        """A runner's epoch machine was fenced by a standby's reply with a higher term."""
        role = self.primaries.get(unit)
        if role is None or role.runner is None:
            return
        term: int | None = None
        try:
            role.runner.shipper.hello(unit, role.term, timeout=0.5)
        except NackedError as exc:
            term = exc.nack.term if exc.nack.term > role.term else None
        except Exception:
            log.warning("unit %s: could not learn the term that fenced it", unit)
        self._fence(role, term, f"{role.standby} answered with a higher term")

    def _fence(self, role: PrimaryRole, term: int | None, cause: str) -> None:
        """This primary is deposed (a higher term exists): the unit's ``on_fenced`` policy.

        "stop": stop the epoch loop; set the data plane's term to the new one, which drops
        everything it holds for the unit and refuses the old term's commands from then on
        (I3: nothing held may leave, because the new primary restores from a commit that does
        not include it); stop the NF; remove the unit and its port from the data plane, and
        (plan agent) the NF's netns and veth. The event ``fenced`` carries the term and the
        data plane's last counters of the unit.
        """
        unit = role.spec.name
        if role.runner is not None:
            role.runner.stop(drain_seconds=0)
            role.runner = None
        counters: dict[str, Any] = {}
        with self.dp_client() as dp:
            try:
                stats = dp.stats(unit).units.get(unit)
                if stats is not None:
                    counters = {
                        "released_pkts": int(stats.released_pkts),
                        "retired_pkts": int(stats.retired_pkts),
                        "held_pkts": int(stats.buffered_pkts) - int(stats.releasable_pkts),
                    }
                    new_term = max(int(stats.term), role.term) + 1 if term is None else term
                    discarded = dp.set_term(unit, new_term) if new_term > int(stats.term) else 0
                    counters["discarded_pkts"] = discarded
            except DataPlaneError:
                # Removing the unit below drops whatever it still holds all the same.
                log.exception("unit %s: fencing the data plane's unit failed", unit)
        try:
            role.nf.destroy()  # its state is worthless now: the new primary restored its own
        except Exception:
            log.exception("unit %s: stopping the deposed NF (pid %d) failed", unit, role.nf.pid)
        with self.dp_client() as dp:
            with contextlib.suppress(DataPlaneError):
                dp.remove_unit(unit)
            with contextlib.suppress(DataPlaneError):
                dp.remove_port(role.names.nf_port)
            for peer in {role.standby, role.lost_standby} - {None, ""}:
                assert peer is not None
                with contextlib.suppress(DataPlaneError):
                    dp.remove_probe(peer)
                self._watching.pop(peer, None)
        if not self.embedded:
            # Nothing else of the unit stays here: the plan agent keeps no record a later
            # `unprotect` would remove it by (the main agent does: `hamgr unprotect`).
            with contextlib.suppress(netns.NetnsError):
                netns.delete_netns(role.names.nf_netns)
        del self.primaries[unit]
        self.write_status()
        try:
            self.hooks.fenced(unit, term, cause)
        except Exception:
            log.exception("unit %s: recording its fencing failed", unit)
        self.event(
            "fenced",
            unit=unit,
            term=term,
            own_term=role.term,
            cause=cause,
            policy=role.on_fenced,
            nf_pid=role.nf.pid,
            **counters,
        )
        if role.on_fenced == "standby":
            self._become_spare(role, term)

    def _become_spare(self, role: PrimaryRole, term: int | None) -> None:
        """on_fenced = "standby": keep an empty store of the deposed unit, as a spare does, and
        offer this host to the new primary (`hamgr.agent.rejoin`; loop thread, after `_fence`).

        Which peer deposed it, this host cannot tell for sure: only a standby takes a unit over,
        but a re-protection may have moved the standby just before the one it lost took the
        unit over (and then the new standby's higher term is what fenced this host). So the
        offer goes to every peer, the likeliest first (the standby it lost, then its standby,
        then its spares), and the answers say which one runs the unit (`Rejoin`). Whatever
        store an earlier role of this host left is removed first: a re-protection onto this
        host ships a full image, and an old promoted store would refuse it.
        """
        unit = role.spec.name
        deposed_at = role.term + 1 if term is None else term
        likely = [role.lost_standby, role.standby, *role.spares, *self.plan.peers]
        candidates = tuple(p for p in dict.fromkeys(likely) if p and p != self.host)
        if not candidates or self.server is None:
            why = "it has no peer" if not candidates else "this host serves no store"
            self.event("alarm", unit=unit, reason=f"deposed, and cannot become a spare: {why}")
            return
        try:
            # First: the main agent removes what the primary had here, and records the spare.
            self.hooks.became_spare(unit, candidates[0], deposed_at)
        except Exception:
            log.exception("unit %s: recording the spare role failed", unit)
        shutil.rmtree(self.plan.runtime / "standby" / unit, ignore_errors=True)
        store = self._open_store(role.spec)
        store.observe_term(deposed_at)
        self.spare_of[unit] = (candidates[0], deposed_at)
        self.event("spare", unit=unit, candidates=candidates, term=deposed_at, cause="deposed")
        self._offer(unit, candidates, deposed_at)

    def _offer(self, unit: str, candidates: tuple[str, ...], term: int) -> None:
        """Offer this host, deposed at `term`, as a spare of `unit` to `candidates` until one
        takes it (`hamgr.agent.rejoin`), and have the offer recorded so that a restart goes on
        with it."""
        try:
            self.hooks.offering(unit, candidates, term)
        except Exception:
            log.exception("unit %s: recording the offer to be a spare failed", unit)
        driver = RejoinDriver(
            Rejoin(unit, self.host, candidates, term),
            request=self.links.request,
            done=lambda outcome: self._rejoined.put((unit, outcome)),
        )
        self._rejoins[unit] = driver
        driver.start()

    def _end_rejoin(self, unit: str, wait: float = 0.0) -> RejoinDriver | None:
        """End this host's offer to be a spare of `unit`, if it makes one, and the record of
        it; its thread is waited for up to `wait` s (loop thread). Called when the offer's
        outcome came, and when this host became the standby (the offer was taken up, whatever
        it was told)."""
        driver = self._rejoins.pop(unit, None)
        if driver is not None:
            driver.stop(timeout=wait)
            try:
                self.hooks.offer_ended(unit)
            except Exception:
                log.exception("unit %s: recording the end of the offer to be a spare failed", unit)
        return driver

    def _rejoin_ended(self, unit: str, outcome: Joined | Refused) -> None:
        """How this host's offer to be a spare of `unit` ended (loop thread)."""
        driver = self._end_rejoin(unit, wait=5.0)
        if driver is None:
            return
        r = driver.rejoin
        match outcome:
            case Joined(primary=primary, term=term):
                if unit in self.spare_of:
                    self.spare_of[unit] = (primary, term)
                try:
                    self.hooks.spare_of(unit, primary, term)
                except Exception:
                    log.exception("unit %s: recording the spare's primary failed", unit)
                self.event("rejoined", unit=unit, primary=primary, term=term, offers=r.offers)
            case Refused(detail=detail):
                self.event("rejoin_refused", unit=unit, candidates=r.candidates, detail=detail)

    def spare_join(self, unit: str, host: str, term: int) -> dict[str, Any]:
        """`host`, deposed as the primary of `unit` at `term`, offers itself as a spare (any
        thread): this host, the unit's primary, takes it on its loop (`_spare_joined`)."""
        role = self.primaries.get(unit)
        driver = self.drivers.get(unit)
        answer = spare_join_answer(
            unit=unit,
            here=self.host,
            host=host,
            term=term,
            peers=set(self.plan.peers),
            primary_term=None if role is None else role.term,
            taking_over=driver is not None
            and driver.machine.state not in (fo.State.WATCHING, fo.State.FAILED),
        )
        if answer.get("joined"):
            self.requests.put({"type": "spare_join", "unit": unit, "host": host, "term": term})
        return answer

    def _spare_joined(self, req: dict[str, Any]) -> None:
        unit, host = str(req["unit"]), str(req["host"])
        role = self.primaries.get(unit)
        if role is None or host in (role.standby, self.host):
            return
        if host not in role.spares:
            role.spares.append(host)
            try:
                self.hooks.spare_joined(unit, host, role.term)
            except Exception:
                log.exception("unit %s: recording the spare %s failed", unit, host)
        self.event("spare_joined", unit=unit, spare=host, term=role.term, spares=role.spares)
        if role.lost_standby is not None:
            self._recheck_at = 0.0  # a unit without a standby: re-protect onto it now

    # -- events --------------------------------------------------------------------------

    def _on_report(self, report: fo.Report) -> None:
        self.event(
            "failover",
            unit=report.unit,
            status=report.status.value,
            term=report.term,
            detail=report.detail,
            elapsed_us=report.elapsed_us,
        )
        driver = self.drivers.get(report.unit)
        record: dict[str, Any] | None = None
        if report.status is not fo.Status.RUNNING and driver and driver.records:
            record = driver.records[-1].to_json()
            self.event("failover_record", unit=report.unit, **record)
        try:
            self.hooks.report(report.unit, report, record)
        except Exception:
            log.exception("unit %s: recording the takeover's report failed", report.unit)

    def _handle(self, req: dict[str, Any]) -> dict[str, Any]:
        seq = req.get("seq")
        match req.get("type"):
            case "ping":
                return {"seq": seq, "host": self.host, "pid": os.getpid()}
            case "failover":
                term = req.get("term")
                return {
                    "seq": seq,
                    **self.request_failover(
                        str(req.get("unit")),
                        None if term is None else int(term),
                        str(req.get("reason", "operator")),
                    ),
                }
            case "watch":
                self.requests.put(req)
                return {"seq": seq, "queued": True}
            case "spare_join":
                try:
                    unit, host, term = str(req["unit"]), str(req["host"]), int(req["term"])
                except (KeyError, TypeError, ValueError) as exc:
                    return {"seq": seq, "error": f"bad spare_join: {exc}", "code": "bad_request"}
                return {"seq": seq, **self.spare_join(unit, host, term)}
            case "status":
                units = {
                    u: {"state": d.machine.state.value, "term": d.machine.term}
                    for u, d in self.drivers.items()
                }
                prim = {
                    u: {
                        "term": r.term,
                        "standby": r.standby,
                        "nf_pid": r.nf.pid,
                        "protection": r.protection,
                        "handoff": None if r.handoff is None else dict(r.handoff),
                    }
                    for u, r in list(self.primaries.items())
                }
                for u, st in self.steps.items():
                    if u not in prim and st.unprotected:
                        term = max(st.unprotected)
                        prim[u] = {
                            "term": term,
                            "standby": "",
                            "nf_pid": st.restored[term].pid if term in st.restored else None,
                            "protection": "unprotected",
                        }
                spare = {u: d.rejoin.status() for u, d in list(self._rejoins.items())}
                return {
                    "seq": seq,
                    "host": self.host,
                    "standby": units,
                    "primary": prim,
                    "rejoining": spare,
                }
        return {"seq": seq, "error": f"unknown type {req.get('type')!r}"}

    def request_failover(self, unit: str, term: int | None, reason: str) -> dict[str, Any]:
        """An unplanned failover of `unit`, whose standby this host is, at the primary's
        `term` (None: the term this host watches): queued for the loop, whose failover machine
        decides (a stale or repeated request is ignored there, event ``failover_ignored``).
        Any thread; refused at once only when no takeover could come of it."""
        driver = self.drivers.get(unit)
        if driver is None:
            return {"error": f"{self.host} is not a standby of unit {unit}", "code": "no_such_unit"}
        machine = driver.machine
        if term is None:
            term = machine.term
        if term >= machine.term and (self.server is None or self.server.committed(unit) is None):
            # The peer_down rule: nothing committed, nothing to restore; an attempt would
            # raise the term, fence the primary and then fail.
            return {
                "error": f"{self.host} holds no committed checkpoint of {unit} yet",
                "code": "failed",
            }
        self.requests.put({"type": "failover", "unit": unit, "term": term, "reason": reason})
        return {"queued": True, "term": term}

    def _spoke(self, peer: str) -> bool:
        """Whether `peer`'s probes ever arrived: a `PeerUp` said so, or, failing that, the data
        plane's count of its probes. The data plane reports a peer up once; one that came up
        before this loop subscribed (a primary seeding its first standby, on a loaded host) was
        never heard of here, and its death would have passed for a peer still starting: the
        unit stalled for good instead of being re-protected."""
        if peer in self._seen:
            return True
        probe = self.probe(peer)
        if probe is None or probe.rx == 0:
            return False
        self._seen.add(peer)
        return True

    def probe(self, peer: str) -> ProbeStats | None:
        """The data plane's probe of `peer` as it is now (None: no such probe)."""
        with self.dp_client() as dp:
            return dp.stats().probes.get(peer)

    def run(self) -> None:
        with self.dp_client() as events:
            events.subscribe()
            while not self._stop.is_set():
                ev = events.next_event(0.002)
                if isinstance(ev, PeerDown) and not self._spoke(ev.peer):
                    self.event("peer_silent", peer=ev.peer)
                elif isinstance(ev, PeerDown):
                    self.event(
                        "peer_down",
                        peer=ev.peer,
                        last_rx_us=ev.last_rx_mono_us,
                        down_us=ev.mono_us,
                    )
                    for unit, driver in self.drivers.items():
                        if driver.machine.peer != ev.peer:
                            continue
                        # Nothing committed means nothing to restore: the unit is not yet
                        # protected, and a failover could only fail after fencing the store.
                        if self.server is None or self.server.committed(unit) is None:
                            self.event("peer_down_unprotected", unit=unit, peer=ev.peer)
                            continue
                        driver.peer_down(ev.peer, ev.last_rx_mono_us, ev.mono_us)
                    if ev.peer in self._watching:
                        self._standby_lost(ev.peer, ev)
                elif isinstance(ev, PeerUp):
                    self.event("peer_up", peer=ev.peer)
                    self._seen.add(ev.peer)
                    if ev.peer in self._standby_watch:
                        self._standby_watch[ev.peer].heard()
                    for driver in self.drivers.values():
                        driver.feed(fo.PeerUp(ev.peer, ev.mono_us))
                now_us = _now_us()
                for peer, silence in list(self._standby_silence.items()):
                    if self._standby_watch[peer].due(now_us):
                        self._standby_lost(peer, silence)
                while True:
                    try:
                        req = self.requests.get_nowait()
                    except queue.Empty:
                        break
                    if req.get("type") == "watch":
                        try:
                            self._watch_request(req)
                        except Exception as exc:
                            log.exception("watch request %s failed", req)
                            self.event("watch_failed", unit=req.get("unit"), error=str(exc))
                        continue
                    if req.get("type") == "spare_join":
                        self._spare_joined(req)
                        continue
                    unit = str(req.get("unit"))
                    wanted = self.drivers.get(unit)
                    if wanted is not None:
                        reason = str(req.get("reason", "operator"))
                        ignored = len(wanted.ignored)
                        self.event("failover_requested", unit=unit, term=req["term"], reason=reason)
                        wanted.feed(fo.FailoverRequested(reason, False, int(req["term"])))
                        for why in wanted.ignored[ignored:]:
                            self.event("failover_ignored", unit=unit, term=req["term"], why=why)
                for driver in self.drivers.values():
                    driver.tick()
                for fenced in _drained(self._fenced):
                    self._deposed(fenced)
                for unit, outcome in _drained(self._handed):
                    self._handed_over(unit, outcome)
                for unit, joined in _drained(self._rejoined):
                    self._rejoin_ended(unit, joined)
                if time.monotonic() >= self._recheck_at:
                    self._recheck_at = time.monotonic() + RECHECK_S
                    self._recheck()
                self._run_calls()

    def stop(self) -> None:
        self._stop.set()

    def close(self, drain_seconds: float = 0.0) -> None:
        """Stop every role's threads (the loop's first); the NFs and the data plane run on."""
        self._stop.set()
        if self._loop is not None:
            self._loop.join(10)
            if self._loop.is_alive():
                log.error("the remote roles' loop did not stop within 10 s")
        self._run_calls()  # what was handed to the loop as it stopped runs here
        for handoff in list(self._handoffs.values()):
            handoff.stop()
        for rejoin in list(self._rejoins.values()):
            rejoin.stop()
        for role in self.primaries.values():
            if role.runner is not None:
                role.runner.stop(drain_seconds=drain_seconds)
                role.runner = None
        for d in self.drivers.values():
            d.close()
        for steps in self.steps.values():
            steps.close()
        if self.control is not None:
            self.control.close()
        if self.server is not None:
            self.server.stop()
        self.links.close()
        self.announcer.close()
        self._events.close()


@attrs.define
class _Prestored:
    """A copy restored ahead (`shim.failover.Prestore`): for the attempt at `term`, from the
    committed image at `source`."""

    term: int
    source: str
    nf: ProtectedNf


class StandbySteps:
    """The failover steps on a standby host (`shim.remote_failover.RemoteSteps`)."""

    def __init__(
        self,
        agent: RemoteAgent,
        spec: UnitSpec,
        names: UnitNames,
        spares: list[str],
        *,
        claim_timeout_s: float = CLAIM_TIMEOUT_S,
        primary: str | None = None,
    ) -> None:
        self.agent = agent
        self.spec = spec
        self.names = names
        self.spares = spares
        self.primary = primary  # the host whose death this takeover answers
        self.unit = spec.name
        self.term_file = TermFile(agent.plan.work / "terms" / self.unit)
        self.claim_timeout_s = claim_timeout_s
        # One replication link per spare for the term claim, connected now: its CURVE
        # handshake is not on the takeover's path.
        self._claim_links = {
            s: agent._shipper(s, tcp_maxrt_ms=CLAIM_MAXRT_MS) for s in dict.fromkeys(spares)
        }
        self.restored: dict[int, ProtectedNf] = {}
        # term -> the new primary's epoch machine, born standby-lost (output not committed)
        # until `reprotect` seeds the new standby.
        self.unprotected: dict[int, tuple[ep.PrimaryMachine, ep.Alarm]] = {}
        # The speculative copy, and the one thread that makes, drops and hands it over, in the
        # order commanded: a drop never overtakes the restore it drops. Each `prestore` is a
        # generation; one not begun yet is skipped once a newer one or a drop was commanded,
        # so a flapping peer leaves no backlog of restores in front of a takeover's.
        self._prestored: _Prestored | None = None
        self._prestorer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prestore")
        self._prestore_gen = 0
        self._dropped_gen = 0
        self._gen_lock = threading.Lock()

    def confirm(self, peer: str, timeout_s: float) -> bool:
        return self.agent.confirm_peer(peer, timeout_s)

    def close(self) -> None:
        for link in self._claim_links.values():
            link.close()
        # A copy restored ahead for a takeover that will not come from this watch.
        with contextlib.suppress(Exception):
            self._prestorer.submit(self._drop, None).result(timeout=PRESTORE_CLOSE_S)
        self._prestorer.shutdown(wait=False)

    def raise_term(self, term: int) -> tuple[fo.Claim, ...]:
        """Write `term` durably, then claim it at every spare of the unit, in parallel.

        The claim names the (term, epoch) of the image this node will restore, its store's
        committed checkpoint: a spare grants it only if it holds nothing newer (`shim.standby`),
        and then refuses the old primary's term from now on. The machine judges the answers
        (`shim.failover.judge_claims`): a refusal or no grant at all and this node stands down.
        The image restored later may be newer than the claim (the store can still commit), never
        older, which is what the claim guarantees against.
        """
        self.term_file.write(term)
        if not self._claim_links:
            self.agent.event("claims", unit=self.unit, term=term, image=None, claims=[])
            return ()
        server = self.agent.server
        assert server is not None
        cp = server.committed(self.unit)
        if cp is None:
            raise RuntimeError(f"the store of {self.unit} holds no committed checkpoint")
        image = (cp.term, cp.epoch)
        with concurrent.futures.ThreadPoolExecutor(len(self._claim_links)) as pool:
            futures = [pool.submit(self._claim, s, term, image) for s in self._claim_links]
            claims = tuple(f.result() for f in futures)
        self.agent.event(
            "claims",
            unit=self.unit,
            term=term,
            image=list(image),
            claims=[
                {"spare": c.spare, "verdict": c.verdict.value, "detail": c.detail} for c in claims
            ],
        )
        return claims

    def _claim(self, spare: str, term: int, image: tuple[int, int]) -> fo.Claim:
        link = self._claim_links[spare]
        try:
            link.hello(self.unit, term, claim=image, timeout=self.claim_timeout_s)
        except NackedError as exc:
            n = exc.nack
            return fo.Claim(spare, fo.ClaimVerdict.REFUSED, f"{n.code}: {n.reason}", n.committed)
        except TimeoutError:
            why = f"no answer within {self.claim_timeout_s * 1000:g} ms"
            return fo.Claim(spare, fo.ClaimVerdict.NO_ANSWER, why)
        except Exception as exc:
            return fo.Claim(spare, fo.ClaimVerdict.NO_ANSWER, f"{type(exc).__name__}: {exc}")
        return fo.Claim(spare, fo.ClaimVerdict.GRANTED)

    def fence(self, term: int) -> tuple[int, int]:
        discarded = 0
        with self.agent.dp_client() as dp:
            if self.unit in dp.stats().units:  # left by an earlier attempt
                discarded = dp.set_term(self.unit, term)
                discarded += dp.remove_unit(self.unit)
        return discarded, 1

    def locate(self, term: int) -> tuple[str, int, int]:
        server = self.agent.server
        assert server is not None
        cp = server.promote(self.unit, term)
        if cp is None:
            raise RuntimeError(f"the store of {self.unit} holds no committed checkpoint")
        return str(cp.path), cp.epoch, int(cp.meta.get("cut_seq", 0))

    def restore(self, image: str, term: int) -> int:
        # Always through the prestore thread: a copy still being restored ahead is finished
        # and then used or destroyed (`_take` judges it by what it came from), never left in
        # the netns beside this one.
        nf = self._prestorer.submit(self._take, image, term).result()
        if nf is None:
            nf = self._restore_copy(Path(image), term)
        # Its first cut (the seed of the next standby) needs a CRIU worker: start it now.
        nf.prepare_checkpoint(wait=False)
        self.restored[term] = nf
        self.agent.hooks.restored(self.unit, term, nf)
        self.agent.write_status()
        return nf.pid

    def _restore_copy(
        self, image: Path, term: int, abort: Callable[[], bool] | None = None
    ) -> ProtectedNf:
        name = f"{self.names.container}-t{term}"
        # A standby runs no copy of the unit, so one under this name is what an agent of this
        # host restored ahead and could not drop before it died: it would hold the name, the
        # netns' addresses and the NF's connections.
        if self.agent.backend.remove_stale(name):
            netns.destroy_tcp_sockets(self.names.nf_netns)
            log.warning("unit %s: removed a copy %s that an earlier agent left", self.unit, name)
            self.agent.event("prestore_swept", unit=self.unit, term=term, name=name)
        return restore_unit_nf(
            self.agent.backend, image, self.names.nf_netns, name=name, abort=abort
        )

    def prestore(self, term: int, peer: str, not_before_us: int) -> None:
        with self._gen_lock:
            self._prestore_gen += 1
            gen = self._prestore_gen
        self._prestorer.submit(self._logged, term, self._prestore, gen, term, peer, not_before_us)

    def drop_prestore(self, term: int) -> None:
        with self._gen_lock:
            self._dropped_gen = self._prestore_gen
        self._prestorer.submit(self._logged, term, self._drop, term)

    def _logged(self, term: int, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:
            # A speculation that fails costs only its head start: the takeover restores.
            log.warning("unit %s: %s at term %d failed: %s", self.unit, fn.__name__, term, exc)
            self.agent.event(
                "prestore_failed", unit=self.unit, term=term, reason=f"{type(exc).__name__}: {exc}"
            )

    def _superseded(self, gen: int) -> bool:
        with self._gen_lock:
            return gen != self._prestore_gen or gen <= self._dropped_gen

    def _peer_silent(self, peer: str) -> bool:
        probe = self.agent.probe(peer)
        return probe is None or probe.state != "up"

    def _prestore(self, gen: int, term: int, peer: str, not_before_us: int) -> None:
        """Restore the committed checkpoint as it is now, from hard links of its files: the
        primary may commit again meanwhile, and the store then deletes this one."""
        if self._superseded(gen):
            return
        wait_s = (not_before_us - _now_us()) / 1e6
        if wait_s > 0:
            time.sleep(min(wait_s, PRESTORE_WAIT_MAX_S))
        if self._superseded(gen) or not self._peer_silent(peer):
            return
        self._drop(None)
        server = self.agent.server
        assert server is not None
        cp = server.committed(self.unit)
        if cp is None:
            return
        started = _now_us()
        copy = self.agent.plan.runtime / "prestore" / self.unit
        shutil.rmtree(copy, ignore_errors=True)
        try:
            link_copy(cp.path, copy)
        except FileNotFoundError:
            log.info("unit %s: epoch %d went while copied: no prestore", self.unit, cp.epoch)
            return
        try:
            # A chain stops between members once dropped or superseded: a live peer's copy
            # would otherwise hold this thread, and a real takeover's copy behind it, for
            # every member's restore (~60 ms each under load).
            nf = self._restore_copy(copy, term, abort=lambda: self._superseded(gen))
        except RestoreAbortedError:
            netns.destroy_tcp_sockets(self.names.nf_netns)
            self.agent.event(
                "prestore_dropped", unit=self.unit, term=term, pid=None, why="given up midway"
            )
            return
        finally:
            # CRIU has read the images; the copy's files are needed no more.
            shutil.rmtree(copy, ignore_errors=True)
        self._prestored = _Prestored(term, str(cp.path), nf)
        self.agent.event(
            "prestored",
            unit=self.unit,
            term=term,
            image=[cp.term, cp.epoch],
            pid=nf.pid,
            elapsed_us=_now_us() - started,
        )

    def _drop(self, term: int | None) -> None:
        """Destroy the copy restored ahead (of `term`; None: whichever)."""
        p = self._prestored
        if p is None or (term is not None and p.term != term):
            return
        self._prestored = None
        self._destroy_copy(p.nf)
        self.agent.event("prestore_dropped", unit=self.unit, term=p.term, pid=p.nf.pid)

    def _destroy_copy(self, nf: ProtectedNf) -> None:
        nf.destroy()
        # Its connections linger in the netns (closing) with the very addresses and ports a
        # later restore of the unit binds again.
        netns.destroy_tcp_sockets(self.names.nf_netns)

    def _take(self, image: str, term: int) -> ProtectedNf | None:
        """The copy restored ahead if it is the one `image` at `term` needs; else destroy it."""
        p, self._prestored = self._prestored, None
        if p is None:
            return None
        if p.term == term and p.source == image and not p.nf.exited(timeout=0):
            self.agent.event("prestore_used", unit=self.unit, term=term, pid=p.nf.pid)
            return p.nf
        self._destroy_copy(p.nf)
        why = "it exited" if p.source == image and p.term == term else f"the image is {image}"
        self.agent.event("prestore_dropped", unit=self.unit, term=p.term, pid=p.nf.pid, why=why)
        return None

    def attach(self, term: int) -> None:
        # No standby holds an image of the unit now: it is attached without output commit
        # (plain), as its machine commands (`unprotected_machine`), until the new standby is
        # seeded (`reprotect`).
        machine = unprotected_machine(self.unit, term, remote_config(self.spec), _now_us())
        with self.agent.dp_client() as dp:
            try:
                attach_unit(dp, self.spec, self.names, term=term, paused=True, mode="plain")
                set_mode_retrying(dp, self.unit, "plain")  # the machine's SetOutputCommit(False)
                self.unprotected[term] = machine
                self.agent.hooks.attached(self.unit, term)
                # From here on the unit's wire port keeps what reaches it, paused.
                self.agent.event("attached", unit=self.unit, term=term)
            except BaseException:
                # The machine never saw PortsAttached: leave no half-added unit behind.
                with contextlib.suppress(DataPlaneError):
                    dp.remove_unit(self.unit)
                with contextlib.suppress(DataPlaneError):
                    dp.remove_port(self.names.nf_port)
                raise

    def announce(self, term: int) -> None:
        self.agent.announcer.announce(self.spec.nf.mac, self.spec.nf.address)

    def replay(self, term: int, after_seq: int) -> int:
        """Lossless mode: the logged inputs after the image's cut, into the paused unit, then
        the shadow log's (inputs the old primary never delivered)."""
        name = log_name(self.unit)
        shadow = 0
        with self.agent.dp_client() as dp:
            try:
                before = dp.stats().input_logs.get(name)
                r = dp.replay_input_log(name, self.unit, after_seq, term=term)
                if dp.stats().input_logs[name].shadow:
                    try:
                        shadow = dp.replay_shadow_log(name, self.unit, term=term).delivered
                    except DataPlaneError as exc:
                        why = (
                            f"{exc.code}: {exc.message}; the {r.delivered} mirrored inputs "
                            f"after seq {after_seq} were delivered, lost: the shadow frames "
                            "the message says are left"
                        )
                        raise ReplayError(why) from exc
            except DataPlaneError as exc:
                stats = None
                with contextlib.suppress(DataPlaneError):
                    stats = dp.stats().input_logs.get(name)
                why = replay_loss(after_seq, exc, stats)
                self.agent.event(
                    "replay_failed", unit=self.unit, term=term, after=after_seq, reason=why
                )
                raise ReplayError(why) from exc
            except ReplayError as exc:
                self.agent.event(
                    "replay_failed", unit=self.unit, term=term, after=after_seq, reason=str(exc)
                )
                raise
        self.agent.event(
            "replayed",
            unit=self.unit,
            term=term,
            after=after_seq,
            delivered=r.delivered,
            first=r.first,
            last=r.last,
            shadow=shadow,
            # The log as the replay found it: how its mirror frames met their flooded copies.
            log=None if before is None else attrs.asdict(before),
        )
        return r.delivered + shadow

    def resume(self, term: int) -> None:
        with self.agent.dp_client() as dp:
            dp.resume_ingress(self.unit, term)
        _machine, alarm = self.unprotected[term]
        self.agent.event("unprotected", unit=self.unit, term=term, reason=alarm.reason)
        if self.spec.protection.lossless:
            # Replayed, or given up: either way nothing will read the log again. A failed
            # attempt keeps it, so that an operator's retry can still replay it.
            self.agent.lossless.discard(self.unit)
            try:
                dropped = self.agent.inputs.remove(self.unit)
            except DataPlaneError:
                # The unit runs; a log left behind only costs its memory.
                log.exception("unit %s: removing the input log failed", self.unit)
            else:
                self.agent.event("input_log_removed", unit=self.unit, term=term, dropped=dropped)

    def _candidates(self) -> list[str]:
        """Hosts a new standby may be put on: the spares; inside the main agent, the spares
        first, then its other peers but the failed primary (the new one is set up by its
        `standby_add`, `RoleHooks.add_standby`)."""
        if not self.agent.embedded:
            return list(self.spares)
        others = [p for p in self.agent.plan.peers if p not in (self.primary, self.agent.host)]
        return list(dict.fromkeys([*self.spares, *others]))

    def survey(self, term: int) -> tuple[HostFacts, ...]:
        return tuple(
            HostFacts(s, self.agent.links.ping(s, SURVEY_PING_S), 1 << 34, 0, False)
            for s in self._candidates()
        )

    def reprotect(self, term: int, standby: str) -> None:
        nf = self.restored[term]
        machine, _alarm = self.unprotected[term]
        # The spares it claimed its term at, but the new standby: where the unit goes if that
        # one is lost (a deposed primary with on_fenced = "standby" joins them later).
        spares = [s for s in self.spares if s not in (standby, self.agent.host)]
        if self.agent.embedded:
            # It becomes the standby first (netns, image, and a watch of this host at the new
            # term), as at `hamgr protect`: a spare with the store it holds (it recorded this
            # term at the claim), another peer with a new one.
            self.agent.hooks.add_standby(self.spec, standby, term, spares)
        role = PrimaryRole(
            self.spec,
            self.names,
            nf,
            term,
            standby,
            spares,
            protection="unprotected",
            on_fenced=self.agent._policy(self.spec),
        )
        self.agent.primaries[self.unit] = role
        # A failed re-protection leaves the unit running unprotected (plain), not stalled.
        self.agent.protect(role, standby, first=True, unprotected=machine)
        del self.unprotected[term]
        self.agent.write_status()

    def detach(self, term: int) -> None:
        with self.agent.dp_client() as dp, contextlib.suppress(DataPlaneError):
            dp.pause_ingress(self.unit, term)

    def destroy_restored(self, term: int, pid: int | None) -> None:
        nf = self.restored.pop(term, None)
        if nf is not None:
            nf.destroy()
            self.agent.hooks.destroyed(self.unit, nf)
            self.agent.write_status()

    def discard_output(self, term: int) -> None:
        self.unprotected.pop(term, None)
        with self.agent.dp_client() as dp, contextlib.suppress(DataPlaneError):
            dp.remove_unit(self.unit)


@click.group()
def cli() -> None:
    """A host's agent for remote roles (primary, standby, spare)."""


@cli.command()
@click.option("--plan", "plan_path", type=click.Path(path_type=Path), required=True)
def run(plan_path: Path) -> None:
    """Run until SIGTERM; the plan file says what this host does."""
    logging.basicConfig(
        level=os.environ.get("HAMGR_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    agent = RemoteAgent(HostPlan.load(plan_path))
    signal.signal(signal.SIGTERM, lambda *_: agent.stop())
    try:
        agent.start()
        agent.run()
    finally:
        agent.close()


if __name__ == "__main__":
    cli()
