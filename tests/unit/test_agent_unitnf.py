"""How an agent derives a chain's containers from a unit spec, and its handle on a dead NF (no
root: no container is started)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from hamgr.agent.state import Resource
from hamgr.agent.topology import sequencer_spec
from hamgr.agent.unitnet import dead_container
from hamgr.agent.unitnf import unit_container_specs
from hamgr.unitspec import loads
from shim.container import RuncBackend
from shim.oci import ContainerSpec

CHAIN = """
[[chain]]
image = "{image}"
args = ["/bin/fw", "--listen", "7001"]
env = ["FW_RULES=/etc/fw"]
image_ref = "v2"
"""
SPEC = sequencer_spec("u1", wire="w0", egress="e0")


def test_chain_members_share_the_first_ones_netns_and_cgroup(tmp_path: Path) -> None:
    fw = tmp_path / "fw.tar"
    fw.write_bytes(b"")
    spec = loads(SPEC + CHAIN.format(image=fw))
    first = ContainerSpec(
        name="hamgr-h1-u1",
        image=tmp_path / "seq.tar",
        args=spec.nf.args,
        netns="hamgr-h1-u1",
        cgroup_parent="/hamgr/h1",
    )
    specs = unit_container_specs(spec, first)
    assert specs[0] == first
    (second,) = specs[1:]
    assert (second.netns, second.cgroup_parent) == (first.netns, first.cgroup_parent)
    assert (second.image, second.image_ref) == (fw, "v2")
    assert second.args == ("/bin/fw", "--listen", "7001")
    assert second.env == ("FW_RULES=/etc/fw",)
    assert second.name != first.name
    assert unit_container_specs(loads(SPEC.split("[[chain]]", maxsplit=1)[0]), first) == [first]


def test_a_dead_containers_handle_never_signals_the_process_that_now_has_its_pid(
    tmp_path: Path,
) -> None:
    """An agent that restarts finds a recorded NF dead; its PID may have been given to an
    unrelated process since. The handle built for what is left watches and signals nothing."""
    other = subprocess.Popen(["sleep", "30"])
    try:
        spec = ContainerSpec(
            name="hamgr-h1-u1", image=tmp_path / "seq.tar", args=("nf",), netns="hamgr-h1-u1"
        )
        res = Resource(
            "u1",
            "container",
            "hamgr-h1-u1",
            {
                "pid": other.pid,  # as if the kernel had reused the dead NF's PID
                "ticks": 0,
                "bundle": str(tmp_path / "bundle"),
                "rootfs": str(tmp_path / "bundle" / "rootfs"),
                "owns_rootfs": True,
                "work_dir": str(tmp_path / "work"),
                "spec": spec.to_json(),
            },
        )
        dead = dead_container(RuncBackend(state_dir=tmp_path / "state"), res)
        assert (dead.name, dead.pid) == ("hamgr-h1-u1", other.pid)
        assert dead.exited()
        dead.kill()
        time.sleep(0.1)
        assert other.poll() is None, "the process that reuses the PID was signalled"
    finally:
        other.kill()
        other.wait()
