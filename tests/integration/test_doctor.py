"""`hamgr doctor` against the real machine: every required check passes after `make setup`,
and a broken requirement makes it fail with a fix that works when followed."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

HAMGR = [sys.executable, "-m", "hamgr"]
EXPECTED = {
    "kernel_checkpoint_restore",
    "cgroup_freezer",
    "netns_veth_bridge",
    "hugepages",
    "criu_version",
    "criu_check",
    "criu_tcp_dump",
    "nftables",
    "conntrack",
    "dpdk",
    "dataplane_built",
    "runc",
    "oci_tools",
    "qemu",
    "kvm",
    "libvirt",
    "sshd",
    "python_deps",
}
NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")


def doctor() -> tuple[int, dict[str, object]]:
    proc = subprocess.run(
        [*HAMGR, "doctor", "--json"], capture_output=True, text=True, timeout=240, check=False
    )
    last = proc.stdout.strip().splitlines()[-1]
    return proc.returncode, json.loads(last)


def by_name(report: dict[str, object]) -> dict[str, dict[str, str]]:
    checks = report["checks"]
    assert isinstance(checks, list)
    return {c["name"]: c for c in checks}


def test_every_required_check_is_ok() -> None:
    code, report = doctor()
    checks = by_name(report)
    assert set(checks) == EXPECTED
    failing = {n: c for n, c in checks.items() if c["required"] and c["status"] != "ok"}
    assert failing == {}
    assert report["ok"] is True
    assert code == 0
    assert checks["criu_tcp_dump"]["status"] == "ok"


@pytest.fixture
def hugepages_restored() -> Iterator[int]:
    before = int(NR_HUGEPAGES.read_text())
    try:
        yield before
    finally:
        NR_HUGEPAGES.write_text(str(before))


def test_missing_hugepages_fail_and_the_fix_works(hugepages_restored: int) -> None:
    NR_HUGEPAGES.write_text("0")
    if int(NR_HUGEPAGES.read_text()) >= 256:
        pytest.fail("hugepages are held by a running DPDK process; stop it before this test")
    code, report = doctor()
    hp = by_name(report)["hugepages"]
    assert code == 1
    assert report["ok"] is False
    assert hp["status"] == "fail"
    assert "nr_hugepages" in hp["fix"]
    # Follow the fix exactly as printed, up to the alternative in parentheses.
    fix = hp["fix"].split(" (or ")[0]
    subprocess.run(["bash", "-c", fix], check=True, timeout=30)
    code, report = doctor()
    assert by_name(report)["hugepages"]["status"] == "ok"
    assert code == 0
