"""`hamgr failover` as a process, where no agent or root is needed: help, usage, exits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def hamgr(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hamgr", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_failover_is_listed_and_documents_planned_and_now() -> None:
    assert "  failover" in hamgr("--help").stdout
    proc = hamgr("failover", "--help")
    assert proc.returncode == 0
    for text in ("--planned / --now", "--term", "--lossless", "Exits 0 when the failover"):
        assert text in proc.stdout, proc.stdout


def test_failover_without_an_agent_exits_3_and_bad_usage_exits_2(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert hamgr("init", "--state-dir", str(state), "--host", "h1").returncode == 0
    proc = hamgr("failover", "seq0", "--state-dir", str(state), "--json")
    assert proc.returncode == 3
    assert json.loads(proc.stdout.strip().splitlines()[-1])["code"] == "not_running"
    assert hamgr("failover", "--state-dir", str(state)).returncode == 2  # no UNIT
    assert hamgr("failover", "seq0", "--term", "0", "--state-dir", str(state)).returncode == 2
