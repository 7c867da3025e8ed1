"""A one-host testbed for an agent, for tests and demos: namespaces made here, removed by `close`.

    client netns <p>-cl                       host netns <p>-h (agent + data plane)
    <p>w 198.18.0.1 ──veth── <p>dw    wire:   traffic to the NF enters here
    <p>s (sink side) ──veth── <p>ds   egress: the NF's released output leaves here
                                      hv<tag> ══veth══ eth0 198.18.0.2  NF netns (made by the agent)

It is `hamgr.testbed.UnitBed` with the NF side left to the agent: the agent creates the NF's
netns, veth, data-plane ports and container from the unit spec (`sequencer_spec`). Addresses and
MACs are `hamgr.testbed`'s, from 198.18.0.0/15 only. `reap` removes whatever an agent that died
mid-test left behind (its data plane, containers, NF namespaces, cgroups, tmpfs), by the PIDs
and names recorded in its state dir.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs

from dpdk_vhost.process import remove_dpdk_files
from hamgr.agent import procs
from hamgr.testbed import (
    CLIENT_IP,
    CLIENT_MAC,
    NF_IP,
    NF_MAC,
    NF_PORT,
    SINK_MAC,
    SINK_PORT,
    Testbed,
)
from shim import netns
from shim.container import remove_cgroup

__all__ = ["AgentBed", "AgentHarness", "reap", "sequencer_spec"]


def sequencer_spec(
    unit: str,
    *,
    wire: str,
    egress: str,
    epoch_ms: int = 50,
    extra: str = "",
) -> str:
    """A unit spec for the sequencer NF wired as in `hamgr.testbed`."""
    return f"""\
name = "{unit}"

[nf]
image = "sequencer"
args = ["/usr/local/bin/sequencer", "--listen", "{NF_PORT}", "--dest", "{CLIENT_IP}:{SINK_PORT}"]
address = "{NF_IP}/24"
mac = "{NF_MAC}"

[nf.neighbors]
"{CLIENT_IP}" = "{SINK_MAC}"

[ports]
wire = ["{wire}"]
egress = "{egress}"

[standby]
host = "auto"

[epoch]
policy = "fixed"
length_ms = {epoch_ms}

[protection]
max_inflight = 4
memory_budget_mb = 64
lossless = false
on_standby_loss = "stall"
{extra}"""


@attrs.define
class AgentBed(Testbed):
    """The client and host namespaces and the two veths between them."""

    __test__ = False  # not a pytest class

    prefix: str = attrs.field(factory=lambda: f"ha{os.getpid() % 100000}")
    made: list[str] = attrs.Factory(list)

    @property
    def cl(self) -> str:
        return f"{self.prefix}-cl"

    @property
    def host_ns(self) -> str:
        return f"{self.prefix}-h"

    @property
    def host(self) -> str:
        return f"{self.prefix}h"

    @property
    def wire(self) -> str:
        return f"{self.prefix}dw"

    @property
    def egress(self) -> str:
        return f"{self.prefix}ds"

    def build(self) -> None:
        for ns in (self.cl, self.host_ns):
            netns.create_netns(ns)
            self.made.append(ns)
            netns.quiet_host_netns(ns)
        p = self.prefix
        for outer, inner, mac in (
            (f"{p}w", self.wire, CLIENT_MAC),
            (f"{p}s", self.egress, SINK_MAC),
        ):
            netns.create_veth(netns.VethEnd(outer, self.cl), netns.VethEnd(inner, self.host_ns))
            netns.set_mac_address(outer, mac, self.cl)
            netns.set_up(outer, self.cl)
            netns.set_up(inner, self.host_ns)
            netns.disable_checksum_offload(outer, self.cl)
        netns.add_address(f"{p}w", f"{CLIENT_IP}/24", self.cl)
        subprocess.run(
            ["ip", "-n", self.cl, "neigh", "replace", NF_IP, "lladdr", NF_MAC, "dev", f"{p}w",
             "nud", "permanent"],
            check=True,
            timeout=10,
        )  # fmt: skip

    def spec(self, unit: str, **kwargs: object) -> str:
        return sequencer_spec(unit, wire=self.wire, egress=self.egress, **kwargs)  # type: ignore[arg-type]

    def in_client(self, argv: list[str]) -> list[str]:
        return ["nsenter", f"--net={netns.netns_path(self.cl)}", "--", *argv]

    def close(self) -> None:
        for ns in reversed(self.made):
            with contextlib.suppress(netns.NetnsError):
                netns.delete_netns(ns)
        self.made.clear()


def reap(state_dir: Path, host: str, runtime_dir: Path | None = None) -> list[str]:
    """Remove what an agent on `state_dir` left running; returns what was found.

    Only processes and names recorded by that agent are touched: its data plane (PID plus start
    time from state.db), the containers in its runc root, the netns ``hamgr-<host>-*``, the
    cgroup ``/hamgr-<host>`` and its tmpfs dir.
    """
    found: list[str] = []
    db_path = state_dir / "state.db"
    if db_path.exists():
        with contextlib.closing(sqlite3.connect(db_path)) as db, contextlib.suppress(sqlite3.Error):
            for pid, ticks, prefix in db.execute(
                "SELECT pid, start_ticks, file_prefix FROM dataplane"
            ):
                if procs.process_alive(pid, ticks):
                    found.append(f"data plane pid {pid}")
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                remove_dpdk_files(prefix)
    runc_root = state_dir / "containers" / "runc"
    if runc_root.is_dir():
        for entry in runc_root.iterdir():
            found.append(f"container {entry.name}")
            subprocess.run(
                ["runc", "--root", str(runc_root), "delete", "--force", entry.name],
                capture_output=True,
                timeout=30,
                check=False,
            )
    for path in Path("/run/netns").glob(f"hamgr-{host}-*"):
        found.append(f"netns {path.name}")
        with contextlib.suppress(netns.NetnsError):
            netns.delete_netns(path.name)
    remove_cgroup(f"/hamgr-{host}", timeout=2.0)
    shutil.rmtree(runtime_dir or Path("/dev/shm") / f"hamgr-{host}", ignore_errors=True)
    return found


@attrs.define
class AgentHarness:
    """An agent on an `AgentBed`, driven through the real `hamgr` CLI as separate processes.

    `start` runs ``hamgr init`` and ``hamgr up``; `close` runs ``hamgr up`` (if the agent is
    down) and ``hamgr down --teardown``, then `reap` for anything left behind (which a test
    should treat as a bug), then removes the namespaces.
    """

    __test__ = False

    state_dir: Path
    bed: AgentBed = attrs.Factory(AgentBed)
    timeout: float = 300.0

    def hamgr(
        self,
        *args: str,
        check: bool = True,
        timeout: float | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "hamgr", *args, "--state-dir", str(self.state_dir)]
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout or self.timeout,
            check=False,
            env={**os.environ, **(env or {})},
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"`hamgr {' '.join(args)}` exited {proc.returncode}\n"
                f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-4000:]}"
            )
        return proc

    def json(self, *args: str, check: bool = True) -> dict[str, Any]:
        proc = self.hamgr(*args, "--json", check=check)
        last = proc.stdout.strip().splitlines()[-1]
        data: dict[str, Any] = json.loads(last)
        return data

    def start(self) -> AgentHarness:
        self.bed.build()
        self.hamgr("init", "--host", self.bed.host, "--metrics", "127.0.0.1:0")
        self.hamgr("up", "--netns", self.bed.host_ns)
        return self

    def log(self) -> str:
        path = self.state_dir / "log" / "agent.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> list[str]:
        """Tear everything down; returns what had to be reaped by force."""
        try:
            if (self.state_dir / "agent.toml").exists():
                # A stopped agent left its units and data plane running on purpose; a new one
                # adopts them, and its teardown removes them the regular way.
                self.hamgr("up", "--netns", self.bed.host_ns, check=False, timeout=120)
                self.hamgr("down", "--teardown", check=False, timeout=180)
        finally:
            left = reap(self.state_dir, self.bed.host)
            self.bed.close()
        return left
