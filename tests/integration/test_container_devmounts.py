"""The container's /dev and /dev/shm across checkpoint and restore, on the real runc + CRIU stack.

hamgr declares both tmpfs mounts external to CRIU and carries their contents in the image
itself (shim.devmounts): these tests check that a restored NF has a working /dev (from inside
the container, through ``runc exec``, so the devices cgroup and the mount flags count), that
what an NF keeps in /dev/shm comes back as it was at the cut (with the files it holds open or
unlinked), the same as CRIU's own tar brought it back, and that nothing is left mounted on the
host. See container_env for the topology.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hamgr.nfs import images
from shim import container as container_mod
from shim.container import CheckpointError, Container, RestoreError
from shim.devmounts import CARRIED_MOUNTS
from tests.integration.container_env import (
    CLIENT_IP,
    ContainerEnv,
    UdpSender,
    UdpSink,
    wait_port,
)

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("container_stack")]

NF_PORT = 7000
SINK_PORT = 9000
SEQ_ARGS = ("/usr/local/bin/sequencer", "--listen", str(NF_PORT), "--dest", f"{CLIENT_IP}:9000")
CARRIED_ARCHIVES = {m.archive for m in CARRIED_MOUNTS}
# A legacy NF that keeps state in /dev/shm: it waits for its files, then holds two of them open
# (fd 3 and fd 4; the test unlinks the second, as an NF does with a segment it keeps private).
SHM_NF = (
    "/bin/sh",
    "-c",
    "while [ ! -e /dev/shm/ready ]; do sleep 0.01; done; "
    "exec 3</dev/shm/held 4</dev/shm/ghost; exec sleep 100000",
)
# Run inside the restored container: every device runc gives a container, the symlinks, and the
# mounts below /dev. Exits non-zero at the first thing that does not work.
DEV_CHECK = r"""
set -e
echo discard > /dev/null
test "$(busybox head -c 4096 /dev/urandom | busybox wc -c)" = 4096
test "$(busybox head -c 4096 /dev/random | busybox wc -c)" = 4096
test "$(busybox head -c 64 /dev/zero | busybox tr -d '\000' | busybox wc -c)" = 0
if (echo x > /dev/full) 2>/dev/null; then echo "/dev/full took a write"; exit 3; fi
test -c /dev/tty
test "$(busybox readlink /dev/fd)" = /proc/self/fd
test "$(busybox readlink /dev/stdin)" = /proc/self/fd/0
test "$(busybox readlink /dev/ptmx)" = pts/ptmx
echo shm-write > /dev/shm/probe && test "$(cat /dev/shm/probe)" = shm-write
busybox rm /dev/shm/probe
cat /proc/self/mountinfo
"""


@pytest.fixture(scope="module")
def sequencer_image() -> Path:
    return images.build_image("sequencer")


@pytest.fixture
def env(tmp_path: Path) -> Iterator[ContainerEnv]:
    e = ContainerEnv.open("d", tmp_path)
    try:
        yield e
    finally:
        e.close()
        assert _host_mounts(e) == [], "a tmpfs of a restore is still mounted on the host"


def _host_mounts(env: ContainerEnv) -> list[str]:
    """Mounts on the host below the backend's state directory (restores must leave none)."""
    state = os.path.realpath(env.backend.state_dir)
    points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    return [p for p in points if p.startswith(state + "/")]


def _exec(env: ContainerEnv, c: Container, script: str) -> subprocess.CompletedProcess[str]:
    """Run `script` with busybox sh inside the container (its namespaces and cgroups)."""
    root = env.backend.state_dir / "runc"
    cmd = ["runc", "--root", str(root), "exec", c.name, "/bin/busybox", "sh", "-c", script]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)


def _mounts_inside(mountinfo: str) -> dict[str, tuple[str, set[str], set[str]]]:
    """mount point -> (fstype, per-mount options, filesystem options) for /dev and below."""
    out = {}
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if len(fields) >= 6 and len(rest) >= 3 and fields[4].startswith("/dev"):
            out[fields[4]] = (rest[0], set(fields[5].split(",")), set(rest[2].split(",")))
    return out


def _tree(root: Path) -> dict[str, tuple[Any, ...]]:
    """What an NF can see of a directory tree: type, mode, owner, size, mtime, content, link."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath, name)
            st = path.lstat()
            rel = str(path.relative_to(root))
            kind = stat.S_IFMT(st.st_mode)
            extra: Any = None
            if stat.S_ISREG(st.st_mode):
                extra = hashlib.sha256(path.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                extra = os.readlink(path)
            elif stat.S_ISCHR(st.st_mode):
                extra = (os.major(st.st_rdev), os.minor(st.st_rdev))
            size = st.st_size if not stat.S_ISDIR(st.st_mode) else None
            mtime = int(st.st_mtime) if not stat.S_ISDIR(st.st_mode) else None
            out[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, size, mtime, extra)
    return out


def _start_sequencer(env: ContainerEnv, image: Path) -> Container:
    nf = env.start(env.spec("seq", image, SEQ_ARGS))
    wait_port(nf.pid, NF_PORT)
    return nf


def _checkpoint(nf: Container, dest: Path, epoch: int = 1) -> container_mod.CheckpointImage:
    nf.freeze()
    try:
        return nf.checkpoint(epoch, dest)
    finally:
        nf.thaw()


def _fail_over(env: ContainerEnv, nf: Container, image: Path, name: str) -> Container:
    env.topo.unplug_nf()
    nf.kill()
    env.topo.next_nf()
    restored = env.restore(image, name=f"{env.topo.prefix}-{name}")
    assert _host_mounts(env) == [], "the restore left its tmpfs mounted on the host"
    return restored


def test_restored_container_has_a_working_dev(env: ContainerEnv, sequencer_image: Path) -> None:
    nf = _start_sequencer(env, sequencer_image)
    assert nf.dump_facts().carried == ("/dev", "/dev/shm")
    before_dev = _tree(Path(f"/proc/{nf.pid}/root/dev"))
    before_mounts = _mounts_inside(Path(f"/proc/{nf.pid}/mountinfo").read_text())
    image = _checkpoint(nf, env.images / "e1")
    names = {name for name, _ in image.files}
    # CRIU archived no tmpfs: /dev and /dev/shm are hamgr's, the masked directories external.
    assert names >= CARRIED_ARCHIVES
    assert not [n for n in names if n.startswith("tmpfs-dev-")]

    current = nf
    for generation in (1, 2):
        restored = _fail_over(env, current, image.path, f"r{generation}")
        wait_port(restored.pid, NF_PORT)
        res = _exec(env, restored, DEV_CHECK)
        assert res.returncode == 0, f"/dev does not work inside: {res.stdout}{res.stderr}"
        mounts = _mounts_inside(res.stdout)
        for point in ("/dev", "/dev/shm", "/dev/pts", "/dev/mqueue"):
            fstype, mount_opts, fs_opts = mounts[point]
            want_type, want_mount_opts, want_fs_opts = before_mounts[point]
            assert fstype == want_type, point
            assert mount_opts == want_mount_opts, point
            # tmpfs size and mode are the OCI config's (runc's defaults), as at the start.
            if fstype == "tmpfs":
                assert {o for o in fs_opts if o.startswith(("size=", "mode="))} == {
                    o for o in want_fs_opts if o.startswith(("size=", "mode="))
                }, point
        # The device nodes, symlinks and mount points are the ones runc made, with their
        # owners and modes (mtimes aside: the directories' are not kept).
        after_dev = _tree(Path(f"/proc/{restored.pid}/root/dev"))
        assert {k: v[:5] + v[6:] for k, v in after_dev.items()} == {
            k: v[:5] + v[6:] for k, v in before_dev.items()
        }
        # The restored NF runs in its own container's cgroups (the freezer the engine uses).
        freezer = next(
            line.split(":", 2)[2]
            for line in Path(f"/proc/{restored.pid}/cgroup").read_text().splitlines()
            if "freezer" in line.split(":")[1].split(",")
        )
        assert freezer.endswith(f"/{restored.name}")
        # And it forwards.
        sink = UdpSink.open(env.topo.client, SINK_PORT)
        env.track(sink.close)
        sender = UdpSender.open(env.topo.client, NF_PORT)
        env.track(sender.close)
        sent = sender.send(3)
        assert [s for _, s, _ in sink.wait_count(3)] == list(sent)
        sink.close()
        sender.close()
        # A restored container is carried the same way again.
        assert restored.dump_facts().carried == ("/dev", "/dev/shm")
        image = _checkpoint(restored, env.images / f"e{generation + 1}", generation + 1)
        names = {name for name, _ in image.files}
        assert names >= CARRIED_ARCHIVES
        assert not [n for n in names if n.startswith("tmpfs-dev-")]
        current = restored


def _populate_shm(shm: Path) -> None:
    """What a legacy NF might keep in /dev/shm: segments, a sparse one bigger than the tmpfs,
    a private directory of another user, links, a FIFO."""
    (shm / "held").write_bytes(os.urandom(100_000))
    (shm / "ghost").write_bytes(os.urandom(8192))
    with open(shm / "sparse", "wb") as f:
        # 1 GiB on a 64 MiB tmpfs: only a sparse copy fits.
        f.truncate(1 << 30)
        f.seek(512 << 20)
        f.write(os.urandom(4096))
    (shm / "state").mkdir()
    (shm / "state" / "counter").write_text("41\n")
    os.chmod(shm / "state" / "counter", 0o600)
    os.chown(shm / "state" / "counter", 1000, 1001)
    os.chmod(shm / "state", 0o2750)
    os.chown(shm / "state", 1000, 1001)
    os.symlink("state/counter", shm / "current")
    os.link(shm / "held", shm / "held.link")
    os.mkfifo(shm / "pipe", 0o620)
    (shm / "sem.lock").write_bytes(b"\x01" * 32)
    os.utime(shm / "sem.lock", (1_600_000_000, 1_600_000_000))


def _wait_fd(pid: int, fd: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(f"/proc/{pid}/fd/{fd}"):
        assert time.monotonic() < deadline, f"pid {pid} did not open fd {fd}"
        time.sleep(0.01)


@pytest.mark.parametrize("carry", [True, False], ids=["hamgr-carries", "criu-tar"])
def test_dev_shm_contents_survive_checkpoint_and_restore(
    env: ContainerEnv, sequencer_image: Path, carry: bool
) -> None:
    """Both ways of saving /dev/shm (hamgr's archives, and CRIU's tar as the control) give the
    restored NF exactly what it had at the cut, including the files it holds open."""
    env.backend.carry_dev_mounts = carry
    nf = env.start(env.spec("shm", sequencer_image, SHM_NF))
    shm = Path(f"/proc/{nf.pid}/root/dev/shm")
    _populate_shm(shm)
    (shm / "ready").touch()
    _wait_fd(nf.pid, 4)
    os.unlink(shm / "ghost")  # still open on fd 4: CRIU must carry it as a ghost file
    held = (shm / "held").read_bytes()
    ghost = Path(f"/proc/{nf.pid}/fd/4").read_bytes()
    expected = _tree(shm)
    assert expected["sparse"][4] == 1 << 30

    image = _checkpoint(nf, env.images / "e1")
    names = {name for name, _ in image.files}
    tars = [n for n in names if n.startswith("tmpfs-dev-")]
    if carry:
        assert names >= CARRIED_ARCHIVES
        assert tars == []
        # Sparse in the image too: 1 GiB of holes is not stored.
        assert dict(image.files)["hamgr-dev-shm.tar"] < 1 << 20
        # /dev's archive stops at the mounts below it: /dev/shm is only in its own.
        with tarfile.open(image.path / "hamgr-dev.tar") as tar:
            dev_names = set(tar.getnames())
        assert {"./shm", "./pts", "./mqueue", "./null"} <= dev_names
        assert not [n for n in dev_names if n.startswith(("./shm/", "./pts/"))]
    else:
        assert not CARRIED_ARCHIVES & names
        assert len(tars) == 2
    # After the cut the primary goes on changing its state; the restore must not see that.
    (shm / "held").write_bytes(b"after the cut")

    current = nf
    for generation in (1, 2):
        restored = _fail_over(env, current, image.path, f"r{generation}")
        rshm = Path(f"/proc/{restored.pid}/root/dev/shm")
        assert _tree(rshm) == expected
        assert os.stat(rshm / "sparse").st_blocks * 512 < 1 << 20, "the sparse file was filled"
        assert os.stat(rshm / "held").st_ino == os.stat(rshm / "held.link").st_ino
        assert os.readlink(f"/proc/{restored.pid}/fd/3") == "/dev/shm/held"
        assert Path(f"/proc/{restored.pid}/fd/3").read_bytes() == held
        assert os.readlink(f"/proc/{restored.pid}/fd/4") == "/dev/shm/ghost (deleted)"
        assert Path(f"/proc/{restored.pid}/fd/4").read_bytes() == ghost
        # The next checkpoint of the restored NF, taken without freezing it first (the backend
        # freezes it for the dump and the copy, so the two see the same instant).
        image = restored.checkpoint(10 + generation, env.images / f"e{generation + 1}")
        assert not restored.freezer.is_frozen()
        current = restored


def test_a_failed_copy_of_dev_leaves_no_image_and_the_nf_runs_on(
    env: ContainerEnv, sequencer_image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nf = _start_sequencer(env, sequencer_image)
    real = container_mod.archive_tree

    def full(root: str | Path, dest: str | Path) -> int:
        raise OSError(errno.ENOSPC, "No space left on device", str(dest))

    monkeypatch.setattr(container_mod, "archive_tree", full)
    nf.freeze()
    try:
        with pytest.raises(CheckpointError, match="cannot save the contents of /dev"):
            nf.checkpoint(1, env.images / "e1")
    finally:
        nf.thaw()
    assert list(env.images.iterdir()) == [], "a failed dump left files behind"
    sink = UdpSink.open(env.topo.client, SINK_PORT)
    env.track(sink.close)
    sender = UdpSender.open(env.topo.client, NF_PORT)
    env.track(sender.close)
    sent = sender.send(5)
    assert [s for _, s, _ in sink.wait_count(5)] == list(sent)

    monkeypatch.setattr(container_mod, "archive_tree", real)
    image = _checkpoint(nf, env.images / "e2", 2)
    assert {name for name, _ in image.files} >= CARRIED_ARCHIVES


def test_a_failed_restore_leaves_nothing_mounted(env: ContainerEnv, sequencer_image: Path) -> None:
    nf = _start_sequencer(env, sequencer_image)
    image = _checkpoint(nf, env.images / "e1")
    # Same size, other bytes: the metadata check passes, CRIU refuses the image, and it does
    # so after the backend mounted the tmpfs for /dev and /dev/shm.
    core = image.path / "core-1.img"
    core.write_bytes(b"\xff" * core.stat().st_size)
    env.topo.unplug_nf()
    nf.kill()
    env.topo.next_nf()
    bundles = env.backend.state_dir / "bundles"
    before = set(bundles.iterdir())
    with pytest.raises(RestoreError):
        env.restore(image.path, name=f"{env.topo.prefix}-bad")
    assert _host_mounts(env) == []
    assert set(bundles.iterdir()) == before, "the failed restore left its bundle"
