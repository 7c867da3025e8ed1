"""The pure parts of the container backend: the CRIU command line and RPC request, image
metadata checks, and the parsers behind the receive-queue drain and the cgroup yard."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from shim.container import (
    IMAGE_META,
    MASKED_DIR_KEY,
    CheckpointImage,
    DumpFacts,
    DumpOptions,
    RestoreError,
    cgroup_yard_for,
    criu_dump_command,
    criu_dump_request,
    parse_rx_queues,
)
from shim.oci import ContainerSpec

SPEC = ContainerSpec(name="seq", image=Path("/i.tar"), args=("/seq",), netns="n1")


def _options(**kw: Any) -> DumpOptions:
    facts: dict[str, Any] = {
        "rootfs": Path("/b/rootfs"),
        "freezer": Path("/sys/fs/cgroup/freezer/hamgr/seq"),
        "netns_inode": 4026532000,
        "masked_files": ("/proc/kcore",),
        "masked_dirs": (),
        "cgroup_yard": None,
    }
    opts: dict[str, Any] = {"network_lock": "nftables", "tcp_established": True, "file_locks": True}
    for key, value in kw.items():
        (facts if key in facts else opts)[key] = value
    return DumpOptions(facts=DumpFacts(**facts), **opts)


def _cmd(**kw: Any) -> list[str]:
    return criu_dump_command(
        criu="/opt/criu",
        pid=4242,
        images=Path("/dev/shm/e1.partial"),
        work=Path("/run/w"),
        options=_options(**kw),
    )


def _opt(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def test_dump_command_matches_what_runc_asks_for() -> None:
    cmd = _cmd()
    assert cmd[:2] == ["/opt/criu", "dump"]
    assert _opt(cmd, "--tree") == "4242"
    assert _opt(cmd, "--images-dir") == "/dev/shm/e1.partial"
    assert _opt(cmd, "--root") == "/b/rootfs"
    assert _opt(cmd, "--freeze-cgroup") == "/sys/fs/cgroup/freezer/hamgr/seq"
    # runc restore looks the netns up under this key, so the dump must use it.
    assert _opt(cmd, "--external") == "net[4026532000]:extRootNetNS"
    assert _opt(cmd, "--network-lock") == "nftables"
    assert _opt(cmd, "--ext-mount-map") == "/proc/kcore:/dev/null"
    for flag in ("--leave-running", "--tcp-established", "--file-locks", "--manage-cgroups=soft"):
        assert flag in cmd


def test_dump_command_optional_flags() -> None:
    cmd = _cmd(tcp_established=False, file_locks=False, masked_files=[], network_lock="skip")
    assert "--tcp-established" not in cmd
    assert "--file-locks" not in cmd
    assert "--ext-mount-map" not in cmd
    assert _opt(cmd, "--network-lock") == "skip"


def _image(tmp_path: Path, files: dict[str, bytes], meta: dict[str, object] | None) -> Path:
    d = tmp_path / "e3"
    d.mkdir()
    for name, data in files.items():
        (d / name).write_bytes(data)
    if meta is not None:
        (d / IMAGE_META).write_text(json.dumps(meta))
    return d


def _meta(files: dict[str, int]) -> dict[str, object]:
    return {
        "format": 1,
        "epoch": 3,
        "spec": SPEC.to_json(),
        "engine": "criu",
        "dump_seconds": 0.1,
        "files": files,
    }


def test_complete_image_loads(tmp_path: Path) -> None:
    d = _image(tmp_path, {"pages-1.img": b"x" * 10}, _meta({"pages-1.img": 10}))
    image = CheckpointImage.load(d)
    assert (image.epoch, image.spec, image.size_bytes) == (3, SPEC, 10)
    assert CheckpointImage.load(d).to_json() == _meta({"pages-1.img": 10})


def test_image_without_metadata_is_refused(tmp_path: Path) -> None:
    d = _image(tmp_path, {"pages-1.img": b"x"}, None)
    with pytest.raises(RestoreError, match="not a complete hamgr checkpoint"):
        CheckpointImage.load(d)


@pytest.mark.parametrize(
    ("files", "recorded", "message"),
    [
        ({"pages-1.img": b"x" * 5}, {"pages-1.img": 10}, "metadata says 10"),
        ({}, {"pages-1.img": 10}, "is missing"),
    ],
)
def test_image_with_wrong_files_is_refused(
    tmp_path: Path, files: dict[str, bytes], recorded: dict[str, int], message: str
) -> None:
    d = _image(tmp_path, files, _meta(recorded))
    with pytest.raises(RestoreError, match=message):
        CheckpointImage.load(d)


def test_image_of_another_format_is_refused(tmp_path: Path) -> None:
    d = _image(tmp_path, {}, {**_meta({}), "format": 99})
    with pytest.raises(RestoreError, match="format 99"):
        CheckpointImage.load(d)


def test_dump_command_fast_path_options() -> None:
    cmd = _cmd(masked_dirs=["/proc/acpi", "/sys/firmware"], cgroup_yard=Path("/sys/fs/cgroup"))
    externals = [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "--external"]
    assert externals == [
        "net[4026532000]:extRootNetNS",
        f"mnt[/proc/acpi]:{MASKED_DIR_KEY}",
        f"mnt[/sys/firmware]:{MASKED_DIR_KEY}",
    ]
    assert _opt(cmd, "--cgroup-yard") == "/sys/fs/cgroup"
    assert "-v4" in cmd
    assert "-v2" in _cmd(log_level=2)
    assert "--cgroup-yard" not in _cmd()


def test_rpc_dump_request_asks_for_what_the_command_line_does() -> None:
    import pycriu.rpc_pb2 as rpc  # make setup installs pycriu into the venv

    options = _options(
        masked_dirs=("/proc/acpi",),
        network_lock="skip",
        cgroup_yard=Path("/sys/fs/cgroup"),
        log_level=2,
    )
    req = criu_dump_request(rpc, pid=4242, images_fd=7, work_fd=8, options=options)
    # Both paths take the same value, so they ask CRIU for the same things.
    cmd = criu_dump_command(criu="c", pid=4242, images=Path("/i"), work=Path("/w"), options=options)
    assert "-v2" in cmd
    assert _opt(cmd, "--network-lock") == "skip"
    opts = req.opts
    assert req.type == rpc.DUMP
    assert (opts.pid, opts.images_dir_fd, opts.work_dir_fd) == (4242, 7, 8)
    assert (opts.log_file, opts.log_level) == ("dump.log", 2)
    assert opts.leave_running
    assert opts.root == "/b/rootfs"
    assert opts.freeze_cgroup == "/sys/fs/cgroup/freezer/hamgr/seq"
    assert opts.manage_cgroups
    assert opts.manage_cgroups_mode == rpc.SOFT
    assert list(opts.external) == [
        "net[4026532000]:extRootNetNS",
        f"mnt[/proc/acpi]:{MASKED_DIR_KEY}",
    ]
    assert opts.network_lock == rpc.SKIP
    assert opts.tcp_established
    assert opts.file_locks
    assert [(m.key, m.val) for m in opts.ext_mnt] == [("/proc/kcore", "/dev/null")]
    assert opts.cgroup_yard == "/sys/fs/cgroup"
    # The request must survive the wire.
    again = rpc.criu_req()
    again.ParseFromString(req.SerializeToString())
    assert again == req


# /proc/net/udp, with the columns after "inode" cut (the parser reads only rx_queue).
UDP = """\
   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
  123: 00000000:1B58 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 81
  124: 0200C6C6:1B59 00000000:0000 07 00000000:00000A80 00:00000000 00000000     0        0 82
  125: 0200C6C6:1B5A 00000000:0000 07 00000000:00000100 00:00000000 00000000     0        0 83
"""
PACKET = """\
sk               RefCnt Type Proto  Iface R Rmem   User   Inode
ffff888100000000 3      3    0003   2     1 0      0      9001
ffff888100000800 3      3    0003   2     1 2304   0      9002
"""


def test_rx_queues_are_read_from_proc_net_tables() -> None:
    assert parse_rx_queues("udp", UDP) == (0xA80 + 0x100, 2)
    assert parse_rx_queues("packet", PACKET) == (2304, 1)
    header_only = UDP.splitlines()[0] + "\n"
    assert parse_rx_queues("udp6", header_only) == (0, 0)
    assert parse_rx_queues("raw", "") == (0, 0)


def test_rx_queues_can_be_read_for_some_sockets_only() -> None:
    assert parse_rx_queues("udp", UDP, frozenset({82})) == (0xA80, 1)
    assert parse_rx_queues("udp", UDP, frozenset({81})) == (0, 0)  # its own queue is empty
    assert parse_rx_queues("udp", UDP, frozenset()) == (0, 0)
    assert parse_rx_queues("packet", PACKET, frozenset({9002, 9001})) == (2304, 1)
    assert parse_rx_queues("packet", PACKET, frozenset({9001})) == (0, 0)


HYBRID_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
HYBRID_CGROUP = """\
9:name=systemd:/
6:freezer:/hamgr/seq
2:cpuacct:/
1:cpu:/
0::/hamgr/seq
"""


def test_cgroup_yard_is_used_only_when_it_holds_every_hierarchy() -> None:
    yard = Path("/sys/fs/cgroup")
    assert cgroup_yard_for(HYBRID_MOUNTINFO, HYBRID_CGROUP, yard) == yard
    # A combined hierarchy is named by all its controllers.
    combined = HYBRID_MOUNTINFO.replace("/sys/fs/cgroup/cpu rw", "/sys/fs/cgroup/cpu,cpuacct rw")
    combined = combined.replace("- cgroup cgroup rw,cpu\n", "- cgroup cgroup rw,cpu,cpuacct\n")
    cg = HYBRID_CGROUP.replace("2:cpuacct:/\n1:cpu:/\n", "1:cpu,cpuacct:/\n")
    assert cgroup_yard_for(combined, cg, yard) == yard
    # A hierarchy mounted elsewhere, or only a sub-tree of it mounted in the yard: CRIU mounts.
    elsewhere = HYBRID_MOUNTINFO.replace("/sys/fs/cgroup/freezer", "/mnt/freezer")
    assert cgroup_yard_for(elsewhere, HYBRID_CGROUP, yard) is None
    subtree = HYBRID_MOUNTINFO.replace(
        "0:34 / /sys/fs/cgroup/freezer", "0:34 /x /sys/fs/cgroup/freezer"
    )
    assert cgroup_yard_for(subtree, HYBRID_CGROUP, yard) is None
    assert cgroup_yard_for(HYBRID_MOUNTINFO, "", yard) is None


def test_bench_percentile_is_nearest_rank() -> None:
    from hamgr.bench.checkpoint import percentile

    values = [float(v) for v in range(1, 31)]
    assert percentile(values, 0.5) == 15.0
    assert percentile(values, 0.99) == 30.0
    assert percentile([7.0], 0.99) == 7.0
