"""The unit spec parser: good specs round-trip, bad ones name the field and the line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from hamgr import unitspec
from hamgr.unitspec import SpecError, UnitSpec, key_lines, loads

GOOD = textwrap.dedent(
    """\
    name = "seq0"

    [nf]
    image = "sequencer"
    args = ["/usr/local/bin/sequencer", "--listen", "7000", "--dest", "198.18.0.1:9000"]
    env = ["SEQ_MEM_MB=4"]
    address = "198.18.0.2/24"
    mac = "02:00:c6:12:00:02"

    [nf.neighbors]
    "198.18.0.1" = "02:00:c6:12:00:03"

    [ports]
    wire = ["hbdw"]
    egress = "hbds"

    [standby]
    host = "auto"

    [epoch]
    policy = "fixed"
    length_ms = 50

    [protection]
    max_inflight = 4
    memory_budget_mb = 64
    lossless = false
    on_standby_loss = "stall"
    """
)

MINIMAL = textwrap.dedent(
    """\
    name = "u1"
    [nf]
    image = "sequencer"
    args = ["/usr/local/bin/sequencer"]
    address = "198.18.0.2/24"
    mac = "02:00:c6:12:00:02"
    [ports]
    wire = ["w0"]
    egress = "e0"
    """
)


def _errors(text: str) -> list[str]:
    with pytest.raises(SpecError) as info:
        loads(text, source="spec.toml")
    return str(info.value).splitlines()


def test_good_spec_parses_with_every_field() -> None:
    spec = loads(GOOD, source="spec.toml")
    assert spec.name == "seq0"
    assert spec.nf.builtin
    assert spec.nf.args[0] == "/usr/local/bin/sequencer"
    assert spec.nf.env == ("SEQ_MEM_MB=4",)
    assert dict(spec.nf.neighbors) == {"198.18.0.1": "02:00:c6:12:00:03"}
    assert spec.ports.wire == ("hbdw",)
    assert spec.ports.egress == "hbds"
    assert spec.standby.host == "auto"
    assert spec.epoch.policy == "fixed"
    assert spec.epoch.length_ms == 50
    assert spec.protection.max_inflight == 4
    assert spec.protection.memory_budget_bytes == 64 << 20
    assert spec.protection.lossless is False
    assert spec.protection.on_standby_loss == "stall"


def test_defaults_fill_the_optional_tables() -> None:
    spec = loads(MINIMAL)
    assert spec.standby.host == "auto"
    assert spec.epoch.policy == "fixed"
    assert spec.epoch.length_ms_or_default == 50
    assert spec.protection.max_inflight == 4
    assert spec.protection.on_standby_loss == "stall"


def test_json_round_trip_is_exact() -> None:
    spec = loads(GOOD)
    assert UnitSpec.from_json(spec.to_json()) == spec
    adaptive = loads(
        MINIMAL + '[epoch]\npolicy = "adaptive"\ntarget_added_latency_ms = 20\nmax_ms = 90\n'
    )
    assert UnitSpec.from_json(adaptive.to_json()) == adaptive
    assert adaptive.epoch.min_ms_or_default == 5


def test_the_documented_example_message() -> None:
    text = MINIMAL.replace("[ports]", '[epoch]\nlength_ms = "fast"\n[ports]')
    assert _errors(text) == ['spec.toml:8: epoch.length_ms: must be a positive integer, got "fast"']


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        # name
        ('name = "u1"', 'name = "has space"', "spec.toml:1: name: must be 1-24 characters"),
        ('name = "u1"', 'name = "' + "x" * 25 + '"', "spec.toml:1: name: must be 1-24"),
        ('name = "u1"', "name = 7", "spec.toml:1: name: must be 1-24 characters"),
        ('name = "u1"', "", "spec.toml: name: is required"),
        # nf
        ('image = "sequencer"', 'image = ""', "spec.toml:3: nf.image: must be a non-empty string"),
        ('image = "sequencer"', "", "spec.toml:2: nf.image: is required in [nf]"),
        (
            'args = ["/usr/local/bin/sequencer"]',
            'args = "/usr/local/bin/sequencer"',
            "spec.toml:4: nf.args: must be an array of strings",
        ),
        ('args = ["/usr/local/bin/sequencer"]', "args = []", "spec.toml:4: nf.args: must name"),
        (
            'args = ["/usr/local/bin/sequencer"]',
            'args = ["/bin/nf", 3]',
            'spec.toml:4: nf.args: must be an array of strings, got ["/bin/nf", 3]',
        ),
        (
            'address = "198.18.0.2/24"',
            'address = "198.18.0.2"',
            "spec.toml:5: nf.address: must be an IPv4 address with its prefix",
        ),
        (
            'address = "198.18.0.2/24"',
            'address = "198.18.0.300/24"',
            "spec.toml:5: nf.address:",
        ),
        (
            'address = "198.18.0.2/24"',
            'address = "198.18.0.0/24"',
            "spec.toml:5: nf.address: is the network or broadcast address",
        ),
        ('mac = "02:00:c6:12:00:02"', 'mac = "02:00:c6:12:00"', "spec.toml:6: nf.mac: must be"),
        ('mac = "02:00:c6:12:00:02"', 'mac = "01:00:5e:00:00:01"', "nf.mac: must be a unicast"),
        (
            'mac = "02:00:c6:12:00:02"',
            'mac = "02:00:c6:12:00:02"\nenv = ["NOEQUALS"]',
            'spec.toml:7: nf.env: entry "NOEQUALS" must look like KEY=VALUE',
        ),
        (
            'mac = "02:00:c6:12:00:02"',
            'mac = "02:00:c6:12:00:02"\nneighbors = { "198.18.0.x" = "02:00:00:00:00:01" }',
            'spec.toml:7: nf.neighbors: key "198.18.0.x" is not an IPv4 address',
        ),
        (
            'mac = "02:00:c6:12:00:02"',
            'mac = "02:00:c6:12:00:02"\nimage_ref = "latest"',
            'spec.toml:7: nf.image_ref: applies to OCI archives, not the built-in "sequencer"',
        ),
        (
            'mac = "02:00:c6:12:00:02"',
            'mac = "02:00:c6:12:00:02"\nimgae = "x"',
            "spec.toml:7: nf.imgae: unknown key; did you mean 'image'?",
        ),
        # ports
        ('wire = ["w0"]', 'wire = "w0"', "spec.toml:8: ports.wire: must be an array of interface"),
        ('wire = ["w0"]', "wire = []", "spec.toml:8: ports.wire: must be an array of 1-4"),
        (
            'wire = ["w0"]',
            'wire = ["a", "b", "c", "d", "e"]',
            "spec.toml:8: ports.wire: must be an array of 1-4",
        ),
        ('wire = ["w0"]', 'wire = ["w0", "w0"]', "ports.wire: names an interface twice"),
        (
            'wire = ["w0"]',
            'wire = ["an-interface-name-too-long"]',
            "spec.toml:8: ports.wire: must be an interface name",
        ),
        ('egress = "e0"', 'egress = "w0"', 'spec.toml:9: ports.egress: "w0" is also a wire port'),
        ('egress = "e0"', "", "spec.toml:7: ports.egress: is required in [ports]"),
    ],
)
def test_bad_field(old: str, new: str, expected: str) -> None:
    assert old in MINIMAL
    errors = _errors(MINIMAL.replace(old, new, 1))
    assert any(expected in e for e in errors), errors


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ('[standby]\nhost = ""', 'spec.toml:11: standby.host: must be "auto" or a host name'),
        ('[standby]\nhost = "a_b"', "spec.toml:11: standby.host: must be"),
        ("[standby]\nhost = 3", "spec.toml:11: standby.host: must be"),
        (
            '[standby]\nhost = "hostB"\nspares = "hostC"',
            "spec.toml:12: standby.spares: must be an array of at most 8 host names",
        ),
        (
            '[standby]\nhost = "hostB"\nspares = ["h1","h2","h3","h4","h5","h6","h7","h8","h9"]',
            "spec.toml:12: standby.spares: must be an array of at most 8 host names",
        ),
        (
            '[standby]\nhost = "hostB"\nspares = ["host_C"]',
            'spec.toml:12: standby.spares: "host_C" is not a host name',
        ),
        (
            '[standby]\nhost = "hostB"\nspares = ["hostC", "hostC"]',
            "spec.toml:12: standby.spares: names a host twice",
        ),
        (
            '[standby]\nhost = "hostB"\nspares = ["hostB"]',
            'spec.toml:12: standby.spares: "hostB" is the standby; a spare is another host',
        ),
        (
            '[standby]\nspares = ["hostC"]',
            "spec.toml:11: standby.spares: spares need a remote standby: set host to a peer's",
        ),
        ('[epoch]\npolicy = "sometimes"', 'spec.toml:11: epoch.policy: must be "fixed" or'),
        ("[epoch]\nlength_ms = 0", "spec.toml:11: epoch.length_ms: must be a positive integer"),
        ("[epoch]\nlength_ms = -5", "spec.toml:11: epoch.length_ms: must be a positive integer"),
        ("[epoch]\nlength_ms = 2.5", "spec.toml:11: epoch.length_ms: must be a positive integer"),
        ("[epoch]\nlength_ms = true", "spec.toml:11: epoch.length_ms: must be a positive integer"),
        ("[epoch]\nlength_ms = 60001", "spec.toml:11: epoch.length_ms: must be at most 60000"),
        (
            "[epoch]\nlength_ms = 20\ntarget_added_latency_ms = 5",
            'spec.toml:12: epoch.target_added_latency_ms: applies only to policy = "adaptive"',
        ),
        (
            '[epoch]\npolicy = "adaptive"',
            'spec.toml:10: epoch.target_added_latency_ms: is required with policy = "adaptive"',
        ),
        (
            '[epoch]\npolicy = "adaptive"\ntarget_added_latency_ms = 5\nlength_ms = 10',
            'spec.toml:13: epoch.length_ms: applies only to policy = "fixed"',
        ),
        (
            '[epoch]\npolicy = "adaptive"\ntarget_added_latency_ms = 5\nmin_ms = 50\nmax_ms = 10',
            "spec.toml:13: epoch.min_ms: 50 is above max_ms 10",
        ),
        ("[protection]\nmax_inflight = 0", "spec.toml:11: protection.max_inflight: must be a"),
        ("[protection]\nmax_inflight = 65", "protection.max_inflight: must be at most 64"),
        ('[protection]\nmemory_budget_mb = "64M"', "protection.memory_budget_mb: must be a posit"),
        ('[protection]\nlossless = "yes"', 'protection.lossless: must be true or false, got "yes"'),
        (
            '[protection]\non_standby_loss = "panic"',
            'spec.toml:11: protection.on_standby_loss: must be "stall" or "run-unprotected"',
        ),
        (
            '[standby]\non_fenced = "restart"',
            'spec.toml:11: standby.on_fenced: must be "stop" or "standby", got "restart"',
        ),
        ("[protection]\nk = 4", "spec.toml:11: protection.k: unknown key"),
        ("[bogus]\nx = 1", "spec.toml:10: bogus: unknown key"),
    ],
)
def test_bad_optional_table(table: str, expected: str) -> None:
    errors = _errors(MINIMAL + table + "\n")
    assert any(expected in e for e in errors), errors


def test_spares_round_trip() -> None:
    spec = loads(MINIMAL + '[standby]\nhost = "hostB"\nspares = ["hostC", "hostD"]\n')
    assert spec.standby.spares == ("hostC", "hostD")
    assert UnitSpec.from_json(spec.to_json()) == spec
    assert loads(MINIMAL).standby.spares == ()


def test_on_fenced_defaults_to_stop_and_round_trips() -> None:
    assert loads(MINIMAL).standby.on_fenced == "stop"
    spec = loads(MINIMAL + '[standby]\nhost = "hostB"\non_fenced = "standby"\n')
    assert spec.standby.on_fenced == "standby"
    assert spec.to_json()["standby"]["on_fenced"] == "standby"
    assert UnitSpec.from_json(spec.to_json()) == spec


def test_a_section_that_is_not_a_table() -> None:
    errors = _errors('epoch = "fast"\n' + MINIMAL)
    assert errors == ['spec.toml:1: epoch: must be a table ([epoch]), got "fast"']


def test_every_problem_is_reported_in_line_order() -> None:
    text = MINIMAL.replace('mac = "02:00:c6:12:00:02"', 'mac = "zz"').replace(
        'egress = "e0"', "egress = 5"
    )
    text += '[epoch]\nlength_ms = "fast"\n[protection]\nlossless = 1\n'
    errors = _errors(text)
    assert [e.split(":")[1] for e in errors] == ["6", "9", "11", "13"]
    assert [e.split(": ")[1] for e in errors] == [
        "nf.mac",
        "ports.egress",
        "epoch.length_ms",
        "protection.lossless",
    ]


def test_missing_tables_are_named() -> None:
    errors = _errors('name = "u1"\n')
    assert "spec.toml: nf: the [nf] table is required" in errors
    assert "spec.toml: ports: the [ports] table is required" in errors


def test_syntax_error_carries_tomllibs_line() -> None:
    errors = _errors(MINIMAL.replace('egress = "e0"', "egress = "))
    assert len(errors) == 1
    assert errors[0].startswith("spec.toml:9: toml: not valid TOML: ")
    assert "(column" in errors[0]


def test_duplicate_key_is_a_syntax_error_with_its_line() -> None:
    errors = _errors(MINIMAL + "[epoch]\nlength_ms = 5\nlength_ms = 6\n")
    assert errors[0].startswith("spec.toml:12: toml:")


def test_dotted_keys_and_inline_tables_get_their_lines() -> None:
    text = MINIMAL + 'epoch.length_ms = "x"\n'
    # A dotted key after [ports] belongs to ports: ports.epoch is unknown.
    assert _errors(text)[0].startswith("spec.toml:10: ports.epoch: unknown key")
    text = 'name = "u1"\nepoch = { length_ms = "x" }\n' + MINIMAL.split("\n", 1)[1]
    assert _errors(text) == ['spec.toml:2: epoch.length_ms: must be a positive integer, got "x"']


def test_key_lines_skip_multiline_values() -> None:
    text = 'a = 1\nb = [\n  "c = 2",\n]\ns = """\nd = 3\n"""\n[t]\ne = 4\n'
    lines = key_lines(text)
    assert lines == {("a",): 1, ("b",): 2, ("s",): 5, ("t",): 8, ("t", "e"): 9}


def test_from_json_rejects_what_the_agent_must_not_trust() -> None:
    data = loads(MINIMAL).to_json()
    data["protection"] = {"max_inflight": "4"}
    with pytest.raises(SpecError) as info:
        UnitSpec.from_json(data, source="request")
    assert (
        str(info.value) == 'request: protection.max_inflight: must be a positive integer, got "4"'
    )
    with pytest.raises(SpecError):
        UnitSpec.from_json(["not", "a", "table"])


def test_image_paths_resolve_against_the_spec_file(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    spec_file = tmp_path / "unit.toml"
    spec_file.write_text(MINIMAL.replace('image = "sequencer"', 'image = "rootfs"'))
    spec = unitspec.load(spec_file)
    assert spec.nf.image == str(rootfs)
    assert not spec.nf.builtin
    spec_file.write_text(MINIMAL.replace('image = "sequencer"', 'image = "nope.tar"'))
    with pytest.raises(SpecError) as info:
        unitspec.load(spec_file)
    assert str(info.value).startswith(f'{spec_file}:3: nf.image: "nope.tar" is neither')


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        unitspec.load(tmp_path / "missing.toml")
    assert "file: cannot read" in str(info.value)


CHAIN = MINIMAL + textwrap.dedent(
    """\
    [[chain]]
    image = "sequencer"
    args = ["/usr/local/bin/sequencer", "--listen", "7001"]
    env = ["SEQ_DEST=198.18.0.1:9000"]
    """
)


def test_a_chain_lists_the_nfs_after_nf_in_order() -> None:
    assert loads(MINIMAL).chain == ()
    spec = loads(CHAIN + '[[chain]]\nimage = "tcpnf"\nargs = ["/usr/local/bin/tcpnf"]\n')
    assert [m.image for m in spec.chain] == ["sequencer", "tcpnf"]
    assert spec.chain[0].args[2] == "7001"
    assert spec.chain[0].env == ("SEQ_DEST=198.18.0.1:9000",)
    assert UnitSpec.from_json(spec.to_json()) == spec
    assert "chain" not in loads(MINIMAL).to_json()


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        # The second [[chain]] table (line 14) has no args; each table is named by its index.
        (
            '[[chain]]\nimage = "sequencer"\n',
            ["spec.toml:14: chain[1].args: is required in [chain[1]]"],
        ),
        (
            '[[chain]]\nimage = "sequencer"\nargs = []\nmem = 4\n',
            [
                "spec.toml:16: chain[1].args: must name the program to run first, e.g. "
                '["/usr/local/bin/nf"]',
                "spec.toml:17: chain[1].mem: unknown key; known: args, env, image, image_ref",
            ],
        ),
        (
            '[[chain]]\nimage = "sequencer"\nargs = ["a"]\n' * 2,
            [
                "spec.toml:17: chain[2]: a chain has at most 3 NFs ([nf] and 2 [[chain]] "
                "tables), got 4; protect the rest as another unit"
            ],
        ),
        (
            '[[chain]]\nimage = "sequencer"\nargs = ["a"]\nimage_ref = "v1"\n',
            [
                "spec.toml:17: chain[1].image_ref: applies to OCI archives, not the built-in "
                '"sequencer"'
            ],
        ),
    ],
)
def test_a_bad_chain_names_the_table_the_field_and_the_line(
    extra: str, expected: list[str]
) -> None:
    assert _errors(CHAIN + extra) == expected


def test_chain_must_be_tables() -> None:
    errors = _errors('chain = "sequencer"\n' + MINIMAL)
    assert errors == ["spec.toml:1: chain: must be [[chain]] tables, one per NF after [nf]"]


def test_chain_image_paths_resolve_against_the_spec_file(tmp_path: Path) -> None:
    (tmp_path / "fw").mkdir()
    spec_file = tmp_path / "unit.toml"
    spec_file.write_text(
        CHAIN.replace(
            'image = "sequencer"\nargs = ["/usr/local/bin/sequencer", "--listen"',
            'image = "fw"\nargs = ["/usr/local/bin/sequencer", "--listen"',
        )
    )
    spec = unitspec.load(spec_file)
    assert spec.chain[0].image == str(tmp_path / "fw")
    assert spec.nf.image == "sequencer"
    spec_file.write_text(CHAIN + '[[chain]]\nimage = "nope.tar"\nargs = ["a"]\n')
    with pytest.raises(SpecError) as info:
        unitspec.load(spec_file)
    assert str(info.value).startswith(f'{spec_file}:15: chain[1].image: "nope.tar" is neither')


def test_key_lines_number_the_tables_of_an_array() -> None:
    text = "[[chain]]\na = 1\n[[chain]]\nb = 2\n[ports]\nc = 3\n"
    assert key_lines(text) == {
        ("chain",): 1,
        ("chain", "0"): 1,
        ("chain", "0", "a"): 2,
        ("chain", "1"): 3,
        ("chain", "1", "b"): 4,
        ("ports",): 5,
        ("ports", "c"): 6,
    }
