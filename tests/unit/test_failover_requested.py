"""Operator failovers in the local driver (shim/local_failover.py) against fakes: the planned
switchover's quiesce (and its abort), the unplanned `--now`, refusals and the owner's hooks.

The fakes record every call in one list, so the order of the quiesce (settle, pause, let the NF
read, freeze, close, dump, ship, release, kill) and of what follows is asserted exactly. The
integration tests (tests/integration/test_agent_failover.py) run the same on the real stack.
"""

from __future__ import annotations

import os
import select
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import attrs
import pytest

from shim import failover as fo
from shim import local_failover as lf
from shim.oci import ContainerSpec
from tests.unit.test_failover_local import NETNS, UNIT, write_image

Calls = list[tuple[Any, ...]]


@attrs.define
class Nf:
    name: str
    pid: int
    calls: Calls
    image_root: Path
    spec: ContainerSpec = attrs.field(
        factory=lambda: ContainerSpec(name="x", image=Path("/none"), args=("nf",), netns=NETNS)
    )
    pidfd: int = -1
    _w: int = -1
    rx_pending: int = 0
    checkpoint_error: Exception | None = None

    def __attrs_post_init__(self) -> None:
        self.pidfd, self._w = os.pipe()

    def exited(self, timeout: float = 0.0) -> bool:
        return bool(select.select([self.pidfd], [], [], timeout)[0])

    def die(self) -> None:
        os.write(self._w, b"x")

    def wait_rx_drained(self, timeout: float = 0.02) -> Any:
        self.calls.append(("rx_drained", self.pid))
        return attrs.make_class("R", ["drained", "pending_bytes"])(
            self.rx_pending == 0, self.rx_pending
        )

    def freeze(self) -> None:
        self.calls.append(("freeze", self.pid))

    def thaw(self) -> None:
        self.calls.append(("thaw", self.pid))

    def checkpoint(self, epoch: int, dest: Path) -> None:
        self.calls.append(("checkpoint", self.pid, epoch))
        if self.checkpoint_error is not None:
            raise self.checkpoint_error
        write_image(dest.parent, epoch)

    def kill(self) -> None:
        self.calls.append(("kill", self.pid))
        self.die()

    def destroy(self) -> None:
        self.calls.append(("destroy", self.pid))

    def prepare_checkpoint(self, *, wait: bool = True) -> None:
        self.calls.append(("prepare", self.pid, wait))

    def close(self) -> None:
        for fd in (self.pidfd, self._w):
            os.close(fd)


@attrs.frozen
class _Unit:
    epoch: int
    nf_rx: int
    nf: str = "dn"


@attrs.define
class Dp:
    calls: Calls
    term: int = 1
    epoch: int = 9
    nf_rx: int = 300

    def set_term(self, unit: str, term: int, epoch: int | None = None) -> int:
        self.calls.append(("set_term", term))
        self.term = term
        return 0

    def pause_ingress(self, unit: str, term: int | None = None) -> Any:
        self.calls.append(("pause_ingress", term))
        return attrs.make_class("Cut", ["cut"])(1234)

    def resume_ingress(self, unit: str, term: int | None = None) -> None:
        self.calls.append(("resume_ingress", term))

    def close_epoch(self, unit: str, epoch: int, term: int | None = None) -> None:
        self.calls.append(("close_epoch", epoch, term))
        self.epoch = epoch + 1
        self.nf_rx += 5  # what the close drained from the NF port

    def discard(self, unit: str, from_epoch: int, term: int | None = None) -> int:
        self.calls.append(("discard", from_epoch, term))
        return 0

    def release(self, unit: str, epoch: int, term: int) -> int:
        self.calls.append(("release", epoch, term))
        return 1

    def stats(self, unit: str | None = None) -> Any:
        return attrs.make_class("S", ["units"])({UNIT: _Unit(self.epoch, self.nf_rx)})


@attrs.define
class Shipper:
    calls: Calls
    error: Exception | None = None

    def ship_nowait(self, unit: str, epoch: int, term: int, source: Path, **kw: Any) -> Future[Any]:
        self.calls.append(("ship", epoch, term, kw["meta"]["cut_seq"]))
        f: Future[Any] = Future()
        if self.error is not None:
            f.set_exception(self.error)
        else:
            f.set_result(object())
        return f


@attrs.define
class Engine:
    term: int
    image_root: Path
    calls: Calls
    shipper: Shipper
    last_committed: int | None = None
    settles: bool = True
    drain_error: Exception | None = None
    first_epoch: int = 0
    nf_rx_base: int = 0
    holding: bool = False  # new cuts held (HoldCuts)

    @property
    def machine(self) -> Any:
        return attrs.make_class("M", {"term": attrs.field(default=self.term)})()

    def image_dir(self, epoch: int) -> Path:
        return self.image_root / f"epoch-{epoch:08d}"

    def step(self) -> None:
        self.calls.append(("step", self.term))

    def hold_cuts(self, hold: bool) -> None:
        self.holding = hold

    def drain(self, timeout: float, *, hold_cuts: bool = False) -> bool:
        self.calls.append(("drain",))
        self.holding = self.holding or hold_cuts
        if self.drain_error is not None:
            raise self.drain_error
        return self.settles


@attrs.define
class Backend:
    calls: Calls
    image_root: Path
    restored: list[Nf] = attrs.Factory(list)

    def restore(self, image: Path, netns: str, *, name: str | None = None) -> Nf:
        self.calls.append(("restore", image.name, name))
        nf = Nf(str(name), 1000 + len(self.restored), self.calls, self.image_root)
        self.restored.append(nf)
        return nf


@attrs.define
class Rig:
    driver: lf.LocalFailover
    calls: Calls
    dp: Dp
    nf: Nf
    backend: Backend
    engines: list[Engine]
    terms: lf.TermFile
    hooks: Calls


@pytest.fixture
def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    monkeypatch.setattr(lf, "nf_interfaces", lambda pid: {"lo", "eth0"})
    calls: Calls = []
    hooks: Calls = []
    monkeypatch.setattr(lf.netns, "destroy_tcp_sockets", lambda ns: calls.append(("rst", ns)))
    root = tmp_path / "images"
    write_image(root, 6)
    nf = Nf("h-seq0", 100, calls, root)
    first = Engine(1, root, calls, Shipper(calls), last_committed=6)
    engines = [first]

    def protect(term: int, first_epoch: int, nf: Any, nf_rx_base: int) -> Any:
        calls.append(("protect", term, first_epoch, nf.pid, nf_rx_base))
        e = Engine(term, root, calls, Shipper(calls), first_epoch=first_epoch)
        e.nf_rx_base = nf_rx_base
        engines.append(e)
        return e

    terms = lf.TermFile(tmp_path / "term")
    backend = Backend(calls, root)
    driver = lf.LocalFailover(
        UNIT,
        dataplane=Dp(calls),
        backend=backend,  # type: ignore[arg-type]
        nf=nf,  # type: ignore[arg-type]
        engine=first,  # type: ignore[arg-type]
        protect=protect,  # type: ignore[arg-type]
        term_file=terms,
        hooks=lf.FailoverHooks(
            report=lambda r, rec: hooks.append(("report", r.status, r.term, rec is not None)),
            restored=lambda t, c: hooks.append(("restored", t, c.pid, calls[-1][0])),
            destroyed=lambda c: hooks.append(("destroyed", c.pid)),
            protected=lambda t, c, e: hooks.append(("protected", t, c.pid)),
        ),
    )
    dp = driver.dp
    assert isinstance(dp, Dp)
    yield Rig(driver, calls, dp, nf, backend, engines, terms, hooks)
    nf.close()
    for r in backend.restored:
        r.close()


def test_a_planned_switchover_commits_a_last_cut_then_restores_exactly_that(rig: Rig) -> None:
    rec = rig.driver.request("maintenance", planned=True)
    assert isinstance(rec, lf.FailoverRecord)
    # The engine settled with new cuts held, so nothing of its own raced the last cut.
    assert rig.engines[0].holding
    rig.driver.close()
    reaped = ("destroy", 100)  # on a reaper thread, after the resume
    assert reaped in rig.calls
    assert [c for c in rig.calls if c != reaped] == [
        # Quiesce, at the old term: settle the engine, then the last cut, kept frozen.
        ("drain",),
        ("pause_ingress", 1),
        ("rx_drained", 100),
        ("freeze", 100),
        ("close_epoch", 9, 1),
        ("checkpoint", 100, 9),
        ("ship", 9, 1, 1234),
        ("release", 9, 1),
        ("kill", 100),
        # Then the failover proper, at term 2; the NF is already dead, so no second kill.
        ("set_term", 2),
        ("pause_ingress", 2),
        ("rst", NETNS),
        ("close_epoch", 10, 2),
        ("discard", 10, 2),
        ("restore", "epoch-00000009", "h-seq0-t2"),
        ("prepare", 1000, False),  # the first dump's CRIU worker, started without waiting
        ("resume_ingress", 2),
        ("protect", 2, 10, 1000, 310),
    ]
    assert rig.terms.read() == 2
    assert (rec.status, rec.planned, rec.term, rec.old_term) == (fo.Status.FINISHED, True, 2, 1)
    assert (rec.quiesced_epoch, rec.restored_epoch) == (9, 9)
    assert (rec.old_pid, rec.new_pid) == (100, 1000)
    assert list(rec.steps_us)[:2] == ["quiesce", "raise-term"]
    assert rec.to_json()["steps_ms"]["quiesce"] is not None
    assert (rig.driver.machine.term, rig.driver.machine.pid) == (2, 1000)
    # The owner saw: the attempt start, the restored copy before ingress resumed, the new
    # engine, the end; and the old container once reaped.
    assert ("destroyed", 100) in rig.hooks
    assert [h for h in rig.hooks if h != ("destroyed", 100)] == [
        ("report", fo.Status.RUNNING, 2, True),
        ("restored", 2, 1000, "prepare"),
        ("protected", 2, 1000),
        ("report", fo.Status.FINISHED, 2, True),
    ]


@pytest.mark.parametrize("where", ["settle", "rx", "checkpoint", "ship"])
def test_a_failed_quiesce_aborts_and_the_copy_runs_on_at_its_term(rig: Rig, where: str) -> None:
    if where == "settle":
        rig.engines[0].settles = False
    elif where == "rx":
        rig.nf.rx_pending = 512
    elif where == "checkpoint":
        rig.nf.checkpoint_error = RuntimeError("criu: dump failed")
    else:
        rig.engines[0].shipper.error = TimeoutError("no ack")
    rec = rig.driver.request("upgrade", planned=True)
    assert isinstance(rec, lf.FailoverRecord)
    assert rec.status is fo.Status.ABORTED
    assert "quiesce" in rec.detail
    assert rig.driver.machine.state is fo.State.WATCHING
    assert (rig.driver.machine.term, rig.driver.machine.pid) == (1, 100)
    assert rig.terms.read() == 1
    assert rig.dp.term == 1
    assert not rig.nf.exited()
    assert not [c for c in rig.calls if c[0] in ("kill", "set_term", "release", "restore")]
    assert ("resume_ingress", 1) in rig.calls
    assert any("switchover aborted" in a for a in rig.driver.alarms)
    closed = where in ("checkpoint", "ship")
    assert (("thaw", 100) in rig.calls) == (where not in {"settle", "rx"})
    if closed:
        # Epoch 9 was closed behind the engine's back: a fresh engine at term 1 takes over from
        # epoch 10, counting output from the close on; its first release lets 9 out too.
        assert rig.calls[-1] == ("protect", 1, 10, 100, 305)
        assert rig.driver.engine is rig.engines[1]  # type: ignore[comparison-overlap]
        assert ("protected", 1, 100) in rig.hooks
    else:
        assert rig.driver.engine is rig.engines[0]  # type: ignore[comparison-overlap]
        assert not [c for c in rig.calls if c[0] == "protect"]
        # It settled with new cuts held; running on, it cuts again.
        assert rig.engines[0].holding is False
    # The engine that protects the copy is stepped again.
    rig.driver.step()
    assert rig.calls[-1] == ("step", 1)
    assert rig.hooks[-1] == ("report", fo.Status.ABORTED, 2, True)


def test_an_engine_that_fails_while_settling_is_handed_to_the_owner_after_the_abort(
    rig: Rig,
) -> None:
    rig.engines[0].drain_error = OSError("data plane timed out")
    rec = rig.driver.request("upgrade", planned=True)
    assert isinstance(rec, lf.FailoverRecord)
    assert rec.status is fo.Status.ABORTED
    assert ("resume_ingress", 1) in rig.calls
    # The engine may be stuck mid-cut: the next step raises, once, and the owner rebuilds it.
    with pytest.raises(lf.LocalFailoverError, match="data plane timed out"):
        rig.driver.step()
    fresh = Engine(1, rig.engines[0].image_root, rig.calls, Shipper(rig.calls))
    rig.driver.replace_engine(fresh)  # type: ignore[arg-type]
    rig.driver.step()
    assert rig.calls[-1] == ("step", 1)
    assert rig.driver.engine is fresh  # type: ignore[comparison-overlap]


def test_a_quiesce_whose_nf_died_meanwhile_aborts_and_the_death_is_restored(rig: Rig) -> None:
    rig.nf.die()
    rec = rig.driver.request("upgrade", planned=True)
    assert isinstance(rec, lf.FailoverRecord)
    assert rec.status is fo.Status.ABORTED
    assert "already exited" in rec.detail
    assert ("resume_ingress", 1) not in rig.calls  # nothing left to feed
    rig.driver.step()
    assert [r.status for r in rig.driver.records] == [fo.Status.ABORTED, fo.Status.FINISHED]
    # The aborted attempt spent term 2; the restore runs at term 3.
    assert (rig.driver.machine.term, rig.driver.records[1].term) == (3, 3)
    assert ("restore", "epoch-00000006", "h-seq0-t3") in rig.calls


def test_an_unplanned_request_stops_the_copy_once_the_term_is_durable(rig: Rig) -> None:
    rec = rig.driver.request("operator: now", planned=False)
    assert isinstance(rec, lf.FailoverRecord)
    assert rec.status is fo.Status.FINISHED
    assert not rec.planned
    # No last cut: the copy is killed at the fence and the last commit (epoch 6) restored.
    assert rig.calls[:4] == [("kill", 100), ("set_term", 2), ("pause_ingress", 2), ("rst", NETNS)]
    assert ("restore", "epoch-00000006", "h-seq0-t2") in rig.calls
    assert not [c for c in rig.calls if c[0] in ("drain", "checkpoint", "ship", "release")]
    assert next(iter(rec.steps_us)) == "raise-term"


def test_a_stale_or_repeated_request_is_ignored_and_says_why(rig: Rig) -> None:
    first = rig.driver.request("once", planned=False, term=1)
    assert isinstance(first, lf.FailoverRecord)
    again = rig.driver.request("once", planned=False, term=1)
    assert again == "stale term 1: the unit already runs at term 2"
    ahead = rig.driver.request("typo", planned=True, term=9)
    assert isinstance(ahead, str)
    assert "ahead" in ahead
    assert len(rig.driver.records) == 1
    assert rig.driver.machine.term == 2


def test_a_restored_copy_that_cannot_be_recorded_is_destroyed(rig: Rig) -> None:
    def refuse(term: int, c: Any) -> None:
        raise OSError("database is locked")

    rig.driver.hooks.restored = refuse
    rec = rig.driver.request("now", planned=False)
    assert isinstance(rec, lf.FailoverRecord)
    assert rec.status is fo.Status.ERROR
    assert "database is locked" in rec.detail
    assert rig.driver.machine.state is fo.State.FAILED
    (restored,) = rig.backend.restored
    assert ("destroy", restored.pid) in rig.calls
    assert ("destroyed", restored.pid) in rig.hooks
    assert ("resume_ingress", 2) not in rig.calls
