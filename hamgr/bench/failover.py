"""`hamgr bench failover`: fail the protected sequencer over under a steady UDP stream and one TCP
connection; measure the takeover at the sink.

Every run builds a fresh testbed, protects the sequencer (started with its TCP listener, see
hamgr/nfs/src/sequencer.c), sends a steady numbered UDP stream through it (`hamgr.trafgen send`
to `hamgr.trafgen sink`) and keeps one TCP connection to it (`hamgr.trafgen tcp`: a numbered
request every 20 ms, each answer checked), then breaks it at a random moment:

- ``--scope remote``: the three-host testbed (`hamgr.fabric`; A primary, B standby, C spare, each
  with its own agent and data plane). Everything of host A is SIGKILLed at once and its links go
  down; B takes the unit over and re-protects it onto C.
- ``--scope local``: the one-host bed of tests/integration/test_local_failover.py
  (`hamgr.testbed.UnitBed`: client, data-plane and NF namespaces, a local standby store), driven
  by `shim.local_failover.LocalFailover` in this process. The NF's process (the container's init,
  the sequencer itself) is SIGKILLed; the host, its data plane and the NF's netns stay up, and the
  unit is restored from the local copy of its last committed checkpoint.

In both, the client reaches the NF only through the data plane: client -> data plane (wire) ->
NF's netns -> data plane (held per epoch, released on commit) -> client. The NF's netns has no
other link. All addresses are in 198.18.0.0/15.

Measured per run (all times CLOCK_MONOTONIC, which every namespace shares):
- ``failover_ms``: at the UDP sink, from the last packet the old primary released to the first
  one the new primary released: the two arrivals around the moment ingress resumed to the
  restored NF. Local: the fence dropped everything of the dead NF that was not released by then,
  so every later arrival is the new incarnation's, and every earlier one was released by the old.
  Remote: the start of B's resume step. Output is released at the standby, so B can still send
  the old primary's output after the kill (an epoch whose transfer was on its way, committed
  before B's promotion); the new primary's unit is born paused, in both directions, so none of
  its output leaves before the resume. (The split used to be the kill, and such a late release
  then counted as B's first output: runs of 73 and 83 ms.)
- ``silence_ms``: the longest the sink heard nothing, among the silences that ended after the
  kill and no later than the new primary's first output (`silence_ms`). Remote runs differ from
  ``failover_ms`` when A's last committed epoch was released at B's promotion (committed, its
  release not yet confirmed when A died): ``failover_ms`` then spans only the few ms from that
  release to B's first output. The summary gives its p50 and max beside the issue's fields.
- ``detect_ms``: remote, B's data plane, from the last probe it got from A to its ``peer_down``
  (the agent's confirmation window follows and is not included). Local, from the
  ``kill()`` call to the driver beginning the failover (``FailoverRecord.exited_us``, taken when
  the driver acts on the pidfd: the wait for the process to exit, the pidfd's poll, and the engine
  step the driver may be in at that moment).
- ``restore_ms``: the ``restore`` step (`RuncBackend.restore`, a ``runc restore`` of the committed
  image), from the failover record's step timings. Remote, where the outage went, from the kill:
  ``verdict_ms`` (B's failover machine decided: detection plus the confirmation window),
  ``copy_ready_ms`` (B's copy restored ahead was up, None if it restored none) and
  ``outage_ms`` (B attached the unit); ``copy_restore_ms`` is that copy's restore alone, and
  ``copies_dropped_before_kill`` counts the copies B restored ahead for a live A and dropped.
- ``duplicates``/``gaps``: in the NF's UDP counter as the sink saw it (`trafgen.check_sequence`);
  ``lost_packets``: UDP inputs sent but never reflected in any output; ``inputs_twice`` (not
  in the issue's line): inputs reflected with two different counters, an input the NF counted
  twice (`trafgen.inputs_twice`; a lossless replay that delivered one twice), which neither of
  the others shows.
- ``tcp_survived``: runs whose TCP connection kept working across the failover
  (`trafgen.tcp_survived`): connected before the failure, never reset or closed, every answer
  correct and from the same NF connection (the NF numbers its connections and counts the lines of
  each, so a rebuilt connection would show), every request answered, and requests sent after the
  new primary resumed among them.

With a remote standby, output is released at the standby (docs/failover.md), so a gap is a defect
in either scope; ``gap runs`` counts the runs that had one, and each run reports how many missing
counters fall outside the takeover (between the last output before and the first after it).

``--chain``: the NF is a chain of two sequencers in one netns (`hamgr.testbed.chain_args`,
`hamgr.fabric.sequencer_spec`: the first forwards to the second over loopback, and also serves
the TCP connection), protected as one unit (`shim.chain`). Locally each run kills one member,
in turn (run i kills member i modulo 2, ``killed_member``), and the whole chain fails over;
remotely host A dies and B restores every member. The sink records every member's counter:
``duplicates`` and ``gaps`` count the last member's, ``upstream_duplicates`` and
``upstream_gaps`` the first member's, and the summary's ``duplicates`` and ``gaps`` add them up
(``"chain": 2`` in the summary; 1 without the option).

``--lossless`` (remote only) protects the unit in lossless mode (DESIGN.md I7): A mirrors its
inputs to B, and B replays those after the restored image's cut. The summary line has the same
fields (plus ``"lossless": true``); each run adds ``replayed`` (inputs B's replay delivered, from
its failover record) and splits the lost inputs by when they were sent (`classify_lost`):
``lost_before_kill``; ``lost_in_outage``, sent after the kill and before B attached the unit to
its data plane (they reach no one); ``lost_after_attach``. Replay alone cannot bring
``lost_packets`` to 0: the outage's inputs were never delivered to anyone (docs/failover.md).
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import attrs
import click

from hamgr.fabric import NF_IP, NF_PORT, SINK_PORT, Fabric
from hamgr.testbed import UNIT, UnitBed, chain_args, sequencer_args, wait_udp_bound
from hamgr.trafgen import (
    Record,
    TcpSummary,
    check_sequence,
    inputs_twice,
    member_records,
    missing_outside_takeover,
    read_records,
    tcp_survived,
)
from policies.epoch import FixedEpoch
from shim import epoch as ep
from shim import failover as fo
from shim import netns
from shim.chain import Chain, ChainBackend
from shim.container import Container, remove_cgroup_parent
from shim.engine import PrimaryEngine
from shim.local_failover import FailoverRecord, LocalFailover, Restorer, TermFile
from shim.replication import ReplicationClient

TCP_PORT = 7001  # the sequencer's TCP listener (UDP stays on NF_PORT)
CHAIN_MEMBERS = 2  # --chain: two sequencers, the first forwarding to the second
# What a local failover protects: one container, or a chain of them.
Protected = Container | Chain
TCP_INTERVAL_MS = 20.0
TCP_DRAIN_S = 8.0  # the client's wait for answers after its last request
START_TIMEOUT_S = 15.0


def _info(msg: str) -> None:
    click.echo(msg, err=True)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def outage_ms(records: list[Record], kill_us: int) -> float | None:
    """Sink time from the last arrival before the kill to the first after it."""
    return sink_gap_ms(records, kill_us * 1000)


def sink_gap_ms(records: list[Record], split_ns: int) -> float | None:
    """Sink time from the last arrival at or before `split_ns` to the first after it."""
    before = [r.recv_ns for r in records if r.recv_ns <= split_ns]
    after = [r.recv_ns for r in records if r.recv_ns > split_ns]
    if not before or not after:
        return None
    return (min(after) - max(before)) / 1e6


def silence_ms(records: list[Record], kill_ns: int, split_ns: int) -> float | None:
    """The longest time the sink heard nothing, among the silences that ended after the kill and
    no later than the new primary's first output (the first arrival after `split_ns`).

    Usually `failover_ms` itself. It differs when the old primary's last committed epoch left
    late, at the standby's promotion (committed, but its release not yet confirmed when the
    primary died): `failover_ms` then spans only the few milliseconds from that release to the
    new primary's first output, while the sink had heard nothing for the whole outage before it.
    """
    times = sorted(r.recv_ns for r in records)
    later = [t for t in times if t > split_ns]
    if not later:
        return None
    end = later[0]
    gaps = [b - a for a, b in itertools.pairwise(times) if kill_ns < b <= end]
    return max(gaps) / 1e6 if gaps else None


def in_netns(ns: str, argv: list[str]) -> list[str]:
    """`argv` run in network namespace `ns` only (no new mount namespace; see ENVIRONMENT.md)."""
    return ["nsenter", f"--net={netns.netns_path(ns)}", "--", *argv]


def _wait_file(path: Path, proc: subprocess.Popen[bytes], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.01)


def start_udp(
    client_ns: str,
    sink_ns: str,
    work: Path,
    *,
    seconds: float,
    pps: int,
    stamps: int = 1,
    idle_exit: float = 2.0,
) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes], Path]:
    """A sink in `sink_ns` (ready once it is bound) and a bounded sender in `client_ns`;
    returns both and the sink's record file (behind a chain, the last member's counters;
    `trafgen.member_records` has the others'). The sink stops once nothing arrived for
    `idle_exit` seconds after the first datagram."""
    out, ready = work / "sink.rec", work / "sink.ready"
    py = sys.executable
    sink = subprocess.Popen(
        in_netns(
            sink_ns,
            [py, "-m", "hamgr.trafgen", "sink", "--port", str(SINK_PORT), "--out", str(out),
             "--seconds", str(seconds + 30), "--idle-exit", str(idle_exit), "--ready", str(ready),
             "--stamps", str(stamps)],
        ),
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        _wait_file(ready, sink, 10.0, "the sink")
    except RuntimeError:
        sink.kill()
        sink.wait()
        raise
    sender = subprocess.Popen(
        in_netns(
            client_ns,
            [py, "-m", "hamgr.trafgen", "send", "--dest", f"{NF_IP}:{NF_PORT}",
             "--seconds", str(seconds), "--pps", str(pps)],
        ),
        stdout=subprocess.PIPE,
    )  # fmt: skip
    return sink, sender, out


def start_traffic(
    fab: Fabric, work: Path, *, seconds: float, pps: int, idle_exit: float = 2.0
) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes], Path]:
    """The UDP stream of the three-host testbed: client netns to the sink's netns."""
    return start_udp(fab.cl, fab.sk, work, seconds=seconds, pps=pps, idle_exit=idle_exit)


def finish_traffic(
    sink: subprocess.Popen[bytes], sender: subprocess.Popen[bytes], timeout: float = 60
) -> dict[str, Any]:
    sent: dict[str, Any] = json.loads(sender.communicate(timeout=timeout)[0].splitlines()[-1])
    sink.communicate(timeout=timeout)
    return sent


@attrs.frozen
class TcpClient:
    """A running `hamgr.trafgen tcp` process and its files."""

    proc: subprocess.Popen[bytes]
    ready: Path  # exists once connected
    out: Path  # the JSON summary, once done
    bound_s: float  # its own time bound: sending plus draining

    def connected(self) -> bool:
        return self.ready.exists()

    def wait_connected(self, timeout: float) -> bool:
        """Wait until connected, or the client gave up (its summary then says why)."""
        deadline = time.monotonic() + timeout
        while not self.connected() and self.alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.connected()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def finish(self, margin: float = 15.0) -> TcpSummary:
        """Wait for the client (bounded), and read its summary; a client that had to be killed
        or wrote none counts as a connection that did not survive."""
        try:
            self.proc.communicate(timeout=self.bound_s + margin)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
        try:
            return TcpSummary.from_json(json.loads(self.out.read_text()))
        except (FileNotFoundError, ValueError):
            return TcpSummary(False, 0, 0, 0, 0, 0.0, detail="the TCP client left no summary")


def start_tcp(client_ns: str, work: Path, *, seconds: float) -> TcpClient:
    """One bounded TCP connection from `client_ns` to the sequencer's TCP listener."""
    ready, out = work / "tcp.ready", work / "tcp.json"
    proc = subprocess.Popen(
        in_netns(
            client_ns,
            [sys.executable, "-m", "hamgr.trafgen", "tcp", "--dest", f"{NF_IP}:{TCP_PORT}",
             "--seconds", str(seconds), "--interval-ms", str(TCP_INTERVAL_MS),
             "--drain", str(TCP_DRAIN_S), "--ready", str(ready), "--out", str(out)],
        ),
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    return TcpClient(proc, ready, out, seconds + TCP_DRAIN_S + 5.0)


def _stop(procs: Iterable[subprocess.Popen[bytes]]) -> None:
    """Kill, by PID, whichever of our traffic processes still runs (after a failed run)."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)


def run_measures(
    records: list[Record],
    *,
    split_ns: int,
    kill_ns: int,
    sent: int,
    tcp: TcpSummary | None,
    takeover_ns: int | None,
) -> dict[str, Any]:
    """The per-run measures that come from what the outside saw (sink and TCP client).

    `split_ns` separates the old primary's output from the new one's; `takeover_ns` is when the
    new primary resumed (None: it never did)."""
    check = check_sequence(records)
    return {
        "failover_ms": sink_gap_ms(records, split_ns),
        "silence_ms": silence_ms(records, kill_ns, split_ns),
        "duplicates": check.duplicates,
        "gaps": check.gaps,
        # Where the gaps fall, to tell a takeover defect from one in steady state.
        "gaps_outside_takeover": len(missing_outside_takeover(records, split_ns)),
        "lost_packets": sent - len({r.seq for r in records}),
        "inputs_twice": inputs_twice(records),
        "received": check.received,
        "sent": sent,
        "tcp_survived": (
            tcp is not None and takeover_ns is not None and tcp_survived(tcp, takeover_ns)
        ),
        "tcp": None if tcp is None else tcp.to_json(),
    }


@attrs.frozen
class InputLoss:
    """Lost inputs (sent, never reflected in any output) by when they were sent."""

    before_kill: int
    in_outage: int  # from the kill until the new primary's unit was attached
    after_attach: int


def classify_lost(
    records: list[Record],
    *,
    sent: int,
    kill_ns: int,
    attached_ns: int | None,
    interval_ns: int,
    first_seq: int = 1,
) -> InputLoss:
    """Split the inputs `first_seq`..`first_seq + sent - 1` that no record reflects by send time.

    A lost input's send time is not recorded anywhere: it is interpolated between the send
    times of the nearest received inputs below and above it (the sender is paced, so this is
    exact to within its jitter), or extrapolated by `interval_ns` past the first or last one.
    `attached_ns` None (the unit never came back): everything after the kill is outage.
    """
    got: dict[int, int] = {}
    for r in records:
        got.setdefault(r.seq, r.sent_ns)
    seqs = sorted(got)
    before = outage = after = 0
    for seq in range(first_seq, first_seq + sent):
        if seq in got:
            continue
        i = bisect.bisect_left(seqs, seq)
        if not seqs:
            at = kill_ns  # nothing arrived at all: it counts as the outage's
        elif i == 0:
            at = got[seqs[0]] - (seqs[0] - seq) * interval_ns
        elif i == len(seqs):
            at = got[seqs[-1]] + (seq - seqs[-1]) * interval_ns
        else:
            s0, s1 = seqs[i - 1], seqs[i]
            at = got[s0] + (got[s1] - got[s0]) * (seq - s0) // (s1 - s0)
        if at < kill_ns:
            before += 1
        elif attached_ns is None or at < attached_ns:
            outage += 1
        else:
            after += 1
    return InputLoss(before, outage, after)


def rollbacks(r: dict[str, Any], what: str) -> int:
    """A run's `what` ("duplicates" or "gaps") over every member's counter."""
    return int(r[what]) + sum(int(n) for n in r.get(f"upstream_{what}", ()))


def summarize(
    scope: str, results: list[dict[str, Any]], lossless: bool = False, chain: int = 1
) -> dict[str, Any]:
    """The bench's JSON line from the per-run results. With a chain, ``duplicates`` and
    ``gaps`` count every member's counter."""
    fo = [r["failover_ms"] for r in results if r["failover_ms"] is not None]
    detect = [r["detect_ms"] for r in results if r["detect_ms"] is not None]
    restore = [r["restore_ms"] for r in results if r["restore_ms"] is not None]
    silence = [r["silence_ms"] for r in results if r.get("silence_ms") is not None]
    return {
        "scope": scope,
        "runs": len(results),
        "failover_ms_p50": round(statistics.median(fo), 1) if fo else None,
        "failover_ms_max": round(max(fo), 1) if fo else None,
        "detect_ms_p50": round(_percentile(detect, 0.5), 2) if detect else None,
        "restore_ms_p50": round(_percentile(restore, 0.5), 1) if restore else None,
        "duplicates": sum(rollbacks(r, "duplicates") for r in results),
        "gaps": sum(rollbacks(r, "gaps") for r in results),
        "lost_packets": sum(r["lost_packets"] for r in results),
        "tcp_survived": sum(1 for r in results if r["tcp_survived"]),
        # Not in the list: a failover that failed (the unit stayed down) has no
        # failover_ms, so without this count it would vanish from the figures above.
        "failed_runs": sum(1 for r in results if r["status"] != "finished"),
        "lossless": lossless,
        "chain": chain,
        # Not in the list either: the longest silence at the sink per run
        # (`silence_ms`), which a late release of the old primary's last epoch hides from
        # failover_ms.
        "silence_ms_p50": round(statistics.median(silence), 1) if silence else None,
        "silence_ms_max": round(max(silence), 1) if silence else None,
        # Not in the list: inputs the NF counted twice (an input replayed twice).
        "inputs_twice": sum(int(r.get("inputs_twice", 0)) for r in results),
    }


# -- remote ------------------------------------------------------------------------------


# Runs redone because B took a live A over before the kill, before the bench gives up.
MAX_FALSE_TAKEOVERS = 3


class FalseTakeoverError(Exception):
    """B took the unit over from a live A before the bench's kill: no failover to measure."""


@attrs.frozen
class FailoverRun:
    """Everything one remote failover left behind: the sink's records and B's account."""

    records: list[Record]
    kill_us: int
    record: dict[str, Any]  # B's failover_record event
    sent: int
    tcp: TcpSummary | None  # None: the run had no TCP flow
    # When B attached the unit (its ``attached`` event); None if it never did.
    attached_us: int | None = None
    # A chain: the counters of every member but the last, as the sink saw them.
    upstream: list[list[Record]] = attrs.Factory(list)
    # When B's copy restored ahead was ready (its ``prestored`` event after the kill), and
    # how long that restore took; None: B restored none after the kill.
    prestored_us: int | None = None
    prestore_elapsed_us: int | None = None
    # Copies B restored ahead for a live A before the kill, and dropped: the restore ahead's cost.
    dropped_before_kill: int = 0


def run_remote_failover(
    work: Path,
    *,
    pps: int,
    epoch_ms: int,
    seed: int,
    tcp: bool = True,
    lossless: bool = False,
    chain: int = 1,
) -> FailoverRun:
    """Protect the sequencer (or a chain of `chain`) on A, stream through it, kill host A,
    wait for B to take over."""
    rng = random.Random(seed)
    work.mkdir(parents=True, exist_ok=True)
    tcp_port = TCP_PORT if tcp else None
    with Fabric(
        work / "fab", epoch_ms=epoch_ms, lossless=lossless, tcp_port=tcp_port, chain=chain
    ) as fab:
        fab.start()
        warm = 1.0 + rng.random()
        sink, sender, out = start_udp(
            fab.cl, fab.sk, work, seconds=warm + 6.0, pps=pps, stamps=chain
        )
        client: TcpClient | None = None
        try:
            # An idle unit takes no checkpoints (I5): the first commit follows the first output.
            fab.wait_event("A", "first_commit", timeout=10)
            if tcp:
                # The handshake's SYN-ACK is NF output too: it leaves A with a commit.
                client = start_tcp(fab.cl, work, seconds=warm + 5.0)
                client.wait_connected(START_TIMEOUT_S)
            time.sleep(warm)
            early = fab.hosts["B"].events("failover")
            if early:
                raise FalseTakeoverError(str(early[0].get("detail", early[0])))
            kill_us = fab.kill_host("A")
            done = fab.wait_event("B", "failover_record", timeout=30, after_us=kill_us)
            fab.wait_event("B", "first_commit", timeout=30, after_us=kill_us)
            summary = client.finish() if client is not None else None
            sent = finish_traffic(sink, sender)
        finally:
            _stop([sink, sender, *([client.proc] if client is not None else [])])
        records = read_records(out)
        upstream = [read_records(member_records(out, i)) for i in range(chain - 1)]
        attached = [e for e in fab.hosts["B"].events("attached") if e["mono_us"] >= kill_us]
        ahead = [e for e in fab.hosts["B"].events("prestored") if e["mono_us"] >= kill_us]
        wasted = [e for e in fab.hosts["B"].events("prestore_dropped") if e["mono_us"] < kill_us]
    return FailoverRun(
        records,
        kill_us,
        done,
        int(sent["sent"]),
        summary,
        attached[0]["mono_us"] if attached else None,
        upstream,
        ahead[0]["mono_us"] if ahead else None,
        ahead[0]["elapsed_us"] if ahead else None,
        len(wasted),
    )


def remote_measures(run: FailoverRun, *, pps: int, lossless: bool) -> dict[str, Any]:
    """The measures of one remote failover (`run_remote_failover`)."""
    done = run.record
    resumed_us = done.get("resumed_us")
    # The resume step's start: the first moment the new primary's output can leave.
    resume_us = None if resumed_us is None else resumed_us - done["steps_us"].get("resume", 0)
    loss = classify_lost(
        run.records,
        sent=run.sent,
        kill_ns=run.kill_us * 1000,
        attached_ns=None if run.attached_us is None else run.attached_us * 1000,
        interval_ns=int(1e9 / pps),
    )
    return {
        **(chain_measures(run.upstream) if run.upstream else {}),
        "status": done["status"],
        "detect_ms": done["detect_us"] / 1000,
        "restore_ms": done["steps_us"].get("restore", 0) / 1000,
        "steps_ms": {k: v / 1000 for k, v in done["steps_us"].items()},
        "lossless": lossless,
        "replayed": done.get("replayed"),
        "replay_failed": done.get("replay_failed", ""),
        "lost_before_kill": loss.before_kill,
        "lost_in_outage": loss.in_outage,
        "lost_after_attach": loss.after_attach,
        "outage_ms": (None if run.attached_us is None else (run.attached_us - run.kill_us) / 1000),
        # Where the outage went: B's verdict, and its copy restored ahead ready (both from
        # the kill), and that restore's own length.
        "verdict_ms": (done["started_us"] - run.kill_us) / 1000 if done["started_us"] else None,
        "copy_ready_ms": _since_ms(run.prestored_us, run.kill_us),
        "copy_restore_ms": (
            None if run.prestore_elapsed_us is None else run.prestore_elapsed_us / 1000
        ),
        "copies_dropped_before_kill": run.dropped_before_kill,
        **run_measures(
            run.records,
            # A failover that never resumed has no second side: the gap stays unmeasured.
            split_ns=(run.kill_us if resume_us is None else int(resume_us)) * 1000,
            kill_ns=run.kill_us * 1000,
            sent=run.sent,
            tcp=run.tcp,
            takeover_ns=None if resumed_us is None else int(resumed_us) * 1000,
        ),
    }


def _since_ms(at_us: int | None, kill_us: int) -> float | None:
    return None if at_us is None else (at_us - kill_us) / 1000


# -- local -------------------------------------------------------------------------------


@attrs.define
class LocalProtection:
    """Builds the unit's epoch engines for `LocalFailover` (its `EngineFactory`), as
    tests/integration/test_local_failover.py does: each on a fresh replication link that
    announced its term to the standby first, so the standby refuses the dead incarnation's late
    transfers."""

    bed: UnitBed
    endpoint: str
    epoch_us: int
    links: list[ReplicationClient] = attrs.Factory(list)
    engines: list[PrimaryEngine] = attrs.Factory(list)

    def __call__(
        self, term: int, first_epoch: int, nf: Protected, nf_rx_base: int
    ) -> PrimaryEngine:
        assert self.bed.client is not None
        assert self.bed.images is not None
        link = ReplicationClient(self.endpoint)
        self.links.append(link)
        if term > 1:
            link.hello(UNIT, term, timeout=2.0)
        # As the agent's (`Agent._run_local`): the restored copy's first cut comes as soon as
        # it has output.
        machine = ep.PrimaryMachine(
            UNIT,
            term,
            ep.PrimaryConfig(epoch=FixedEpoch(self.epoch_us)),
            first_epoch=first_epoch,
            now_us=time.monotonic_ns() // 1000,
            prompt_first_cut=True,
        )
        engine = PrimaryEngine(
            UNIT,
            machine,
            self.bed.client,
            nf,
            link,
            image_root=self.bed.images,
            nf_rx_base=nf_rx_base,
        )
        self.engines.append(engine)
        return engine

    def close(self) -> None:
        for engine in self.engines:
            with contextlib.suppress(Exception):
                engine.close()
        for link in self.links:
            link.close()


@attrs.define
class LocalRig:
    """The protected sequencer (UDP and TCP) in a `UnitBed`, driven by a `LocalFailover` that
    this process steps. With ``chain`` > 1 the NF is a chain of that many sequencers
    (`hamgr.testbed.chain_args`; the first one also serves TCP)."""

    bed: UnitBed
    driver: LocalFailover[Protected]
    protection: LocalProtection

    @staticmethod
    @contextlib.contextmanager
    def open(
        work: Path, *, prefix: str, epoch_ms: int, tcp: bool = True, chain: int = 1
    ) -> Iterator[LocalRig]:
        work.mkdir(parents=True, exist_ok=True)
        bed = UnitBed(work, prefix=prefix)
        try:
            with bed:
                driver: LocalFailover[Protected] | None = None
                protection: LocalProtection | None = None
                try:
                    dp = bed.start_dataplane()
                    extra = ("--tcp-listen", str(TCP_PORT)) if tcp else ()
                    nf, backend = _start_nf(bed, extra, chain)
                    if tcp:
                        wait_tcp_listening(nf.pid, TCP_PORT)
                    protection = LocalProtection(bed, bed.start_standby(), epoch_ms * 1000)
                    driver = LocalFailover(
                        UNIT,
                        dataplane=dp,
                        backend=backend,
                        nf=nf,
                        engine=protection(1, 1, nf, 0),
                        protect=protection,
                        term_file=TermFile(work / "term"),
                    )
                    yield LocalRig(bed, driver, protection)
                finally:
                    if driver is not None:
                        driver.close()
                    if protection is not None:
                        protection.close()
                    if driver is not None:
                        # The driver holds every incarnation, the first one included.
                        for c in driver.containers:
                            with contextlib.suppress(Exception):
                                c.destroy()
                        bed.nf = bed.chain = None
        finally:
            # The bed leaves its containers' cgroup parent behind once restored copies used it.
            remove_cgroup_parent(bed.cgroup_parent)

    def committed(self) -> bool:
        engine = self.driver.engine
        return engine is not None and engine.last_committed is not None

    def step_while(self, cond: Callable[[], bool], timeout: float) -> bool:
        """Step the driver while `cond()` holds, for at most `timeout` s; False on timeout."""
        deadline = time.monotonic() + timeout
        while cond():
            if time.monotonic() > deadline:
                return False
            self.driver.step()
        return True

    def step_until(self, cond: Callable[[], bool], timeout: float, what: str) -> None:
        if not self.step_while(lambda: not cond(), timeout):
            raise TimeoutError(f"no {what} within {timeout} s")

    def step_for(self, seconds: float) -> None:
        self.driver.run(seconds)

    def kill_nf(self, member: int = 0) -> int:
        """SIGKILL the NF's process (the container's init; of chain member `member`); returns
        when, in monotonic ns."""
        nf = self.driver.nf
        pid = nf.members[member].pid if isinstance(nf, Chain) else nf.pid
        at = time.monotonic_ns()
        os.kill(pid, signal.SIGKILL)
        return at

    def recover(self, timeout: float) -> FailoverRecord:
        """Step until the failover ended (and, when it finished, the new engine committed);
        its record. A failover that failed is a result, not an error of the bench."""

        def done() -> bool:
            recs = self.driver.records
            if not recs or recs[0].status is fo.Status.RUNNING:
                return False
            return recs[0].status is not fo.Status.FINISHED or recs[0].first_commit_us is not None

        self.step_until(done, timeout, "end of the local failover")
        return self.driver.records[0]

    def drain(self, timeout: float = 20.0) -> None:
        engine = self.driver.engine
        if engine is not None and not engine.drain(timeout):
            raise TimeoutError("the last epochs were not committed")


def _start_nf(
    bed: UnitBed, extra: tuple[str, ...], chain: int
) -> tuple[Protected, Restorer[Protected]]:
    """The NF (one sequencer, or a chain of `chain`) started in `bed`, bound, and what
    restores it."""
    if chain == 1:
        nf = bed.start_nf(sequencer_args(*extra))
        wait_udp_bound(nf.pid, NF_PORT)
        assert bed.backend is not None
        return nf, bed.backend
    args = chain_args(chain)
    args[0] = (*args[0], *extra)
    members = bed.start_chain(args)
    for i, m in enumerate(members.members):
        wait_udp_bound(m.pid, NF_PORT + i)
    assert bed.backend is not None
    return members, ChainBackend(bed.backend)


def wait_tcp_listening(pid: int, port: int, timeout: float = 10.0) -> None:
    """Wait until process `pid`'s netns has a TCP socket listening on `port`."""
    suffix = f":{port:04X}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[1].endswith(suffix) and fields[3] == "0A":
                return
        time.sleep(0.01)
    raise TimeoutError(f"pid {pid} did not listen on TCP port {port} within {timeout} s")


def local_run(
    work: Path,
    *,
    pps: int,
    epoch_ms: int,
    seed: int,
    index: int,
    tcp: bool = True,
    chain: int = 1,
) -> dict[str, Any]:
    """One local failover on a fresh one-host bed; returns its measures. A chain loses member
    `index` modulo its length, so that consecutive runs kill every member in turn."""
    rng = random.Random(seed)
    work.mkdir(parents=True, exist_ok=True)
    prefix = f"hl{os.getpid() % 10000}{index % 100:02d}"
    with LocalRig.open(work, prefix=prefix, epoch_ms=epoch_ms, tcp=tcp, chain=chain) as rig:
        warm = 1.0 + rng.random()
        victim = index % chain
        sink, sender, out = start_udp(
            rig.bed.cl, rig.bed.cl, work, seconds=warm + 6.0, pps=pps, stamps=chain
        )
        client = start_tcp(rig.bed.cl, work, seconds=warm + 5.0) if tcp else None
        procs = [sink, sender, *([client.proc] if client is not None else [])]
        try:
            # The first commit follows the first output (I5); the handshake needs one too.
            rig.step_until(rig.committed, START_TIMEOUT_S, "first commit")
            if client is not None:
                rig.step_while(lambda: client.alive() and not client.connected(), START_TIMEOUT_S)
            rig.step_for(warm)
            kill_ns = rig.kill_nf(victim)
            rec = rig.recover(timeout=30.0)
            # Keep the engine going while the flows run, then commit what they left. After a
            # failed failover this only waits for the flows' own bounds: the unit is down.
            rig.step_while(
                lambda: sender.poll() is None or (client is not None and client.alive()),
                (client.bound_s if client is not None else warm + 6.0) + 10.0,
            )
            rig.drain()
            rig.step_while(lambda: sink.poll() is None, 10.0)
            summary = client.finish() if client is not None else None
            sent = finish_traffic(sink, sender)
        finally:
            _stop(procs)
        records = read_records(out)
        upstream = [read_records(member_records(out, i)) for i in range(chain - 1)]
    resumed_ns = None if rec.resumed_us is None else rec.resumed_us * 1000
    return {
        **({"killed_member": victim, **chain_measures(upstream)} if chain > 1 else {}),
        "status": rec.status.value,
        "detail": rec.detail if rec.status is not fo.Status.FINISHED else "",
        "detect_ms": (rec.exited_us * 1000 - kill_ns) / 1e6,
        "restore_ms": rec.steps_us.get("restore", 0) / 1000,
        "steps_ms": {k: v / 1000 for k, v in rec.steps_us.items()},
        "discarded_pkts": rec.discarded_pkts,
        **run_measures(
            records,
            # A failover that never resumed has no second side: the gap stays unmeasured.
            split_ns=resumed_ns if resumed_ns is not None else kill_ns,
            kill_ns=kill_ns,
            sent=int(sent["sent"]),
            tcp=summary,
            takeover_ns=resumed_ns,
        ),
    }


def chain_measures(upstream: list[list[Record]]) -> dict[str, Any]:
    """Duplicates and gaps in the counters of a chain's members before the last (whose own are
    the run's ``duplicates`` and ``gaps``), as the sink saw them."""
    checks = [check_sequence(records) for records in upstream]
    return {
        "upstream_duplicates": [c.duplicates for c in checks],
        "upstream_gaps": [c.gaps for c in checks],
    }


# -- command -----------------------------------------------------------------------------


@click.command()
@click.option("--scope", type=click.Choice(["remote", "local"]), default="remote")
@click.option("--runs", type=click.IntRange(1, 50), default=5, show_default=True)
@click.option("--pps", type=click.IntRange(1, 20000), default=1000, show_default=True)
@click.option("--epoch-ms", type=click.IntRange(5, 1000), default=50, show_default=True)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option(
    "--tcp/--no-tcp",
    default=True,
    show_default=True,
    help="Keep one TCP connection through the NF in every run (tcp_survived counts it).",
)
@click.option(
    "--lossless",
    is_flag=True,
    help="Remote only: protect the unit in lossless mode (inputs mirrored to B and replayed).",
)
@click.option(
    "--chain",
    is_flag=True,
    help=f"The NF is a chain of {CHAIN_MEMBERS} sequencers, checked at every member's counter; "
    "locally run i kills member i modulo its length.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object as the last line.")
def command(
    *,
    scope: str,
    runs: int,
    pps: int,
    epoch_ms: int,
    seed: int,
    tcp: bool,
    lossless: bool,
    chain: bool,
    as_json: bool,
) -> None:
    """Fail the sequencer over RUNS times under a UDP stream and one TCP connection.

    remote: kill its whole host; local: kill its process, the host stays up.
    """
    if lossless and scope != "remote":
        raise click.UsageError(
            "--lossless needs --scope remote: the local failover refuses lossless mode (it keeps "
            "no local input log)"
        )
    members = CHAIN_MEMBERS if chain else 1
    common: dict[str, Any] = {"pps": pps, "epoch_ms": epoch_ms, "tcp": tcp, "chain": members}
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(
        prefix="hamgr-bench-failover-", dir=os.environ.get("HAMGR_BENCH_KEEP")
    ) as tmp:
        false_takeovers: list[str] = []
        i = 0
        # A false takeover (B took a live A over during the warm-up: this testbed's three
        # hosts share two CPUs and one kernel) leaves nothing to measure; the run is done again,
        # at most MAX_FALSE_TAKEOVERS times, and counted in the JSON line.
        while len(results) < runs:
            work = Path(tmp) / f"run{i}"
            if scope == "remote":
                try:
                    run = run_remote_failover(work, seed=seed + i, lossless=lossless, **common)
                except FalseTakeoverError as exc:
                    false_takeovers.append(str(exc))
                    _info(f"run {i}: B took a live A over before the kill: {exc}")
                    if len(false_takeovers) > MAX_FALSE_TAKEOVERS:
                        raise click.ClickException(
                            f"{len(false_takeovers)} false takeovers before the kill; the host is "
                            "too loaded to measure a failover (see `uptime`)"
                        ) from exc
                    i += 1
                    continue
                r = remote_measures(run, pps=pps, lossless=lossless)
            else:
                r = local_run(work, seed=seed + i, index=i, **common)
            results.append(r)
            _info(f"run {i}: {json.dumps(r)}")
            i += 1
    summary = summarize(scope, results, lossless, members)
    if scope == "remote":
        summary["false_takeovers"] = len(false_takeovers)
    gap_runs = sum(1 for r in results if rollbacks(r, "gaps"))
    _info(f"gap runs: {gap_runs}/{runs}")
    _info(f"failed failovers: {summary['failed_runs']}/{runs}")
    for i, r in enumerate(results):
        if r["status"] != "finished":
            _info(f"run {i}: the failover ended {r['status']}: {r.get('detail', '')[:2000]}")
    for i, r in enumerate(results):
        if tcp and not r["tcp_survived"]:
            _info(f"run {i}: the TCP connection did not survive: {r['tcp']}")
    click.echo(
        json.dumps(summary) if as_json else "\n".join(f"{k}: {v}" for k, v in summary.items())
    )
