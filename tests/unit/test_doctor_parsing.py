"""Parsers behind `hamgr doctor`, fed with outputs recorded on real machines."""

from __future__ import annotations

import pytest

from hamgr.doctor import (
    Check,
    Report,
    Status,
    classify_criu_version,
    classify_dpdk,
    classify_hugepages,
    parse_meminfo,
    parse_mounts,
    parse_version,
)

MEMINFO = """\
MemTotal:       24610436 kB
MemFree:        22001784 kB
HugePages_Total:     512
HugePages_Free:      448
HugePages_Rsvd:        0
HugePages_Surp:        0
Hugepagesize:       2048 kB
Hugetlb:         1048576 kB
"""

MOUNTS = """\
/dev/vda / ext4 rw,relatime 0 0
proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0
nodev /dev/hugepages hugetlbfs rw,relatime,pagesize=2M 0 0
cgroup /sys/fs/cgroup/freezer cgroup rw,relatime,freezer 0 0
"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Version: 4.2.1\n", (4, 2, 1)),
        ("Version: 3.17.1\nGitID: v3.17.1\n", (3, 17, 1)),
        ("Version: 4.2\n", (4, 2, 0)),
        ("22.11.11\n", (22, 11, 11)),
        ("runc version 1.1.5+ds1\ncommit: 1.1.5+ds1-1+deb12u1\nspec: 1.0.2-dev\n", (1, 1, 5)),
        ("QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u18)\n", (7, 2, 19)),
    ],
)
def test_parse_version_real_outputs(text: str, expected: tuple[int, int, int]) -> None:
    assert parse_version(text) == expected


def test_parse_version_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="no version number"):
        parse_version("criu: command not found")


def test_criu_version_gate() -> None:
    assert classify_criu_version("/usr/sbin/criu", "Version: 3.17.1\n").status is Status.FAIL
    assert classify_criu_version("/usr/sbin/criu", "Version: 4.1.1\n").status is Status.FAIL
    ok = classify_criu_version("/opt/hamgr/criu/bin/criu", "Version: 4.2.1\n")
    assert ok.status is Status.OK
    assert "4.2.1" in ok.detail
    bad = classify_criu_version("/x/criu", "Segmentation fault")
    assert bad.status is Status.FAIL
    assert "make setup" in bad.fix


def test_old_criu_names_the_fix() -> None:
    check = classify_criu_version("/usr/sbin/criu", "Version: 3.17.1\n")
    assert "older than 4.2.0" in check.detail
    assert "make setup" in check.fix


def test_pkgconfig_output() -> None:
    assert classify_dpdk("22.11.11\n").status is Status.OK
    assert classify_dpdk("21.11.2\n").status is Status.FAIL
    missing = classify_dpdk(
        "Package libdpdk was not found in the pkg-config search path.\n"
        "Perhaps you should add the directory containing `libdpdk.pc'\n"
    )
    assert missing.status is Status.FAIL
    assert "libdpdk-dev" in missing.fix


def test_meminfo_and_mounts() -> None:
    info = parse_meminfo(MEMINFO)
    assert info["HugePages_Total"] == 512
    assert info["HugePages_Free"] == 448
    assert info["Hugepagesize"] == 2048
    mounts = parse_mounts(MOUNTS)
    assert [m.target for m in mounts if m.fstype == "hugetlbfs"] == ["/dev/hugepages"]


def test_hugepages_classification() -> None:
    mounts = parse_mounts(MOUNTS)
    assert classify_hugepages(parse_meminfo(MEMINFO), mounts).status is Status.OK
    none = parse_meminfo(MEMINFO.replace("HugePages_Total:     512", "HugePages_Total:       0"))
    failed = classify_hugepages(none, mounts)
    assert failed.status is Status.FAIL
    assert "nr_hugepages" in failed.fix
    unmounted = classify_hugepages(parse_meminfo(MEMINFO), parse_mounts(MOUNTS.splitlines()[0]))
    assert unmounted.status is Status.FAIL
    busy = parse_meminfo(MEMINFO.replace("HugePages_Free:      448", "HugePages_Free:       12"))
    assert classify_hugepages(busy, mounts).status is Status.WARN


def test_report_ok_ignores_optional_warnings_only() -> None:
    ok = Check("a", Status.OK, "fine")
    kvm = Check("kvm", Status.WARN, "PVM", required=False)
    assert Report((ok, kvm)).ok
    assert not Report((ok, Check("b", Status.WARN, "meh"))).ok
    assert not Report((ok, Check("c", Status.FAIL, "broken", "fix it"))).ok
    as_json = Report((ok, kvm)).as_json()
    assert as_json["ok"] is True
    assert as_json["checks"] == [
        {"name": "a", "status": "ok", "detail": "fine", "fix": "", "required": True},
        {"name": "kvm", "status": "warn", "detail": "PVM", "fix": "", "required": False},
    ]
