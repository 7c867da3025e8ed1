"""The `hamgr` CLI as a process, where no agent or root is needed: usage, specs, init, exits."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

GOOD = textwrap.dedent(
    """\
    name = "seq0"

    [nf]
    image = "sequencer"
    args = ["/usr/local/bin/sequencer"]
    address = "198.18.0.2/24"
    mac = "02:00:c6:12:00:02"

    [epoch]
    length_ms = 50

    [ports]
    wire = ["w0"]
    egress = "e0"
    """
)


def hamgr(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hamgr", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def test_help_documents_the_exit_codes_and_keeps_the_old_commands() -> None:
    proc = hamgr("--help")
    assert proc.returncode == 0
    for line in ("0  success", "1  a check or operation failed", "2  bad usage", "3  the agent"):
        assert line in proc.stdout
    for command in ("bench", "doctor", "demo", "init", "up", "down", "protect", "unprotect",
                    "status", "events", "agent"):  # fmt: skip
        assert f"  {command}" in proc.stdout
    for command in ("bench", "doctor", "demo"):
        assert hamgr(command, "--help").returncode == 0


def test_a_bad_spec_names_file_line_and_field_and_exits_2(tmp_path: Path) -> None:
    spec = tmp_path / "spec.toml"
    spec.write_text(GOOD.replace("length_ms = 50", 'length_ms = "fast"'))
    proc = hamgr("protect", str(spec), "--state-dir", str(tmp_path / "none"))
    assert proc.returncode == 2
    assert f'{spec}:10: epoch.length_ms: must be a positive integer, got "fast"' in proc.stderr
    assert proc.stdout == ""
    proc = hamgr("protect", str(spec), "--state-dir", str(tmp_path / "none"), "--json")
    assert proc.returncode == 2
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["ok"] is False
    assert out["problems"] == [
        {
            "field": "epoch.length_ms",
            "message": 'must be a positive integer, got "fast"',
            "line": 10,
        }
    ]


def test_a_syntax_error_carries_its_line(tmp_path: Path) -> None:
    spec = tmp_path / "spec.toml"
    spec.write_text(GOOD.replace('egress = "e0"', "egress = "))
    proc = hamgr("protect", str(spec))
    assert proc.returncode == 2
    assert f"{spec}:14: toml: not valid TOML" in proc.stderr


def test_a_missing_spec_file_is_bad_usage(tmp_path: Path) -> None:
    proc = hamgr("protect", str(tmp_path / "nope.toml"))
    assert proc.returncode == 2
    assert "cannot read" in proc.stderr


def test_init_writes_config_and_keys_once(tmp_path: Path) -> None:
    state = tmp_path / "state"
    proc = hamgr("init", "--state-dir", str(state), "--host", "h1", "--json")
    assert proc.returncode == 0, proc.stderr
    first = json.loads(proc.stdout.strip().splitlines()[-1])
    assert first["host"] == "h1"
    assert first["config_written"] is True
    assert first["keys_created"] == ["agent", "cli"]
    assert stat.S_IMODE((state / "keys" / "agent.key_secret").stat().st_mode) == 0o600
    assert 'host = "h1"' in (state / "agent.toml").read_text()
    again = json.loads(
        hamgr("init", "--state-dir", str(state), "--json").stdout.strip().splitlines()[-1]
    )
    assert again["config_written"] is False
    assert again["keys_created"] == []
    assert again["agent_public_key"] == first["agent_public_key"]
    clash = hamgr("init", "--state-dir", str(state), "--host", "h2")
    assert clash.returncode == 2
    assert "--force" in clash.stderr


@pytest.mark.parametrize("command", [["status"], ["unprotect", "u1"], ["events", "--seconds", "1"]])
def test_no_agent_running_exits_3_at_once(tmp_path: Path, command: list[str]) -> None:
    state = tmp_path / "state"
    assert hamgr("init", "--state-dir", str(state), "--host", "h1").returncode == 0
    proc = hamgr(*command, "--state-dir", str(state), "--json")
    assert proc.returncode == 3
    assert "not running" in proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["code"] == "not_running"


def test_without_init_commands_say_run_init(tmp_path: Path) -> None:
    proc = hamgr("status", "--state-dir", str(tmp_path / "empty"))
    assert proc.returncode == 2
    assert "hamgr" in proc.stderr
    assert "init" in proc.stderr


def test_down_without_an_agent_is_fine(tmp_path: Path) -> None:
    state = tmp_path / "state"
    hamgr("init", "--state-dir", str(state), "--host", "h1")
    proc = hamgr("down", "--state-dir", str(state), "--json")
    assert proc.returncode == 0
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"ok": True, "stopped": False}


def test_the_systemd_unit_is_valid(tmp_path: Path) -> None:
    import shutil

    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "systemd-analyze is missing: make setup installs systemd"
    unit = Path(__file__).resolve().parents[2] / "packaging" / "systemd" / "hamgr-agent.service"
    text = unit.read_text()
    for line in ("Type=notify", "WatchdogSec=", "KillMode=process", "NotifyAccess=main"):
        assert line in text
    # Verify it as installed, with ExecStart pointing at this checkout's hamgr.
    hamgr_bin = Path(sys.executable).parent / "hamgr"
    copy = tmp_path / "hamgr-agent.service"
    copy.write_text(text.replace("/usr/local/bin/hamgr", str(hamgr_bin)))
    proc = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "hamgr-agent" not in proc.stderr, proc.stderr
