"""`hamgr demo` end to end: a 3-host testbed, the primary host killed, and the report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.root


def test_demo_reports_a_failover_without_visible_rollback(tmp_path: Path) -> None:
    report_dir = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "hamgr", "demo", "--json", "--report-dir", str(report_dir)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result) == {"failover_ms", "duplicates", "gaps", "tcp_survived", "report"}
    assert result["duplicates"] == 0
    assert result["gaps"] == 0
    # The TCP connection opened through the NF before the kill still answered after it.
    assert result["tcp_survived"] is True
    details = json.loads((report_dir / "result.json").read_text())
    assert details["takeover_status"] == "finished"
    assert isinstance(result["failover_ms"], float)
    assert result["failover_ms"] > 0
    # The timeline names both hosts' sides of the takeover, in order.
    lines = proc.stdout.splitlines()
    killed = next(i for i, line in enumerate(lines) if "host A killed" in line)
    restored = "first output of the NF restored on B"
    first_b = next(i for i, line in enumerate(lines) if restored in line)
    assert killed < first_b
    index = Path(result["report"])
    assert index == report_dir / "index.html"
    page = index.read_text()
    assert "host A killed" in page
    for png in ("pps.png", "latency_cdf.png"):
        data = (report_dir / png).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        assert png in page
