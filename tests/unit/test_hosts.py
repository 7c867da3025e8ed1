"""`hamgr hosts` without a network: fingerprints, the inventory, authorized_keys edits, the
host-key policy, and the CLI's usage errors."""

from __future__ import annotations

import base64
import json
import tomllib
from pathlib import Path
from typing import Any

import attrs
import paramiko  # type: ignore[import-untyped, unused-ignore]
import pytest
from click.testing import CliRunner

from hamgr import hosts, keys
from hamgr.cli import cli
from hamgr.inventory import HostRecord, Inventory, InventoryError, parse, render

# A key made with `ssh-keygen -t ed25519`, and what `ssh-keygen -lf` printed for it.
PUBLIC = "AAAAC3NzaC1lZDI1NTE5AAAAIPZZRcL0BSqKDuDjbO4RapWZYnqTGZS6lST4Lb7PaObd"
SHA256 = "SHA256:rJCFEzdPId4BV+T/egM8Q/1ubxZ1Scb5k+KzVBbBAL0"
MD5 = "MD5:26:4a:49:69:35:d4:32:95:5d:4e:34:a9:e5:cf:ca:09"


def _record(**changes: Any) -> HostRecord:
    base = HostRecord(
        name="hostB",
        address="198.18.5.2",
        port=22,
        user="root",
        key="/root/.ssh/id_ed25519",
        fingerprint=SHA256,
        host_key_type="ssh-ed25519",
        agent_public_key=keys.generate().public.decode(),
        control="tcp://198.18.5.2:7311",
        state_dir="/var/lib/hamgr",
        python="python3",
        version="0.1.0",
        added="2025-01-01T00:00:00Z",
    )
    return attrs.evolve(base, **changes)


# --- fingerprints ------------------------------------------------------------------------------


def test_fingerprint_matches_ssh_keygen() -> None:
    assert hosts.fingerprint(base64.b64decode(PUBLIC)) == SHA256


def test_fingerprint_of_a_paramiko_key() -> None:
    key = paramiko.PKey.from_type_string("ssh-ed25519", base64.b64decode(PUBLIC))
    assert hosts.fingerprint(key.asbytes()) == SHA256 == key.fingerprint


@pytest.mark.parametrize(
    "typed",
    [
        SHA256,
        f"  {SHA256}\n",
        SHA256 + "=",  # padded, as some tools print it
        "sha256:" + SHA256.removeprefix("SHA256:"),
    ],
)
def test_parse_fingerprint_accepts_the_forms_people_paste(typed: str) -> None:
    assert hosts.parse_fingerprint(typed) == SHA256


@pytest.mark.parametrize(
    ("typed", "says"),
    [
        (MD5, "MD5 fingerprint"),
        ("rJCFEzdPId4BV+T/egM8Q/1ubxZ1Scb5k+KzVBbBAL0", "is not a host key fingerprint"),
        ("SHA1:abc", "only SHA256"),
        ("SHA256:", "43 base64 characters"),
        ("SHA256:rJCFEzdPId4BV+T/egM8Q", "43 base64 characters"),
        ("SHA256:rJCFEzdPId4BV+T/egM8Q/1ubxZ1Scb5k+KzVBbBAL0AAAA", "43 base64 characters"),
        ("SHA256:rJCFEzdPId4BV+T/egM8Q/1ubxZ1Scb5k+KzVBbB!L0", "43 base64 characters"),
    ],
)
def test_parse_fingerprint_refuses_with_the_fix(typed: str, says: str) -> None:
    with pytest.raises(hosts.HostsError) as info:
        hosts.parse_fingerprint(typed)
    assert says in info.value.message
    assert "ssh-keygen" in info.value.message
    assert info.value.status == 2
    assert info.value.code == "bad_fingerprint"


def test_policy_accepts_only_the_expected_key() -> None:
    key = paramiko.PKey.from_type_string("ssh-ed25519", base64.b64decode(PUBLIC))
    hosts._VerifyHostKey(SHA256).missing_host_key(None, "198.18.5.2", key)
    other = "SHA256:" + base64.b64encode(bytes(32)).decode().rstrip("=")
    for expected in (other, None):
        with pytest.raises(hosts._HostKeyRefusedError) as info:
            hosts._VerifyHostKey(expected).missing_host_key(None, "198.18.5.2", key)
        assert info.value.actual == SHA256
        assert info.value.key_type == "ssh-ed25519"


def test_host_key_errors_name_the_key_and_the_fix() -> None:
    target = hosts.SshTarget("198.18.5.2", 2222, fingerprint="SHA256:" + "A" * 43)
    err = hosts._host_key_error(target, "ssh-ed25519", SHA256)
    assert err.status == 1
    assert err.code == "host_key_mismatch"
    assert f"pass --fingerprint {SHA256}" in err.message
    assert "198.18.5.2:2222" in err.message
    unknown = hosts._host_key_error(
        attrs.evolve(target, fingerprint=None, known_hosts=Path("/k")),
        "ecdsa-sha2-nistp256",
        SHA256,
    )
    assert unknown.code == "host_key_unknown"
    assert "not in /k" in unknown.message
    assert "ssh_host_ecdsa_key.pub" in unknown.message


def test_ssh_target_formats_ipv6() -> None:
    assert hosts.SshTarget("198.18.5.2").where == "198.18.5.2:22"
    assert hosts.SshTarget("2001:db8::1", 2200).where == "[2001:db8::1]:2200"


# --- authorized_keys ---------------------------------------------------------------------------


def test_edit_authorized_keys_adds_keeps_and_removes() -> None:
    a, b, c = (keys.generate().public for _ in range(3))
    text = f"# hamgr: header\n{a.decode()} hostB agent\n\n{b.decode()} hostB cli"
    added = hosts.edit_authorized_keys(text, add={c: "ctl cli", a: "renamed"})
    assert added == f"# hamgr: header\n{a.decode()} hostB agent\n\n{b.decode()} hostB cli\n" + (
        f"{c.decode()} ctl cli\n"
    )
    assert hosts.edit_authorized_keys(added, add={c: "ctl cli"}) == added
    removed = hosts.edit_authorized_keys(added, remove=[c, b])
    assert removed == f"# hamgr: header\n{a.decode()} hostB agent\n\n"


def test_edit_authorized_keys_starts_an_empty_file_with_its_header(tmp_path: Path) -> None:
    key = keys.generate().public
    text = hosts.edit_authorized_keys("", add={key: "ctl agent"})
    path = tmp_path / "authorized_keys"
    path.write_text(text)
    assert keys.AuthorizedKeys(path).load() == {key: "ctl agent"}
    assert text.startswith("# hamgr")


def test_edit_authorized_keys_refuses_a_bad_key() -> None:
    with pytest.raises(keys.KeysError):
        hosts.edit_authorized_keys("", add={b"short": "x"})


def test_remote_result_reads_the_last_json_line_and_the_reason() -> None:
    ok = hosts.RemoteResult(0, 'progress\n{"ok": true, "pid": 7}\n', "")
    assert ok.last_json() == {"ok": True, "pid": 7}
    bad = hosts.RemoteResult(2, "", "Usage: ...\nError: no such option\n")
    assert bad.last_json() is None
    assert bad.why() == "Usage: ... / Error: no such option"
    assert hosts.RemoteResult(1, "", "").why() == "exit status 1"
    assert hosts.RemoteResult(0, "[1]", "").last_json() is None


# --- inventory ---------------------------------------------------------------------------------


def test_inventory_round_trip(tmp_path: Path) -> None:
    inventory = Inventory(tmp_path)
    assert inventory.load() == {}
    b = _record()
    c = _record(name="hostC", address="198.18.5.3", port=2222, control="tcp://198.18.5.3:7311")
    inventory.put(c)
    inventory.put(b)
    assert inventory.load() == {"hostB": b, "hostC": c}
    assert inventory.get("hostB") == b
    text = inventory.path.read_text()
    assert text.index("[hosts.hostB]") < text.index("[hosts.hostC]")
    assert tomllib.loads(text)["hosts"]["hostC"]["port"] == 2222
    moved = attrs.evolve(b, address="198.18.5.9")
    inventory.put(moved)
    assert inventory.get("hostB") == moved
    assert inventory.remove("hostB") == moved
    assert inventory.remove("hostB") is None
    assert inventory.load() == {"hostC": c}
    assert not list(tmp_path.glob(".hosts.toml.*.tmp"))


def test_inventory_put_check_can_refuse(tmp_path: Path) -> None:
    inventory = Inventory(tmp_path)
    inventory.put(_record())

    def refuse(records: Any) -> None:
        assert set(records) == {"hostB"}
        raise InventoryError("no")

    with pytest.raises(InventoryError):
        inventory.put(_record(name="hostC"), check=refuse)
    assert set(inventory.load()) == {"hostB"}


def test_inventory_escapes_strings() -> None:
    odd = _record(key='/keys/a "quoted" \\ path\tx', state_dir="/srv/h\u00e9mgr")
    assert parse(render({"hostB": odd})) == {"hostB": odd}


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("hosts = 3\n", "hosts must be a table"),
        ("other = 1\n", "unknown key other"),
        ("[hosts\n", "not valid TOML"),
        ('[hosts."bad name"]\n', "is not a host name"),
    ],
)
def test_inventory_refuses_a_broken_file(text: str, says: str) -> None:
    with pytest.raises(InventoryError, match=says):
        parse(text, "hosts.toml")


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("fingerprint", MD5, "hosts.hostB.fingerprint"),
        ("port", 0, "hosts.hostB.port"),
        ("port", "22", "hosts.hostB.port"),
        ("address", "host.example", "hosts.hostB.address"),
        ("agent_public_key", "nope", "hosts.hostB.agent_public_key"),
        ("control", "ipc:///x", "hosts.hostB.control"),
        ("user", "a b", "hosts.hostB.user"),
    ],
)
def test_inventory_names_the_bad_field(field: str, value: object, says: str) -> None:
    entry = _record().to_json()
    del entry["name"]
    entry[field] = value
    text = (
        render({})
        + "[hosts.hostB]\n"
        + "".join(f"{k} = {json.dumps(v)}\n" for k, v in entry.items())
    )
    with pytest.raises(InventoryError, match=says.replace(".", r"\.")):
        parse(text, "hosts.toml")


def test_inventory_names_unknown_and_missing_fields() -> None:
    entry = _record().to_json()
    del entry["name"]
    lines = "".join(f"{k} = {json.dumps(v)}\n" for k, v in entry.items())
    with pytest.raises(InventoryError, match=r"hosts\.hostB\.colour: unknown key"):
        parse(f'[hosts.hostB]\n{lines}colour = "red"\n')
    without = "".join(line + "\n" for line in lines.splitlines() if not line.startswith("user"))
    with pytest.raises(InventoryError, match=r"hosts\.hostB\.user: is required"):
        parse(f"[hosts.hostB]\n{without}")


# --- the CLI's usage errors (no network) -------------------------------------------------------


def _run(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args))


def _last(output: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(output.strip().splitlines()[-1])
    return data


def test_cli_refuses_both_known_hosts_and_fingerprint(tmp_path: Path) -> None:
    result = _run(
        "hosts", "add", "hostB", "--address", "198.18.5.2", "--known-hosts", "/dev/null",
        "--fingerprint", SHA256, "--state-dir", str(tmp_path), "--json",
    )  # fmt: skip
    assert result.exit_code == 2
    assert _last(result.stdout)["error"] == "give --known-hosts or --fingerprint, not both"


def test_cli_refuses_a_bad_address_or_fingerprint(tmp_path: Path) -> None:
    result = _run("hosts", "add", "hostB", "--address", "nowhere", "--state-dir", str(tmp_path))
    assert result.exit_code == 2
    result = _run(
        "hosts", "add", "hostB", "--address", "198.18.5.2", "--fingerprint", MD5,
        "--state-dir", str(tmp_path), "--json",
    )  # fmt: skip
    assert result.exit_code == 2
    assert _last(result.stdout)["code"] == "bad_fingerprint"


def test_cli_add_needs_an_initialised_state_dir(tmp_path: Path) -> None:
    key = tmp_path / "id"
    key.write_text("not used: the state dir is checked first")
    result = _run(
        "hosts", "add", "hostB", "--address", "198.18.5.2", "--key", str(key),
        "--fingerprint", SHA256, "--state-dir", str(tmp_path / "none"), "--json",
    )  # fmt: skip
    assert result.exit_code == 2
    out = _last(result.stdout)
    assert out["code"] == "not_initialised"
    assert "hamgr --state-dir" in out["error"]


def test_cli_list_and_remove_on_an_empty_inventory(tmp_path: Path) -> None:
    result = _run("hosts", "list", "--state-dir", str(tmp_path), "--json")
    assert result.exit_code == 0
    assert _last(result.stdout) == {"ok": True, "hosts": []}
    result = _run("hosts", "remove", "hostB", "--state-dir", str(tmp_path), "--json")
    assert result.exit_code == 1
    assert _last(result.stdout)["code"] == "no_such_host"
    result = _run("hosts", "remove", "hostB", "--teardown", "--state-dir", str(tmp_path))
    assert result.exit_code == 2


def test_cli_list_shows_an_unreachable_host(tmp_path: Path) -> None:
    assert _run("init", "--host", "ctl", "--state-dir", str(tmp_path)).exit_code == 0
    # Nothing listens on this endpoint: the ping times out, the row says so.
    record = _record(control="tcp://127.0.0.1:9")
    Inventory(tmp_path).put(record)
    result = _run("hosts", "list", "--timeout", "0.3", "--state-dir", str(tmp_path), "--json")
    assert result.exit_code == 0
    (row,) = _last(result.stdout)["hosts"]
    assert row["name"] == "hostB"
    assert row["reachable"] is False
    assert row["error"]
