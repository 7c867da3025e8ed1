"""The pure parts of the container backend: the CRIU command line and image metadata checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shim.container import (
    IMAGE_META,
    CheckpointImage,
    RestoreError,
    criu_dump_command,
)
from shim.oci import ContainerSpec

SPEC = ContainerSpec(name="seq", image=Path("/i.tar"), args=("/seq",), netns="n1")


def _cmd(**kw: object) -> list[str]:
    args: dict[str, object] = {
        "criu": "/opt/criu",
        "pid": 4242,
        "images": Path("/dev/shm/e1.partial"),
        "work": Path("/run/w"),
        "rootfs": Path("/b/rootfs"),
        "freezer": Path("/sys/fs/cgroup/freezer/hamgr/seq"),
        "netns_inode": 4026532000,
        "masked_files": ["/proc/kcore"],
        "network_lock": "nftables",
        "tcp_established": True,
        "file_locks": True,
    }
    args.update(kw)
    return criu_dump_command(**args)  # type: ignore[arg-type]


def _opt(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def test_dump_command_matches_what_runc_asks_for() -> None:
    cmd = _cmd()
    assert cmd[:2] == ["/opt/criu", "dump"]
    assert _opt(cmd, "--tree") == "4242"
    assert _opt(cmd, "--images-dir") == "/dev/shm/e1.partial"
    assert _opt(cmd, "--root") == "/b/rootfs"
    assert _opt(cmd, "--freeze-cgroup") == "/sys/fs/cgroup/freezer/hamgr/seq"
    # runc restore looks the netns up under this key, so the dump must use it.
    assert _opt(cmd, "--external") == "net[4026532000]:extRootNetNS"
    assert _opt(cmd, "--network-lock") == "nftables"
    assert _opt(cmd, "--ext-mount-map") == "/proc/kcore:/dev/null"
    for flag in ("--leave-running", "--tcp-established", "--file-locks", "--manage-cgroups=soft"):
        assert flag in cmd


def test_dump_command_optional_flags() -> None:
    cmd = _cmd(tcp_established=False, file_locks=False, masked_files=[], network_lock="skip")
    assert "--tcp-established" not in cmd
    assert "--file-locks" not in cmd
    assert "--ext-mount-map" not in cmd
    assert _opt(cmd, "--network-lock") == "skip"


def _image(tmp_path: Path, files: dict[str, bytes], meta: dict[str, object] | None) -> Path:
    d = tmp_path / "e3"
    d.mkdir()
    for name, data in files.items():
        (d / name).write_bytes(data)
    if meta is not None:
        (d / IMAGE_META).write_text(json.dumps(meta))
    return d


def _meta(files: dict[str, int]) -> dict[str, object]:
    return {
        "format": 1,
        "epoch": 3,
        "spec": SPEC.to_json(),
        "engine": "criu",
        "dump_seconds": 0.1,
        "files": files,
    }


def test_complete_image_loads(tmp_path: Path) -> None:
    d = _image(tmp_path, {"pages-1.img": b"x" * 10}, _meta({"pages-1.img": 10}))
    image = CheckpointImage.load(d)
    assert (image.epoch, image.spec, image.size_bytes) == (3, SPEC, 10)
    assert CheckpointImage.load(d).to_json() == _meta({"pages-1.img": 10})


def test_image_without_metadata_is_refused(tmp_path: Path) -> None:
    d = _image(tmp_path, {"pages-1.img": b"x"}, None)
    with pytest.raises(RestoreError, match="not a complete hamgr checkpoint"):
        CheckpointImage.load(d)


@pytest.mark.parametrize(
    ("files", "recorded", "message"),
    [
        ({"pages-1.img": b"x" * 5}, {"pages-1.img": 10}, "metadata says 10"),
        ({}, {"pages-1.img": 10}, "is missing"),
    ],
)
def test_image_with_wrong_files_is_refused(
    tmp_path: Path, files: dict[str, bytes], recorded: dict[str, int], message: str
) -> None:
    d = _image(tmp_path, files, _meta(recorded))
    with pytest.raises(RestoreError, match=message):
        CheckpointImage.load(d)


def test_image_of_another_format_is_refused(tmp_path: Path) -> None:
    d = _image(tmp_path, {}, {**_meta({}), "format": 99})
    with pytest.raises(RestoreError, match="format 99"):
        CheckpointImage.load(d)
