"""The local failover driver (shim/local_failover.py) against fakes: no root, no processes.

The NF's pidfd is the read end of a pipe, so "the NF dies" is a write to it. The integration test
(tests/integration/test_local_failover.py) runs the same driver on the real stack.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from shim import failover as fo
from shim import local_failover as lf
from shim.container import IMAGE_FORMAT, IMAGE_META
from shim.oci import ContainerSpec

UNIT = "seq0"
NETNS = "hb1-nf"


@attrs.define
class FakeNf:
    name: str
    pid: int
    spec: ContainerSpec
    pidfd: int = -1
    _w: int = -1
    destroyed: bool = False
    prepared: int = 0  # prepare_checkpoint(wait=False) calls

    @staticmethod
    def make(name: str, pid: int) -> FakeNf:
        r, w = os.pipe()
        spec = ContainerSpec(name=name, image=Path("/nonexistent"), args=("nf",), netns=NETNS)
        return FakeNf(name, pid, spec, r, w)

    def die(self) -> None:
        os.write(self._w, b"x")

    def exited(self, timeout: float = 0.0) -> bool:
        import select

        return bool(select.select([self.pidfd], [], [], timeout)[0])

    def destroy(self) -> None:
        self.destroyed = True

    def prepare_checkpoint(self, *, wait: bool = True) -> None:
        assert not wait, "the driver must not wait for CRIU on the critical path"
        self.prepared += 1

    def close(self) -> None:
        for fd in (self.pidfd, self._w):
            os.close(fd)


@attrs.frozen
class _Unit:
    epoch: int
    nf_rx: int
    nf: str = "dn"


@attrs.frozen
class _Stats:
    units: dict[str, _Unit]
    ports: dict[str, object]


@attrs.define
class FakeDp:
    term_file: Path
    calls: list[tuple[Any, ...]] = attrs.Factory(list)
    term: int = 1
    epoch: int = 7
    nf_rx: int = 500

    def set_term(self, unit: str, term: int, epoch: int | None = None) -> int:
        # What the term file says at the moment the data plane is fenced.
        self.calls.append(("set_term", term, int(self.term_file.read_text())))
        self.term = term
        return 40

    def pause_ingress(self, unit: str, term: int | None = None) -> None:
        self.calls.append(("pause_ingress", term))

    def resume_ingress(self, unit: str, term: int | None = None) -> None:
        self.calls.append(("resume_ingress", term))

    def close_epoch(self, unit: str, epoch: int, term: int | None = None) -> None:
        self.calls.append(("close_epoch", epoch, term))

    def discard(self, unit: str, from_epoch: int, term: int | None = None) -> int:
        self.calls.append(("discard", from_epoch, term))
        return 2

    def stats(self, unit: str | None = None) -> _Stats:
        return _Stats({UNIT: _Unit(self.epoch, self.nf_rx)}, {"dn": object()})


@attrs.define
class FakeEngine:
    term: int
    image_root: Path
    last_committed: int | None = None
    steps: int = 0
    fail_with: Exception | None = None
    nf_rx_base: int = 0

    @property
    def machine(self) -> Any:
        return attrs.make_class("M", {"term": attrs.field(default=self.term)})()

    def image_dir(self, epoch: int) -> Path:
        return self.image_root / f"epoch-{epoch:08d}"

    def step(self) -> None:
        self.steps += 1
        if self.fail_with is not None:
            raise self.fail_with


@attrs.define
class FakeBackend:
    delay_s: float = 0.0
    error: Exception | None = None
    restored: list[FakeNf] = attrs.Factory(list)

    def restore(self, image_dir: Path, netns: str, *, name: str | None = None) -> FakeNf:
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.error is not None:
            raise self.error
        assert name is not None
        nf = FakeNf.make(name, 1000 + len(self.restored))
        self.restored.append(nf)
        return nf


def write_image(root: Path, epoch: int) -> Path:
    path = root / f"epoch-{epoch:08d}"
    path.mkdir(parents=True)
    (path / "pages-1.img").write_bytes(b"p" * 64)
    spec = ContainerSpec(name="hb1-seq", image=Path("/nonexistent"), args=("nf",), netns=NETNS)
    meta = {
        "format": IMAGE_FORMAT,
        "epoch": epoch,
        "spec": spec.to_json(),
        "engine": "criu",
        "dump_seconds": 0.01,
        "files": {"pages-1.img": 64},
    }
    (path / IMAGE_META).write_text(json.dumps(meta))
    return path


@attrs.define
class Rig:
    driver: lf.LocalFailover
    dp: FakeDp
    backend: FakeBackend
    nf: FakeNf
    engines: list[FakeEngine]
    term_file: lf.TermFile


@pytest.fixture
def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    monkeypatch.setattr(lf, "nf_interfaces", lambda pid: {"lo", "hb1n"})
    term_file = lf.TermFile(tmp_path / "state" / "term")
    dp = FakeDp(term_file.path)
    # The dead NF's lingering TCP sockets are closed in its netns: recorded in the same order.
    monkeypatch.setattr(lf.netns, "destroy_tcp_sockets", lambda ns: dp.calls.append(("rst", ns)))
    nf = FakeNf.make("hb1-seq", 100)
    first = FakeEngine(1, tmp_path / "images", last_committed=6)
    write_image(first.image_root, 6)
    engines = [first]

    def protect(term: int, first_epoch: int, restored: Any, nf_rx_base: int) -> Any:
        engine = FakeEngine(term, first.image_root, nf_rx_base=nf_rx_base)
        engines.append(engine)
        return engine

    backend = FakeBackend()
    driver = lf.LocalFailover(
        UNIT,
        dataplane=dp,
        backend=backend,  # type: ignore[arg-type]
        nf=nf,  # type: ignore[arg-type]
        engine=first,  # type: ignore[arg-type]
        protect=protect,  # type: ignore[arg-type]
        term_file=term_file,
    )
    yield Rig(driver, dp, backend, nf, engines, term_file)
    nf.close()
    for restored in backend.restored:
        restored.close()


def test_an_exit_raises_the_term_durably_then_fences_then_restores_then_resumes(rig: Rig) -> None:
    rig.driver.step()
    assert rig.dp.calls == []
    assert rig.engines[0].steps == 1
    rig.nf.die()
    rig.driver.step()
    # The term file already said 2 when the data plane was fenced.
    assert rig.dp.calls == [
        ("set_term", 2, 2),
        ("pause_ingress", 2),
        # Before the close + discard, which drop the resets that closing them sends.
        ("rst", NETNS),
        ("close_epoch", 7, 2),
        ("discard", 7, 2),
        ("resume_ingress", 2),
    ]
    (restored,) = rig.backend.restored
    assert restored.name == "hb1-seq-t2"
    assert restored.prepared == 1  # its first dump's CRIU worker was started at the restore
    assert rig.driver.machine.state is fo.State.WATCHING
    assert (rig.driver.machine.term, rig.driver.machine.pid) == (2, restored.pid)
    assert rig.term_file.read() == 2
    # The new engine starts counting output where the fence left nf_rx.
    new = rig.engines[1]
    assert (new.term, new.nf_rx_base) == (2, 500)
    assert id(rig.driver.engine) == id(new)  # a duck-typed fake, not a PrimaryEngine
    (rec,) = rig.driver.records
    assert (rec.status, rec.term, rec.old_pid, rec.new_pid) == (fo.Status.FINISHED, 2, 100, 1000)
    assert (rec.restored_epoch, rec.discarded_pkts) == (6, 42)
    assert list(rec.steps_us) == [
        "raise-term", "fence", "locate-image", "restore", "attach", "resume", "reprotect"
    ]  # fmt: skip
    rig.driver.close()
    assert rig.nf.destroyed  # reaped off the critical path
    # The old engine is never stepped again; the new one is.
    old_steps = rig.engines[0].steps
    rig.driver.step()
    assert (rig.engines[0].steps, new.steps) == (old_steps, 1)


def test_a_second_failure_restores_the_same_image_if_nothing_was_committed_since(
    rig: Rig,
) -> None:
    rig.nf.die()
    rig.driver.step()
    rig.backend.restored[0].die()
    rig.driver.step()
    assert [r.restored_epoch for r in rig.driver.records] == [6, 6]
    assert [r.status for r in rig.driver.records] == [fo.Status.FINISHED] * 2
    assert rig.backend.restored[1].name == "hb1-seq-t3"
    assert rig.term_file.read() == 3


def test_a_failed_restore_leaves_the_unit_down_fenced_and_quiet(rig: Rig) -> None:
    rig.backend.error = RuntimeError("criu: Can't fork")
    rig.nf.die()
    rig.driver.step()
    assert rig.driver.machine.state is fo.State.FAILED
    assert rig.driver.engine is None
    assert ("resume_ingress", 2) not in rig.dp.calls
    assert rig.dp.term == 2
    (rec,) = rig.driver.records
    assert rec.status is fo.Status.ERROR
    assert "Can't fork" in rec.detail
    assert any("the unit is down" in a for a in rig.driver.alarms)
    # The dead NF is not reported again, and the loop waits instead of spinning.
    calls = len(rig.dp.calls)
    started = time.monotonic()
    for _ in range(5):
        rig.driver.step(wait=0.01)
    assert time.monotonic() - started >= 0.05
    assert len(rig.dp.calls) == calls
    # An operator's retry at the failed incarnation's term runs a new attempt at term 3.
    rig.backend.error = None
    rig.driver.feed(fo.FailoverRequested("image repaired", planned=False, term=1))
    assert (rig.driver.machine.state, rig.driver.machine.term) == (fo.State.WATCHING, 3)
    assert rig.dp.calls[-1] == ("resume_ingress", 3)


def test_a_restore_that_returns_after_its_deadline_is_destroyed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lf, "nf_interfaces", lambda pid: {"lo", "hb1n"})
    monkeypatch.setattr(lf.netns, "destroy_tcp_sockets", lambda ns: None)
    term_file = lf.TermFile(tmp_path / "term")
    dp = FakeDp(term_file.path)
    nf = FakeNf.make("hb1-seq", 100)
    engine = FakeEngine(1, tmp_path / "images", last_committed=3)
    write_image(engine.image_root, 3)
    backend = FakeBackend(delay_s=0.05)
    config = fo.FailoverConfig(timeouts=fo.StepTimeouts(restore_us=10_000))
    driver = lf.LocalFailover(
        UNIT,
        dataplane=dp,
        backend=backend,  # type: ignore[arg-type]
        nf=nf,  # type: ignore[arg-type]
        engine=engine,  # type: ignore[arg-type]
        protect=lambda *a: pytest.fail("must not protect"),
        term_file=term_file,
        config=config,
    )
    nf.die()
    driver.step()
    assert driver.machine.state is fo.State.FAILED
    (late,) = backend.restored
    assert late.destroyed
    assert [id(c) for c in driver.containers] == [id(nf)]
    assert "restore passed its 10 ms deadline" in driver.records[0].detail
    nf.close()
    late.close()


def test_without_a_committed_image_the_failover_fails_at_locate(rig: Rig) -> None:
    rig.engines[0].last_committed = None
    # A fresh driver whose engine never committed.
    fresh = lf.LocalFailover(
        UNIT,
        dataplane=rig.dp,
        backend=rig.backend,  # type: ignore[arg-type]
        nf=rig.nf,  # type: ignore[arg-type]
        engine=rig.engines[0],  # type: ignore[arg-type]
        protect=lambda *a: pytest.fail("must not protect"),
        term_file=lf.TermFile(rig.term_file.path.with_name("term2")),
    )
    rig.nf.die()
    fresh.step()
    assert fresh.machine.state is fo.State.FAILED
    assert "no committed checkpoint" in fresh.records[0].detail
    assert rig.backend.restored == []


@attrs.define
class DeadNf:
    """What a restarted owner holds of an NF that died unseen: no pidfd (`Container` made with
    ``gone=True`` raises on it), always exited."""

    name: str
    pid: int
    spec: ContainerSpec
    destroyed: bool = False

    @property
    def pidfd(self) -> int:
        raise AssertionError("a dead NF's pidfd must not be used")

    def exited(self, timeout: float = 0.0) -> bool:
        return True

    def destroy(self) -> None:
        self.destroyed = True


def test_an_nf_found_dead_is_restored_from_the_given_commit_at_the_first_step(rig: Rig) -> None:
    """An owner that restarted finds the NF dead: its engine never ran (it committed nothing),
    so the driver is given the standby's last commit; the first step restores it, at term 2,
    without stepping that engine."""
    spec = ContainerSpec(name="hb1-seq", image=Path("/nonexistent"), args=("nf",), netns=NETNS)
    dead = DeadNf("hb1-seq", 100, spec)
    never = FakeEngine(1, rig.engines[0].image_root)
    image = never.image_dir(6)  # written by the rig
    driver = lf.LocalFailover(
        UNIT,
        dataplane=rig.dp,
        backend=rig.backend,  # type: ignore[arg-type]
        nf=dead,  # type: ignore[arg-type]
        engine=never,  # type: ignore[arg-type]
        protect=lambda term, first_epoch, nf, base: FakeEngine(term, never.image_root),
        term_file=lf.TermFile(rig.term_file.path.with_name("term-dead")),
        committed=(image, 6),
    )
    driver.step()
    assert never.steps == 0
    (rec,) = driver.records
    assert (rec.status, rec.term, rec.old_pid) == (fo.Status.FINISHED, 2, 100)
    assert rec.restored_epoch == 6
    (restored,) = rig.backend.restored
    assert restored.name == "hb1-seq-t2"
    assert driver.machine.pid == restored.pid
    driver.close()
    assert dead.destroyed


def test_an_engine_error_propagates_while_the_nf_lives_and_is_a_death_once_it_died(
    rig: Rig,
) -> None:
    rig.engines[0].fail_with = OSError("data plane gone")
    with pytest.raises(OSError, match="data plane gone"):
        rig.driver.step()
    rig.nf.die()
    rig.driver.step()
    assert rig.driver.records[0].status is fo.Status.FINISHED


def test_the_term_file_is_durable_and_never_goes_down(tmp_path: Path) -> None:
    tf = lf.TermFile(tmp_path / "a" / "term")
    assert tf.read() is None
    tf.write(4)
    tf.write(4)
    assert tf.read() == 4
    with pytest.raises(lf.LocalFailoverError, match="never go down"):
        tf.write(3)
    assert sorted(p.name for p in tf.path.parent.iterdir()) == ["term"]


def test_a_stale_engine_or_lossless_mode_is_refused(rig: Rig) -> None:
    rig.term_file.write(5)
    kwargs: dict[str, Any] = {
        "dataplane": rig.dp,
        "backend": rig.backend,
        "nf": rig.nf,
        "engine": rig.engines[0],
        "protect": lambda *a: None,
        "term_file": rig.term_file,
    }
    with pytest.raises(lf.LocalFailoverError, match="records term 5"):
        lf.LocalFailover(UNIT, **kwargs)
    kwargs["term_file"] = lf.TermFile(rig.term_file.path.with_name("t2"))
    with pytest.raises(lf.LocalFailoverError, match="lossless"):
        lf.LocalFailover(UNIT, config=fo.FailoverConfig(lossless=True), **kwargs)
