"""How an agent derives a chain's containers from a unit spec (no root: nothing is started)."""

from __future__ import annotations

from pathlib import Path

from hamgr.agent.topology import sequencer_spec
from hamgr.agent.unitnf import unit_container_specs
from hamgr.unitspec import loads
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
