"""The hamgr this CLI runs, and every package it needs, as wheels built here without a network.

`hamgr hosts add --install` ships these wheels to a host and installs them there with
``pip --no-index``, so the host needs no package index and gets exactly the code and the
dependency versions that run here.

Each wheel is written from an installed distribution of this CLI's own environment:

- a regular install is packed again from the files its ``RECORD`` lists (the package files and
  its ``.dist-info``; the console scripts outside site-packages are left out, because pip makes
  them again from ``entry_points.txt``);
- an editable install (a checkout installed with ``pip install -e``) is packed from the source
  directories that its top-level packages are imported from, which is what this CLI runs. That
  takes in the data plane binary, ``dpdk_vhost/build/dpdk-vhost``, when it has been built; the
  wheel is then tagged for this machine's platform (``py3-none-linux_x86_64``), not ``any``.

``pip wheel --no-build-isolation`` would need setuptools' ``bdist_wheel`` (the ``wheel`` package,
which the venv does not have) and would drop the data plane binary, which is not package data.

The wheels are reproducible: entries are sorted, dated 1980-01-01, and get fixed modes, so the
same files give the same sha256 and `Wheelhouse.id` tells whether a host already has them.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import platform
import re
import stat
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import attrs

__all__ = [
    "INSTALLER",
    "PlatformFacts",
    "Wheel",
    "WheelError",
    "Wheelhouse",
    "build",
    "closure",
    "compatible",
    "normalize",
    "requirement_name",
    "wheel_filename",
]

INSTALLER: Final = "pip"  # shipped too: it installs the others on the host, from its wheel file
_EPOCH: Final = (1980, 1, 1, 0, 0, 0)
_NAME: Final = re.compile(r"^\s*([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)")
_EXTRA_MARKER: Final = re.compile(r"\bextra\s*==")
# Left out of a repacked .dist-info: pip writes these at install time (RECORD is made anew).
_INSTALL_TIME: Final = frozenset({"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"})
_SKIP_DIRS: Final = frozenset({"__pycache__"})
_SKIP_SUFFIXES: Final = (".pyc", ".pyo")
_MANYLINUX_ALIASES: Final = {
    "manylinux1": (2, 5),
    "manylinux2010": (2, 12),
    "manylinux2014": (2, 17),
}


class WheelError(Exception):
    """A wheel cannot be built here; the message names the package and the fix."""


def normalize(name: str) -> str:
    """A distribution name in PEP 503 normal form (``PyNaCl`` -> ``pynacl``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str | None:
    """The distribution a ``Requires-Dist`` line names, or None when only an extra wants it."""
    _spec, _sep, marker = requirement.partition(";")
    if _EXTRA_MARKER.search(marker):
        return None
    match = _NAME.match(requirement)
    return normalize(match.group(1)) if match else None


def closure(root: str, requires: Callable[[str], Sequence[str] | None]) -> list[str]:
    """`root` and every distribution it needs, transitively, in breadth-first order.

    `requires(name)` gives a distribution's ``Requires-Dist`` lines, or None when it is not
    installed here. A requirement that is not installed is left out: its environment marker
    excludes it here (``colorama; platform_system == "Windows"``), or pip on the host says it
    is missing, by name. Extras are never followed.
    """
    order = [normalize(root)]
    seen = set(order)
    for name in order:
        for line in requires(name) or ():
            dep = requirement_name(line)
            if dep is None or dep in seen:
                continue
            seen.add(dep)
            if requires(dep) is not None:
                order.append(dep)
    return order


def _escape(name: str) -> str:
    return re.sub(r"[^\w\d.]+", "_", name, flags=re.UNICODE)


def wheel_filename(name: str, version: str, tags: Sequence[str]) -> str:
    """PEP 427's file name; several tags are compressed (``py2.py3-none-any``) when they form
    a full product of interpreters, ABIs and platforms, otherwise the first tag is used."""
    if not tags:
        raise WheelError(f"{name} {version}: its WHEEL file has no Tag line")
    parts = [t.split("-") for t in tags]
    if any(len(p) != 3 for p in parts):
        raise WheelError(f"{name} {version}: malformed wheel tag in {list(tags)}")
    sets = [sorted({p[i] for p in parts}) for i in range(3)]
    product = {f"{i}-{a}-{p}" for i in sets[0] for a in sets[1] for p in sets[2]}
    tag = "-".join(".".join(s) for s in sets) if product == set(tags) else tags[0]
    return f"{_escape(name)}-{_escape(version)}-{tag}.whl"


def expand_tags(filename: str) -> list[str]:
    """The tags a wheel's file name stands for (``py2.py3-none-any`` -> two tags)."""
    stem = filename.removesuffix(".whl").split("-")
    if len(stem) < 5:
        raise WheelError(f"{filename} is not a wheel file name")
    interpreters, abis, platforms = (s.split(".") for s in stem[-3:])
    return [f"{i}-{a}-{p}" for i in interpreters for a in abis for p in platforms]


@attrs.frozen
class PlatformFacts:
    """What decides which wheels a host's Python accepts."""

    implementation: str  # sys.implementation.name: "cpython"
    python: tuple[int, int]
    machine: str  # platform.machine(): "x86_64"
    glibc: tuple[int, int] | None  # None: not glibc (musl), or unknown

    @staticmethod
    def local() -> PlatformFacts:
        import sys

        return PlatformFacts(
            implementation=sys.implementation.name,
            python=(sys.version_info[0], sys.version_info[1]),
            machine=platform.machine(),
            glibc=parse_glibc(os.confstr("CS_GNU_LIBC_VERSION") or ""),
        )

    def describe(self) -> str:
        libc = "glibc {}.{}".format(*self.glibc) if self.glibc else "no glibc"
        return f"{self.implementation} {self.python[0]}.{self.python[1]} on {self.machine}, {libc}"


def parse_glibc(text: str) -> tuple[int, int] | None:
    """``glibc 2.36`` (``os.confstr('CS_GNU_LIBC_VERSION')``) -> (2, 36)."""
    match = re.fullmatch(r"glibc (\d+)\.(\d+).*", text.strip())
    return (int(match[1]), int(match[2])) if match else None


def _interpreter_ok(interpreter: str, abi: str, facts: PlatformFacts) -> bool:
    major, minor = facts.python
    if interpreter in ("py3", f"py{major}") or interpreter == f"py{major}{minor}":
        return True
    if re.fullmatch(r"py3\d+", interpreter):
        return int(interpreter[3:]) <= minor and major == 3
    match = re.fullmatch(r"cp3(\d+)", interpreter)
    if match is None or facts.implementation != "cpython" or major != 3:
        return False
    wanted = int(match[1])
    # abi3 wheels work on every later CPython 3; any other ABI only on the one it was built for.
    return wanted <= minor if abi == "abi3" else wanted == minor


def _platform_ok(tag: str, facts: PlatformFacts) -> bool:
    if tag == "any":
        return True
    if tag == f"linux_{facts.machine}":
        return True
    match = re.fullmatch(r"manylinux_(\d+)_(\d+)_(.+)", tag)
    if match:
        needed, arch = (int(match[1]), int(match[2])), match[3]
    else:
        alias, _sep, arch = tag.partition("_")
        if alias not in _MANYLINUX_ALIASES:
            return False
        needed = _MANYLINUX_ALIASES[alias]
    return arch == facts.machine and facts.glibc is not None and facts.glibc >= needed


def compatible(tag: str, facts: PlatformFacts) -> bool:
    """Whether a Python with `facts` accepts a wheel tagged `tag` (``cp311-abi3-manylinux_...``).

    A subset of pip's rules, enough to name the wheels that will not fit before anything is
    uploaded; pip on the host has the last word.
    """
    parts = tag.split("-")
    if len(parts) != 3:
        return False
    interpreter, abi, plat = parts
    if abi not in ("none", "abi3") and not abi.startswith("cp"):
        return False
    return _interpreter_ok(interpreter, abi, facts) and _platform_ok(plat, facts)


@attrs.frozen
class Wheel:
    name: str  # normalized distribution name
    version: str
    path: Path
    sha256: str
    size: int

    @property
    def filename(self) -> str:
        return self.path.name

    @property
    def tags(self) -> list[str]:
        return expand_tags(self.filename)

    def fits(self, facts: PlatformFacts) -> bool:
        return any(compatible(t, facts) for t in self.tags)

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "file": self.filename,
                "sha256": self.sha256, "size": self.size}  # fmt: skip


@attrs.frozen
class Wheelhouse:
    """A directory of wheels: `root` (hamgr), everything it needs, and the installer (pip)."""

    directory: Path
    root: str
    wheels: tuple[Wheel, ...]

    def get(self, name: str) -> Wheel:
        for wheel in self.wheels:
            if wheel.name == normalize(name):
                return wheel
        raise KeyError(name)

    @property
    def root_wheel(self) -> Wheel:
        return self.get(self.root)

    @property
    def installer(self) -> Wheel:
        return self.get(INSTALLER)

    def manifest(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "version": self.root_wheel.version,
            "wheels": [w.as_json() for w in sorted(self.wheels, key=lambda w: w.filename)],
        }

    @property
    def id(self) -> str:
        """sha256 of the manifest: equal ids mean byte-identical wheels."""
        text = json.dumps(self.manifest(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def root_contains(self, name: str) -> bool:
        """Whether the root wheel has the file `name` (a path in the archive)."""
        with zipfile.ZipFile(self.root_wheel.path) as archive:
            return name in archive.namelist()

    def unfit(self, facts: PlatformFacts) -> list[Wheel]:
        return [w for w in self.wheels if not w.fits(facts)]


# --- writing wheels ----------------------------------------------------------------------------


def _record_hash(data: bytes) -> str:
    digest = hashlib.sha256(data).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).decode().rstrip("=")


def write_wheel(path: Path, files: Iterable[tuple[str, bytes, bool]], dist_info: str) -> None:
    """Write a wheel at `path` from ``(name in the archive, content, executable)`` entries.

    ``RECORD`` is made here. Entries are sorted, with the .dist-info last and RECORD at the very
    end, each dated 1980-01-01 with mode 0644 or 0755: the same files give the same bytes.
    """
    entries = sorted(files, key=lambda e: (e[0].startswith(dist_info + "/"), e[0]))
    record_name = f"{dist_info}/RECORD"
    rows: list[list[str]] = []
    tmp = path.with_name(path.name + ".part")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as archive:
        for name, data, executable in entries:
            if name == record_name:
                continue
            info = zipfile.ZipInfo(name, date_time=_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = (stat.S_IFREG | (0o755 if executable else 0o644)) << 16
            archive.writestr(info, data)
            rows.append([name, _record_hash(data), str(len(data))])
        rows.append([record_name, "", ""])
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows(rows)
        info = zipfile.ZipInfo(record_name, date_time=_EPOCH)
        info.compress_type = zipfile.ZIP_DEFLATED
        info.external_attr = (stat.S_IFREG | 0o644) << 16
        archive.writestr(info, out.getvalue())
    os.replace(tmp, path)


def _sha256_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def _is_elf(data: bytes) -> bool:
    return data[:4] == b"\x7fELF"


def _executable(path: Path) -> bool:
    return bool(path.stat().st_mode & 0o111)


def _dist_info_dir(dist: importlib.metadata.Distribution) -> str:
    # `_path` is the .dist-info directory of a PathDistribution: the only kind pip installs.
    path = getattr(dist, "_path", None)
    if not isinstance(path, Path) or not path.name.endswith(".dist-info"):
        name = dist.metadata["Name"]
        raise WheelError(
            f"{name} is not installed from a wheel here (no .dist-info directory), so it cannot "
            f"be shipped: reinstall it with pip (`pip install --force-reinstall {name}`)"
        )
    return path.name


def _editable_source(dist: importlib.metadata.Distribution) -> bool:
    text = dist.read_text("direct_url.json")
    if not text:
        return False
    try:
        data = json.loads(text)
    except ValueError:
        return False
    return bool(isinstance(data, dict) and data.get("dir_info", {}).get("editable"))


def _wheel_tags(dist: importlib.metadata.Distribution) -> list[str]:
    text = dist.read_text("WHEEL") or ""
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Tag:")]


def _repack(dist: importlib.metadata.Distribution, directory: Path) -> Path:
    """A wheel of an installed (non-editable) distribution, from the files its RECORD lists."""
    name, version = dist.metadata["Name"], dist.version
    info_dir = _dist_info_dir(dist)
    if dist.files is None:
        raise WheelError(
            f"{name} {version} has no RECORD, so its files are unknown: reinstall it with pip "
            f"(`pip install --force-reinstall {name}=={version}`)"
        )
    entries: list[tuple[str, bytes, bool]] = []
    for item in dist.files:
        rel = item.as_posix()
        parts = rel.split("/")
        if parts[0] == ".." or any(p in _SKIP_DIRS for p in parts) or rel.endswith(_SKIP_SUFFIXES):
            continue
        if parts[0] == info_dir and parts[-1] in _INSTALL_TIME and len(parts) == 2:
            continue
        path = Path(str(dist.locate_file(item)))
        try:
            data = path.read_bytes()
            executable = _executable(path)
        except OSError as exc:
            raise WheelError(
                f"{name} {version} is damaged here: {path}: {exc.strerror}; reinstall it "
                f"(`pip install --force-reinstall {name}=={version}`)"
            ) from None
        entries.append((rel, data, executable))
    target = directory / wheel_filename(
        info_dir.removesuffix(".dist-info").rsplit("-", 1)[0], version, _wheel_tags(dist)
    )
    write_wheel(target, entries, info_dir)
    return target


def _walk(top: Path, arc_top: str) -> Iterator[tuple[str, Path]]:
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        here = Path(dirpath)
        rel = here.relative_to(top).as_posix()
        prefix = arc_top if rel == "." else f"{arc_top}/{rel}"
        for filename in sorted(filenames):
            if filename.endswith(_SKIP_SUFFIXES) or filename.startswith("."):
                continue
            yield f"{prefix}/{filename}", here / filename


def _from_source(dist: importlib.metadata.Distribution, directory: Path) -> Path:
    """A wheel of an editable install: its top-level packages' source dirs, as imported here."""
    name, version = dist.metadata["Name"], dist.version
    info_dir = f"{_escape(name)}-{_escape(version)}.dist-info"
    tops = (dist.read_text("top_level.txt") or "").split()
    if not tops:
        raise WheelError(
            f"{name} {version} is an editable install without top_level.txt: reinstall it "
            "(`pip install -e .` in the checkout)"
        )
    entries: list[tuple[str, bytes, bool]] = []
    for top in tops:
        spec = importlib.util.find_spec(top)
        if spec is None or spec.origin is None:
            raise WheelError(f"{name}: its package {top} is not importable here")
        if spec.submodule_search_locations:
            source = Path(next(iter(spec.submodule_search_locations)))
            found = list(_walk(source, top))
        else:
            found = [(Path(spec.origin).name, Path(spec.origin))]
        for arc, path in found:
            entries.append((arc, path.read_bytes(), _executable(path)))
    binary = any(_is_elf(data) for _arc, data, _x in entries)
    tag = f"py3-none-linux_{platform.machine()}" if binary else "py3-none-any"
    for meta in ("METADATA", "entry_points.txt", "top_level.txt"):
        text = dist.read_text(meta)
        if text is not None:
            entries.append((f"{info_dir}/{meta}", text.encode(), False))
    wheel_meta = (
        "Wheel-Version: 1.0\nGenerator: hamgr.wheelhouse\n"
        f"Root-Is-Purelib: {'false' if binary else 'true'}\nTag: {tag}\n"
    )
    entries.append((f"{info_dir}/WHEEL", wheel_meta.encode(), False))
    target = directory / wheel_filename(name, version, [tag])
    write_wheel(target, entries, info_dir)
    return target


def _installed(name: str) -> importlib.metadata.Distribution | None:
    """The installed distribution `name`: the first with a .dist-info on sys.path.

    A checkout's own ``*.egg-info`` (setuptools leaves one there) comes first on sys.path when
    hamgr runs from the checkout; it is metadata only, so an installed .dist-info wins.
    """
    found = list(importlib.metadata.Distribution.discover(name=name))
    for dist in found:
        path = getattr(dist, "_path", None)
        if isinstance(path, Path) and path.name.endswith(".dist-info"):
            return dist
    return found[0] if found else None


def _requires(name: str) -> list[str] | None:
    dist = _installed(name)
    return None if dist is None else list(dist.requires or [])


def _distribution(name: str) -> importlib.metadata.Distribution:
    dist = _installed(name)
    if dist is None:
        raise WheelError(f"{name} is not installed in this environment")
    return dist


def build(
    directory: Path,
    root: str = "hamgr",
    *,
    requires: Callable[[str], Sequence[str] | None] = _requires,
    distribution: Callable[[str], importlib.metadata.Distribution] = _distribution,
) -> Wheelhouse:
    """Write the wheels of `root`, its runtime closure and the installer into `directory`."""
    if requires(root) is None:
        raise WheelError(
            f"{root} is not installed in this environment, so there is nothing to ship: run "
            f"hamgr from an environment where it is installed (`pip install -e .` in a checkout)"
        )
    names = closure(root, requires)
    if requires(INSTALLER) is None:
        raise WheelError(
            f"{INSTALLER} is not installed in this environment; hosts are installed with it: "
            "`python -m ensurepip` in this environment"
        )
    if INSTALLER not in names:
        names.append(INSTALLER)
    directory.mkdir(parents=True, exist_ok=True)
    wheels: list[Wheel] = []
    for name in names:
        dist = distribution(name)
        path = _from_source(dist, directory) if _editable_source(dist) else _repack(dist, directory)
        sha, size = _sha256_file(path)
        wheels.append(Wheel(normalize(name), dist.version, path, sha, size))
    return Wheelhouse(directory, normalize(root), tuple(wheels))
