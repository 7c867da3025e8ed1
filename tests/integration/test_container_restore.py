"""The restore path's own costs: runc's exit noticed at once, archives unpacked once per host.

`RuncBackend.restore` used to lose 0-50 ms after `runc restore` had exited (subprocess's
sleep-and-poll wait) and ~35 ms unpacking the NF's OCI archive into a fresh bundle. These tests
show both are gone and that the restored NF still works and leaves nothing behind
(docs/containers.md, "Restore on a standby").
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from hamgr.nfs import images
from shim import container as container_mod
from shim.container import ROOTFS_CACHE, CheckpointImage, Container, RuncBackend, _run_to_exit
from tests.integration.container_env import (
    CLIENT_IP,
    ContainerEnv,
    UdpSender,
    UdpSink,
    wait_port,
)

pytestmark = [
    pytest.mark.root,
    pytest.mark.usefixtures("container_stack"),
]


NF_PORT = 7000
SINK_PORT = 9000
SEQ_ARGS = (
    "/usr/local/bin/sequencer",
    "--listen",
    str(NF_PORT),
    "--dest",
    f"{CLIENT_IP}:{SINK_PORT}",
)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[ContainerEnv]:
    e = ContainerEnv.open("rs", tmp_path)
    try:
        yield e
    finally:
        e.close()


# --------------------------------------------------------------------------- waiting for runc


def test_a_detached_command_is_seen_to_exit_at_once(tmp_path: Path) -> None:
    # 70 ms: subprocess's polling wait looks at 63.5 ms and next at 113.5 ms, so it would
    # return ~40 ms after the exit. The child stamps its own end just before exiting.
    stamp = tmp_path / "end"
    lags = []
    with open(os.devnull, "r+b") as null:
        for _ in range(3):
            proc = _run_to_exit(
                ["/bin/sh", "-c", f"sleep 0.07; date +%s.%N > {stamp}"], stdio=null, timeout=10
            )
            returned = time.time()
            assert proc.returncode == 0
            lags.append(returned - float(stamp.read_text()))
    # The child's sh still exits after `date` ran; a few ms is scheduling, not polling.
    assert min(lags) < 0.015, f"returned {min(lags) * 1000:.1f} ms after the command ended"


def test_a_detached_command_that_hangs_is_killed_and_reaped() -> None:
    with open(os.devnull, "r+b") as null:
        t0 = time.monotonic()
        with pytest.raises(subprocess.TimeoutExpired):
            _run_to_exit(["/bin/sleep", "30"], stdio=null, timeout=0.2)
        assert time.monotonic() - t0 < 5
    # Killed and reaped: no `sleep` child of ours is left, running or as a zombie.
    assert [p for p in _children() if p[1] == "sleep"] == []


def _children() -> list[tuple[int, str, str]]:
    """(pid, comm, state) of this process's children."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
        if int(ppid) == os.getpid():
            found.append((int(entry.name), comm, state))
    return found


def test_a_failing_detached_command_reports_its_status() -> None:
    with open(os.devnull, "r+b") as null:
        proc = _run_to_exit(["/bin/sh", "-c", "exit 3"], stdio=null, timeout=10)
    assert proc.returncode == 3


# --------------------------------------------------------------------------- shared rootfs


def _checkpoint(nf: Container, dest: Path) -> Path:
    nf.freeze()
    try:
        return nf.checkpoint(1, dest).path
    finally:
        nf.thaw()


def _forwards(sink: UdpSink, sender: UdpSender, n: int = 5) -> list[tuple[int, int]]:
    before = len(sink.snapshot())
    sent = sender.send(n)
    got = sink.wait_count(before + n)[before:]
    assert [s for _, s, _ in got] == list(sent), "the restored NF does not forward"
    return [(c, s) for c, s, _ in got]


def _root_mount_options(pid: int) -> set[str]:
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == "/":
            return set(fields[5].split(","))
    raise AssertionError(f"pid {pid} has no / mount")


def _leftovers(env: ContainerEnv, names: list[str]) -> list[str]:
    """What a destroyed container could leave: runc state, cgroups, host mounts, bundles."""
    found = []
    state = os.path.realpath(env.backend.state_dir)
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        if line.split()[4].startswith(state + "/"):
            found.append(f"mount {line.split()[4]}")
    runc_root = env.backend.state_dir / "runc"
    found += [f"runc state {p.name}" for p in runc_root.iterdir()]
    found += [f"bundle {p.name}" for p in (env.backend.state_dir / "bundles").iterdir()]
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        for name in names:
            cg = hierarchy / env.cgroup_parent.strip("/") / name
            if cg.exists():
                found.append(f"cgroup {cg}")
    return found


def test_restores_share_one_unpacked_read_only_rootfs(
    env: ContainerEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = images.build_image("sequencer")
    nf = env.start(env.spec("seq", image, SEQ_ARGS))
    wait_port(nf.pid, NF_PORT)
    sink = UdpSink.open(env.topo.client, SINK_PORT)
    env.track(sink.close)
    sender = UdpSender.open(env.topo.client, NF_PORT)
    env.track(sender.close)
    assert _forwards(sink, sender) == [(i, i) for i in range(1, 6)]
    cut = _checkpoint(nf, env.images / "e1")
    env.topo.unplug_nf()
    nf.kill()

    # A standby with its own state directory prepares the rootfs before any failure; its
    # restores then never unpack the archive.
    standby = RuncBackend(state_dir=tmp_path / "standby")
    env.backend = standby
    spec = CheckpointImage.load(cut).spec
    rootfs = standby.prepare_image(spec)
    assert rootfs is not None
    assert rootfs.parent == standby.state_dir / ROOTFS_CACHE
    assert standby.prepare_image(spec) == rootfs, "a second prepare unpacked again"
    # Its one-time work too (CRIU's version check, runc's base spec): ~16 ms of a first restore.
    standby.warm_up()

    def no_unpack(*_args: object) -> None:
        raise AssertionError("a restore unpacked the archive although it was prepared")

    def not_again(*_args: object) -> None:
        raise AssertionError("a restore redid the backend's one-time work after warm_up")

    monkeypatch.setattr(container_mod, "unpack_image", no_unpack)
    monkeypatch.setattr(container_mod, "runc_spec_base", not_again)
    monkeypatch.setattr(container_mod, "CriuRuntime", not_again)
    names = []
    counter = 5
    for gen in range(2):
        env.topo.next_nf()
        name = f"{env.topo.prefix}-r{gen}"
        names.append(name)
        restored = env.restore(cut, name=name)
        wait_port(restored.pid, NF_PORT)
        assert restored.bundle.rootfs == rootfs.resolve()
        assert not restored.bundle.owns_rootfs
        # The NF continues from the cut each time, and cannot write the shared rootfs.
        got = _forwards(sink, sender)
        assert [c for c, _ in got] == list(range(counter + 1, counter + 6))
        assert "ro" in _root_mount_options(restored.pid)
        restored.destroy()
        env.containers.remove(restored)
        assert _leftovers(env, names) == [], "a destroyed restore left something behind"
    # Only the shared rootfs stays, unchanged and unmounted, for the next restore.
    assert [p.name for p in (standby.state_dir / ROOTFS_CACHE).iterdir()] == [rootfs.name]
    assert (rootfs / "usr/local/bin/sequencer").is_file()


def test_a_rebuilt_archive_gets_its_own_rootfs(env: ContainerEnv, tmp_path: Path) -> None:
    image = images.build_image("sequencer")
    copy = tmp_path / "copy.oci.tar"
    copy.write_bytes(image.read_bytes())
    spec = env.spec("seq", copy, SEQ_ARGS)
    first = env.backend.prepare_image(spec)
    os.utime(copy, ns=(time.time_ns(), time.time_ns() + 10**9))
    second = env.backend.prepare_image(spec)
    assert first is not None
    assert second not in (None, first)
    # A writable rootfs is never shared, and a directory image is used in place as before.
    assert env.backend.prepare_image(attrs.evolve(spec, readonly_rootfs=False)) is None
    assert env.backend.prepare_image(attrs.evolve(spec, image=first)) is None
