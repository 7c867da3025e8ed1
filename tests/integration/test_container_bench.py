"""Pause, dump and restore times for a container NF with 64 MiB of touched memory.

The sequencer touches 64 MiB at start and rewrites 1% of its pages every EPOCH_S, and one
checkpoint is taken per epoch, as the epoch engine would. The checkpoint paths are measured
(runc's `checkpoint`, `criu dump` run per checkpoint, and a criu swrk worker started ahead);
docs/containers.md explains the choice. `hamgr bench checkpoint` is the full benchmark (with
shipping to a standby); this test guards the same paths against regressions.
Run with ``-s`` to see the numbers; the last line is one JSON object.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from hamgr.nfs import images
from shim.container import CheckpointEngine, CriuMode
from tests.integration.container_env import (
    CLIENT_IP,
    ContainerEnv,
    UdpSender,
    UdpSink,
    p50,
    wait_port,
)

pytestmark = [
    pytest.mark.root,
    pytest.mark.usefixtures("container_stack"),
]


MEM_MB = 64
EPOCH_S = 0.05
RUNS = 10
RESTORES = 5


def _measure(engine: CheckpointEngine, mode: CriuMode, work: Path) -> dict[str, float]:
    env = ContainerEnv.open(mode[0] + "b", work / engine, engine=engine)
    env.backend.criu_mode = mode
    try:
        image = images.build_image("sequencer")
        args = (
            "/usr/local/bin/sequencer",
            "--listen", "7000",
            "--dest", f"{CLIENT_IP}:9000",
            "--mem-mb", str(MEM_MB),
            "--dirty-pct", "1",
            "--dirty-ms", str(int(EPOCH_S * 1000)),
        )  # fmt: skip
        nf = env.start(env.spec("seq", image, args))
        wait_port(nf.pid, 7000)
        nf.prepare_checkpoint()
        sink = UdpSink.open(env.topo.client, 9000)
        env.track(sink.close)
        sender = UdpSender.open(env.topo.client, 7000)
        env.track(sender.close)
        sender.send(10)
        assert len(sink.wait_count(10)) == 10

        freeze, dump, thaw, pause, sizes = [], [], [], [], []
        last = None
        for epoch in range(RUNS):
            time.sleep(EPOCH_S)
            t0 = time.monotonic()
            nf.freeze()
            t1 = time.monotonic()
            try:
                img = nf.checkpoint(epoch, env.images / f"e{epoch}")
            finally:
                t2 = time.monotonic()
                nf.thaw()
                t3 = time.monotonic()
            freeze.append(t1 - t0)
            dump.append(t2 - t1)
            thaw.append(t3 - t2)
            pause.append(t3 - t0)
            sizes.append(img.size_bytes)
            if last is not None:
                shutil.rmtree(last)
            last = img.path
        assert last is not None
        assert min(sizes) >= MEM_MB << 20, "the image is smaller than the NF's touched memory"

        env.topo.unplug_nf()
        nf.kill()
        restore = []
        for i in range(RESTORES):
            env.topo.next_nf()
            t0 = time.monotonic()
            restored = env.restore(last, name=f"{env.topo.prefix}-r{i}")
            restore.append(time.monotonic() - t0)
            wait_port(restored.pid, 7000)
            before = len(sink.snapshot())
            sender.send(3)
            assert len(sink.wait_count(before + 3)) == before + 3, "restored NF does not forward"
            restored.destroy()

        return {
            "freeze_ms_p50": p50(freeze) * 1000,
            "dump_ms_p50": p50(dump) * 1000,
            "thaw_ms_p50": p50(thaw) * 1000,
            "pause_ms_p50": p50(pause) * 1000,
            "pause_ms_max": max(pause) * 1000,
            "restore_ms_p50": p50(restore) * 1000,
            "image_mb": sizes[-1] / (1 << 20),
        }
    finally:
        env.close()


@pytest.mark.parametrize(("engine", "mode"), [("criu", "swrk"), ("criu", "exec"), ("runc", "exec")])
def test_pause_dump_restore_times(engine: CheckpointEngine, mode: CriuMode, tmp_path: Path) -> None:
    result = _measure(engine, mode, tmp_path)
    print(
        json.dumps(
            {
                "bench": "container-checkpoint",
                "engine": engine,
                "criu_mode": mode if engine == "criu" else None,
                "mem_mb": MEM_MB,
                "runs": RUNS,
                **{k: round(v, 2) for k, v in result.items()},
            }
        )
    )
    # Bounds far above what this machine measures, so only a real regression trips them.
    assert result["freeze_ms_p50"] < 50
    assert result["thaw_ms_p50"] < 50
    assert result["pause_ms_p50"] < 2000
    assert result["restore_ms_p50"] < 3000
