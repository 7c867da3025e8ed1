"""shim.devmounts without root: which mounts are carried, the archive format (round trip,
sparse files, GNU tar compatibility), the checks that refuse a hostile archive, and the CRIU
options a dump with carried mounts asks for."""

from __future__ import annotations

import io
import os
import shutil
import socket
import stat
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from shim.container import DumpFacts, DumpOptions, criu_dump_command, criu_dump_request
from shim.devmounts import (
    CARRIED_MOUNTS,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_RDONLY,
    MS_STRICTATIME,
    DevMountError,
    archive_tree,
    carried_mounts,
    check_members,
    extract_tree,
    mounts_under,
    tmpfs_options,
)

# /proc/PID/mountinfo of a runc container started by hamgr (runc 1.1.5), trimmed.
RUNC_MOUNTINFO = """\
77 49 254:0 /b/rootfs / ro,relatime - ext4 /dev/vda rw
78 77 0:43 / /proc rw,relatime - proc proc rw
79 77 0:44 / /dev rw,nosuid - tmpfs tmpfs rw,size=65536k,mode=755
80 79 0:45 / /dev/pts rw,nosuid,noexec,relatime - devpts devpts rw,gid=5,mode=620,ptmxmode=666
81 79 0:46 / /dev/shm rw,nosuid,nodev,noexec,relatime - tmpfs shm rw,size=65536k
82 79 0:42 / /dev/mqueue rw,nosuid,nodev,noexec,relatime - mqueue mqueue rw
83 77 0:47 / /sys ro,nosuid,nodev,noexec,relatime - sysfs sysfs ro
54 78 0:48 / /proc/acpi ro,relatime - tmpfs tmpfs ro
55 78 0:44 /null /proc/keys rw,nosuid - tmpfs tmpfs rw,size=65536k,mode=755
56 78 0:44 /null /proc/timer_list rw,nosuid - tmpfs tmpfs rw,size=65536k,mode=755
57 83 0:49 / /sys/firmware ro,relatime - tmpfs tmpfs ro
"""
MASKED_FILES = ("/proc/keys", "/proc/timer_list")


def test_a_runc_container_carries_dev_and_dev_shm() -> None:
    assert carried_mounts(RUNC_MOUNTINFO, MASKED_FILES) == ("/dev", "/dev/shm")


def test_dev_shared_with_an_unmapped_mount_is_left_to_criu() -> None:
    # Without the masked-file mapping, /proc/keys would be a bind of /dev's tmpfs that a
    # restore could only set up from /dev's contents: CRIU's own business.
    assert carried_mounts(RUNC_MOUNTINFO) == ("/dev/shm",)
    extra = RUNC_MOUNTINFO + "90 77 0:46 /sub /data rw - tmpfs shm rw\n"
    assert carried_mounts(extra, MASKED_FILES) == ("/dev",)


@pytest.mark.parametrize(
    ("line", "left"),
    [
        # /dev/shm overmounted by a second tmpfs
        ("91 81 0:60 / /dev/shm rw - tmpfs other rw", ("/dev",)),
        # /dev/shm replaced by something that is not a tmpfs
        (None, ("/dev",)),
    ],
)
def test_only_a_plain_tmpfs_is_carried(line: str | None, left: tuple[str, ...]) -> None:
    if line is None:
        text = RUNC_MOUNTINFO.replace(" - tmpfs shm ", " - ext4 /dev/vdb ")
    else:
        text = RUNC_MOUNTINFO + line + "\n"
    assert carried_mounts(text, MASKED_FILES) == left


def test_dev_bound_from_a_subdirectory_is_not_carried() -> None:
    text = RUNC_MOUNTINFO.replace("79 77 0:44 / /dev ", "79 77 0:44 /x /dev ")
    assert carried_mounts(text, MASKED_FILES) == ("/dev/shm",)


def test_mountinfo_escapes_are_decoded() -> None:
    text = "1 0 0:5 / /a\\040b rw - tmpfs t rw\n2 0 0:6 / /run rw - tmpfs t rw\n"
    assert mounts_under(Path("/a b"), text) == [Path("/a b")]
    nested = "1 0 0:5 / /s/b rw - tmpfs t rw\n2 1 0:6 / /s/b/m/dev rw - tmpfs t rw\n"
    assert mounts_under(Path("/s/b"), nested) == [Path("/s/b/m/dev"), Path("/s/b")]
    assert mounts_under(Path("/s/bb"), nested) == []


def test_tmpfs_options_split_flags_from_data() -> None:
    flags, data = tmpfs_options(["nosuid", "strictatime", "mode=755", "size=65536k"])
    assert flags == MS_NOSUID | MS_STRICTATIME
    assert data == "mode=755,size=65536k"
    flags, data = tmpfs_options(["ro", "nodev", "noexec", "rprivate", "mode=1777"])
    assert flags == MS_RDONLY | MS_NODEV | MS_NOEXEC
    assert data == "mode=1777"
    for mount in CARRIED_MOUNTS:  # runc's defaults parse
        assert tmpfs_options(mount.default_options)[1]


def _make_tree(root: Path) -> None:
    (root / "plain").write_bytes(os.urandom(10_000))
    (root / "empty").write_bytes(b"")
    with open(root / "sparse", "wb") as f:  # data, a hole, data, and a hole at the end
        f.write(b"a" * 4096)
        f.seek(1 << 20)
        f.write(b"b" * 10)
        f.truncate(8 << 20)
    with open(root / "holes", "wb") as f:
        f.truncate(1 << 20)
    (root / "d" / "e").mkdir(parents=True)
    (root / "d" / "e" / "f").write_text("deep")
    os.chmod(root / "d", 0o2751)
    os.symlink("plain", root / "link")
    os.symlink("/proc/self/fd", root / "fd")
    os.utime(root / "link", (1_500_000_000, 1_500_000_000), follow_symlinks=False)
    os.link(root / "plain", root / "plain.hard")
    os.mkfifo(root / "fifo", 0o620)
    os.utime(root / "plain", (1_600_000_000, 1_600_000_000))
    (root / os.fsdecode(b"name-\xff")).write_text("not utf-8")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(root / "sock"))


def _describe(root: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath, name)
            st = path.lstat()
            rel = str(path.relative_to(root))
            body: Any = None
            if stat.S_ISREG(st.st_mode):
                body = path.read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                body = os.readlink(path)
            mtime = None if stat.S_ISDIR(st.st_mode) else int(st.st_mtime)
            out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), mtime, body)
    return out


def test_archive_round_trip_keeps_everything_but_sockets(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir(mode=0o1777)
    os.chmod(src, 0o1777)
    _make_tree(src)
    size = archive_tree(src, tmp_path / "a.tar")
    assert size == (tmp_path / "a.tar").stat().st_size
    assert size % tarfile.RECORDSIZE == 0
    dst.mkdir()
    extract_tree(tmp_path / "a.tar", dst)
    want = _describe(src)
    del want["sock"]  # as GNU tar does: CRIU recreates a bound socket's file itself
    assert _describe(dst) == want
    assert stat.S_IMODE(dst.stat().st_mode) == 0o1777  # the archive's root is the mount's
    assert (dst / "plain").stat().st_ino == (dst / "plain.hard").stat().st_ino
    # Holes stay holes; a file that ends in one keeps its length.
    assert (dst / "sparse").stat().st_size == 8 << 20
    assert (dst / "sparse").stat().st_blocks * 512 < 1 << 20
    assert (dst / "holes").stat().st_blocks == 0
    # The archive stores the data, not the holes.
    assert size < 64 << 10


def test_the_same_tree_gives_the_same_archive(tmp_path: Path) -> None:
    # Deterministic bytes let the replication link ship an unchanged /dev as no new blocks.
    src = tmp_path / "src"
    src.mkdir()
    _make_tree(src)
    archive_tree(src, tmp_path / "1.tar")
    archive_tree(src, tmp_path / "2.tar")
    assert (tmp_path / "1.tar").read_bytes() == (tmp_path / "2.tar").read_bytes()
    with pytest.raises(FileExistsError):
        archive_tree(src, tmp_path / "1.tar")


def test_gnu_tar_reads_the_archive(tmp_path: Path) -> None:
    # What CRIU would have used; an operator can inspect an image with plain tar.
    tar = shutil.which("tar")
    assert tar is not None, "GNU tar is part of every Debian system"
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    _make_tree(src)
    archive_tree(src, tmp_path / "a.tar")
    subprocess.run([tar, "-xf", str(tmp_path / "a.tar"), "-C", str(out)], check=True)
    for name in ("plain", "sparse", "holes", "d/e/f", os.fsdecode(b"name-\xff")):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    assert (out / "sparse").stat().st_blocks * 512 < 1 << 20


def test_symlinks_are_archived_not_followed(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "pts").symlink_to("/proc")
    archive_tree(src, tmp_path / "a.tar")
    with tarfile.open(tmp_path / "a.tar") as tar:
        assert tar.getnames() == [".", "./pts"]


def _tar_of(path: Path, *members: tuple[tarfile.TarInfo, bytes | None]) -> Path:
    with tarfile.open(path, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tuple[Any, Any]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    data = b"x" if kind == tarfile.REGTYPE else None
    info.size = len(data) if data else 0
    return info, data


@pytest.mark.parametrize(
    ("members", "why"),
    [
        ([_member("/etc/passwd")], "outside"),
        ([_member("../escape")], "outside"),
        ([_member("./a/../../escape")], "outside"),
        ([_member("./l", tarfile.SYMTYPE, "/etc"), _member("./l/passwd")], "below a symlink"),
        ([_member("./h", tarfile.LNKTYPE, "/etc/shadow")], "outside"),
        ([_member("./h", tarfile.LNKTYPE, "./nothing")], "unknown member"),
        ([_member("./c", tarfile.CONTTYPE)], "has type"),
    ],
)
def test_a_hostile_archive_is_refused(
    tmp_path: Path, members: list[tuple[Any, Any]], why: str
) -> None:
    path = _tar_of(tmp_path / "hostile.tar", *members)
    with tarfile.open(path) as tar, pytest.raises(DevMountError, match=why):
        check_members(tar.getmembers(), path)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(DevMountError, match=why):
        extract_tree(path, dest)
    assert list(dest.iterdir()) == []


def _options(carried: tuple[str, ...]) -> DumpOptions:
    facts = DumpFacts(
        rootfs=Path("/b/rootfs"),
        freezer=Path("/sys/fs/cgroup/freezer/hamgr/seq"),
        netns_inode=4026532000,
        masked_files=MASKED_FILES,
        masked_dirs=("/proc/acpi",),
        cgroup_yard=None,
        carried=carried,
    )
    return DumpOptions(facts=facts, network_lock="skip", tcp_established=True, file_locks=True)


def test_carried_mounts_are_external_on_both_dump_paths() -> None:
    import pycriu.rpc_pb2 as rpc  # make setup installs pycriu into the venv

    options = _options(("/dev", "/dev/shm"))
    cmd = criu_dump_command(criu="c", pid=1, images=Path("/i"), work=Path("/w"), options=options)
    externals = [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "--external"]
    keys = [f"mnt[{m.mountpoint}]:{m.key}" for m in CARRIED_MOUNTS]
    assert externals[-2:] == keys
    req = criu_dump_request(rpc, pid=1, images_fd=3, work_fd=4, options=options)
    assert list(req.opts.external) == externals
    # Without carried mounts, CRIU archives /dev and /dev/shm itself, as before.
    plain = criu_dump_command(
        criu="c", pid=1, images=Path("/i"), work=Path("/w"), options=_options(())
    )
    assert not [a for a in plain if a.startswith("mnt[/dev")]
