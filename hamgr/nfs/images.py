"""Offline OCI images of the test and demo NFs.

Each image is a rootfs of busybox-static plus one NF, packed with umoci into an OCI layout and
written as an OCI archive with skopeo. Nothing is pulled from a registry. The C NFs are compiled
with ``gcc -static`` so the rootfs needs no libc; socat is Debian's own dynamically linked binary,
copied with the shared libraries ``ldd`` names, because Debian ships no static socat.

Results are cached by a hash of everything that goes into the rootfs, so a rebuilt image with
the same content reuses the archive and a changed source gets a new file name.

    python -m hamgr.nfs.images [--cache-dir DIR] [NAME ...]   # prints NAME PATH lines
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import attrs

DEFAULT_CACHE_DIR = Path(os.environ.get("HAMGR_IMAGE_CACHE", "/var/cache/hamgr/images"))
SRC_DIR = Path(__file__).resolve().parent / "src"
BUSYBOX = Path("/bin/busybox")
SOCAT = Path("/usr/bin/socat")
BUSYBOX_APPLETS = ("sh", "cat", "echo", "ls", "sleep", "ps", "kill")
TOOL_TIMEOUT_S = 120.0
# Bump when the rootfs layout or the archive format changes, so old cache entries are not reused.
BUILDER_VERSION = "1"

C_NFS = {"sequencer": "sequencer.c", "tcpnf": "tcpnf.c"}
NF_NAMES = (*C_NFS, "socat")


class ImageBuildError(Exception):
    """An image could not be built; the message names the missing tool or failing step."""


@attrs.frozen
class RootfsEntry:
    """One file of the rootfs to build: copied from `source`, or a symlink to `link`."""

    dest: str
    source: Path | None = None
    link: str | None = None
    mode: int = 0o755


def _run(cmd: Sequence[str], *, what: str, fix: str, cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(
            list(cmd),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=TOOL_TIMEOUT_S,
            check=False,
        )
    except FileNotFoundError as exc:
        raise ImageBuildError(f"{what}: `{cmd[0]}` not found; {fix}") from exc
    except subprocess.TimeoutExpired as exc:
        raise ImageBuildError(f"{what}: `{' '.join(cmd)}` took over {TOOL_TIMEOUT_S:.0f}s") from exc
    if proc.returncode != 0:
        raise ImageBuildError(
            f"{what}: `{' '.join(cmd)}` failed ({proc.returncode}): "
            f"{(proc.stderr or proc.stdout).strip()[-2000:]}; {fix}"
        )
    return proc.stdout


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _gcc_version() -> str:
    return _run(
        ["gcc", "--version"], what="gcc --version", fix="install gcc (apt-get install gcc)"
    ).splitlines()[0]


def compile_nf(name: str, cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    """Compile a C NF statically; the binary is cached by source and compiler version."""
    if name not in C_NFS:
        raise ImageBuildError(f"no C source for NF {name!r}; known: {sorted(C_NFS)}")
    source = SRC_DIR / C_NFS[name]
    key = hashlib.sha256(f"{_sha256_file(source)}\0{_gcc_version()}".encode()).hexdigest()[:16]
    out = cache_dir / "bin" / f"{name}-{key}"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        _run(
            ["gcc", "-static", "-O2", "-Wall", "-Wextra", "-o", str(tmp), str(source)],
            what=f"compiling {source.name}",
            fix="install gcc and libc6-dev (apt-get install gcc libc6-dev)",
        )
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


_LDD_PATH = re.compile(r"(/\S+)")


def shared_libraries(binary: Path) -> list[Path]:
    """The libraries (and the loader) a dynamic binary needs, by the paths ldd reports."""
    out = _run(["ldd", str(binary)], what=f"ldd {binary}", fix="install libc-bin")
    libs: list[Path] = []
    for line in out.splitlines():
        # "libx.so => /lib/.../libx.so (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        target = line.split("=>", 1)[-1]
        match = _LDD_PATH.search(target)
        if match and match.group(1) not in {str(p) for p in libs}:
            libs.append(Path(match.group(1)))
    return libs


def _base_entries() -> list[RootfsEntry]:
    if not BUSYBOX.exists():
        raise ImageBuildError(f"{BUSYBOX} missing; install busybox-static")
    entries = [RootfsEntry("bin/busybox", source=BUSYBOX)]
    entries += [RootfsEntry(f"bin/{a}", link="busybox") for a in BUSYBOX_APPLETS]
    return entries


def rootfs_entries(name: str, cache_dir: Path = DEFAULT_CACHE_DIR) -> list[RootfsEntry]:
    """Everything that goes into NF `name`'s rootfs besides the empty top-level dirs."""
    entries = _base_entries()
    if name in C_NFS:
        entries.append(RootfsEntry(f"usr/local/bin/{name}", source=compile_nf(name, cache_dir)))
    elif name == "socat":
        if not SOCAT.exists():
            raise ImageBuildError(f"{SOCAT} missing; install socat (apt-get install socat)")
        entries.append(RootfsEntry("usr/bin/socat", source=SOCAT))
        for lib in shared_libraries(SOCAT):
            # The path ldd printed is the one the loader will search, so keep it; copy the
            # file the symlink chain ends at.
            entries.append(RootfsEntry(str(lib).lstrip("/"), source=lib.resolve(), mode=0o755))
    else:
        raise ImageBuildError(f"unknown NF {name!r}; known: {list(NF_NAMES)}")
    return entries


def content_key(name: str, entries: Iterable[RootfsEntry]) -> str:
    h = hashlib.sha256(f"hamgr-image {BUILDER_VERSION} {name}\n".encode())
    for e in sorted(entries, key=lambda e: e.dest):
        digest = _sha256_file(e.source) if e.source is not None else ""
        h.update(f"{e.dest}\0{e.link or ''}\0{digest}\0{e.mode:o}\n".encode())
    return h.hexdigest()


def _write_rootfs(root: Path, entries: Iterable[RootfsEntry]) -> None:
    for d in ("proc", "sys", "dev", "tmp", "etc", "run"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    (root / "etc/passwd").write_text("root:x:0:0:root:/:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\n")
    for e in entries:
        dest = root / e.dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        if e.link is not None:
            dest.symlink_to(e.link)
        elif e.source is not None:
            shutil.copyfile(e.source, dest)
            dest.chmod(e.mode)


def build_image(name: str, cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    """Return the path of NF `name`'s OCI archive (tag = `name`), building it if needed."""
    entries = rootfs_entries(name, cache_dir)
    key = content_key(name, entries)[:16]
    out = cache_dir / f"{name}-{key}.oci.tar"
    if out.exists():
        return out
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=cache_dir) as tmp_s:
        tmp = Path(tmp_s)
        root = tmp / "rootfs"
        _write_rootfs(root, entries)
        layout = tmp / "layout"
        image = f"{layout}:{name}"
        fix_umoci = "install umoci (apt-get install umoci)"
        _run(["umoci", "init", "--layout", str(layout)], what="umoci init", fix=fix_umoci)
        _run(["umoci", "new", "--image", image], what="umoci new", fix=fix_umoci)
        _run(
            ["umoci", "insert", "--image", image, str(root), "/"],
            what="umoci insert",
            fix=fix_umoci,
        )
        entrypoint = "/usr/bin/socat" if name == "socat" else f"/usr/local/bin/{name}"
        _run(
            ["umoci", "config", "--image", image, f"--config.entrypoint={entrypoint}"],
            what="umoci config",
            fix=fix_umoci,
        )
        archive = tmp / "image.tar"
        _run(
            ["skopeo", "copy", "--quiet", f"oci:{layout}:{name}", f"oci-archive:{archive}:{name}"],
            what="skopeo copy",
            fix="install skopeo (apt-get install skopeo)",
        )
        os.replace(archive, out)
    return out


def build_all(
    cache_dir: Path = DEFAULT_CACHE_DIR, names: Iterable[str] = NF_NAMES
) -> dict[str, Path]:
    return {name: build_image(name, cache_dir) for name in names}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hamgr.nfs.images", description=__doc__)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("names", nargs="*", default=list(NF_NAMES), help=" ".join(NF_NAMES))
    args = parser.parse_args(argv)
    try:
        for name, path in build_all(args.cache_dir, args.names).items():
            print(f"{name} {path}")
    except ImageBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
