"""The container's ``/dev`` and ``/dev/shm``: carried across a checkpoint by hamgr, not by CRIU.

CRIU saves a tmpfs by running ``tar --create --gzip`` on it: a tar and a gzip process per
mount, 3.5-5 ms each on this machine, and all of it inside the NF's pause (the NF is frozen
while CRIU dumps). A runc container has two: ``/dev`` (device nodes, a few symlinks and the
mount points below it) and ``/dev/shm``. Together that was a quarter of the pause.

So a dump declares both mounts external to CRIU (``--external mnt[/dev]:hamgr-dev``), and
hamgr saves what they hold itself, while the NF is still frozen, as one uncompressed tar per
mount in the image (`archive_tree`): in-process, no compression, no process start, file data
moved by ``sendfile``, sparse files kept sparse. For the usual NF, whose ``/dev/shm`` is
empty, both archives together take well under a millisecond. A restore mounts a fresh tmpfs per
archive with the options the OCI config gives that mount (`mount_tmpfs`), unpacks the archive
into it (`extract_tree`), and names it as the external mount's source in CRIU's configuration
(``external mnt[hamgr-dev]:PATH``); CRIU binds it at ``/dev`` in the restored container. The
restored NF thus finds at ``/dev`` and ``/dev/shm`` a tmpfs with the same options and the same
contents as at the cut: the device nodes, and whatever a legacy NF keeps in ``/dev/shm``.
Files the NF holds open there, mapped, or unlinked but open, are CRIU's business as before:
CRIU reopens them by path on the restored mount (or recreates an unlinked one from its own
ghost-file image).

What the archives carry is what CRIU's tar carried: regular files (sparse ones sparse),
directories, symlinks, hard links, device nodes and FIFOs, with numeric owners, modes and
mtimes. Sockets are skipped, as GNU tar skips them: a bound socket's file is recreated by CRIU
when it restores the socket. Extended attributes are not kept (CRIU's tar did not keep them
either). Mount points below a carried mount (``/dev/pts``...) are kept as empty directories,
their contents belong to their own mounts.

Only a mount CRIU could otherwise archive and that nothing else refers to is carried
(`carried_mounts`); anything else is left to CRIU.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import posixpath
import stat
import tarfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

__all__ = [
    "CARRIED_MOUNTS",
    "CarriedMount",
    "DevMountError",
    "archive_tree",
    "carried_mount",
    "carried_mounts",
    "check_members",
    "detach",
    "detach_mounts_under",
    "extract_tree",
    "mount_tmpfs",
    "mounts_under",
    "oci_mount_options",
    "tmpfs_options",
]


class DevMountError(Exception):
    """A carried mount could not be saved or set up again; the message says why."""


@attrs.frozen
class CarriedMount:
    """A tmpfs mount of the container that hamgr carries instead of CRIU.

    ``key`` names it in CRIU's image (the external mount's key), ``archive`` is the image file
    holding its contents, ``host_name`` the directory a restore mounts its tmpfs on.
    """

    mountpoint: str
    key: str
    archive: str
    host_name: str
    # runc's defaults for this mount, for a restore whose OCI config does not name it.
    default_options: tuple[str, ...]


CARRIED_MOUNTS = (
    CarriedMount(
        "/dev",
        "hamgr-dev",
        "hamgr-dev.tar",
        "dev",
        ("nosuid", "strictatime", "mode=755", "size=65536k"),
    ),
    CarriedMount(
        "/dev/shm",
        "hamgr-dev-shm",
        "hamgr-dev-shm.tar",
        "dev-shm",
        ("nosuid", "noexec", "nodev", "mode=1777", "size=65536k"),
    ),
)
_BY_MOUNTPOINT = {m.mountpoint: m for m in CARRIED_MOUNTS}


def carried_mount(mountpoint: str) -> CarriedMount:
    return _BY_MOUNTPOINT[mountpoint]


# --------------------------------------------------------------------------- which mounts


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as ``\\ooo``."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit() and i + 4 <= len(field):
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


@attrs.frozen
class _Mount:
    device: str  # major:minor of the superblock
    root: str
    point: str
    fstype: str


def _parse_mountinfo(mountinfo: str) -> list[_Mount]:
    mounts = []
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if len(fields) < 5 or not rest:
            continue
        mounts.append(_Mount(fields[2], _unescape(fields[3]), _unescape(fields[4]), rest[0]))
    return mounts


def carried_mounts(mountinfo: str, mapped: Iterable[str] = ()) -> tuple[str, ...]:
    """The mount points of `CARRIED_MOUNTS` that hamgr can carry for a container, given the
    container's ``/proc/PID/mountinfo``.

    A mount is carried when it is the only mount at its point, is a tmpfs mounted from its
    root, and no other mount shows the same filesystem, except the masked-file binds in
    `mapped` (runc binds ``/dev/null`` over ``/proc/kcore`` etc.; dumps map those to the host's
    ``/dev/null`` anyway). A bind of part of it elsewhere would need the filesystem's contents
    at restore before CRIU could bind it, which is CRIU's own tmpfs handling.
    """
    mounts = _parse_mountinfo(mountinfo)
    mapped_set = set(mapped)
    out = []
    for point in _BY_MOUNTPOINT:
        here = [m for m in mounts if m.point == point]
        if len(here) != 1 or here[0].fstype != "tmpfs" or here[0].root != "/":
            continue
        others = [m for m in mounts if m.device == here[0].device and m is not here[0]]
        if all(m.point in mapped_set for m in others):
            out.append(point)
    return tuple(out)


# --------------------------------------------------------------------------- archive

_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE
_ENCODING = "utf-8"
_ERRORS = "surrogateescape"  # file names are bytes; keep any that are not UTF-8
_COPY_CHUNK = 1 << 30


def _walk(root: str) -> Iterator[tuple[str, os.stat_result, str]]:
    """(archive name, lstat, path) for `root` and everything below it on the same filesystem,
    parents before children, names sorted (so an unchanged tree gives the same bytes)."""
    top = os.lstat(root)
    if not stat.S_ISDIR(top.st_mode):
        raise DevMountError(f"{root} is not a directory")
    yield ".", top, root
    stack = [(".", root)]
    while stack:
        name, path = stack.pop()
        with os.scandir(path) as it:
            entries = sorted(it, key=lambda e: e.name)
        subdirs = []
        for entry in entries:
            st = entry.stat(follow_symlinks=False)
            child = f"{name}/{entry.name}"
            yield child, st, entry.path
            if stat.S_ISDIR(st.st_mode) and st.st_dev == top.st_dev:
                subdirs.append((child, entry.path))
        stack.extend(reversed(subdirs))


def _data_segments(fd: int, size: int) -> list[tuple[int, int]]:
    """The (offset, length) ranges of a file that hold data, from SEEK_DATA / SEEK_HOLE."""
    segments = []
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # nothing but a hole from here on
                break
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        segments.append((start, end - start))
        offset = end
    return segments


def _copy(src: int, dst: int, offset: int, length: int) -> None:
    while length > 0:
        n = os.sendfile(dst, src, offset, min(length, _COPY_CHUNK))
        if n == 0:
            raise DevMountError("a file shrank while it was archived (is the NF frozen?)")
        offset += n
        length -= n


def _pad(out: int, length: int) -> None:
    if length % _BLOCK:
        os.write(out, b"\0" * (_BLOCK - length % _BLOCK))


def _header(info: tarfile.TarInfo) -> bytes:
    return info.tobuf(tarfile.PAX_FORMAT, _ENCODING, _ERRORS)


def _info(name: str, st: os.stat_result) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid, info.gid = st.st_uid, st.st_gid
    info.uname = info.gname = ""
    info.mtime = int(st.st_mtime)
    return info


def archive_tree(root: Path | str, dest: Path | str) -> int:
    """Write the tree at `root` (one filesystem) into a new tar file `dest`; return its size.

    PAX format; sparse files in GNU's PAX 1.0 sparse format (which Python's tarfile and GNU
    tar read), so a large, mostly empty shared-memory segment costs only what it holds.
    """
    out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        links: dict[tuple[int, int], str] = {}
        for name, st, path in _walk(os.fspath(root)):
            mode = st.st_mode
            info = _info(name, st)
            if stat.S_ISSOCK(mode):
                continue
            if not stat.S_ISDIR(mode) and st.st_nlink > 1:
                first = links.setdefault((st.st_dev, st.st_ino), name)
                if first != name:
                    info.type, info.linkname = tarfile.LNKTYPE, first
                    os.write(out, _header(info))
                    continue
            if stat.S_ISREG(mode):
                _archive_file(out, info, path, st)
                continue
            if stat.S_ISDIR(mode):
                info.type = tarfile.DIRTYPE
            elif stat.S_ISLNK(mode):
                info.type, info.linkname = tarfile.SYMTYPE, os.readlink(path)
            elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                info.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
                info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
            elif stat.S_ISFIFO(mode):
                info.type = tarfile.FIFOTYPE
            else:
                raise DevMountError(f"{path}: a file of unknown type {stat.S_IFMT(mode):o}")
            os.write(out, _header(info))
        os.write(out, b"\0" * (2 * _BLOCK))
        end = os.lseek(out, 0, os.SEEK_CUR)
        if end % _RECORD:
            os.write(out, b"\0" * (_RECORD - end % _RECORD))
        return os.lseek(out, 0, os.SEEK_CUR)
    finally:
        os.close(out)


def _archive_file(out: int, info: tarfile.TarInfo, path: str, st: os.stat_result) -> None:
    src = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        size = st.st_size
        sparse = st.st_blocks * 512 < size
        segments = _data_segments(src, size) if sparse else [(0, size)]
        if not sparse:
            info.size = size
            os.write(out, _header(info))
        else:
            # GNU PAX 1.0: the map (count, then offset and length per segment, one decimal per
            # line, padded to a block) leads the member's data; the real name and size travel
            # in the PAX header.
            # A file that ends in a hole ends its map with (size, 0), as GNU tar writes it:
            # GNU tar takes the file's length from the map, Python's tarfile from the header.
            entries = segments if segments and sum(segments[-1]) == size else [*segments, (size, 0)]
            numbers = [len(entries), *(n for seg in entries for n in seg)]
            sparse_map = "".join(f"{n}\n" for n in numbers).encode()
            sparse_map += b"\0" * (-len(sparse_map) % _BLOCK)
            head, tail = posixpath.split(info.name)
            real_name = info.name
            info.name = posixpath.join(head, "GNUSparseFile.0", tail)
            info.size = len(sparse_map) + sum(length for _, length in segments)
            info.pax_headers = {
                "GNU.sparse.major": "1",
                "GNU.sparse.minor": "0",
                "GNU.sparse.name": real_name,
                "GNU.sparse.realsize": str(size),
            }
            os.write(out, _header(info))
            os.write(out, sparse_map)
        for offset, length in segments:
            _copy(src, out, offset, length)
        _pad(out, sum(length for _, length in segments))
    finally:
        os.close(src)


# --------------------------------------------------------------------------- extract

_TYPES = (
    tarfile.REGTYPE,
    tarfile.AREGTYPE,
    tarfile.DIRTYPE,
    tarfile.SYMTYPE,
    tarfile.LNKTYPE,
    tarfile.CHRTYPE,
    tarfile.BLKTYPE,
    tarfile.FIFOTYPE,
)


def _clean_name(name: str, archive: Path) -> str:
    norm = posixpath.normpath(name)
    if name.startswith("/") or norm == ".." or norm.startswith("../"):
        raise DevMountError(f"{archive}: member {name!r} points outside the mount")
    return norm


def check_members(members: Sequence[tarfile.TarInfo], archive: Path) -> None:
    """Refuse an archive that could write outside its mount: absolute or ``..`` names, a
    member below a symlink member, a hard link to something not archived before it, or a
    member of a type `archive_tree` never writes."""
    symlinks: set[str] = set()
    seen: set[str] = set()
    for member in members:
        if member.type not in _TYPES:
            raise DevMountError(f"{archive}: member {member.name!r} has type {member.type!r}")
        name = _clean_name(member.name, archive)
        parent = posixpath.dirname(name)
        while parent not in ("", "."):
            if parent in symlinks:
                raise DevMountError(f"{archive}: member {name!r} lies below a symlink")
            parent = posixpath.dirname(parent)
        if member.islnk() and _clean_name(member.linkname, archive) not in seen:
            raise DevMountError(f"{archive}: hard link {name!r} to an unknown member")
        if member.issym():
            symlinks.add(name)
        seen.add(name)


def extract_tree(archive: Path, dest: Path) -> None:
    """Unpack an `archive_tree` archive into the (empty, freshly mounted) directory `dest`,
    with owners, modes, mtimes and holes as archived; the archive's root sets `dest`'s own."""
    try:
        with tarfile.open(archive, "r:", encoding=_ENCODING, errors=_ERRORS) as tar:
            members = tar.getmembers()
            check_members(members, archive)
            # The checks above are the filter: the contents must come back exactly as they
            # were (setuid bits, device nodes, absolute symlinks like /dev/fd -> /proc/self/fd).
            tar.extractall(dest, members, numeric_owner=True, filter="fully_trusted")
            # tarfile leaves a symlink's own mtime at "now"; GNU tar (CRIU's) sets it.
            for member in members:
                if member.issym():
                    target = dest / posixpath.normpath(member.name)
                    os.utime(target, (member.mtime, member.mtime), follow_symlinks=False)
    except (OSError, tarfile.TarError) as exc:
        raise DevMountError(f"cannot unpack {archive} into {dest}: {exc}") from exc


# --------------------------------------------------------------------------- host mounts

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_SYNCHRONOUS = 0x10
MS_REMOUNT = 0x20
MS_DIRSYNC = 0x80
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_PRIVATE = 1 << 18
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MNT_DETACH = 2

_FLAGS = {
    "ro": MS_RDONLY,
    "rw": 0,
    "nosuid": MS_NOSUID,
    "suid": 0,
    "nodev": MS_NODEV,
    "dev": 0,
    "noexec": MS_NOEXEC,
    "exec": 0,
    "sync": MS_SYNCHRONOUS,
    "async": 0,
    "dirsync": MS_DIRSYNC,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
    "strictatime": MS_STRICTATIME,
}
# Propagation words in an OCI mount's options are runc's business, not the filesystem's.
_PROPAGATION = {"private", "rprivate", "shared", "rshared", "slave", "rslave"}
_PROPAGATION |= {"unbindable", "runbindable"}


def tmpfs_options(options: Iterable[str]) -> tuple[int, str]:
    """(mount flags, filesystem data) for an OCI tmpfs mount's ``options``."""
    flags, data = 0, []
    for word in options:
        if word in _FLAGS:
            flags |= _FLAGS[word]
        elif word not in _PROPAGATION:
            data.append(word)
    return flags, ",".join(data)


def _mount(source: str, target: Path, fstype: str | None, flags: int, data: str | None) -> None:
    ret = _libc.mount(
        source.encode(),
        os.fsencode(target),
        fstype.encode() if fstype else None,
        flags,
        data.encode() if data else None,
    )
    if ret != 0:
        err = ctypes.get_errno()
        raise DevMountError(f"mount {fstype or source} on {target}: {os.strerror(err)}")


def mount_tmpfs(
    target: Path, options: Iterable[str], *, source: str, contents: Path | None = None
) -> None:
    """Mount a private tmpfs at `target` with OCI-style `options`, fill it from the archive
    `contents` (made by `archive_tree`), and only then make it read-only if asked to."""
    flags, data = tmpfs_options(options)
    _mount(source, target, "tmpfs", flags & ~MS_RDONLY, data)
    try:
        # Private: nothing mounted here may propagate to (or from) other mount namespaces.
        _mount("none", target, None, MS_PRIVATE, None)
        if contents is not None:
            extract_tree(contents, target)
        if flags & MS_RDONLY:
            _mount("none", target, None, MS_REMOUNT | flags, data)
    except BaseException:
        with contextlib.suppress(DevMountError):
            detach(target)
        raise


def detach(target: Path) -> None:
    if _libc.umount2(os.fsencode(target), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):  # not a mount point (any more)
            raise DevMountError(f"umount {target}: {os.strerror(err)}")


def mounts_under(path: Path, mountinfo: str) -> list[Path]:
    """Mount points at or below `path` in `mountinfo`, deepest first."""
    top = os.path.realpath(path)
    found = [
        Path(m.point)
        for m in _parse_mountinfo(mountinfo)
        if m.point == top or m.point.startswith(top.rstrip("/") + "/")
    ]
    return sorted(set(found), key=lambda p: len(p.parts), reverse=True)


def detach_mounts_under(path: Path) -> None:
    """Detach every mount at or below `path` (in this process's mount namespace)."""
    try:
        with open("/proc/self/mountinfo") as f:
            mountinfo = f.read()
    except OSError:
        return
    for point in mounts_under(path, mountinfo):
        detach(point)


def oci_mount_options(config: Mapping[str, Any], mountpoint: str) -> tuple[str, ...] | None:
    """The options of the tmpfs mount at `mountpoint` in an OCI config, or None."""
    for mount in config.get("mounts", []):
        if mount.get("destination") == mountpoint and mount.get("type") == "tmpfs":
            return tuple(mount.get("options", ()))
    return None
