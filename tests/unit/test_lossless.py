"""Lossless mode (DESIGN.md I7) for remote failover, its pure parts: the mirror tag, the failover
machine's replay step and what it does when the replay fails, the remote driver carrying it out,
the standby's input logs (against a fake data plane), the Receiver's hooks (against a real
Store), the spec field, and the bench's split of lost inputs. No root, no network."""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Any

import attrs
import pytest

from dpdk_vhost.client import DataPlaneError
from dpdk_vhost.protocol import InputLogStats
from hamgr.agent.lossless import InputLogs, mirror_tag, replay_loss
from hamgr.agent.remote import attach_unit
from hamgr.agent.unitnet import UnitNames
from hamgr.bench.failover import classify_lost
from hamgr.fabric import sequencer_spec
from hamgr.trafgen import Record
from hamgr.unitspec import SpecError, loads
from policies.detection import DetectionPolicy
from shim import failover as fo
from shim.replication import Ack, Begin, Hello, Message, Receiver, Status
from shim.store import Checkpoint, Store
from tests.unit.playbook import Playbook
from tests.unit.test_failover import (
    CUT,
    DETECT,
    HOSTS,
    NEW,
    NEW_PID,
    PEER,
    STANDBY,
    TERM,
    T,
    located,
    reports,
)
from tests.unit.test_remote_failover import Clock, FakeSteps
from tests.unit.test_replication import _transfer, write_checkpoint

UNIT = "seq0"

# --- the mirror tag ---------------------------------------------------------------------------


def test_the_mirror_tag_is_the_crc32_of_unit_and_term() -> None:
    assert mirror_tag("seq0", 1) == zlib.crc32(b"seq0/1")
    assert mirror_tag("seq0", 1) == mirror_tag("seq0", 1)  # both sides compute it alike
    tags = {mirror_tag(u, t) for u in ("seq0", "seq1", "fw") for t in (1, 2, 3)}
    assert len(tags) == 9  # a new term, or another unit, never feeds the same log
    assert all(0 <= t < 1 << 32 for t in tags)  # the data plane's tags are u32


def test_a_term_below_one_has_no_tag() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        mirror_tag("seq0", 0)


# --- the machine: ReplayInputs, and a replay that fails -------------------------------------


def remote(replay_failure: fo.ReplayFailure) -> fo.FailoverMachine:
    config = fo.FailoverConfig(
        detection=DETECT, lossless=True, replay_failure=replay_failure, standby_mem_bytes=1 << 29
    )
    return fo.FailoverMachine(UNIT, TERM, config, peer=PEER)


def to_replay(m: fo.FailoverMachine) -> Playbook:
    pb = Playbook(m) >> fo.FailoverRequested("host A lost power", planned=False, term=TERM)
    pb << fo.Report << fo.RaiseTerm(NEW, T.raise_term_us)
    pb >> fo.TermRecorded(NEW) << fo.FenceDataPlane >> fo.DataPlaneFenced(NEW, 0, 1)
    pb << fo.LocateImage >> located() << fo.Restore >> fo.Restored(NEW, NEW_PID)
    pb << fo.AttachPorts >> fo.PortsAttached(NEW) << fo.Announce >> fo.Announced(NEW)
    return pb << fo.ReplayInputs(NEW, T.replay_us, after_seq=CUT)


def finish(pb: Playbook, event: fo.Event) -> Playbook:
    return (
        pb
        >> event
        << fo.SurveyHosts
        >> fo.HostsSurveyed(NEW, HOSTS)
        << fo.Reprotect(NEW, T.reprotect_us, standby=STANDBY)
        >> fo.Reprotected(NEW, STANDBY)
        << fo.Report
    )


def test_a_remote_lossless_failover_replays_after_the_images_cut_then_resumes() -> None:
    m = remote(fo.ReplayFailure.RESUME)
    pb = to_replay(m) >> fo.InputsReplayed(NEW, 40) << fo.Resume(NEW, T.resume_us)
    assert finish(pb, fo.Resumed(NEW))
    done = reports(pb)[-1]
    assert done.status is fo.Status.FINISHED
    assert "inputs lost" not in done.detail
    assert not [c for c in pb.commands if isinstance(c, fo.Alarm)]


@pytest.mark.parametrize("how", ["failed", "driver", "tick"])
def test_a_failed_replay_resumes_without_the_lost_inputs_and_says_so(how: str) -> None:
    m = remote(fo.ReplayFailure.RESUME)
    pb = to_replay(m)
    assert pb
    why = "log_incomplete: seq 60 is missing; lost: inputs 56..80"
    if how == "failed":
        pb >> fo.StepFailed(fo.Step.REPLAY, NEW, why)
    elif how == "driver":
        pb >> fo.StepTimedOut(fo.Step.REPLAY, NEW)
    else:
        deadline = m.next_wakeup_us
        assert deadline is not None
        pb >> fo.Tick(deadline)
    # No cleanup: the restored copy is consistent (a prefix of its inputs, nothing released).
    pb << fo.Alarm << fo.Resume(NEW, T.resume_us)
    assert pb
    alarm = next(c for c in pb.commands if isinstance(c, fo.Alarm))
    assert f"after seq {CUT}" in alarm.reason
    assert "resumes without them" in alarm.reason
    if how == "failed":
        assert why in alarm.reason
    # A late completion of the replay that was given up changes nothing.
    assert Playbook(m) >> fo.InputsReplayed(NEW, 3) << fo.Ignored
    assert finish(pb, fo.Resumed(NEW))
    assert m.state is fo.State.WATCHING
    assert (m.term, m.pid) == (NEW, NEW_PID)
    done = reports(pb)[-1]
    assert done.status is fo.Status.FINISHED
    assert "inputs lost: the lossless replay failed" in done.detail


def test_with_replay_failure_fail_a_failed_replay_takes_the_unit_down() -> None:
    m = remote(fo.ReplayFailure.FAIL)
    pb = to_replay(m) >> fo.StepFailed(fo.Step.REPLAY, NEW, "log_incomplete")
    pb << fo.DetachPorts << fo.DestroyRestored(NEW, NEW_PID, T.cleanup_us) << fo.DiscardOutput
    assert pb << fo.Alarm << fo.Report
    assert m.state is fo.State.FAILED


def test_the_default_is_to_fail() -> None:
    # The local driver refuses lossless mode; the remote agent asks for RESUME explicitly.
    assert fo.FailoverConfig().replay_failure is fo.ReplayFailure.FAIL


def test_a_resume_that_fails_after_a_given_up_replay_still_cleans_up() -> None:
    m = remote(fo.ReplayFailure.RESUME)
    pb = to_replay(m) >> fo.StepFailed(fo.Step.REPLAY, NEW, "gap") << fo.Alarm << fo.Resume
    pb >> fo.StepFailed(fo.Step.RESUME, NEW, "data plane gone")
    pb << fo.DetachPorts << fo.DestroyRestored << fo.DiscardOutput << fo.Alarm << fo.Report
    assert pb
    assert m.state is fo.State.FAILED


# --- the remote driver ----------------------------------------------------------------------


class LosslessSteps(FakeSteps):
    def __init__(self, *, replay_error: str = "") -> None:
        super().__init__()
        self.replay_error = replay_error

    def replay(self, term: int, after_seq: int) -> int:
        self._call(f"replay:{after_seq}")
        if self.replay_error:
            raise RuntimeError(self.replay_error)
        return 9


def driver(steps: FakeSteps, clock: Clock) -> Any:
    from shim.remote_failover import RemoteFailover

    config = fo.FailoverConfig(
        detection=DetectionPolicy(confirm_window_us=30_000, hold_down_us=5_000),
        lossless=True,
        replay_failure=fo.ReplayFailure.RESUME,
    )
    machine = fo.FailoverMachine(UNIT, 1, config, peer="hostA", now_us=clock.now)
    return RemoteFailover(machine, steps, clock=clock)


ORDER = ["confirm", "raise_term:2", "fence", "locate", "restore", "attach", "announce"]
AFTER = ["resume", "survey", "reprotect:hostC"]


def test_the_driver_replays_after_the_located_cut_between_announce_and_resume() -> None:
    steps, clock = LosslessSteps(), Clock()
    d = driver(steps, clock)
    clock.now += 10_000
    d.peer_down("hostA", clock.now - 10_000, clock.now - 7_000)
    # FakeSteps.locate answers cut_seq 123.
    assert steps.calls == [*ORDER, "replay:123", *AFTER]
    rec = d.records[-1]
    assert rec.status == "finished"
    assert (rec.cut_seq, rec.replayed, rec.replay_failed) == (123, 9, "")
    assert "replay" in rec.steps_us
    assert rec.to_json()["replayed"] == 9


def test_the_driver_resumes_a_unit_whose_replay_failed_with_an_alarm() -> None:
    steps, clock = LosslessSteps(replay_error="log_incomplete: lost: inputs 124..130"), Clock()
    d = driver(steps, clock)
    clock.now += 10_000
    d.peer_down("hostA", clock.now - 10_000, clock.now - 7_000)
    assert steps.calls == [*ORDER, "replay:123", *AFTER]
    rec = d.records[-1]
    assert rec.status == "finished"
    assert rec.replayed is None
    assert "lost: inputs 124..130" in rec.replay_failed
    assert "inputs lost" in rec.detail
    assert any("resumes without them" in a for a in d.alarms)


# --- what a failed replay lost --------------------------------------------------------------


def log_stats(**kw: int) -> InputLogStats:
    fields = {f.name: 0 for f in attrs.fields(InputLogStats)}
    fields.update(name=UNIT, port="fab", **kw)
    return InputLogStats(**fields)


def test_an_incomplete_log_loses_every_input_after_the_cut() -> None:
    err = DataPlaneError("log_incomplete", "log seq0 cannot replay after seq 55: seq 60 is missing")
    why = replay_loss(55, err, log_stats(first_seq=56, last_seq=80, frames=20, gaps=1, gap_seq=60))
    assert why.startswith("log_incomplete: log seq0 cannot replay after seq 55")
    assert "lost: inputs 56..80, 25 seqs" in why
    assert "gaps 1 from seq 60" in why


def test_a_replay_cut_short_loses_only_what_it_did_not_deliver() -> None:
    err = DataPlaneError(
        "tx_timeout", "NF port took 5 of 25 frames (up to seq 60), ...; replay again with after=60"
    )
    assert "lost: inputs 61..80, 20 seqs" in replay_loss(55, err, log_stats(last_seq=80))


def test_a_log_with_nothing_after_the_cut_or_no_log_at_all() -> None:
    err = DataPlaneError("log_incomplete", "seq 56 is missing (trimmed)")
    assert "the log holds none after it" in replay_loss(55, err, log_stats(last_seq=50))
    assert "the log is gone" in replay_loss(55, DataPlaneError("no_such_log", "x"), None)


# --- the standby's input logs ---------------------------------------------------------------


@attrs.define
class FakeStats:
    input_logs: dict[str, Any]


class FakeDataPlane:
    """The input-log commands of a data plane, recorded."""

    def __init__(self) -> None:
        self.logs: dict[str, tuple[str, int]] = {}
        self.calls: list[tuple[Any, ...]] = []

    def __call__(self) -> FakeDataPlane:
        return self

    def __enter__(self) -> FakeDataPlane:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def stats(self) -> FakeStats:
        return FakeStats(dict(self.logs))

    def add_input_log(self, name: str, port: str, tag: int, shadow_mac: str | None) -> None:
        assert name not in self.logs
        self.calls.append(("add", name, port, tag, shadow_mac))
        self.logs[name] = (port, tag)

    def remove_input_log(self, name: str) -> int:
        self.calls.append(("remove", name))
        del self.logs[name]
        return 7

    def trim_input_log(self, name: str, upto: int) -> int:
        self.calls.append(("trim", name, upto))
        return 3


def checkpoint(term: int, **meta: int) -> Checkpoint:
    return Checkpoint(epoch=5, term=term, path=Path("/nonexistent"), manifest=None, meta=meta)  # type: ignore[arg-type]


def test_a_standby_keeps_one_log_per_unit_for_the_term_it_recorded_last() -> None:
    dp = FakeDataPlane()
    logs = InputLogs(dp, "fab")  # type: ignore[arg-type]
    assert logs.ensure(UNIT, 1)
    assert not logs.ensure(UNIT, 1)  # idempotent: the same term keeps its log and entries
    assert dp.calls == [("add", UNIT, "fab", mirror_tag(UNIT, 1), None)]
    # A new primary's term: the old term's log goes, one for the new tag comes.
    assert logs.ensure(UNIT, 2)
    assert dp.calls[1:] == [("remove", UNIT), ("add", UNIT, "fab", mirror_tag(UNIT, 2), None)]
    assert logs.term(UNIT) == 2


def test_a_unit_with_a_shadow_mac_gets_a_shadow_log_with_each_new_log() -> None:
    dp = FakeDataPlane()
    logs = InputLogs(dp, "fab")  # type: ignore[arg-type]
    logs.shadow(UNIT, "02:00:c6:12:00:02")
    logs.ensure(UNIT, 1)
    logs.ensure(UNIT, 2)
    adds = [c for c in dp.calls if c[0] == "add"]
    assert adds == [
        ("add", UNIT, "fab", mirror_tag(UNIT, 1), "02:00:c6:12:00:02"),
        ("add", UNIT, "fab", mirror_tag(UNIT, 2), "02:00:c6:12:00:02"),
    ]
    logs.ensure("other", 1)
    assert dp.calls[-1] == ("add", "other", "fab", mirror_tag("other", 1), None)


def test_a_commit_trims_the_log_to_its_cut_and_only_for_the_logs_term() -> None:
    dp = FakeDataPlane()
    logs = InputLogs(dp, "fab")  # type: ignore[arg-type]
    assert logs.trim(UNIT, checkpoint(1, cut_seq=40)) is None  # no log yet
    logs.ensure(UNIT, 2)
    assert logs.trim(UNIT, checkpoint(1, cut_seq=40)) is None  # the older term's image
    assert logs.trim(UNIT, checkpoint(2)) is None  # no cut shipped with it: nothing known
    assert logs.trim(UNIT, checkpoint(2, cut_seq=41)) == 3
    assert dp.calls[-1] == ("trim", UNIT, 41)
    assert [c for c in dp.calls if c[0] == "trim"] == [("trim", UNIT, 41)]


def test_after_a_takeover_the_log_is_removed_once() -> None:
    dp = FakeDataPlane()
    logs = InputLogs(dp, "fab")  # type: ignore[arg-type]
    logs.ensure(UNIT, 1)
    assert logs.remove(UNIT) == 7
    assert logs.remove(UNIT) == 0  # already gone: nothing to do
    assert logs.term(UNIT) is None
    assert logs.trim(UNIT, checkpoint(1, cut_seq=9)) is None


# --- the new primary's unit is born paused ------------------------------------------------


def test_a_unit_attached_for_a_replay_is_added_paused() -> None:
    """Paused from its first packet: ``add_unit`` then ``pause_ingress`` would let inputs reach
    the restored NF before the replay's older ones."""
    calls: list[tuple[str, dict[str, Any]]] = []

    class Dp:
        def stats(self) -> Any:
            return attrs.make_class("S", ["ports"])({})

        def add_af_packet_port(self, name: str, iface: str) -> int:
            calls.append(("add_port", {"name": name}))
            return 1

        def add_unit(self, unit: str, **kw: Any) -> None:
            calls.append(("add_unit", kw))

        def pause_ingress(self, unit: str, term: int | None = None) -> None:
            calls.append(("pause_ingress", {}))

    spec = loads(sequencer_spec(lossless=True))
    attach_unit(Dp(), spec, UnitNames("hostB", UNIT), term=2, paused=True, mode="plain")  # type: ignore[arg-type]
    assert [c for c, _ in calls] == ["add_port", "add_unit"]
    assert calls[1][1]["paused"] is True
    calls.clear()
    attach_unit(Dp(), spec, UnitNames("hostA", UNIT), term=1, paused=False)  # type: ignore[arg-type]
    assert calls[1][1]["paused"] is None


# --- the Receiver's hooks -------------------------------------------------------------------


@pytest.fixture
def hooked(tmp_path: Path) -> tuple[Receiver, list[tuple[str, Any]]]:
    seen: list[tuple[str, Any]] = []
    r = Receiver(
        {"fw0": Store(tmp_path / "fw0", fsync=False)},
        on_term=lambda unit, term: seen.append(("term", (unit, term))),
        on_commit=lambda unit, cp: seen.append(("commit", (unit, cp.term, cp.epoch, cp.meta))),
    )
    return r, seen


def with_cut(msgs: list[Message], cut: int) -> list[Message]:
    first = msgs[0]
    assert isinstance(first, Begin)
    return [attrs.evolve(first, meta={"cut_seq": cut}), *msgs[1:]]


def test_the_receiver_tells_of_a_new_term_before_its_reply_and_of_a_commit_after_its_ack(
    tmp_path: Path, hooked: tuple[Receiver, list[tuple[str, Any]]]
) -> None:
    r, seen = hooked
    src = write_checkpoint(tmp_path / "src", os.urandom(1 << 16), {"core-1.img": b"core"})
    assert isinstance(r.handle(Hello(unit="fw0", epoch=0, term=1, seq=1))[0], Status)
    assert seen == [("term", ("fw0", 1))]
    assert isinstance(r.handle(Hello(unit="fw0", epoch=0, term=1, seq=2))[0], Status)
    assert seen == [("term", ("fw0", 1))]  # the same term again: no news
    replies: list[Message] = []
    for msg in with_cut(_transfer(src, 1, 1), 42):
        replies += r.handle(msg)
    assert isinstance(replies[-1], Ack)
    assert len(seen) == 1  # the ack first ...
    r.collect()
    assert seen[-1] == ("commit", ("fw0", 1, 1, {"cut_seq": 42}))  # ... then the commit
    r.collect()
    assert len(seen) == 2  # told once per commit


def test_a_promotion_is_not_told_and_a_hook_that_fails_costs_no_nack(tmp_path: Path) -> None:
    calls: list[str] = []

    def broken(unit: str, term: int) -> None:
        calls.append(f"{unit}/{term}")
        raise RuntimeError("data plane gone")

    r = Receiver({"fw0": Store(tmp_path / "fw0", fsync=False)}, on_term=broken)
    assert isinstance(r.handle(Hello(unit="fw0", epoch=0, term=1, seq=1))[0], Status)
    assert r.machine("fw0").term == 1
    r.promote("fw0", 2)
    assert calls == ["fw0/1"]


# --- the spec ------------------------------------------------------------------------------


def test_the_fabrics_spec_says_lossless_when_asked() -> None:
    assert loads(sequencer_spec(lossless=True)).protection.lossless is True
    assert loads(sequencer_spec()).protection.lossless is False


def test_a_lossless_that_is_not_a_boolean_is_reported_with_its_line() -> None:
    text = sequencer_spec().replace("lossless = false", 'lossless = "yes"')
    line = text.splitlines().index('lossless = "yes"') + 1
    with pytest.raises(SpecError) as err:
        loads(text, source="u.toml")
    assert str(err.value) == f'u.toml:{line}: protection.lossless: must be true or false, got "yes"'


# --- the bench: lost inputs by send time ---------------------------------------------------

MS = 1_000_000


def rec(seq: int, sent_ms: float) -> Record:
    return Record(seq, seq, int(sent_ms * MS), int(sent_ms * MS) + MS)


def test_lost_inputs_are_split_by_their_interpolated_send_time() -> None:
    # Paced at 2 ms: 1..10 arrive; 11..20 are lost; 21..30 arrive. The kill at 31 ms and the
    # attach at 37 ms fall inside the lost stretch.
    records = [rec(s, 2 * s) for s in range(1, 11)] + [rec(s, 2 * s) for s in range(21, 31)]
    loss = classify_lost(records, sent=30, kill_ns=31 * MS, attached_ns=37 * MS, interval_ns=2 * MS)
    # 11..15 were sent at 22..30 ms, 16..18 at 32..36 ms, 19..20 at 38..40 ms.
    assert (loss.before_kill, loss.in_outage, loss.after_attach) == (5, 3, 2)


def test_lost_inputs_at_either_end_are_extrapolated_at_the_senders_pace() -> None:
    records = [rec(s, 2 * s) for s in range(3, 8)]
    loss = classify_lost(records, sent=10, kill_ns=100 * MS, attached_ns=None, interval_ns=2 * MS)
    assert loss == type(loss)(before_kill=5, in_outage=0, after_attach=0)
    # Never attached: everything after the kill counts as the outage.
    loss = classify_lost(records, sent=10, kill_ns=15 * MS, attached_ns=None, interval_ns=2 * MS)
    assert (loss.before_kill, loss.in_outage, loss.after_attach) == (2, 3, 0)
