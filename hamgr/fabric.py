"""A three-host testbed in network namespaces, for remote failover (DESIGN.md "Testbed").

::

                              fabric netns <p>-br:  bridge br0
        ┌───────────┬────────────┬──────────────┬──────────────┬──────────────┐
    client <p>-cl  sink <p>-sk   host A <p>-A    host B <p>-B    host C <p>-C
    198.18.0.1     198.18.0.3    data  <p>dA     data  <p>dB     data  <p>dC   (no IP: the
                                 mgmt  <p>mA     mgmt  <p>mB     mgmt  <p>mC    data plane's
                                 198.18.1.1      198.18.1.2      198.18.1.3     af_packet)

Each host netns holds its own agent (`hamgr.agent.remote`, started under ``nsenter --net``),
which starts its own data plane (own ``--file-prefix``). The data link is the data plane's port
``fab``: the unit's wire and egress, and the port of the probes. The management link carries a
kernel IP for the agents' control endpoints and replication (zmq, CURVE; the keys are made here
and handed to each agent in its plan file, 0600).

With ``agents="main"`` each host runs the main agent instead (``hamgr up`` inside its netns, on
a state dir of its own): ``hamgr init`` makes its config and keys, then the testbed adds
``[remote]`` (the data link, the replication endpoint) and the two other hosts as
``[peers.NAME]`` to its ``agent.toml`` and their agent keys to its ``authorized_keys``. No unit
is protected at start: a test protects one with `cli` (``hamgr protect`` on a host, its
standby named in the spec, `sequencer_spec(standby=...)`).

The NF (the sequencer) is 198.18.0.2 with a fixed MAC on every host: in its netns on the
primary, and in a prepared netns on the standby whose veth stays out of the data plane until a
takeover. All neighbours are static: an ARP reply of the NF would be held in an epoch buffer.
The sink has its own address, so the NF's output and the client's input never share a MAC.

With ``lossless=True`` the unit is protected in lossless mode (DESIGN.md I7): A mirrors its
inputs on its data link, so the data links get an MTU 26 bytes above any input (1600).

`kill_host` SIGKILLs every process of a host at once (agent and its children, data plane, NFs:
the PIDs are in the agent's ``status.json``) and takes its two fabric links down. `partition`
cuts two live hosts apart (every frame between their links is dropped in the bridge, by an
nftables ``bridge`` table in the fabric netns) and `heal` joins them again; `mute_probes`
drops only the data planes' liveness probes between two hosts (their agents still reach each
other: a disputed silence) until `unmute_probes`. `close`
removes everything, by PID and by name: processes, containers, namespaces, cgroups, hugepage
files, tmpfs directories. Addresses are from 198.18.0.0/15 only.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import attrs
import zmq

from dpdk_vhost.client import DataPlaneClient
from dpdk_vhost.process import remove_dpdk_files
from dpdk_vhost.protocol import ETHERTYPE_PROBE, Stats
from hamgr import keys
from hamgr.agent.config import AgentConfig, PeerConfig, RemoteConfig
from hamgr.agent.remote import HostPlan, PeerPlan, UnitPlan
from hamgr.agent.unitnet import UnitNames
from hamgr.testbed import Testbed
from shim import netns
from shim.container import remove_cgroup
from shim.devmounts import DevMountError, detach_mounts_under

__all__ = ["Fabric", "HostHandle", "sequencer_spec"]

CLIENT_IP = "198.18.0.1"
NF_IP = "198.18.0.2"
SINK_IP = "198.18.0.3"
CLIENT_MAC = "02:00:c6:12:00:01"
NF_MAC = "02:00:c6:12:00:02"
SINK_MAC = "02:00:c6:12:00:03"
NF_PORT = 7000
SINK_PORT = 9000
CONTROL_PORT = 7100
REPL_PORT = 7200
UNIT = "seq0"
HOSTS = ("A", "B", "C")
START_TIMEOUT_S = 60.0
PARTITION_TABLE = "hamgr_partition"
# A lossless unit's primary mirrors each input with a 26-byte header (docs/dataplane.md, "Input
# mirror"): the data links carry frames that much longer than the largest input.
LOSSLESS_DATA_MTU = 1600


def sequencer_spec(
    unit: str = UNIT,
    *,
    epoch_ms: int = 50,
    image: str = "sequencer",
    lossless: bool = False,
    tcp_port: int | None = None,
    chain: int = 1,
    standby: str | None = None,
    spares: tuple[str, ...] = (),
    on_fenced: str = "stop",
) -> str:
    """The sequencer's unit spec on the fabric; with `tcp_port` it also serves TCP there; with
    `standby` (a host's name) its standby is on that host (for the main agents), and `spares`
    its spares, and `on_fenced` what its primary does once deposed.

    With `chain` > 1 the unit is a chain of that many sequencers: each forwards to the next on
    the next port over the NF netns's loopback, and the last one to the sink.
    """
    tcp = "" if tcp_port is None else f', "--tcp-listen", "{tcp_port}"'
    standby_table = "" if standby is None else f'\n[standby]\nhost = "{standby}"\n'
    if spares:
        standby_table += f"spares = {json.dumps(list(spares))}\n"
    if on_fenced != "stop":
        standby_table += f'on_fenced = "{on_fenced}"\n'
    dest = f"{SINK_IP}:{SINK_PORT}" if chain == 1 else f"127.0.0.1:{NF_PORT + 1}"
    members = ""
    for i in range(1, chain):
        to = f"{SINK_IP}:{SINK_PORT}" if i == chain - 1 else f"127.0.0.1:{NF_PORT + i + 1}"
        members += (
            f'\n[[chain]]\nimage = "{image}"\nargs = ["/usr/local/bin/sequencer", '
            f'"--listen", "{NF_PORT + i}", "--dest", "{to}"]\n'
        )
    return f"""\
name = "{unit}"

[nf]
image = "{image}"
args = ["/usr/local/bin/sequencer", "--listen", "{NF_PORT}", "--dest", "{dest}"{tcp}]
address = "{NF_IP}/24"
mac = "{NF_MAC}"

[nf.neighbors]
"{SINK_IP}" = "{SINK_MAC}"
"{CLIENT_IP}" = "{CLIENT_MAC}"

# Remote roles use the host's data link as both wire and egress (hamgr.agent.remote); the
# spec's port names are not used there, but the spec format wants two distinct ones.
[ports]
wire = ["fab"]
egress = "fabout"
{standby_table}
[epoch]
policy = "fixed"
length_ms = {epoch_ms}

[protection]
max_inflight = 4
memory_budget_mb = 64
lossless = {"true" if lossless else "false"}
on_standby_loss = "stall"
{members}"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def _in_netns(name: str) -> set[int]:
    """The processes whose network namespace is the named one (/run/netns/NAME)."""
    try:
        ino = os.stat(f"/run/netns/{name}").st_ino
    except OSError:
        return set()
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(entry / "ns" / "net").st_ino == ino:
                    out.add(int(entry.name))
    return out


def _children(pids: set[int]) -> set[int]:
    """`pids` and all their descendants (one /proc scan per generation)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(entry.name))
    out, todo = set(), list(pids)
    while todo:
        pid = todo.pop()
        if pid in out:
            continue
        out.add(pid)
        todo.extend(parents.get(pid, []))
    return out


@attrs.define
class HostHandle:
    letter: str
    name: str  # the agent's host name
    ns: str
    work: Path
    runtime: Path
    mgmt_ip: str
    public: str
    secret: str
    cpu: int
    proc: subprocess.Popen[bytes] | None = None
    killed_us: int | None = None

    @property
    def control(self) -> str:
        return f"tcp://{self.mgmt_ip}:{CONTROL_PORT}"

    def status(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads((self.work / "status.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        return data

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        path = self.work / "events.jsonl"
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                ev = json.loads(line)
                if kind is None or ev.get("kind") == kind:
                    out.append(ev)
        return out

    def log(self) -> str:
        for path in (self.work / "agent.log", self.work / "log" / "agent.log"):
            if path.exists():
                return path.read_text(errors="replace")
        return ""


_TESTBEDS = itertools.count()


@attrs.define
class Fabric(Testbed):
    """The three hosts, the bridge, the client and the sink (module doc)."""

    __test__ = False

    work: Path
    # Unique per testbed, not just per process: a bench builds one testbed per run, and a
    # leftover of the previous run (a store under /dev/shm, a link) must never be reused.
    prefix: str = attrs.field(factory=lambda: f"f{os.getpid() % 1000}{next(_TESTBEDS) % 100}")
    epoch_ms: int = 50
    # The unit in lossless mode (DESIGN.md I7): its inputs mirrored to the standby and replayed
    # there after a takeover; the data links get LOSSLESS_DATA_MTU.
    lossless: bool = False
    # The sequencer also serves TCP on this port (a connection that must survive the takeover).
    tcp_port: int | None = None
    # The unit is a chain of this many sequencers (`sequencer_spec`).
    chain: int = 1
    # "plan": each host runs `hamgr.agent.remote` from a plan; "main": `hamgr up` (module doc).
    agents: str = attrs.field(default="plan", validator=attrs.validators.in_(("plan", "main")))
    # Every host's `UnitPlan.on_fenced` (plan agents): what a deposed primary does.
    on_fenced: str = "stop"
    made: list[str] = attrs.Factory(list)
    hosts: dict[str, HostHandle] = attrs.Factory(dict)
    _partition_table: bool = False

    @property
    def br(self) -> str:
        return f"{self.prefix}-br"

    @property
    def cl(self) -> str:
        return f"{self.prefix}-cl"

    @property
    def sk(self) -> str:
        return f"{self.prefix}-sk"

    # -- build ---------------------------------------------------------------------------

    def build(self) -> None:
        p = self.prefix
        self.work.mkdir(parents=True, exist_ok=True)
        for i, letter in enumerate(HOSTS):
            pub, sec = zmq.curve_keypair()
            name = f"{p}{letter}"
            self.hosts[letter] = HostHandle(
                letter,
                name,
                f"{p}-{letter}",
                self.work / name,
                Path("/dev/shm") / f"hamgr-{name}",
                f"198.18.1.{i + 1}",
                pub.decode(),
                sec.decode(),
                cpu=(1, 0, 1)[i],
            )
        spaces = [self.br, self.cl, self.sk, *(h.ns for h in self.hosts.values())]
        for ns in spaces:
            netns.create_netns(ns)
            self.made.append(ns)
            netns.quiet_host_netns(ns)
        _ip("-n", self.br, "link", "add", "br0", "type", "bridge", "stp_state", "0")
        _ip("-n", self.br, "link", "set", "br0", "up")
        self._port(f"{p}c", self.cl, f"{p}bc", CLIENT_MAC)
        self._port(f"{p}s", self.sk, f"{p}bs", SINK_MAC)
        netns.add_address(f"{p}c", f"{CLIENT_IP}/24", self.cl)
        netns.add_address(f"{p}s", f"{SINK_IP}/24", self.sk)
        _ip("-n", self.cl, "neigh", "replace", NF_IP, "lladdr", NF_MAC, "dev", f"{p}c",
            "nud", "permanent")  # fmt: skip
        for h in self.hosts.values():
            self._port(f"{p}d{h.letter}", h.ns, f"{p}bd{h.letter}", None)
            self._port(f"{p}m{h.letter}", h.ns, f"{p}bm{h.letter}", None)
            if self.lossless:
                mtu = str(LOSSLESS_DATA_MTU)
                _ip("-n", h.ns, "link", "set", f"{p}d{h.letter}", "mtu", mtu)
                _ip("-n", self.br, "link", "set", f"{p}bd{h.letter}", "mtu", mtu)
            netns.add_address(f"{p}m{h.letter}", f"{h.mgmt_ip}/24", h.ns)
            _ip("-n", h.ns, "link", "set", "lo", "up")

    def _port(self, outer: str, ns: str, inner: str, mac: str | None) -> None:
        netns.create_veth(netns.VethEnd(outer, ns), netns.VethEnd(inner, self.br))
        if mac is not None:
            netns.set_mac_address(outer, mac, ns)
        # AF_PACKET reads a CHECKSUM_PARTIAL frame with its checksum never filled in.
        netns.disable_checksum_offload(outer, ns)
        netns.set_up(outer, ns)
        _ip("-n", self.br, "link", "set", inner, "master", "br0")
        netns.set_up(inner, self.br)

    def plan(self, letter: str) -> HostPlan:
        h = self.hosts[letter]
        peers = {
            o.name: PeerPlan(o.mgmt_ip, CONTROL_PORT, REPL_PORT, o.public)
            for o in self.hosts.values()
            if o.letter != letter
        }
        a, b, c = (self.hosts[x].name for x in HOSTS)
        spec = sequencer_spec(
            epoch_ms=self.epoch_ms,
            lossless=self.lossless,
            tcp_port=self.tcp_port,
            chain=self.chain,
        )
        fenced = self.on_fenced
        role = {
            "A": UnitPlan(spec, "primary", standby=b, spares=(c,), on_fenced=fenced),
            "B": UnitPlan(spec, "standby", primary=a, spares=(c,), on_fenced=fenced),
            "C": UnitPlan(spec, "spare", on_fenced=fenced),
        }[letter]
        return HostPlan(
            host=h.name,
            work=h.work,
            runtime=h.runtime,
            data_iface=f"{self.prefix}d{letter}",
            mgmt_ip=h.mgmt_ip,
            control_port=CONTROL_PORT,
            repl_port=REPL_PORT,
            public_key=h.public,
            secret_key=h.secret,
            peers=peers,
            units=(role,),
            cpu=h.cpu,
        )

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Start the agents: spare and standby first, so the primary's first ship finds them."""
        if self.agents == "main":
            self._start_main(timeout)
            return
        for letter in ("C", "B", "A"):
            h = self.hosts[letter]
            h.work.mkdir(parents=True, exist_ok=True)
            plan_path = h.work / "plan.json"
            self.plan(letter).dump(plan_path)
            log = (h.work / "agent.log").open("ab")
            h.proc = subprocess.Popen(
                [
                    "nsenter",
                    f"--net={netns.netns_path(h.ns)}",
                    "--",
                    sys.executable,
                    "-m",
                    "hamgr.agent.remote",
                    "run",
                    "--plan",
                    str(plan_path),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
            log.close()
            self.wait_event(letter, "ready", timeout=timeout)

    # -- main agents (agents="main") -----------------------------------------------------

    def _start_main(self, timeout: float) -> None:
        for letter in HOSTS:
            self.init_main(letter)
        for letter in HOSTS:
            self.configure_main(letter)
        for letter in ("C", "B", "A"):
            self.cli(letter, "up", "--timeout", str(timeout), timeout=timeout + 30)

    def init_main(self, letter: str) -> None:
        """``hamgr init`` for host `letter`: its config (control on its management IP) and
        keys; the host's keys are the ones init made from now on."""
        h = self.hosts[letter]
        subprocess.run(
            [sys.executable, "-m", "hamgr", "init", "--state-dir", str(h.work),
             "--host", h.name, "--control", h.control, "--metrics", "127.0.0.1:0",
             "--runtime-dir", str(h.runtime), "--dp-cpu", str(h.cpu)],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        kp = keys.load_keypair(keys.keys_dir(h.work), keys.AGENT)
        h.public, h.secret = kp.public.decode(), kp.secret.decode()

    def configure_main(self, letter: str) -> None:
        """[remote] and the two other hosts as peers in the host's agent.toml; their agent
        keys in its authorized_keys."""
        h = self.hosts[letter]
        config = AgentConfig.load(h.work)
        others = [o for o in self.hosts.values() if o.letter != letter]
        config = attrs.evolve(
            config,
            remote=RemoteConfig(
                data_link=f"{self.prefix}d{letter}",
                replication=f"tcp://{h.mgmt_ip}:{REPL_PORT}",
            ),
            peers={
                o.name: PeerConfig(o.name, o.control, f"tcp://{o.mgmt_ip}:{REPL_PORT}", o.public)
                for o in others
            },
        )
        config.write()
        authorized = keys.AuthorizedKeys(h.work / keys.AUTHORIZED_KEYS)
        for o in others:
            authorized.add(o.public, f"agent of {o.name}")

    def cli(
        self, letter: str, *args: str, check: bool = True, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """``hamgr ARGS --state-dir DIR`` inside host `letter`'s netns (agents="main")."""
        h = self.hosts[letter]
        argv = [sys.executable, "-m", "hamgr", *args, "--state-dir", str(h.work)]
        proc = subprocess.run(
            self.in_ns(h.ns, argv), capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"`hamgr {' '.join(args)}` on {h.name} exited {proc.returncode}\n"
                f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-4000:]}"
            )
        return proc

    def cli_json(self, letter: str, *args: str, check: bool = True) -> dict[str, Any]:
        """The last line of ``hamgr ARGS --json`` on host `letter`."""
        proc = self.cli(letter, *args, "--json", check=check)
        data: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        data["exit"] = proc.returncode
        return data

    def wait_event(
        self, letter: str, kind: str, *, timeout: float, after_us: int = 0, **match: Any
    ) -> dict[str, Any]:
        h = self.hosts[letter]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ev in h.events(kind):
                if ev["mono_us"] >= after_us and all(ev.get(k) == v for k, v in match.items()):
                    return ev
            if h.proc is not None and h.proc.poll() is not None and h.killed_us is None:
                raise RuntimeError(f"the agent of {h.name} exited:\n{h.log()[-3000:]}")
            time.sleep(0.02)
        raise TimeoutError(f"no {kind} event {match} from {h.name} in {timeout} s")

    def request(self, letter: str, body: dict[str, Any], timeout: float = 1.0) -> Any:
        """A request to a host's agent from outside (the caller's netns reaches no host), so it
        is sent from inside the client netns by a helper process."""
        h = self.hosts[letter]
        code = (
            "import json,sys;from hamgr.agent.remote import request;"
            f"print(json.dumps(request({h.control!r},{h.public!r},json.loads(sys.argv[1]),"
            f"{timeout})))"
        )
        # From C (B for C) over the management link, as ever; from another live host if that
        # one was killed, and from the host itself when it is the last one standing.
        first = "C" if letter != "C" else "B"
        order = [first, *(x for x in HOSTS if x not in (first, letter)), letter]
        via = next(x for x in order if x == letter or self.hosts[x].killed_us is None)
        out = subprocess.run(
            ["nsenter", f"--net={netns.netns_path(self.hosts[via].ns)}",
             "--", sys.executable, "-c", code, json.dumps(body)],
            capture_output=True, text=True, timeout=timeout + 20, check=True,
        )  # fmt: skip
        return json.loads(out.stdout.strip().splitlines()[-1])

    def in_ns(self, ns: str, argv: list[str]) -> list[str]:
        return ["nsenter", f"--net={netns.netns_path(ns)}", "--", *argv]

    # -- failure -------------------------------------------------------------------------

    def host_pids(self, letter: str) -> set[int]:
        h = self.hosts[letter]
        st = h.status()
        roots = {int(p) for p in st.get("nf_pids", {}).values()}
        for key in ("agent_pid", "dp_pid"):
            if st.get(key):
                roots.add(int(st[key]))
        with contextlib.suppress(OSError, ValueError):  # a main agent's own pid file
            roots.add(int((h.work / "agent.pid").read_text().strip()))
        if h.proc is not None and h.proc.poll() is None:
            roots.add(h.proc.pid)
        # And whatever runs in its NFs' netns, recorded or not (a copy restored ahead).
        return _children(roots | self.nf_netns_pids(letter))

    def nf_netns_pids(self, letter: str) -> set[int]:
        """The processes in host `letter`'s NF network namespaces: its NFs, and nothing else."""
        pids: set[int] = set()
        for path in Path("/run/netns").glob(f"hamgr-{self.hosts[letter].name}-*"):
            pids |= _in_netns(path.name)
        return pids

    def kill_host(self, letter: str, pids: set[int] | None = None) -> int:
        """Take the host's fabric links down, then SIGKILL everything of it at once.

        `pids`: the host's processes, from `host_pids` taken just before (its scan of /proc
        takes milliseconds, which a kill timed to the unit's state cannot wait for).
        Returns the CLOCK_MONOTONIC time of the kill, in microseconds."""
        h = self.hosts[letter]
        pids = self.host_pids(letter) if pids is None else pids
        h.killed_us = time.monotonic_ns() // 1000
        # Links first, both at once (no `ip` spawned: that took 5-20 ms, in which the host
        # could still ship and commit): a dead host answers nothing. Killed first, its kernel
        # would reset a peer's connection attempt to the agent's port until the links went
        # down, and the peer's check (docs/failover.md, "Confirm") would take it for a live
        # host whose agent restarts.
        with contextlib.suppress(netns.NetnsError):
            netns.links_down(self.br, *self._bridge_ports(letter))
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if h.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                h.proc.wait(5)
        return h.killed_us

    def _bridge_ports(self, letter: str) -> tuple[str, str]:
        """The bridge's ends of a host's data and management links."""
        return f"{self.prefix}bd{letter}", f"{self.prefix}bm{letter}"

    def _partition_elements(self, a: str, b: str) -> str:
        pairs = [
            (x, y)
            for one, other in ((a, b), (b, a))
            for x in self._bridge_ports(one)
            for y in self._bridge_ports(other)
        ]
        return "{ " + ", ".join(f'"{x}" . "{y}"' for x, y in pairs) + " }"

    def partition(self, a: str, b: str) -> int:
        """Drop every frame between hosts `a` and `b` (both links, both ways), nothing else.

        An nftables ``bridge`` table in the fabric netns drops frames whose (in port, out port)
        pair is in its set, flooded frames included (the forward hook sees each copy with its
        own out port). Both hosts keep reaching the client, the sink and the third host.
        The table lives in the fabric netns, so `close` removes it with the netns. Returns the
        CLOCK_MONOTONIC time of the cut (just before it: `_nft_at`), in microseconds.
        """
        if a == b or a not in self.hosts or b not in self.hosts:
            raise ValueError(f"a partition is between two hosts of {sorted(self.hosts)}")
        self._partition_setup()
        return self._nft_at(
            f"add element bridge {PARTITION_TABLE} pairs {self._partition_elements(a, b)}"
        )

    def _partition_setup(self) -> None:
        if not self._partition_table:
            self._nft(
                f"add table bridge {PARTITION_TABLE}\n"
                f"add set bridge {PARTITION_TABLE} pairs {{ type ifname . ifname; }}\n"
                f"add chain bridge {PARTITION_TABLE} cut "
                "{ type filter hook forward priority 0; policy accept; }\n"
                f"add rule bridge {PARTITION_TABLE} cut iifname . oifname @pairs drop\n"
                f"add set bridge {PARTITION_TABLE} probe_pairs {{ type ifname . ifname; }}\n"
                f"add rule bridge {PARTITION_TABLE} cut iifname . oifname @probe_pairs "
                f"ether type {ETHERTYPE_PROBE:#06x} drop\n"
            )
            self._partition_table = True

    def mute_probes(self, a: str, b: str, *, timeout: float = 5.0) -> int:
        """Drop the liveness probes between hosts `a` and `b`, both ways, and nothing else; returns
        the CLOCK_MONOTONIC time of the cut (just before it), in µs.

        The cut waits (up to `timeout`) until each data plane has the other up: one that had it
        down already, in a flap of its own, would report no ``peer_down`` for this silence."""
        if a == b or a not in self.hosts or b not in self.hosts:
            raise ValueError(f"probes are muted between two hosts of {sorted(self.hosts)}")
        self._partition_setup()  # first: between the check and the cut, one short command
        deadline = time.monotonic() + timeout
        while not (self._probe_up(a, b) and self._probe_up(b, a)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the probes between {a} and {b} were not up within {timeout} s")
            time.sleep(0.002)
        return self._nft_at(
            f"add element bridge {PARTITION_TABLE} probe_pairs {self._data_pairs(a, b)}"
        )

    def dp_client(self, letter: str) -> DataPlaneClient:
        """A client of host `letter`'s data plane (either kind of agent keeps it there)."""
        return DataPlaneClient(str(self.hosts[letter].work / "dataplane" / "dp.sock"))

    def dp_stats(self, letter: str) -> Stats:
        """Host `letter`'s data plane's counters."""
        with self.dp_client(letter) as dp:
            return dp.stats()

    def _probe_up(self, letter: str, peer: str) -> bool:
        """Whether host `letter`'s data plane has its probe of host `peer` up."""
        probe = self.dp_stats(letter).probes.get(self.hosts[peer].name)
        return probe is not None and probe.state == "up"

    def unmute_probes(self, a: str, b: str) -> int:
        """Undo `mute_probes(a, b)`; returns the CLOCK_MONOTONIC time, in µs."""
        if not self._partition_table:
            raise ValueError("no probes are muted")
        return self._nft_at(
            f"delete element bridge {PARTITION_TABLE} probe_pairs {self._data_pairs(a, b)}"
        )

    def _data_pairs(self, a: str, b: str) -> str:
        x, y = self._bridge_ports(a)[0], self._bridge_ports(b)[0]
        return f'{{ "{x}" . "{y}", "{y}" . "{x}" }}'

    def heal(self, a: str, b: str) -> int:
        """Undo `partition(a, b)`; returns the CLOCK_MONOTONIC time of the heal, in µs."""
        if not self._partition_table:
            raise ValueError("no partition to heal")
        return self._nft_at(
            f"delete element bridge {PARTITION_TABLE} pairs {self._partition_elements(a, b)}"
        )

    def partitioned(self) -> set[tuple[str, str]]:
        """The (in port, out port) pairs the fabric drops now."""
        if not self._partition_table:
            return set()
        out = subprocess.run(
            self.in_ns(self.br, ["nft", "-j", "list", "set", "bridge", PARTITION_TABLE, "pairs"]),
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout  # fmt: skip
        pairs: set[tuple[str, str]] = set()
        for item in json.loads(out)["nftables"]:
            for elem in item.get("set", {}).get("elem", []):
                x, y = elem["concat"]
                pairs.add((x, y))
        return pairs

    def _nft_at(self, script: str) -> int:
        """Run `script`; returns the CLOCK_MONOTONIC time (µs) just before it: the command takes
        milliseconds, and what the change causes (a data plane's ``peer_down`` comes 3 ms after
        the probes stop) may happen before it returns, never before it starts."""
        started = time.monotonic_ns() // 1000
        self._nft(script)
        return started

    def _nft(self, script: str) -> None:
        subprocess.run(
            self.in_ns(self.br, ["nft", "-f", "-"]),
            input=script, capture_output=True, text=True, timeout=10, check=True,
        )  # fmt: skip

    # -- teardown ------------------------------------------------------------------------

    def close(self) -> None:
        host_pids = {h.letter: self.host_pids(h.letter) for h in self.hosts.values()}
        # Every agent stops before any host's data plane and NFs go: an agent that outlived
        # its peer's teardown took the unit over from it (C from B after a test that left C
        # B's standby), and that takeover, cut short by its own host's teardown, left CRIU's
        # mounts in the work dir behind.
        for h in self.hosts.values():
            if h.proc is not None and h.proc.poll() is None:
                h.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(OSError, ValueError):  # a main agent's own pid file
                agent = int((h.work / "agent.pid").read_text().strip())
                if agent in _in_netns(h.ns):  # still that agent, not a recycled pid
                    os.kill(agent, signal.SIGKILL)
        for h in self.hosts.values():
            if h.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    h.proc.wait(5)
        for h in self.hosts.values():
            pids = host_pids[h.letter]
            # Also what no known process is the parent of any more: a helper (a CRIU worker)
            # orphaned when a killed host's agent died still runs in the host's netns.
            for pid in pids | _in_netns(h.ns):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if h.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    h.proc.wait(5)
            st = h.status()
            if st.get("dp_prefix"):
                remove_dpdk_files(st["dp_prefix"])
            runc_root = h.work / "containers" / "runc"
            if runc_root.is_dir():
                for entry in runc_root.iterdir():
                    subprocess.run(
                        ["runc", "--root", str(runc_root), "delete", "--force", entry.name],
                        capture_output=True,
                        timeout=30,
                        check=False,
                    )
            for path in Path("/run/netns").glob(f"hamgr-{h.name}-*"):
                for pid in _in_netns(path.name):  # the NFs' netns: whatever the runc delete left
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(netns.NetnsError):
                    netns.delete_netns(path.name)
        for h in self.hosts.values():
            # What a restore cut short by its host's kill left mounted in the work dir (the
            # bundle's /dev and /dev/shm, CRIU's root): detached, or the work dir stays.
            for root in (h.work, h.runtime):
                with contextlib.suppress(DevMountError):
                    detach_mounts_under(root)
            remove_cgroup(UnitNames(h.name, UNIT).cgroup_parent, timeout=2.0)
            shutil.rmtree(h.runtime, ignore_errors=True)
        # The partition table lives in the fabric netns and goes with it.
        for ns in reversed(self.made):
            with contextlib.suppress(netns.NetnsError):
                netns.delete_netns(ns)
        self.made.clear()
        self._partition_table = False
