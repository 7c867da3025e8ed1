"""A one-host testbed for a protected container NF, used by benchmarks, the demo and tests.

Every namespace is made here and removed by `close()`; addresses come from 198.18.0.0/15 only.

    client netns                    data-plane netns             NF netns
    w  198.18.0.1 ── veth ── dw  (wire, af_packet)
                                  dn  (nf, af_packet)  ── veth ── n 198.18.0.2  NF
    s  (sink side) ── veth ── ds  (egress, af_packet)

The NF sends to 198.18.0.1 through the data plane's egress, which arrives on `s` in the client
netns, where the sink listens. Static neighbour entries replace ARP, whose replies would otherwise
be NF output held in epoch buffers.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import attrs

from dpdk_vhost.client import DataPlaneClient
from dpdk_vhost.process import DataPlaneConfig, DataPlaneProcess
from hamgr.nfs import images
from shim import netns
from shim.chain import Chain, ChainBackend
from shim.container import Container, RuncBackend, remove_cgroup_parent
from shim.oci import ContainerSpec
from shim.replication import ReplicationServer
from shim.store import Store

CLIENT_IP = "198.18.0.1"
NF_IP = "198.18.0.2"
CLIENT_MAC = "02:00:c6:12:00:01"
NF_MAC = "02:00:c6:12:00:02"
SINK_MAC = "02:00:c6:12:00:03"
NF_PORT = 7000
SINK_PORT = 9000
UNIT = "seq0"


def wait_udp_bound(pid: int, port: int, timeout: float = 10.0) -> None:
    """Wait until process `pid` has a UDP socket bound to `port` (its netns's view)."""
    suffix = f":{port:04X}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in Path(f"/proc/{pid}/net/udp").read_text().splitlines()[1:]:
            if line.split()[1].endswith(suffix):
                return
        time.sleep(0.01)
    raise TimeoutError(f"pid {pid} did not bind UDP port {port} within {timeout} s")


def sequencer_args(*extra: str) -> tuple[str, ...]:
    return (
        "/usr/local/bin/sequencer",
        "--listen",
        str(NF_PORT),
        "--dest",
        f"{CLIENT_IP}:{SINK_PORT}",
        *extra,
    )


def chain_args(members: int) -> list[tuple[str, ...]]:
    """The sequencer as every member of a chain, upstream first: member i listens on
    NF_PORT + i and stamps and forwards to member i+1 over the netns's loopback; the last one
    sends to the sink. The sink then sees one counter per member, the last member's first."""
    out: list[tuple[str, ...]] = []
    for i in range(members):
        last = i == members - 1
        dest = f"{CLIENT_IP}:{SINK_PORT}" if last else f"127.0.0.1:{NF_PORT + i + 1}"
        out.append(("/usr/local/bin/sequencer", "--listen", str(NF_PORT + i), "--dest", dest))
    return out


class Testbed:
    """Namespaces and processes made by `build` and all removed by `close`, even after a failed
    build: use it as a context manager."""

    __test__ = False  # not a pytest class, despite its name

    def build(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@attrs.define
class UnitBed(Testbed):
    """Namespaces, a data plane, one NF container and a local standby store."""

    work: Path
    prefix: str = attrs.field(factory=lambda: f"hb{os.getpid() % 100000}")
    made: list[str] = attrs.Factory(list)
    dp: DataPlaneProcess | None = None
    client: DataPlaneClient | None = None
    nf: Container | None = None
    server: ReplicationServer | None = None
    images: Path | None = None
    backend: RuncBackend | None = None
    chain: Chain | None = None

    @property
    def cgroup_parent(self) -> str:
        return f"/hamgr-bed-{self.prefix}"

    @property
    def cl(self) -> str:
        return f"{self.prefix}-cl"

    @property
    def standby_root(self) -> Path:
        return Path("/dev/shm") / f"hamgr-bed-{self.prefix}-standby"

    @property
    def dpns(self) -> str:
        return f"{self.prefix}-dp"

    @property
    def nfns(self) -> str:
        return f"{self.prefix}-nf"

    def build(self) -> None:
        for ns in (self.cl, self.dpns, self.nfns):
            netns.create_netns(ns)
            self.made.append(ns)
            netns.quiet_host_netns(ns)
        p = self.prefix
        for outer, ns, inner, mac in (
            (f"{p}w", self.cl, f"{p}dw", CLIENT_MAC),
            (f"{p}s", self.cl, f"{p}ds", SINK_MAC),
            (f"{p}n", self.nfns, f"{p}dn", NF_MAC),
        ):
            netns.create_veth(netns.VethEnd(outer, ns), netns.VethEnd(inner, self.dpns))
            netns.set_mac_address(outer, mac, ns)
            netns.set_up(outer, ns)
            netns.set_up(inner, self.dpns)
            netns.disable_checksum_offload(outer, ns)
        netns.add_address(f"{p}w", f"{CLIENT_IP}/24", self.cl)
        netns.add_address(f"{p}n", f"{NF_IP}/24", self.nfns)
        netns.add_static_neighbor(NF_IP, NF_MAC, f"{p}w", self.cl)
        netns.add_static_neighbor(CLIENT_IP, SINK_MAC, f"{p}n", self.nfns)
        # Checkpoints go to tmpfs, as on a real primary.
        self.images = Path("/dev/shm") / f"hamgr-bed-{p}"
        self.images.mkdir()

    def start_dataplane(self, mode: str = "ha", cpu: int = 1) -> DataPlaneClient:
        self.dp = DataPlaneProcess(
            DataPlaneConfig(
                name="hostA",
                ctl_path=str(self.work / "dp.sock"),
                netns=self.dpns,
                cpu=cpu,
                log_path=str(self.work / "dp.log"),
            )
        )
        client = self.dp.start()
        self.client = client
        for port in ("dw", "dn", "ds"):
            client.add_af_packet_port(port, f"{self.prefix}{port}")
        client.add_unit(UNIT, wire="dw", nf="dn", egress="ds", mode=mode, term=1, epoch=1)
        return client

    def start_nf(self, args: tuple[str, ...] | None = None) -> Container:
        self.backend = RuncBackend(state_dir=self.work / "runc", network_lock="skip")
        self.nf = self.backend.start(
            ContainerSpec(
                name=f"{self.prefix}-seq",
                image=images.build_image("sequencer"),
                args=args or sequencer_args(),
                netns=self.nfns,
                cgroup_parent=self.cgroup_parent,
            )
        )
        self.nf.prepare_checkpoint()
        return self.nf

    def start_chain(self, args: list[tuple[str, ...]]) -> Chain:
        """The NF as a chain of sequencers (`chain_args`) in the NF netns."""
        self.backend = RuncBackend(state_dir=self.work / "runc", network_lock="skip")
        image = images.build_image("sequencer")
        specs = [
            ContainerSpec(
                name=f"{self.prefix}-seq{i}",
                image=image,
                args=member_args,
                netns=self.nfns,
                cgroup_parent=self.cgroup_parent,
            )
            for i, member_args in enumerate(args)
        ]
        self.chain = ChainBackend(self.backend).start(f"{self.prefix}-chain", specs)
        self.chain.prepare_checkpoint()
        return self.chain

    def start_standby(self, endpoint: str = "tcp://127.0.0.1:*") -> str:
        # On tmpfs, as the agent keeps its standby stores (`AgentConfig.runtime`): a store on
        # the work directory's disk would make every commit wait for fsyncs the agent never pays.
        assert self.images is not None, "build() first"
        store = Store(self.standby_root / UNIT)
        self.server = ReplicationServer(endpoint, {UNIT: store})
        return self.server.start()

    def in_client(self, argv: list[str]) -> list[str]:
        return ["nsenter", f"--net={netns.netns_path(self.cl)}", "--", *argv]

    def close(self) -> None:
        if self.server is not None:
            with contextlib.suppress(Exception):
                self.server.stop()
        for handle in (self.nf, self.chain):
            if handle is not None:
                with contextlib.suppress(Exception):
                    handle.destroy()
        if self.client is not None:
            self.client.close()
        if self.dp is not None:
            self.dp.stop()
        for ns in reversed(self.made):
            with contextlib.suppress(netns.NetnsError):
                netns.delete_netns(ns)
        self.made.clear()
        if self.images is not None:
            shutil.rmtree(self.images, ignore_errors=True)
            shutil.rmtree(self.standby_root, ignore_errors=True)
        if self.backend is not None:
            with contextlib.suppress(Exception):
                remove_cgroup_parent(self.cgroup_parent)
