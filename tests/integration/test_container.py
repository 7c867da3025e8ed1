"""The container backend with real runc, CRIU and the sequencer NF, in netns made here.

The sequencer stamps a per-flow counter into every datagram it forwards, so the sink can tell
exactly which NF state produced each output. See container_env for the topology.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hamgr.nfs import images
from shim.container import (
    CheckpointError,
    CheckpointImage,
    Container,
    ContainerError,
    CriuMode,
    Freezer,
    RestoreError,
    RuncBackend,
)
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


@pytest.fixture(scope="module")
def sequencer_image() -> Path:
    return images.build_image("sequencer")


@pytest.fixture
def env(tmp_path: Path) -> Iterator[ContainerEnv]:
    e = ContainerEnv.open("s", tmp_path)
    try:
        yield e
    finally:
        e.close()


def _start(env: ContainerEnv, image: Path) -> Container:
    nf = env.start(env.spec("seq", image, SEQ_ARGS))
    wait_port(nf.pid, NF_PORT)
    return nf


def _udp_ends(env: ContainerEnv) -> tuple[UdpSink, UdpSender]:
    sink = UdpSink.open(env.topo.client, SINK_PORT)
    env.track(sink.close)
    sender = UdpSender.open(env.topo.client, NF_PORT)
    env.track(sender.close)
    return sink, sender


def test_sequencer_stamps_every_datagram(env: ContainerEnv, sequencer_image: Path) -> None:
    _start(env, sequencer_image)
    sink, sender = _udp_ends(env)
    sent = sender.send(20)
    got = sink.wait_count(20)
    assert [(c, s) for c, s, _ in got] == [(i, seq) for i, seq in enumerate(sent, start=1)]


def test_freeze_stops_all_processing_until_thaw(env: ContainerEnv, sequencer_image: Path) -> None:
    nf = _start(env, sequencer_image)
    sink, sender = _udp_ends(env)
    sender.send(5)
    assert len(sink.wait_count(5)) == 5

    nf.freeze()
    assert nf.freezer.is_frozen()
    held = sender.send(50)
    # Long enough for the veth and the sink to deliver anything the NF could have forwarded.
    assert len(sink.wait_quiet(quiet=0.3)) == 5, "a frozen NF forwarded a datagram"

    nf.thaw()
    assert not nf.freezer.is_frozen()
    got = sink.wait_count(55)[5:]
    assert [(c, s) for c, s, _ in got] == [(i, seq) for i, seq in enumerate(held, start=6)]


@pytest.mark.parametrize("criu_mode", ["swrk", "exec"])
def test_restore_continues_the_counter_exactly_at_the_cut(
    env: ContainerEnv, sequencer_image: Path, criu_mode: CriuMode
) -> None:
    env.backend.criu_mode = criu_mode
    primary = _start(env, sequencer_image)
    sink, sender = _udp_ends(env)
    sender.start_stream(interval=0.002, max_count=5000, max_seconds=30)
    assert len(sink.wait_count(100)) >= 100, "no traffic through the NF"

    # The cut, with traffic still flowing. Once frozen the NF emits nothing, so after the sink
    # falls quiet its highest counter is the last output produced before the cut.
    primary.freeze()
    cut = sink.wait_quiet(quiet=0.1)
    last_before_cut = max(c for c, _, _ in cut)
    image = primary.checkpoint(1, env.images / "e1")
    speculative_from = len(sink.snapshot())
    assert speculative_from == len(cut), "output while frozen"
    primary.thaw()

    # The primary runs on speculatively: these outputs are what output commit must hold back.
    assert len(sink.wait_count(speculative_from + 20)) >= speculative_from + 20

    # Host failure: the link vanishes, the NF dies, a standby netns takes over.
    sender.stop_stream()
    env.topo.unplug_nf()
    primary.kill()
    env.topo.next_nf(up=False)
    speculative = [c for c, _, _ in sink.wait_quiet(quiet=0.1)[speculative_from:]]

    mark = len(sink.snapshot())
    restored = env.restore(image.path, name=f"{env.topo.prefix}-seq2")
    env.topo.plug_nf()
    after = sender.send(30, gap=0.002)
    post = sink.wait_count(mark + 30)[mark:]

    # Exact: the image holds the counter as of the cut. A datagram the primary had read but not
    # yet forwarded at the freeze is forwarded by the restored NF with its stamp; datagrams
    # queued unread in the socket at the cut are not in the image (CRIU drops UDP read queues)
    # and neither are those sent while nothing was listening. Either way the restored NF's first
    # output carries last_before_cut + 1, and every later one is the next integer.
    counters = [c for c, _, _ in post]
    assert counters[0] == last_before_cut + 1, (counters[:5], last_before_cut)
    assert counters == list(range(last_before_cut + 1, last_before_cut + 1 + len(counters)))
    # Every datagram sent after the restore was forwarded, in order.
    assert [s for _, s, _ in post if s in after] == list(after)
    assert len(post) >= len(after)
    # The primary's speculative outputs reused exactly these counters: a duplicate the outside
    # would see without output commit, which is why hamgr holds them until commit.
    assert speculative
    assert speculative[0] == last_before_cut + 1
    assert set(speculative) & set(counters)
    assert not restored.exited()


def test_image_is_complete_and_self_describing(env: ContainerEnv, sequencer_image: Path) -> None:
    nf = _start(env, sequencer_image)
    nf.freeze()
    try:
        image = nf.checkpoint(7, env.images / "e7")
    finally:
        nf.thaw()
    loaded = CheckpointImage.load(image.path)
    assert loaded.epoch == 7
    assert loaded.spec == nf.spec
    assert loaded.size_bytes == image.size_bytes > 0
    assert sorted(p.name for p in env.images.iterdir()) == ["e7"], "temporary dirs left behind"
    with pytest.raises(CheckpointError, match="already exists"):
        nf.checkpoint(8, env.images / "e7")

    # A truncated file is caught before CRIU is ever asked to restore from it.
    pages = max(image.path.glob("pages-*.img"), key=lambda p: p.stat().st_size)
    with open(pages, "r+b") as f:
        f.truncate(pages.stat().st_size // 2)
    with pytest.raises(RestoreError, match="metadata says"):
        CheckpointImage.load(image.path)


def test_failed_dump_leaves_nothing_that_looks_like_an_image(
    env: ContainerEnv, sequencer_image: Path, tmp_path: Path
) -> None:
    # A fake CRIU command line; test_container_swrk covers the same with a real swrk worker.
    env.backend.criu_mode = "exec"
    nf = _start(env, sequencer_image)
    # A CRIU that writes half an image and then fails, as a dump killed by a full tmpfs would.
    fake = tmp_path / "criu-fails"
    fake.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "--version" ]; then echo "Version: 4.2.1"; exit 0; fi\n'
        'while [ $# -gt 0 ]; do [ "$1" = "--images-dir" ] && d="$2"; shift; done\n'
        '[ -d "$d" ] || exit 2\n'
        'echo partial > "$d/pages-1.img"; exit 1\n'
    )
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    # What a CRIU killed mid-dump leaves: its lock table, which drops all traffic of the netns.
    subprocess.run(
        ["nsenter", f"--net={nf.spec.netns_path}", "nft", "add", "table", "inet", "CRIU-stale"],
        check=True,
        timeout=10,
    )
    nf._runc = type(nf._runc)(nf._runc.runc, nf._runc.root, str(fake))
    with pytest.raises(CheckpointError, match="criu dump exited 1"):
        nf.checkpoint(1, env.images / "e1")
    assert list(env.images.iterdir()) == []
    with pytest.raises(RestoreError, match="not a complete hamgr checkpoint"):
        env.restore(env.images / "e1")
    assert not nf.exited(), "a failed dump must leave the NF running"
    tables = subprocess.run(
        ["nsenter", f"--net={nf.spec.netns_path}", "nft", "list", "tables"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout
    assert "CRIU-" not in tables


def test_checkpoint_keeps_the_nf_frozen(env: ContainerEnv, sequencer_image: Path) -> None:
    # CRIU thaws the cgroup while it holds the tasks with ptrace, then freezes it again before
    # letting go: the NF must not run between freeze() and thaw() (invariant I2).
    nf = _start(env, sequencer_image)
    sink, sender = _udp_ends(env)
    nf.freeze()
    held = sender.send(10)
    nf.checkpoint(1, env.images / "e1")
    assert nf.freezer.is_frozen()
    assert sink.wait_quiet(quiet=0.2) == [], "the NF ran during or right after the dump"
    nf.thaw()
    assert [s for _, s, _ in sink.wait_count(10)] == list(held)


def test_death_is_seen_on_the_pidfd_and_stop_cleans_up(
    env: ContainerEnv, sequencer_image: Path
) -> None:
    nf = _start(env, sequencer_image)
    assert not nf.exited()
    os.kill(nf.pid, signal.SIGKILL)  # an NF crash, from outside the backend
    assert nf.exited(timeout=5)
    nf.stop()
    nf.destroy()  # idempotent
    assert env.backend._runner().state(nf.name) is None
    assert not nf.bundle.path.exists()
    assert not any(Path(h, env.cgroup_parent.strip("/"), nf.name).exists() for h in _hierarchies())

    again = _start(env, sequencer_image)  # the name is free again
    again.stop(timeout=5)
    assert again.exited()


def test_a_container_an_agent_left_running_is_removed_by_name(
    env: ContainerEnv, sequencer_image: Path
) -> None:
    """A new backend on the same state (an agent restarted) finds nothing of a name that runc
    does not know, and removes a running container under a name it knows nothing else of."""
    nf = _start(env, sequencer_image)
    fresh = RuncBackend(state_dir=env.backend.state_dir)
    assert fresh.remove_stale(f"{nf.name}-never-made") is False
    assert fresh.remove_stale(nf.name) is True
    assert nf.exited(timeout=5), "the left container still runs"
    assert env.backend._runner().state(nf.name) is None
    assert not nf.bundle.path.exists()
    assert fresh.remove_stale(nf.name) is False
    again = _start(env, sequencer_image)  # the name is free again
    again.stop(timeout=5)


def test_failed_start_leaves_nothing(env: ContainerEnv, sequencer_image: Path) -> None:
    spec = env.spec("bad", sequencer_image, ("/usr/local/bin/no-such-nf",))
    with pytest.raises(ContainerError, match="starting container"):
        env.start(spec)
    assert env.backend._runner().state(spec.name) is None
    assert list((env.backend.state_dir / "bundles").iterdir()) == []
    assert list((env.backend.state_dir / "work").iterdir()) == []


def _hierarchies() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [
            line.split()[4]
            for line in f
            if line.partition(" - ")[2].split()[:1] in (["cgroup"], ["cgroup2"])
        ]


def test_cgroup2_freezer_holds_processing_too(env: ContainerEnv, sequencer_image: Path) -> None:
    # This host runs the freezer on cgroup v1, where runc and CRIU use it. The v2 code path is
    # what a pure-v2 host uses; a hybrid host's unified hierarchy lets us exercise it here.
    nf = _start(env, sequencer_image)
    v2 = _unified_path(nf.pid)
    assert v2 is not None, "no cgroup2 hierarchy holds the container (hybrid host expected)"
    freezer = Freezer(v2, 2)
    sink, sender = _udp_ends(env)
    freezer.freeze()
    assert freezer.is_frozen()
    sender.send(10)
    assert sink.wait_quiet(quiet=0.2) == []
    freezer.thaw()
    assert len(sink.wait_count(10)) == 10


def _unified_path(pid: int) -> Path | None:
    with open("/proc/self/mountinfo") as f:
        mounts = [ln.split()[4] for ln in f if ln.partition(" - ")[2].split()[:1] == ["cgroup2"]]
    with open(f"/proc/{pid}/cgroup") as f:
        rel = next((ln.split(":", 2)[2].strip() for ln in f if ln.startswith("0::")), None)
    if not mounts or rel is None:
        return None
    path = Path(mounts[0], rel.lstrip("/"))
    return path if (path / "cgroup.freeze").exists() else None


def test_images_are_built_offline_and_cached_by_content(tmp_path: Path) -> None:
    built = images.build_all(tmp_path)
    assert set(built) == {"sequencer", "tcpnf", "socat"}
    again = images.build_all(tmp_path)
    assert again == built, "an unchanged image was rebuilt under a new name"
    for name, path in built.items():
        assert path.name.startswith(f"{name}-")
        with tarfile.open(path) as tar:
            index = json.load(tar.extractfile("index.json"))  # type: ignore[arg-type]
        refs = [m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]]
        assert refs == [name]
    socat_files = {e.dest for e in images.rootfs_entries("socat", tmp_path)}
    assert "usr/bin/socat" in socat_files
    assert any(f.startswith("lib") and "libc.so" in f for f in socat_files)
