"""OCI config generation and bundle preparation, without root or runc."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from shim.oci import (
    CRIU_CONFIG_ANNOTATION,
    ContainerSpec,
    OciError,
    _pick_ref,
    archive_refs,
    generate_config,
    prepare_bundle,
)

# What `runc spec` (1.1) prints, trimmed to the parts generate_config reads or must keep.
RUNC_SPEC: dict[str, Any] = {
    "ociVersion": "1.0.2-dev",
    "process": {
        "terminal": True,
        "user": {"uid": 0, "gid": 0},
        "args": ["sh"],
        "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
        "cwd": "/",
        "capabilities": {
            s: ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
            for s in ("bounding", "effective", "permitted", "ambient")
        },
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
        "noNewPrivileges": True,
    },
    "root": {"path": "rootfs", "readonly": True},
    "hostname": "runc",
    "mounts": [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["ro"]},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup"},
    ],
    "linux": {
        "resources": {"devices": [{"allow": False, "access": "rwm"}]},
        "namespaces": [
            {"type": "pid"},
            {"type": "network"},
            {"type": "ipc"},
            {"type": "uts"},
            {"type": "mount"},
        ],
        "maskedPaths": ["/proc/kcore"],
        "readonlyPaths": ["/proc/sys"],
    },
}


def _spec(**kw: Any) -> ContainerSpec:
    args: dict[str, Any] = {
        "name": "seq-1",
        "image": Path("/images/seq.tar"),
        "args": ("/usr/local/bin/sequencer", "--listen", "7000"),
        "netns": "hamgr-u1",
    }
    args.update(kw)
    return ContainerSpec(**args)


def _config(spec: ContainerSpec | None = None, **kw: Any) -> dict[str, Any]:
    return generate_config(RUNC_SPEC, spec or _spec(), rootfs=Path("/b/rootfs"), **kw)


def test_joins_the_hamgr_netns_by_path_and_keeps_the_other_namespaces() -> None:
    ns = _config()["linux"]["namespaces"]
    assert [n for n in ns if n["type"] == "network"] == [
        {"type": "network", "path": "/run/netns/hamgr-u1"}
    ]
    assert {n["type"] for n in ns} == {"pid", "network", "ipc", "uts", "mount"}
    assert all("path" not in n for n in ns if n["type"] != "network")


def test_adds_missing_private_namespaces() -> None:
    base = copy.deepcopy(RUNC_SPEC)
    base["linux"]["namespaces"] = [{"type": "network"}]
    ns = generate_config(base, _spec(), rootfs=Path("/r"))["linux"]["namespaces"]
    assert sorted(n["type"] for n in ns) == ["ipc", "mount", "network", "pid", "uts"]


def test_process_has_no_terminal_and_the_units_args_and_env() -> None:
    spec = _spec(env=("SEQ_DEST=198.18.0.1:9000", "PATH=/custom"))
    process = _config(spec)["process"]
    assert process["terminal"] is False
    assert process["args"] == list(spec.args)
    assert "SEQ_DEST=198.18.0.1:9000" in process["env"]
    assert "PATH=/custom" in process["env"]
    assert not any(e.startswith("TERM=") for e in process["env"])
    assert sum(e.startswith("PATH=") for e in process["env"]) == 1
    assert process["noNewPrivileges"] is True


def test_path_is_kept_when_the_base_has_none() -> None:
    base = copy.deepcopy(RUNC_SPEC)
    base["process"]["env"] = []
    env = generate_config(base, _spec(), rootfs=Path("/r"))["process"]["env"]
    assert any(e.startswith("PATH=/usr/local/sbin") for e in env)


def test_cgroup_under_the_hamgr_parent_and_no_cgroupfs_inside() -> None:
    config = _config(_spec(cgroup_parent="/hamgr/units"))
    assert config["linux"]["cgroupsPath"] == "/hamgr/units/seq-1"
    assert [m["destination"] for m in config["mounts"]] == ["/proc", "/dev", "/sys"]


def test_rootfs_and_hostname() -> None:
    config = _config()
    assert config["root"] == {"path": "/b/rootfs", "readonly": True}
    assert config["hostname"] == "seq-1"
    assert _config(_spec(readonly_rootfs=False))["root"]["readonly"] is False


def test_criu_config_annotation_only_when_given() -> None:
    assert "annotations" not in _config()
    config = _config(criu_config=Path("/run/hamgr/criu.conf"))
    assert config["annotations"] == {CRIU_CONFIG_ANNOTATION: "/run/hamgr/criu.conf"}


def test_capabilities_are_added_to_every_set_once() -> None:
    caps = _config(_spec(capabilities=("CAP_NET_RAW", "CAP_KILL")))["process"]["capabilities"]
    for cap_set in ("bounding", "effective", "permitted", "ambient"):
        assert caps[cap_set].count("CAP_NET_RAW") == 1
        assert caps[cap_set].count("CAP_KILL") == 1


def test_memory_limit() -> None:
    config = _config(_spec(memory_limit_bytes=128 << 20))
    assert config["linux"]["resources"]["memory"] == {"limit": 128 << 20}
    assert config["linux"]["resources"]["devices"] == RUNC_SPEC["linux"]["resources"]["devices"]


def test_base_is_not_modified_and_result_is_json() -> None:
    before = copy.deepcopy(RUNC_SPEC)
    config = _config(criu_config=Path("/x"))
    assert before == RUNC_SPEC
    assert json.loads(json.dumps(config)) == config
    assert config["linux"]["maskedPaths"] == ["/proc/kcore"]
    assert config["process"]["rlimits"] == RUNC_SPEC["process"]["rlimits"]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("name", "bad name", "name="),
        ("name", "x" * 65, "name="),
        ("netns", "../etc", "netns="),
        ("args", (), "program to run"),
        ("args", "sequencer", "sequence of strings"),
        ("env", ("NOEQUALS",), "KEY=VALUE"),
        ("capabilities", ("net_admin",), "CAP_NET_ADMIN"),
        ("cgroup_parent", "hamgr", "absolute"),
        ("cgroup_parent", "/hamgr/../x", "absolute"),
    ],
)
def test_spec_rejects_bad_input(field: str, value: Any, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        _spec(**{field: value})


def test_spec_json_round_trip() -> None:
    spec = _spec(env=("A=1",), capabilities=("CAP_NET_RAW",), memory_limit_bytes=1 << 20)
    assert ContainerSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec


def _layout(tmp_path: Path, refs: list[str]) -> Path:
    manifests = [
        {"digest": f"sha256:{i}", "annotations": {"org.opencontainers.image.ref.name": r}}
        for i, r in enumerate(refs)
    ]
    (tmp_path / "index.json").write_text(json.dumps({"manifests": manifests}))
    return tmp_path


def test_archive_refs_and_picking_one(tmp_path: Path) -> None:
    layout = _layout(tmp_path, ["sequencer"])
    assert archive_refs(layout) == ["sequencer"]
    assert _pick_ref(layout, None, layout) == "sequencer"
    assert _pick_ref(layout, "sequencer", layout) == "sequencer"
    with pytest.raises(OciError, match="has no tag 'other'"):
        _pick_ref(layout, "other", layout)


def test_ambiguous_archive_needs_image_ref(tmp_path: Path) -> None:
    layout = _layout(tmp_path, ["a", "b"])
    with pytest.raises(OciError, match="set image_ref"):
        _pick_ref(layout, None, layout)


def test_not_a_layout(tmp_path: Path) -> None:
    with pytest.raises(OciError, match="not an OCI layout"):
        archive_refs(tmp_path)


def test_bundle_from_a_rootfs_dir_uses_it_in_place(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    bundle = prepare_bundle(_spec(image=rootfs), tmp_path / "b", base=RUNC_SPEC)
    assert bundle.rootfs == rootfs.resolve()
    assert not bundle.owns_rootfs
    config = json.loads(bundle.config_path.read_text())
    assert config["root"]["path"] == str(rootfs.resolve())
    assert not (tmp_path / "b" / "config.tmp").exists()


def test_bundle_failures_leave_nothing(tmp_path: Path) -> None:
    with pytest.raises(OciError, match="does not exist"):
        prepare_bundle(_spec(image=tmp_path / "missing.tar"), tmp_path / "b", base=RUNC_SPEC)
    assert not (tmp_path / "b").exists()

    not_an_archive = tmp_path / "junk.tar"
    not_an_archive.write_bytes(b"not a tar")
    with pytest.raises(OciError, match="cannot read OCI archive"):
        prepare_bundle(_spec(image=not_an_archive), tmp_path / "b", base=RUNC_SPEC)
    assert not (tmp_path / "b").exists()

    (tmp_path / "b").mkdir()
    with pytest.raises(OciError, match="already exists"):
        prepare_bundle(_spec(image=tmp_path), tmp_path / "b", base=RUNC_SPEC)
