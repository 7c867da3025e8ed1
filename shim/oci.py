"""OCI bundles for hamgr containers: unpack an image, write a runc ``config.json``.

The config starts from ``runc spec`` (so it tracks whatever defaults the installed runc ships)
and is then edited for what checkpointing needs:

- the container *joins* the hamgr-owned netns ``/run/netns/NAME`` instead of creating one, so CRIU
  sees it as external and a restore can join a netns the standby prepared;
- no terminal; the container's stdio is whatever the caller hands runc (hamgr hands /dev/null,
  because a file the NF keeps writing breaks a restore from a ``--leave-running`` dump);
- the cgroup lives under a hamgr-owned parent, so the freezer file is at a known place;
- no cgroupfs mount inside: NFs never read it, and on a cgroup-v1 host runc would turn it into a
  set of bind mounts that every dump and restore must map;
- the ``org.criu.config`` annotation points runc's CRIU calls at hamgr's CRIU options file.

`generate_config` is pure; everything that touches the disk is in the functions after it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs

from shim.devmounts import DevMountError, detach_mounts_under

NETNS_DIR = "/run/netns"
DEFAULT_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CRIU_CONFIG_ANNOTATION = "org.criu.config"
TOOL_TIMEOUT_S = 60.0
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_CAP = re.compile(r"^CAP_[A-Z_]+$")
_CAP_SETS = ("bounding", "effective", "permitted", "ambient")


class OciError(Exception):
    """A bundle could not be prepared; the message names the cause and the fix."""


def _valid_name(_inst: object, attr: attrs.Attribute[str], value: str) -> None:
    if not _NAME.match(value):
        raise ValueError(
            f"{attr.name}={value!r}: use 1-64 characters from [A-Za-z0-9_.-], "
            "starting with a letter or digit"
        )


_StrTuple = tuple[str, ...]


def _str_tuple(value: Iterable[str]) -> _StrTuple:
    if isinstance(value, str):
        raise TypeError(f"expected a sequence of strings, got the string {value!r}")
    return tuple(value)


def _valid_args(_inst: object, _attr: attrs.Attribute[_StrTuple], value: _StrTuple) -> None:
    if not value:
        raise ValueError("args must name the program to run")


def _valid_env(_inst: object, _attr: attrs.Attribute[_StrTuple], value: _StrTuple) -> None:
    for item in value:
        if "=" not in item or item.startswith("="):
            raise ValueError(f"env entry {item!r} must look like KEY=VALUE")


def _valid_caps(_inst: object, _attr: attrs.Attribute[_StrTuple], value: _StrTuple) -> None:
    for cap in value:
        if not _CAP.match(cap):
            raise ValueError(f"capability {cap!r} must be spelled like CAP_NET_ADMIN")


def _valid_cgroup_parent(_inst: object, _attr: attrs.Attribute[str], value: str) -> None:
    if not value.startswith("/") or ".." in value.split("/"):
        raise ValueError(f"cgroup_parent {value!r} must be an absolute path without '..'")


@attrs.frozen
class ContainerSpec:
    """What to run: the container part of a unit spec.

    ``image`` is an OCI archive (a tar of an OCI layout; ``image_ref`` picks the tag, or the
    only one) or a rootfs directory, which is used in place and read-only.
    """

    name: str = attrs.field(validator=_valid_name)
    image: Path = attrs.field(converter=Path)
    args: tuple[str, ...] = attrs.field(converter=_str_tuple, validator=_valid_args)
    netns: str = attrs.field(validator=_valid_name)
    env: tuple[str, ...] = attrs.field(default=(), converter=_str_tuple, validator=_valid_env)
    image_ref: str | None = None
    cwd: str = "/"
    capabilities: tuple[str, ...] = attrs.field(
        default=(), converter=_str_tuple, validator=_valid_caps
    )
    cgroup_parent: str = attrs.field(default="/hamgr", validator=_valid_cgroup_parent)
    readonly_rootfs: bool = True
    memory_limit_bytes: int | None = None

    @property
    def cgroups_path(self) -> str:
        return f"{self.cgroup_parent.rstrip('/')}/{self.name}"

    @property
    def netns_path(self) -> str:
        return f"{NETNS_DIR}/{self.netns}"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "image": str(self.image),
            "args": list(self.args),
            "netns": self.netns,
            "env": list(self.env),
            "image_ref": self.image_ref,
            "cwd": self.cwd,
            "capabilities": list(self.capabilities),
            "cgroup_parent": self.cgroup_parent,
            "readonly_rootfs": self.readonly_rootfs,
            "memory_limit_bytes": self.memory_limit_bytes,
        }

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> ContainerSpec:
        return ContainerSpec(
            name=data["name"],
            image=Path(data["image"]),
            args=tuple(data["args"]),
            netns=data["netns"],
            env=tuple(data.get("env", ())),
            image_ref=data.get("image_ref"),
            cwd=data.get("cwd", "/"),
            capabilities=tuple(data.get("capabilities", ())),
            cgroup_parent=data.get("cgroup_parent", "/hamgr"),
            readonly_rootfs=data.get("readonly_rootfs", True),
            memory_limit_bytes=data.get("memory_limit_bytes"),
        )


def _merge_env(base: list[str], extra: tuple[str, ...]) -> list[str]:
    merged: dict[str, str] = {}
    for item in [*base, *extra]:
        key, _, value = item.partition("=")
        merged[key] = value
    merged.pop("TERM", None)  # no terminal, so no TERM
    if "PATH" not in merged:
        merged["PATH"] = DEFAULT_PATH_ENV.partition("=")[2]
    return [f"{k}={v}" for k, v in merged.items()]


def generate_config(
    base: Mapping[str, Any],
    spec: ContainerSpec,
    *,
    rootfs: Path,
    criu_config: Path | None = None,
) -> dict[str, Any]:
    """Edit a ``runc spec`` config for `spec`. Pure: `base` is not modified."""
    config: dict[str, Any] = copy.deepcopy(dict(base))

    process = config.setdefault("process", {})
    process["terminal"] = False
    process.pop("consoleSize", None)
    process["args"] = list(spec.args)
    process["env"] = _merge_env(list(process.get("env", [])), spec.env)
    process["cwd"] = spec.cwd
    process["noNewPrivileges"] = True
    caps = process.setdefault("capabilities", {})
    for cap_set in _CAP_SETS:
        current = list(caps.get(cap_set, []))
        current += [c for c in spec.capabilities if c not in current]
        caps[cap_set] = current

    config["root"] = {"path": str(rootfs), "readonly": spec.readonly_rootfs}
    config["hostname"] = spec.name
    config["mounts"] = [m for m in config.get("mounts", []) if m.get("type") != "cgroup"]

    linux = config.setdefault("linux", {})
    namespaces = [ns for ns in linux.get("namespaces", []) if ns.get("type") != "network"]
    present = {ns.get("type") for ns in namespaces}
    for ns_type in ("pid", "ipc", "uts", "mount"):
        if ns_type not in present:
            namespaces.append({"type": ns_type})
    namespaces.append({"type": "network", "path": spec.netns_path})
    linux["namespaces"] = namespaces
    linux["cgroupsPath"] = spec.cgroups_path
    if spec.memory_limit_bytes is not None:
        resources = linux.setdefault("resources", {})
        resources["memory"] = {"limit": spec.memory_limit_bytes}

    annotations = dict(config.get("annotations", {}))
    if criu_config is not None:
        annotations[CRIU_CONFIG_ANNOTATION] = str(criu_config)
    if annotations:
        config["annotations"] = annotations
    return config


def _run(cmd: list[str], *, cwd: Path | None = None, what: str, fix: str) -> str:
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False
        )
    except FileNotFoundError as exc:
        raise OciError(f"{what}: `{cmd[0]}` not found; {fix}") from exc
    except subprocess.TimeoutExpired as exc:
        raise OciError(f"{what}: `{' '.join(cmd)}` took over {TOOL_TIMEOUT_S:.0f}s") from exc
    if proc.returncode != 0:
        raise OciError(f"{what}: `{' '.join(cmd)}` failed: {proc.stderr.strip()}; {fix}")
    return proc.stdout


def runc_spec_base(runc: str = "runc") -> dict[str, Any]:
    """The default config of the installed runc, the starting point `generate_config` edits."""
    with tempfile.TemporaryDirectory(prefix="hamgr-spec-") as tmp:
        _run(
            [runc, "spec", "--bundle", tmp],
            what="runc spec",
            fix="install runc (apt-get install runc)",
        )
        with open(Path(tmp) / "config.json") as f:
            base: dict[str, Any] = json.load(f)
            return base


def archive_refs(layout: Path) -> list[str]:
    """The tags an unpacked OCI layout's index names."""
    try:
        index = json.loads((layout / "index.json").read_text())
    except (OSError, ValueError) as exc:
        raise OciError(f"{layout}: not an OCI layout (index.json unreadable: {exc})") from exc
    refs = []
    for manifest in index.get("manifests", []):
        ref = manifest.get("annotations", {}).get(REF_NAME_ANNOTATION)
        if ref:
            refs.append(ref)
    return refs


def _pick_ref(layout: Path, wanted: str | None, image: Path) -> str:
    refs = archive_refs(layout)
    if wanted is not None:
        if wanted not in refs:
            raise OciError(f"{image}: has no tag {wanted!r} (tags: {refs})")
        return wanted
    if len(refs) != 1:
        raise OciError(f"{image}: holds tags {refs}; set image_ref to choose one")
    return refs[0]


def unpack_image(image: Path, ref: str | None, rootfs: Path) -> None:
    """Unpack an OCI archive's layers into `rootfs` (which must not exist yet)."""
    with tempfile.TemporaryDirectory(prefix="hamgr-layout-") as tmp:
        layout = Path(tmp) / "layout"
        try:
            with tarfile.open(image) as tar:
                tar.extractall(layout, filter="data")
        except (OSError, tarfile.TarError) as exc:
            raise OciError(f"{image}: cannot read OCI archive ({exc})") from exc
        chosen = _pick_ref(layout, ref, image)
        _run(
            ["umoci", "raw", "unpack", "--image", f"{layout}:{chosen}", str(rootfs)],
            what=f"unpacking {image}",
            fix="install umoci (apt-get install umoci)",
        )


@attrs.frozen
class Bundle:
    """A runc bundle on disk. ``owns_rootfs`` is False when the rootfs is the caller's dir."""

    path: Path
    rootfs: Path
    owns_rootfs: bool

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"


def prepare_bundle(
    spec: ContainerSpec,
    bundle_dir: Path,
    *,
    base: Mapping[str, Any],
    criu_config: Path | None = None,
) -> Bundle:
    """Create `bundle_dir` with a rootfs and config.json for `spec`.

    On failure nothing is left behind.
    """
    if bundle_dir.exists():
        raise OciError(
            f"bundle {bundle_dir} already exists; remove it (remove_bundle) or pick another name"
        )
    if not spec.image.exists():
        raise OciError(f"image {spec.image} does not exist; build it (hamgr.nfs.images)")
    bundle_dir.mkdir(parents=True, mode=0o700)
    try:
        if spec.image.is_dir():
            rootfs, owns = spec.image.resolve(), False
        else:
            rootfs, owns = bundle_dir / "rootfs", True
            unpack_image(spec.image, spec.image_ref, rootfs)
        config = generate_config(base, spec, rootfs=rootfs, criu_config=criu_config)
        bundle = Bundle(path=bundle_dir, rootfs=rootfs, owns_rootfs=owns)
        tmp = bundle.config_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(config, indent=1))
        os.replace(tmp, bundle.config_path)
        return bundle
    except BaseException:
        shutil.rmtree(bundle_dir, ignore_errors=True)
        raise


def remove_bundle(bundle: Bundle | Path) -> None:
    """Remove a bundle directory; a rootfs the caller provided is left alone. Idempotent.

    Mounts inside it (the tmpfs mounts a restore makes for /dev and /dev/shm) are detached
    first, so their contents go with the mount rather than being deleted file by file.
    """
    path = bundle.path if isinstance(bundle, Bundle) else bundle
    if path.exists():
        # Best effort, like the rmtree: only root makes these mounts, and only root gets here.
        with contextlib.suppress(DevMountError):
            detach_mounts_under(path)
    shutil.rmtree(path, ignore_errors=True)
