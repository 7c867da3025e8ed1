"""The pure parts of `hamgr hosts add --install`, its inventory field and its usage errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from hamgr import hosts, keys
from hamgr import wheelhouse as wh
from hamgr.cli import cli
from hamgr.inventory import HostRecord, InventoryError, parse, render

FP = "SHA256:rJCFEzdPId4BV+T/egM8Q/1ubxZ1Scb5k+KzVBbBAL0"


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("/opt/hamgr/venv", "/opt/hamgr/venv"),
        ("/opt/hamgr/venv/", "/opt/hamgr/venv"),
        ("//opt/./hamgr//venv", "/opt/hamgr/venv"),
        ("/srv", "/srv"),
    ],
)
def test_check_prefix(given: str, canonical: str) -> None:
    assert hosts.check_prefix(given) == canonical


@pytest.mark.parametrize("given", ["opt/hamgr", "", "/", "/opt/../etc", "/opt/a\nb", "~/venv"])
def test_check_prefix_refuses(given: str) -> None:
    with pytest.raises(hosts.HostsError) as caught:
        hosts.check_prefix(given)
    assert caught.value.status == 2
    assert caught.value.code == "bad_prefix"


def test_release_dirs_sit_beside_the_prefix_and_are_recognised() -> None:
    house_id = "0123456789abcdef" * 4
    release = hosts.release_dir("/opt/hamgr/venv", house_id, "a1b2c3")
    assert release == "/opt/hamgr/.venv-0123456789ab-a1b2c3"
    name = release.rsplit("/", 1)[1]
    assert hosts.is_release_of("/opt/hamgr/venv", name)
    assert not hosts.is_release_of("/opt/hamgr/other", name)
    assert not hosts.is_release_of("/opt/hamgr/venv", name + ".upload")
    assert not hosts.is_release_of("/opt/hamgr/venv", "/opt/hamgr/" + name)  # absolute: not ours
    assert not hosts.is_release_of("/opt/hamgr/venv", "../.venv-0123456789ab-a1b2c3")
    assert not hosts.is_release_of("/opt/hamgr/v.nv", ".vXnv-0123456789ab-a1b2c3")


def test_missing_libraries_from_ldd() -> None:
    ldd = (
        "\tlinux-vdso.so.1 (0x00007ffd)\n"
        "\tlibrte_ethdev.so.23 => not found\n"
        "\tlibrte_eal.so.23 => not found\n"
        "\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n"
    )
    assert hosts.missing_libraries(ldd) == ["librte_ethdev.so.23", "librte_eal.so.23"]
    assert hosts.missing_libraries("\tlibc.so.6 => /lib/libc.so.6 (0x1)\n") == []


def test_doctor_failures_are_the_required_failed_checks() -> None:
    report = {
        "ok": False,
        "checks": [
            {"name": "criu_version", "status": "fail", "detail": "no criu", "fix": "make setup",
             "required": True},
            {"name": "kvm", "status": "warn", "detail": "PVM", "fix": "", "required": False},
            {"name": "x", "status": "fail", "detail": "optional", "fix": "", "required": False},
            {"name": "dpdk", "status": "ok", "detail": "22.11", "fix": "", "required": True},
            "not a check",
        ],
    }  # fmt: skip
    assert hosts.doctor_failures(report) == [
        {"name": "criu_version", "detail": "no criu", "fix": "make setup"}
    ]
    assert hosts.doctor_failures(None) == []


def test_platform_facts_and_the_unfit_message(tmp_path: Path) -> None:
    facts = hosts.platform_facts(
        {"python": "3.12.4", "implementation": "cpython", "machine": "x86_64", "libc": "glibc 2.36"}
    )
    assert facts == wh.PlatformFacts("cpython", (3, 12), "x86_64", (2, 36))
    pyzmq = wh.Wheel(
        "pyzmq",
        "27.3.0",
        tmp_path / "pyzmq-27.3.0-cp311-cp311-manylinux_2_28_x86_64.whl",
        "0" * 64,
        1,
    )
    attrs_wheel = wh.Wheel("attrs", "26.1.0", tmp_path / "attrs-26.1.0-py3-none-any.whl", "", 1)
    assert not pyzmq.fits(facts)
    assert attrs_wheel.fits(facts)
    error = hosts.unfit_error([pyzmq], facts, "hostB (198.18.5.2:22)")
    assert error.code == "wheels_unfit"
    assert "pyzmq 27.3.0 (pyzmq-27.3.0-cp311-cp311-manylinux_2_28_x86_64.whl)" in error.message
    assert "cpython 3.12 on x86_64, glibc 2.36" in error.message
    local = wh.PlatformFacts.local()
    assert f"Pass --python with a Python {local.python[0]}.{local.python[1]}" in error.message


def _snippet(source: str, *args: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", source, *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    data: dict[str, Any] = json.loads(out.stdout)
    return data


def test_the_facts_snippet_sees_a_release_link(tmp_path: Path) -> None:
    """The snippets run on the host's Python; here they run on this one, on a tmp dir."""
    prefix = tmp_path / "venv"
    facts = _snippet(hosts._FACTS_PY, str(prefix), hosts.INSTALL_FILE, str(tmp_path / "state"))
    assert facts["prefix_exists"] is False
    assert facts["state_dir_exists"] is False
    assert facts["prefix_link"] is None
    assert facts["system"] == "Linux"
    assert facts["venv"] is True
    release = tmp_path / ".venv-0123456789ab-a1b2c3"
    release.mkdir()
    (release / hosts.INSTALL_FILE).write_text('{"id": "x"}\n')
    subprocess.run(
        [sys.executable, "-c", hosts._SWITCH_PY, release.name, str(prefix)], check=True, timeout=30
    )
    facts = _snippet(hosts._FACTS_PY, str(prefix), hosts.INSTALL_FILE, str(tmp_path))
    assert facts["state_dir_exists"] is True
    assert facts["prefix_link"] == release.name
    assert json.loads(facts["prefix_marker"]) == {"id": "x"}
    subprocess.run(
        [sys.executable, "-c", hosts._SWITCH_PY, "", str(prefix)], check=True, timeout=30
    )
    assert not prefix.exists()
    assert not list(tmp_path.glob("*.tmp"))


def test_the_hash_snippet(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"abc")
    sums = _snippet(hosts._SHA256_PY, str(tmp_path / "a"), str(tmp_path / "missing"))
    assert sums[str(tmp_path / "a")] == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
    assert sums[str(tmp_path / "missing")].startswith("unreadable")


def test_inventory_prefix_is_optional(tmp_path: Path) -> None:
    record = HostRecord(
        name="hostB",
        address="198.18.5.2",
        port=22,
        user="root",
        key="/root/.ssh/id_ed25519",
        fingerprint=FP,
        host_key_type="ssh-ed25519",
        agent_public_key=keys.generate().public.decode(),
        control="tcp://198.18.5.2:7311",
        state_dir="/var/lib/hamgr",
        python="python3",
        version="0.1.0",
        added="2025-01-01T00:00:00Z",
    )
    text = render({"hostB": record})
    assert "prefix" not in text  # files of hosts added without --install stay as they were
    assert parse(text) == {"hostB": record}
    installed = HostRecord(**{**record.to_json(), "prefix": "/opt/hamgr/venv",
                              "python": "/opt/hamgr/venv/bin/python"})  # fmt: skip
    text = render({"hostB": installed})
    assert 'prefix = "/opt/hamgr/venv"' in text
    assert parse(text) == {"hostB": installed}
    with pytest.raises(InventoryError, match=r"hosts\.hostB\.prefix"):
        parse(text.replace('prefix = "/opt/hamgr/venv"', "prefix = 3"))


def _run(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args))


def test_cli_install_usage_errors(tmp_path: Path) -> None:
    assert _run("init", "--host", "ctl", "--state-dir", str(tmp_path)).exit_code == 0
    key = tmp_path / "id"
    key.write_text("not read: the options are refused first")
    base = ["hosts", "add", "hostB", "--address", "198.18.5.2", "--key", str(key),
            "--fingerprint", FP, "--state-dir", str(tmp_path), "--json"]  # fmt: skip
    result = _run(*base, "--prefix", "/opt/x")
    assert result.exit_code == 2
    assert "go with --install" in result.stdout
    result = _run(*base, "--reinstall")
    assert result.exit_code == 2
    result = _run(*base, "--install", "--prefix", "relative/venv")
    assert result.exit_code == 2
    last = json.loads(result.stdout.strip().splitlines()[-1])
    assert last["code"] == "bad_prefix"
    assert "absolute path" in last["error"]
