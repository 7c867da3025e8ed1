"""What the agent builds around one unit on its host, each piece recorded before it is used.

For unit U on host H (names are derived, so a restarted agent finds the same ones)::

    agent's netns                                      NF netns  hamgr-H-U
    wire iface(s) --(dp port w<tag><i>)--\\
                                          data plane -- hv<tag> ==veth== eth0  NF (runc container)
    egress iface  --(dp port e-<iface>)--/               (dp port n<tag>)      address, MAC,
                                                                              static neighbours

Every resource is written to the state database (`hamgr.agent.state`) right after it is made,
so a protect that dies half-way is undone by the next agent, and `teardown` removes exactly what
was made, newest first. The egress port may be shared by several units; it is removed with the
last of them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs

from dpdk_vhost.client import DataPlaneClient, DataPlaneError
from hamgr.agent import procs
from hamgr.agent.state import Resource, StateDB
from hamgr.unitspec import UnitSpec
from shim import netns
from shim.container import Container, ContainerError, RuncBackend, remove_cgroup
from shim.oci import Bundle, ContainerSpec, remove_bundle

__all__ = [
    "UnitNames",
    "adopt_container",
    "build_network",
    "build_nf_netns",
    "build_remote_network",
    "start_nf",
    "teardown",
]

log = logging.getLogger(__name__)

NF_IFNAME = "eth0"


@attrs.frozen
class UnitNames:
    host: str
    unit: str

    @property
    def tag(self) -> str:
        return hashlib.sha1(f"{self.host}/{self.unit}".encode()).hexdigest()[:7]

    @property
    def nf_netns(self) -> str:
        return f"hamgr-{self.host}-{self.unit}"

    @property
    def host_veth(self) -> str:
        return f"hv{self.tag}"

    @property
    def nf_port(self) -> str:
        return f"n{self.tag}"

    def wire_port(self, index: int) -> str:
        return f"w{self.tag}{index}"

    @staticmethod
    def egress_port(iface: str) -> str:
        return "e-" + iface.replace(".", "_")

    @property
    def container(self) -> str:
        return f"{self.host}-{self.unit}"

    @property
    def cgroup_parent(self) -> str:
        return f"/hamgr-{self.host}"


def build_nf_netns(
    db: StateDB, spec: UnitSpec, names: UnitNames, *, host_offload: bool = True
) -> None:
    """The NF's netns and veth (address, MAC, static neighbours), each recorded as it is made.

    `host_offload=False` also turns checksum offload off on the host's end, as the remote
    roles' netns has it (`hamgr.agent.remote.prepare_nf_netns`)."""
    unit = spec.name
    ns = names.nf_netns
    netns.create_netns(ns)
    db.add_resource(unit, "netns", ns)
    netns.quiet_host_netns(ns)
    netns.create_veth(netns.VethEnd(names.host_veth), netns.VethEnd(NF_IFNAME, ns))
    db.add_resource(unit, "veth", names.host_veth)
    netns.set_mac_address(NF_IFNAME, spec.nf.mac, ns)
    netns.disable_checksum_offload(NF_IFNAME, ns)
    if not host_offload:
        netns.disable_checksum_offload(names.host_veth)
    netns.add_address(NF_IFNAME, spec.nf.address, ns)
    netns.set_up(NF_IFNAME, ns)
    netns.set_up(names.host_veth)
    for ip, mac in spec.nf.neighbors.items():
        netns.add_static_neighbor(ip, mac, NF_IFNAME, ns)


def build_remote_network(
    db: StateDB,
    dp: DataPlaneClient,
    spec: UnitSpec,
    names: UnitNames,
    *,
    data_port: str,
    term: int | None,
) -> None:
    """A unit with a remote standby: the NF's netns and veth and its data-plane port; with a
    `term`, the unit too, whose wire and egress are both the host's data link `data_port`
    (``[remote] data_link``, a port the remote roles own, so no unit records it). Without one
    (a standby preparing a takeover) the NF's port waits for the unit of a takeover."""
    build_nf_netns(db, spec, names, host_offload=False)
    unit = spec.name
    dp.add_af_packet_port(names.nf_port, names.host_veth)
    db.add_resource(unit, "dp_port", names.nf_port, {"iface": names.host_veth})
    if term is None:
        return
    add_ha_unit(db, dp, spec, names, wire=[data_port], egress=data_port, term=term)


def add_ha_unit(
    db: StateDB,
    dp: DataPlaneClient,
    spec: UnitSpec,
    names: UnitNames,
    *,
    wire: list[str],
    egress: str,
    term: int,
) -> None:
    """The unit in the data plane, in ha mode at `term` from epoch 1, recorded."""
    dp.add_unit(
        spec.name,
        wire=wire,
        nf=names.nf_port,
        egress=egress,
        mode="ha",
        k=spec.protection.max_inflight,
        budget_bytes=spec.protection.memory_budget_bytes,
        term=term,
        epoch=1,
    )
    db.add_resource(spec.name, "dp_unit", spec.name)


def build_network(
    db: StateDB, dp: DataPlaneClient, spec: UnitSpec, names: UnitNames, *, term: int
) -> None:
    """The NF's netns and veth, the data plane's ports and unit, each recorded as it is made."""
    unit = spec.name
    build_nf_netns(db, spec, names)
    existing = set(dp.stats().ports)
    wire_ports = []
    for i, iface in enumerate(spec.ports.wire):
        port = names.wire_port(i)
        dp.add_af_packet_port(port, iface)
        db.add_resource(unit, "dp_port", port, {"iface": iface})
        wire_ports.append(port)
    dp.add_af_packet_port(names.nf_port, names.host_veth)
    db.add_resource(unit, "dp_port", names.nf_port, {"iface": names.host_veth})
    egress = names.egress_port(spec.ports.egress)
    if egress not in existing:
        dp.add_af_packet_port(egress, spec.ports.egress)
    db.add_resource(unit, "dp_port", egress, {"iface": spec.ports.egress, "shared": True})
    add_ha_unit(db, dp, spec, names, wire=wire_ports, egress=egress, term=term)


def nf_container_spec(spec: UnitSpec, names: UnitNames, image: Path) -> ContainerSpec:
    """The NF's container as the primary starts it (a standby prepares the same image)."""
    return ContainerSpec(
        name=names.container,
        image=image,
        args=spec.nf.args,
        netns=names.nf_netns,
        env=spec.nf.env,
        image_ref=spec.nf.image_ref,
        cgroup_parent=names.cgroup_parent,
    )


def start_nf(
    db: StateDB, backend: RuncBackend, spec: UnitSpec, names: UnitNames, image: Path
) -> Container:
    nf = backend.start(nf_container_spec(spec, names, image))
    nf.prepare_checkpoint()  # the first checkpoint then pauses no longer than the others
    db.add_resource(spec.name, "container", names.container, container_detail(nf))
    return nf


def container_detail(nf: Container) -> dict[str, Any]:
    """What the agent records of a container, to adopt it after a restart."""
    return {
        "pid": nf.pid,
        "ticks": procs.start_ticks(nf.pid),
        "bundle": str(nf.bundle.path),
        "rootfs": str(nf.bundle.rootfs),
        "owns_rootfs": nf.bundle.owns_rootfs,
        "work_dir": str(nf.work_dir),
        "spec": nf.spec.to_json(),
    }


class AdoptError(Exception):
    """A recorded container that cannot be adopted; `dead`: because its NF is gone (runc knows
    no such container, or reports it stopped), not because something else replaced it."""

    def __init__(self, message: str, *, dead: bool = False) -> None:
        super().__init__(message)
        self.dead = dead


def adopt_container(backend: RuncBackend, res: Resource) -> Container:
    """A handle on the container a previous agent started, found by its runc state and PID.

    Nothing is done to the container itself.
    """
    detail: dict[str, Any] = dict(res.detail)
    name = res.name
    runner = backend._runner()
    state = runner.state(name)
    if state is None:
        raise AdoptError(f"runc knows no container {name}: the NF is gone", dead=True)
    if state.get("status") not in ("running", "paused"):
        raise AdoptError(f"container {name} is {state.get('status')}: the NF died", dead=True)
    pid = int(state.get("pid", 0))
    if pid != detail["pid"] or not procs.process_alive(pid, detail["ticks"]):
        raise AdoptError(
            f"container {name} runs pid {pid}, not the recorded {detail['pid']}: "
            "it was restarted by someone else"
        )
    if state.get("bundle") != detail["bundle"]:
        raise AdoptError(
            f"container {name} runs from {state.get('bundle')}, not {detail['bundle']}"
        )
    return _handle(backend, res, pid)


def dead_container(backend: RuncBackend, res: Resource) -> Container:
    """A handle on a recorded container whose NF died while no agent watched it (`AdoptError`
    with `dead`): built from the record alone, for what the agent still does with a dead NF
    (its pid in events and status; `destroy`, which removes what runc left). The handle opens
    no pidfd and signals nothing: the recorded PID may belong to another process by now."""
    return _handle(backend, res, int(res.detail["pid"]), gone=True)


def _handle(backend: RuncBackend, res: Resource, pid: int, *, gone: bool = False) -> Container:
    # shim.container has no public "adopt" yet; the handle is built the way `start` builds it.
    detail = res.detail
    bundle = Bundle(Path(detail["bundle"]), Path(detail["rootfs"]), bool(detail["owns_rootfs"]))
    return Container(
        res.name,
        pid,
        ContainerSpec.from_json(detail["spec"]),
        bundle,
        Path(detail["work_dir"]),
        backend._runner(),
        backend,
        gone=gone,
    )


def destroy_container(backend: RuncBackend, res: Resource, handle: Container | None) -> None:
    if handle is None:
        try:
            handle = adopt_container(backend, res)
        except (AdoptError, ContainerError, KeyError, ValueError) as exc:
            log.info("container %s not adoptable (%s); removing what is left", res.name, exc)
    if handle is not None:
        handle.destroy()
        return
    detail = res.detail
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run(
            ["runc", "--root", str(backend.state_dir / "runc"), "delete", "--force", res.name],
            capture_output=True,
            timeout=10,
            check=False,
        )
    if "bundle" in detail:
        remove_bundle(Path(detail["bundle"]))
    if "work_dir" in detail:
        shutil.rmtree(detail["work_dir"], ignore_errors=True)
    spec = detail.get("spec", {})
    if "cgroup_parent" in spec:
        remove_cgroup(f"{spec['cgroup_parent'].rstrip('/')}/{res.name}")


def teardown(
    db: StateDB,
    unit: str,
    *,
    dp: DataPlaneClient | None,
    backend: RuncBackend,
    nf: Container | None = None,
    others: Mapping[str, Callable[[Resource], None]] | None = None,
    keep: Callable[[Resource], bool] | None = None,
) -> list[str]:
    """Remove every recorded resource of `unit`, newest first; returns what could not be.

    Each resource is forgotten once it is gone, so a teardown that is interrupted resumes
    where it stopped. `others` removes the kinds this module does not know (the agent's
    remote_standby, remote_spare, remote_store and spare_offer); one that raises is kept, as a
    problem.
    `keep`: the resources to leave alone (a role that goes on with what it had before).
    """
    problems: list[str] = []
    for res in reversed(db.resources(unit)):
        if keep is not None and keep(res):
            continue
        try:
            if others is not None and res.kind in others:
                others[res.kind](res)
            else:
                _remove(db, res, dp=dp, backend=backend, nf=nf)
        except Exception as exc:
            log.warning("teardown of %s %s %s failed: %s", unit, res.kind, res.name, exc)
            problems.append(f"{res.kind} {res.name}: {exc}")
            continue
        db.remove_resource(unit, res.kind, res.name)
    return problems


def _remove(
    db: StateDB,
    res: Resource,
    *,
    dp: DataPlaneClient | None,
    backend: RuncBackend,
    nf: Container | None,
) -> None:
    match res.kind:
        case "container":
            destroy_container(backend, res, nf)
        case "standby":
            shutil.rmtree(res.detail["root"], ignore_errors=True)
        case "images":
            shutil.rmtree(res.detail["root"], ignore_errors=True)
        case "dp_unit":
            if dp is not None:
                try:
                    dropped = dp.remove_unit(res.name)
                    if dropped:
                        log.info("unit %s removed with %d held packets", res.name, dropped)
                except DataPlaneError as exc:
                    if exc.code != "no_such_unit":
                        raise
        case "dp_port":
            if dp is None:
                return
            shared = [
                r for r in db.resources(kind="dp_port") if r.name == res.name and r.unit != res.unit
            ]
            if shared:
                return
            try:
                dp.remove_port(res.name)
            except DataPlaneError as exc:
                if exc.code != "no_such_port":
                    raise
        case "veth":
            netns.delete_link(res.name)
        case "netns":
            netns.delete_netns(res.name)
        case _:
            raise ValueError(f"unknown resource kind {res.kind!r}: {json.dumps(dict(res.detail))}")
