"""`hamgr bench failover --runs 1 --json`, as a user runs it, for each scope: one failover of the
sequencer under a UDP stream and one TCP connection, and the JSON line the issue names.

Each run builds and removes its own testbed (`hamgr.fabric.Fabric` for remote,
`hamgr.testbed.UnitBed` for local). The per-run details come from the bench's stderr
(``run 0: {...}``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

pytestmark = pytest.mark.root

ISSUE_FIELDS = {
    "scope", "runs", "failover_ms_p50", "failover_ms_max", "detect_ms_p50", "restore_ms_p50",
    "duplicates", "gaps", "lost_packets", "tcp_survived",
}  # fmt: skip


def bench(scope: str, *extra: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the bench once; return its last stdout line and its run's details."""
    proc = subprocess.run(
        [sys.executable, "-m", "hamgr", "bench", "failover", "--scope", scope, "--runs", "1",
         "--json", *extra],
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    line = next(x for x in proc.stderr.splitlines() if x.startswith("run 0: {"))
    return summary, json.loads(line.removeprefix("run 0: "))


def check_tcp(summary: dict[str, Any], run: dict[str, Any]) -> None:
    """The connection made before the failure served after it, as the same connection."""
    tcp = run["tcp"]
    assert summary["tcp_survived"] == 1, tcp
    assert (tcp["connected"], tcp["resets"], tcp["errors"]) == (True, 0, 0)
    assert tcp["answered"] == tcp["requests"] > 100
    # The NF numbers its connections: a client that reconnected would be on number 2.
    assert tcp["conn"] == 1
    # Answers are NF output that the data plane held until a commit: the connection went
    # through it, not around it (a direct path between namespaces answers in about 0.1 ms).
    assert tcp["rtt_ms_p50"] > 10


def test_local_bench_kills_the_nf_and_the_tcp_connection_survives() -> None:
    summary, run = bench("local")
    assert set(summary) >= ISSUE_FIELDS
    assert (summary["scope"], summary["runs"]) == ("local", 1)
    assert summary["failed_runs"] == 0, run.get("detail", "")[-2000:]
    assert run["status"] == "finished"
    # I4 locally: the fence drops every unreleased output of the dead NF, so no gap either.
    assert (summary["duplicates"], summary["gaps"]) == (0, 0)
    assert summary["failover_ms_p50"] == summary["failover_ms_max"] > 0
    assert summary["detect_ms_p50"] > 0
    assert summary["restore_ms_p50"] > 0
    assert set(run["steps_ms"]) >= {"raise-term", "fence", "restore", "resume", "reprotect"}
    check_tcp(summary, run)


def test_remote_bench_kills_the_host_and_the_tcp_connection_survives() -> None:
    summary, run = bench("remote")
    assert set(summary) >= ISSUE_FIELDS
    assert (summary["scope"], summary["runs"]) == ("remote", 1)
    assert summary["failed_runs"] == 0
    # Released at the standby: neither a duplicate nor a gap (I4).
    assert (summary["duplicates"], summary["gaps"]) == (0, 0)
    assert summary["failover_ms_p50"] == summary["failover_ms_max"] > 0
    assert summary["detect_ms_p50"] > 0
    assert summary["restore_ms_p50"] > 0
    assert set(run["steps_ms"]) >= {"restore", "attach", "announce", "resume"}
    check_tcp(summary, run)


def test_local_bench_with_a_chain_kills_one_member_and_no_member_rolls_back() -> None:
    summary, run = bench("local", "--chain")
    assert set(summary) >= ISSUE_FIELDS
    assert (summary["scope"], summary["runs"], summary["chain"]) == ("local", 1, 2)
    assert summary["failed_runs"] == 0, run.get("detail", "")[-2000:]
    assert run["killed_member"] in (0, 1)
    # Neither the last member's counter nor the first one's shows a rollback.
    assert (run["duplicates"], run["gaps"]) == (0, 0)
    assert (run["upstream_duplicates"], run["upstream_gaps"]) == ([0], [0])
    assert (summary["duplicates"], summary["gaps"]) == (0, 0)
    assert summary["restore_ms_p50"] > 0
    check_tcp(summary, run)


def test_remote_bench_with_a_chain_restores_every_member_on_the_standby() -> None:
    summary, run = bench("remote", "--chain")
    assert (summary["scope"], summary["runs"], summary["chain"]) == ("remote", 1, 2)
    assert summary["failed_runs"] == 0
    assert (run["duplicates"], run["gaps"]) == (0, 0)
    assert (run["upstream_duplicates"], run["upstream_gaps"]) == ([0], [0])
    assert summary["restore_ms_p50"] > 0
    check_tcp(summary, run)
