"""The failover bench's pure parts: the TCP client's checks of its one connection, the summary
line, and the spec change that gives the sequencer its TCP listener. No root, no namespaces; the
TCP client itself runs against a small server on the loopback interface."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import attrs
import pytest
from click.testing import CliRunner

from hamgr import trafgen
from hamgr.bench.failover import TCP_PORT, silence_ms, sink_gap_ms, summarize
from hamgr.fabric import sequencer_spec
from hamgr.trafgen import Record, TcpLedger, TcpSummary, run_tcp_client, tcp_survived
from hamgr.unitspec import loads

MS = 1_000_000  # ns


def answer(conn: int, count: int, seq: int) -> bytes:
    return f"{conn} {count} {seq}\n".encode()


def ledger_with(requests: int, *, every_ms: int = 10) -> TcpLedger:
    ledger = TcpLedger()
    ledger.connect(0)
    for i in range(requests):
        assert ledger.request(i * every_ms * MS) == f"{i + 1}\n".encode()
    return ledger


# -- the ledger ----------------------------------------------------------------------------


def test_answers_in_order_on_one_connection_survive_a_takeover() -> None:
    ledger = ledger_with(5)
    for n in range(1, 6):
        ledger.receive(answer(7, n, n), (n * 10 + 100) * MS)
    s = ledger.summary(200 * MS)
    assert (s.requests, s.answered, s.errors, s.resets, s.conn) == (5, 5, 0, 0, 7)
    assert s.last_answered_sent_ns == 40 * MS
    assert tcp_survived(s, after_ns=35 * MS)
    # Nothing sent after the takeover was answered: the connection is not shown to survive it.
    assert not tcp_survived(s, after_ns=40 * MS)


def test_answers_split_across_reads_are_put_together() -> None:
    ledger = ledger_with(2)
    data = answer(1, 1, 1) + answer(1, 2, 2)
    for i in range(len(data)):
        ledger.receive(data[i : i + 1], 50 * MS)
    assert (ledger.answered, ledger.errors) == (2, 0)


def test_a_connection_rebuilt_behind_the_client_is_an_error() -> None:
    """A new connection restarts the NF's line count and carries another connection number."""
    ledger = ledger_with(4)
    for n in range(1, 4):
        ledger.receive(answer(1, n, n), 100 * MS)
    ledger.receive(answer(2, 1, 4), 200 * MS)
    s = ledger.summary(300 * MS)
    assert (s.answered, s.errors) == (3, 1)
    assert "connection 2" in s.detail
    assert not tcp_survived(s, after_ns=0)


def test_a_count_that_restarted_on_the_same_connection_number_is_an_error() -> None:
    """A restored NF that lost the connection's state but reused its number still shows."""
    ledger = ledger_with(3)
    ledger.receive(answer(1, 1, 1) + answer(1, 2, 2) + answer(1, 1, 3), 100 * MS)
    s = ledger.summary(200 * MS)
    assert (s.answered, s.errors) == (2, 1)
    assert "counted 1" in s.detail


def test_a_repeated_answer_is_an_error() -> None:
    """A rollback made visible on the connection: an answer seen twice."""
    ledger = ledger_with(3)
    ledger.receive(answer(1, 1, 1) + answer(1, 2, 2) + answer(1, 2, 2), 100 * MS)
    s = ledger.summary(200 * MS)
    assert s.errors == 1
    assert "answer 2 where 3 was due" in s.detail
    assert not tcp_survived(s, after_ns=0)


@pytest.mark.parametrize("line", [b"garbage", b"1 2", b"1 x 3"])
def test_an_unreadable_answer_is_an_error(line: bytes) -> None:
    ledger = ledger_with(1)
    ledger.receive(line + b"\n", 10 * MS)
    assert (ledger.answered, ledger.errors) == (0, 1)


def test_an_answer_nobody_asked_for_is_an_error() -> None:
    ledger = ledger_with(0)
    ledger.receive(answer(1, 1, 1), 10 * MS)
    assert ledger.errors == 1


def test_a_reset_ends_the_connection_for_good() -> None:
    ledger = ledger_with(2)
    ledger.receive(answer(1, 1, 1), 50 * MS)
    ledger.reset(60 * MS, "recv: ECONNRESET")
    ledger.receive(answer(1, 2, 2), 70 * MS)  # nothing is read after a failure
    s = ledger.summary(100 * MS)
    assert (s.answered, s.resets, s.detail) == (1, 1, "recv: ECONNRESET")
    assert not tcp_survived(s, after_ns=0)


def test_unanswered_requests_mean_the_connection_did_not_survive() -> None:
    ledger = ledger_with(3)
    ledger.receive(answer(1, 1, 1) + answer(1, 2, 2), 50 * MS)
    s = ledger.summary(100 * MS)
    assert (s.requests, s.answered, s.errors, s.resets) == (3, 2, 0, 0)
    assert not tcp_survived(s, after_ns=0)


def test_the_longest_stall_counts_from_the_later_of_the_last_answer_and_the_request() -> None:
    ledger = TcpLedger()
    ledger.connect(0)
    ledger.request(0)
    ledger.request(10 * MS)
    ledger.receive(answer(1, 1, 1), 100 * MS)  # waited 100 ms
    ledger.receive(answer(1, 2, 2), 1100 * MS)  # waited 1000 ms since the previous answer
    ledger.request(1200 * MS)
    s = ledger.summary(1500 * MS)  # request 3 has waited 300 ms so far
    assert s.max_stall_ms == 1000.0
    assert (s.rtt_ms_min, s.rtt_ms_p50) == (100.0, 595.0)


def test_a_client_that_never_connected_did_not_survive() -> None:
    s = TcpLedger().summary(0)
    assert not s.connected
    assert not tcp_survived(s, after_ns=0)
    assert TcpSummary.from_json(json.loads(json.dumps(s.to_json()))) == s


# -- the client against a real socket --------------------------------------------------------


@attrs.define
class LineServer:
    """Answers like the sequencer's TCP listener; after `drop_after` answers it closes the
    connection, and it keeps accepting until stopped, so a reconnection would be counted."""

    listener: socket.socket
    drop_after: int | None = None
    connections: int = 0
    _stop: threading.Event = attrs.Factory(threading.Event)
    _thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.listener.getsockname()[1])

    def start(self) -> None:
        self.listener.settimeout(0.05)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.listener.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            self.connections += 1
            with conn:
                self._serve(conn, self.connections)

    def _serve(self, conn: socket.socket, number: int) -> None:
        conn.settimeout(0.05)
        buf, count = b"", 0
        while not self._stop.is_set():
            try:
                data = conn.recv(4096)
            except TimeoutError:
                continue
            if not data:
                return
            buf += data
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if self.drop_after is not None and count == self.drop_after:
                    return  # closes the connection with requests outstanding
                count += 1
                conn.sendall(answer(number, count, int(line)))


@pytest.fixture
def server() -> Iterator[LineServer]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    s = LineServer(listener)
    try:
        yield s
    finally:
        s.stop()


def test_the_client_checks_every_answer_on_one_connection(server: LineServer) -> None:
    server.start()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=2)
    with sock:
        before = time.monotonic_ns()
        ledger = run_tcp_client(sock, seconds=0.3, interval_ms=10, drain=2.0, max_count=1000)
    s = ledger.summary(time.monotonic_ns())
    assert s.requests >= 20
    assert (s.answered, s.errors, s.resets, s.conn) == (s.requests, 0, 0, 1)
    assert tcp_survived(s, after_ns=before)
    assert server.connections == 1


def test_the_client_never_reconnects_after_its_connection_fails(server: LineServer) -> None:
    server.drop_after = 5
    server.start()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=2)
    with sock:
        ledger = run_tcp_client(sock, seconds=0.5, interval_ms=10, drain=1.0, max_count=1000)
    time.sleep(0.2)  # a reconnection attempt would have been accepted by now
    s = ledger.summary(time.monotonic_ns())
    assert (s.answered, s.errors, s.resets) == (5, 0, 1)
    assert s.requests > s.answered
    assert not tcp_survived(s, after_ns=0)
    assert server.connections == 1


def test_the_tcp_command_prints_its_summary_as_the_last_line(server: LineServer) -> None:
    server.start()
    result = CliRunner().invoke(
        trafgen.cli,
        ["tcp", "--dest", f"127.0.0.1:{server.port}", "--seconds", "0.2", "--interval-ms", "20",
         "--drain", "2"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    s = TcpSummary.from_json(json.loads(result.output.strip().splitlines()[-1]))
    assert s.connected
    assert s.requests == s.answered > 0


def test_the_tcp_command_reports_a_refused_connection() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, not listening: a connect is refused
        result = CliRunner().invoke(
            trafgen.cli,
            ["tcp", "--dest", f"127.0.0.1:{port}", "--seconds", "1", "--connect-timeout", "1"],
        )
    assert result.exit_code == 0, result.output
    s = TcpSummary.from_json(json.loads(result.output.strip().splitlines()[-1]))
    assert (s.connected, s.requests) == (False, 0)
    assert s.detail.startswith("connect:")


# -- the bench's summary and spec -------------------------------------------------------------

ISSUE_FIELDS = {
    "scope", "runs", "failover_ms_p50", "failover_ms_max", "detect_ms_p50", "restore_ms_p50",
    "duplicates", "gaps", "lost_packets", "tcp_survived",
}  # fmt: skip


def run(
    failover_ms: float | None, *, status: str = "finished", tcp: bool = True
) -> dict[str, object]:
    return {
        "status": status,
        "failover_ms": failover_ms,
        "detect_ms": 1.0,
        "restore_ms": 100.0,
        "duplicates": 0,
        "gaps": 2,
        "lost_packets": 10,
        "tcp_survived": tcp,
    }


def test_the_summary_line_has_the_issues_fields_and_counts_failed_runs() -> None:
    summary = summarize(
        "local",
        [run(300.0), run(100.0), run(200.0, tcp=False), run(None, status="error", tcp=False)],
    )
    assert set(summary) >= ISSUE_FIELDS
    assert summary["scope"] == "local"
    assert summary["runs"] == 4
    assert (summary["failover_ms_p50"], summary["failover_ms_max"]) == (200.0, 300.0)
    assert (summary["gaps"], summary["lost_packets"]) == (8, 40)
    assert summary["tcp_survived"] == 2
    # A failover that failed has no failover_ms; it is counted instead of vanishing.
    assert summary["failed_runs"] == 1
    assert summary["inputs_twice"] == 0
    assert summarize("remote", [{**run(9.0), "inputs_twice": 2}, run(8.0)])["inputs_twice"] == 2


def test_the_sink_gap_spans_the_split() -> None:
    records = [Record(c, c, 0, t * MS) for c, t in ((1, 10), (2, 20), (3, 320), (4, 330))]
    assert sink_gap_ms(records, 100 * MS) == 300.0
    assert sink_gap_ms(records, 400 * MS) is None


def test_the_silence_counts_a_late_release_of_the_old_primarys_last_epoch() -> None:
    # Arrivals every 50 ms until 100, the kill at 110, the old primary's last committed epoch
    # released at the standby's promotion (190), the new primary's first output at 195.
    times = (50, 100, 190, 191, 195, 200, 250)
    records = [Record(i, i, 0, t * MS) for i, t in enumerate(times)]
    assert sink_gap_ms(records, 193 * MS) == 4.0
    assert silence_ms(records, 110 * MS, 193 * MS) == 90.0
    # Without the late release the two are the same gap.
    plain = [r for r in records if r.recv_ns not in (190 * MS, 191 * MS)]
    assert silence_ms(plain, 110 * MS, 193 * MS) == sink_gap_ms(plain, 193 * MS) == 95.0
    # A silence that ended before the kill is not the takeover's.
    assert silence_ms(records, 260 * MS, 260 * MS) is None


def test_the_summary_gives_the_silence_beside_the_failover_time() -> None:
    runs = [{**run(4.0), "silence_ms": 90.0}, {**run(80.0), "silence_ms": 80.0}, run(70.0)]
    summary = summarize("remote", runs)
    assert (summary["silence_ms_p50"], summary["silence_ms_max"]) == (85.0, 90.0)


def test_the_fabrics_spec_gets_the_sequencers_tcp_listener() -> None:
    unit = loads(sequencer_spec(tcp_port=TCP_PORT))
    plain = loads(sequencer_spec())
    assert unit.nf.args == (*plain.nf.args, "--tcp-listen", str(TCP_PORT))
    assert unit == attrs.evolve(plain, nf=attrs.evolve(plain.nf, args=unit.nf.args))


def test_with_a_chain_every_members_rollbacks_count() -> None:
    chained = {**run(100.0), "upstream_duplicates": [1], "upstream_gaps": [3]}
    summary = summarize("local", [chained, run(200.0)], chain=2)
    assert summary["chain"] == 2
    assert (summary["duplicates"], summary["gaps"]) == (1, 2 + 3 + 2)
    assert summarize("local", [run(100.0)])["chain"] == 1


def test_the_fabrics_spec_can_be_a_chain() -> None:
    unit = loads(sequencer_spec(chain=3))
    assert unit.nf.args[-2:] == ("--dest", "127.0.0.1:7001")
    assert [m.args[2:] for m in unit.chain] == [
        ("7001", "--dest", "127.0.0.1:7002"),
        ("7002", "--dest", "198.18.0.3:9000"),
    ]
    assert loads(sequencer_spec()).chain == ()
