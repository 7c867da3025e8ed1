"""What keeps the container checkpoint short, on the real stack: the criu swrk worker started
ahead of each dump, CRIU's kernel-feature cache, masked directories declared external, and the
receive-queue drain the epoch engine runs before the freeze. See container_env for the topology.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hamgr.nfs import images
from shim import netns
from shim.container import (
    MASKED_DIR_KEY,
    CheckpointError,
    Container,
    RuncBackend,
    find_cgroup_yard,
    find_criu,
    socket_inodes,
)
from shim.criu import ensure_kdat_cache, is_tmpfs
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


@pytest.fixture(scope="module")
def sequencer_image() -> Path:
    return images.build_image("sequencer")


@pytest.fixture
def env(tmp_path: Path) -> Iterator[ContainerEnv]:
    e = ContainerEnv.open("w", tmp_path)
    try:
        yield e
    finally:
        e.close()


def _start(env: ContainerEnv, image: Path, *extra: str) -> Container:
    nf = env.start(env.spec("seq", image, (*SEQ_ARGS, *extra)))
    wait_port(nf.pid, NF_PORT)
    return nf


def _udp_ends(env: ContainerEnv) -> tuple[UdpSink, UdpSender]:
    sink = UdpSink.open(env.topo.client, SINK_PORT)
    env.track(sink.close)
    sender = UdpSender.open(env.topo.client, NF_PORT)
    env.track(sender.close)
    return sink, sender


def _cmdline(pid: int, timeout: float = 5.0) -> list[str]:
    """The command line of `pid` once it has exec'd (empty between fork and exec)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        except FileNotFoundError:
            return []
        if any(args) or time.monotonic() > deadline:
            return args
        time.sleep(0.005)


def _gone(pid: int) -> bool:
    # A reaped process has no /proc entry; a zombie would still show one.
    return not Path(f"/proc/{pid}").exists()


@contextlib.contextmanager
def _small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "hamgr-test", str(path)], check=True
    )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
        path.rmdir()


def test_swrk_worker_waits_before_the_freeze_and_every_worker_is_reaped(
    env: ContainerEnv, sequencer_image: Path
) -> None:
    assert env.backend.criu_mode == "swrk"
    nf = _start(env, sequencer_image)
    nf.prepare_checkpoint()
    first = nf._worker
    assert first is not None
    assert first.usable()
    assert "swrk" in _cmdline(first.pid)

    nf.freeze()
    nf.checkpoint(1, env.images / "e1")
    nf.thaw()
    nf._wait_spawner()
    second = nf._worker
    assert second is not None, "no worker was started for the next dump"
    assert second.pid != first.pid
    assert _gone(first.pid), "the worker that served the dump was not reaped"

    nf.freeze()
    nf.checkpoint(2, env.images / "e2")
    nf.thaw()
    nf.destroy()
    assert _gone(second.pid)
    assert nf._worker is None


def test_swrk_and_exec_dumps_write_the_same_image(env: ContainerEnv, sequencer_image: Path) -> None:
    nf = _start(env, sequencer_image)
    names = {}
    for epoch, mode in enumerate(("swrk", "exec"), start=1):
        env.backend.criu_mode = mode  # type: ignore[assignment]
        nf.freeze()
        image = nf.checkpoint(epoch, env.images / mode)
        nf.thaw()
        names[mode] = sorted(name for name, _ in image.files)
    assert names["swrk"] == names["exec"]


def test_failed_swrk_dump_leaves_nothing_and_the_next_dump_works(
    env: ContainerEnv, sequencer_image: Path, tmp_path: Path
) -> None:
    # A real CRIU running out of room half-way through the pages: 8 MiB of NF memory, 1 MiB of
    # tmpfs.
    nf = _start(env, sequencer_image, "--mem-mb", "8")
    sink, sender = _udp_ends(env)
    with _small_tmpfs(tmp_path / "full", "1m") as full:
        nf.freeze()
        try:
            with pytest.raises(CheckpointError, match="criu dump failed"):
                nf.checkpoint(1, full / "e1")
        finally:
            nf.thaw()
        assert list(full.iterdir()) == [], "a failed dump left files behind"
    assert not nf.exited(), "a failed dump must leave the NF running"
    sent = sender.send(5)
    assert [s for _, s, _ in sink.wait_count(5)] == list(sent)

    nf.freeze()
    image = nf.checkpoint(2, env.images / "e2")
    nf.thaw()
    assert image.size_bytes >= 8 << 20


def test_masked_directories_are_external_and_restore_empty_and_read_only(
    env: ContainerEnv, sequencer_image: Path
) -> None:
    nf = _start(env, sequencer_image)
    masked = nf.dump_facts().masked_dirs
    # runc masks /proc/acpi, /sys/firmware and others; on this machine kind some exist, and a
    # host where none does would leave this path untested, so that is a failure, not a skip.
    assert masked, "runc masks no directory that exists on this kernel"
    nf.freeze()
    image = nf.checkpoint(1, env.images / "e1")
    nf.thaw()
    # CRIU archives no tmpfs at all: the masked directories are external, and /dev and
    # /dev/shm are carried by hamgr (test_container_devmounts).
    archives = [name for name, _ in image.files if name.startswith("tmpfs-dev-")]
    assert archives == []
    assert nf.dump_facts().carried == ("/dev", "/dev/shm")

    env.topo.unplug_nf()
    nf.kill()
    env.topo.next_nf()
    restored = env.restore(image.path, name=f"{env.topo.prefix}-r")
    wait_port(restored.pid, NF_PORT)
    for path in masked:
        inside = Path(f"/proc/{restored.pid}/root{path}")
        assert inside.is_dir()
        assert os.listdir(inside) == []
        with pytest.raises(OSError, match="Read-only") as info:
            (inside / "x").write_text("x")
        assert info.value.errno == errno.EROFS
    # A restored container is checkpointed the same way again.
    assert restored.dump_facts().masked_dirs == masked
    restored.freeze()
    again = restored.checkpoint(2, env.images / "e2")
    restored.thaw()
    assert [n for n, _ in again.files if n.startswith("tmpfs-dev-")] == []
    assert MASKED_DIR_KEY in env.backend.criu_config.read_text()


def test_cgroup_yard_is_the_hosts_hierarchies(env: ContainerEnv, sequencer_image: Path) -> None:
    nf = _start(env, sequencer_image)
    yard = find_cgroup_yard(nf.pid)
    assert yard is not None, "/sys/fs/cgroup does not hold every hierarchy of the container"
    assert nf.dump_facts().cgroup_yard == yard
    # The restore path with an image dumped through the yard is covered by test_container.


def test_a_restore_opens_the_hosts_cgroups_instead_of_mounting_its_own(
    env: ContainerEnv, sequencer_image: Path, tmp_path: Path
) -> None:
    nf = _start(env, sequencer_image)
    sink, sender = _udp_ends(env)
    sender.send(5)
    assert [r[0] for r in sink.wait_count(5)] == [1, 2, 3, 4, 5]
    nf.freeze()
    image = nf.checkpoint(1, env.images / "e1")
    nf.thaw()
    env.topo.unplug_nf()
    nf.kill()
    # CRIU logs the scratch directory it mounts each hierarchy in (".criu.cgyard.XXXXXX").
    mounted = []
    for gen, yard in enumerate((True, False)):
        env.topo.next_nf()
        if not yard:
            env.backend = RuncBackend(state_dir=tmp_path / "no-yard", cgroup_yard=False)
        restored = env.restore(image.path, name=f"{env.topo.prefix}-r{gen}")
        wait_port(restored.pid, NF_PORT)
        log = (restored.work_dir / "restore.log").read_text()
        mounted.append(".criu.cgyard." in log)
        # Either way the NF is back in its own cgroups, and continues from the cut.
        own = Path(f"/proc/{restored.pid}/cgroup").read_text()
        assert f"{env.cgroup_parent}/{env.topo.prefix}-r{gen}" in own
        before = len(sink.snapshot())
        sender.send(1)
        assert sink.wait_count(before + 1)[-1][0] == 6
        restored.destroy()
        env.containers.remove(restored)
    assert mounted == [False, True], "with the yard CRIU mounted hierarchies, or without it not"


def test_wait_rx_drained_reports_what_a_frozen_nf_has_not_read(
    env: ContainerEnv, sequencer_image: Path
) -> None:
    nf = _start(env, sequencer_image)
    sink, sender = _udp_ends(env)
    assert nf.wait_rx_drained(timeout=1.0).drained
    nf.freeze()
    sent = sender.send(20)
    try:
        drain = nf.wait_rx_drained(timeout=0.1)
    finally:
        nf.thaw()
    assert not drain.drained
    assert drain.pending_sockets == 1
    assert drain.pending_bytes > 0
    assert drain.waited_s >= 0.1
    after = nf.wait_rx_drained(timeout=2.0)
    assert after.drained
    assert after.pending_bytes == 0
    assert [s for _, s, _ in sink.wait_count(20)] == list(sent)


def test_an_own_drain_waits_for_the_containers_sockets_only(
    env: ContainerEnv, sequencer_image: Path
) -> None:
    """A chain member's drain: data queued in another socket of the shared netns (here one the
    test holds, never read) holds a drain of the whole netns, not one of the NF's own sockets;
    data queued in the NF's own socket holds both."""
    nf = _start(env, sequencer_image)
    sink, sender = _udp_ends(env)
    own = socket_inodes([nf.pid])
    assert own, "the sequencer holds no socket"

    def stranger() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        s.sendto(b"x" * 100, s.getsockname())
        return s

    other = netns.run_in_netns(env.topo.nf, stranger)
    env.track(other.close)
    assert not nf.wait_rx_drained(timeout=0.05).drained
    assert nf.wait_rx_drained(timeout=0.05, own=True).drained
    nf.freeze()
    sender.send(5)
    try:
        drain = nf.wait_rx_drained(timeout=0.1, own=True)
    finally:
        nf.thaw()
    assert not drain.drained
    assert drain.pending_sockets == 1  # the NF's own, not the stranger's
    assert nf.wait_rx_drained(timeout=2.0, own=True).drained
    sink.wait_count(5, timeout=5.0)


@pytest.mark.parametrize("drain_first", [True, False])
def test_draining_before_the_freeze_keeps_delivered_datagrams_in_the_image(
    env: ContainerEnv, sequencer_image: Path, drain_first: bool
) -> None:
    """The epoch engine's order: ingress paused (here: the sender stops), drain, freeze, dump.

    Without the drain, datagrams the NF had been given but not yet read at the freeze are not in
    the image, and the restored NF's counter misses them; with it, the counter continues right
    after the last datagram delivered before the cut.
    """
    nf = _start(env, sequencer_image)
    sink, sender = _udp_ends(env)
    # A backlog the NF has not read: delivered into its socket while it is frozen.
    nf.freeze()
    delivered = sender.send(200)
    assert not nf.wait_rx_drained(timeout=0.05).drained
    if drain_first:
        nf.thaw()
        assert nf.wait_rx_drained(timeout=2.0).drained
        nf.freeze()
    image = nf.checkpoint(1, env.images / "e1")
    nf.thaw()
    sink.wait_count(len(delivered), timeout=5.0)

    env.topo.unplug_nf()
    nf.kill()
    env.topo.next_nf()
    mark = len(sink.snapshot())
    restored = env.restore(image.path, name=f"{env.topo.prefix}-r")
    wait_port(restored.pid, NF_PORT)
    sender.send(1)
    first_after = sink.wait_count(mark + 1)[mark:]
    assert first_after, "the restored NF does not forward"
    counter = first_after[0][0]
    if drain_first:
        assert counter == len(delivered) + 1
    else:
        # The control: the dump came while the backlog was still queued, and CRIU dropped it,
        # so the restored NF has seen none of the 200 datagrams delivered before the cut.
        assert counter == 1


def test_kdat_cache_is_in_place_and_criu_loads_it(tmp_path: Path) -> None:
    criu = find_criu()
    status = ensure_kdat_cache(criu)
    assert status in ("native", "cached", "created")
    assert ensure_kdat_cache(criu) in ("native", "cached")
    res = subprocess.run(
        [criu, "check", "--work-dir", str(tmp_path), "-o", "check.log", "-v4"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    log = (tmp_path / "check.log").read_text()
    assert "Loaded kdat cache from /run/criu.kdat" in log, (res.returncode, log[:2000])


def test_kdat_cache_outside_tmpfs_is_a_link_into_hamgrs_own_tmpfs(tmp_path: Path) -> None:
    # The link is only made where the directory is not a tmpfs; pytest's tmp_path is on disk.
    assert not is_tmpfs(tmp_path), f"{tmp_path} is a tmpfs; point --basetemp at a disk"
    criu = find_criu()
    run = tmp_path / "run"
    run.mkdir()
    link, directory = run / "criu.kdat", tmp_path / "kdat"
    try:
        assert ensure_kdat_cache(criu, link=link, directory=directory) == "created"
        assert is_tmpfs(directory)
        assert os.readlink(link) == str(directory / "criu.kdat")
        assert (directory / "criu.kdat").stat().st_size > 0
        assert ensure_kdat_cache(criu, link=link, directory=directory) == "cached"
        # What CRIU does to a cache it finds stale (another build): it unlinks the link.
        link.unlink()
        assert ensure_kdat_cache(criu, link=link, directory=directory) == "created"
        assert sorted(p.name for p in directory.iterdir()) == ["criu.kdat", "stamp"]
    finally:
        subprocess.run(["umount", str(directory)], check=False)
