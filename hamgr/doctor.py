"""`hamgr doctor`: one check per requirement, each with a status, a detail line and a fix.

The parsers at the top are pure so they can be unit-tested against recorded outputs; the checks
below them run the real thing (a real netns, a real CRIU dump) because a requirement that is only
"installed" is not yet a requirement that works.
"""

from __future__ import annotations

import enum
import importlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import attrs

from hamgr.config import ConfigError, MachineConfig
from shim.criu import CONNTRACK_BUCKETS_FOR_DUMPS, CriuRuntime, conntrack_buckets
from shim.criu import parse_version as parse_criu_version

MIN_CRIU = (4, 2, 0)
MIN_DPDK = (22, 11, 0)
MIN_HUGEPAGES_TOTAL = 256
MIN_HUGEPAGES_FREE = 128
SETUP_FIX = "run `make setup` from the hamgr checkout"


class Status(enum.StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


@attrs.frozen
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""
    required: bool = True

    def as_json(self) -> dict[str, str | bool]:
        return {
            "name": self.name,
            "status": str(self.status),
            "detail": self.detail,
            "fix": self.fix,
            "required": self.required,
        }


@attrs.frozen
class Report:
    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        return all(c.status is Status.OK for c in self.checks if c.required)

    def as_json(self) -> dict[str, object]:
        return {"ok": self.ok, "checks": [c.as_json() for c in self.checks]}


# ---------------------------------------------------------------- pure parsers


def parse_version(text: str) -> tuple[int, int, int]:
    """The first dotted version in `text` ("22.11.11", "Version: 4.2.1", "runc version 1.1.5")."""
    match = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    if match is None:
        raise ValueError(f"no version number in {text.strip()[:80]!r}")
    return int(match[1]), int(match[2]), int(match[3] or 0)


def format_version(version: tuple[int, ...]) -> str:
    return ".".join(str(v) for v in version)


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo as {key: number}; the unit (kB) is dropped, counts stay counts."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        fields = rest.split()
        if sep and fields and fields[0].isdigit():
            values[key.strip()] = int(fields[0])
    return values


@attrs.frozen
class Mount:
    source: str
    target: str
    fstype: str


def parse_mounts(text: str) -> list[Mount]:
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3:
            target = fields[1].replace("\\040", " ")
            mounts.append(Mount(source=fields[0], target=target, fstype=fields[2]))
    return mounts


def classify_hugepages(meminfo: dict[str, int], mounts: Iterable[Mount]) -> Check:
    total = meminfo.get("HugePages_Total", 0)
    free = meminfo.get("HugePages_Free", 0)
    size_kb = meminfo.get("Hugepagesize", 0)
    hugetlbfs = [m.target for m in mounts if m.fstype == "hugetlbfs"]
    detail = f"{total} reserved, {free} free, {size_kb} kB each; hugetlbfs at {hugetlbfs or 'none'}"
    fix = (
        "echo 512 > /proc/sys/vm/nr_hugepages && mkdir -p /dev/hugepages && "
        "{ mountpoint -q /dev/hugepages || mount -t hugetlbfs nodev /dev/hugepages; } "
        f"(or {SETUP_FIX})"
    )
    if total < MIN_HUGEPAGES_TOTAL or not hugetlbfs:
        return Check("hugepages", Status.FAIL, detail, fix)
    if free < MIN_HUGEPAGES_FREE:
        return Check(
            "hugepages",
            Status.WARN,
            detail + f"; fewer than {MIN_HUGEPAGES_FREE} free",
            "stop DPDK processes you no longer need, or reserve more pages: " + fix,
        )
    return Check("hugepages", Status.OK, detail)


def classify_criu_version(path: str, version_output: str) -> Check:
    try:
        version = parse_criu_version(version_output)
    except ValueError as exc:
        return Check("criu_version", Status.FAIL, f"{path}: {exc}", SETUP_FIX)
    detail = f"{path}: {format_version(version)}"
    if version < MIN_CRIU:
        return Check(
            "criu_version",
            Status.FAIL,
            detail + f" is older than {format_version(MIN_CRIU)} (older CRIU cannot dump on "
            "this kernel)",
            SETUP_FIX + " (it provisions a private CRIU >= 4.2 and points hamgr at it)",
        )
    return Check("criu_version", Status.OK, detail)


def classify_dpdk(pkgconfig_output: str) -> Check:
    try:
        version = parse_version(pkgconfig_output)
    except ValueError:
        return Check(
            "dpdk",
            Status.FAIL,
            "pkg-config does not know libdpdk: " + pkgconfig_output.strip()[:120],
            "apt-get install libdpdk-dev dpdk (or " + SETUP_FIX + ")",
        )
    detail = f"libdpdk {format_version(version)}"
    if version < MIN_DPDK:
        return Check(
            "dpdk", Status.FAIL, detail + f" < {format_version(MIN_DPDK)}", "install DPDK 22.11"
        )
    return Check("dpdk", Status.OK, detail)


# ---------------------------------------------------------------- checks on the real machine


def _run(argv: list[str], timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def _last_lines(text: str, n: int = 2) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-n:])


def _tool_version(name: str, argv: list[str], fix: str) -> Check:
    if shutil.which(argv[0]) is None:
        return Check(name, Status.FAIL, f"{argv[0]} not found in PATH", fix)
    proc = _run(argv)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        return Check(name, Status.FAIL, f"{' '.join(argv)}: {_last_lines(out)}", fix)
    try:
        return Check(name, Status.OK, f"{argv[0]} {format_version(parse_version(out))}")
    except ValueError:
        return Check(name, Status.OK, _last_lines(out, 1))


def check_kernel_cr() -> Check:
    # ns_last_pid only exists with CONFIG_CHECKPOINT_RESTORE, and CRIU needs it to restore PIDs.
    if Path("/proc/sys/kernel/ns_last_pid").exists():
        return Check("kernel_checkpoint_restore", Status.OK, "CONFIG_CHECKPOINT_RESTORE is on")
    return Check(
        "kernel_checkpoint_restore",
        Status.FAIL,
        "/proc/sys/kernel/ns_last_pid is missing: the kernel lacks CONFIG_CHECKPOINT_RESTORE",
        "boot a kernel built with CONFIG_CHECKPOINT_RESTORE=y",
    )


def check_cgroup_freezer() -> Check:
    """Create a cgroup and freeze/thaw it, on v1 (freezer controller) or v2 (cgroup.freeze)."""
    name = f"hamgr-doctor-{os.getpid()}"
    candidates = [
        (Path("/sys/fs/cgroup/freezer"), "freezer.state", "FROZEN", "THAWED"),
        (Path("/sys/fs/cgroup"), "cgroup.freeze", "1", "0"),
        (Path("/sys/fs/cgroup/unified"), "cgroup.freeze", "1", "0"),
    ]
    errors = []
    for root, knob, frozen, thawed in candidates:
        if not root.is_dir():
            continue
        group = root / name
        try:
            group.mkdir()
        except OSError as exc:
            errors.append(f"{root}: {exc.strerror}")
            continue
        try:
            if not (group / knob).exists():
                errors.append(f"{root}: no {knob}")
                continue
            (group / knob).write_text(frozen)
            (group / knob).write_text(thawed)
            return Check("cgroup_freezer", Status.OK, f"{group.parent}/…/{knob} freezes and thaws")
        except OSError as exc:
            errors.append(f"{root}: {exc.strerror}")
        finally:
            group.rmdir()
    return Check(
        "cgroup_freezer",
        Status.FAIL,
        "no usable cgroup freezer: " + ("; ".join(errors) or "no cgroup hierarchy mounted"),
        "mount the cgroup v1 freezer (mount -t cgroup -o freezer freezer /sys/fs/cgroup/freezer) "
        "or use a kernel with cgroup v2",
    )


def check_netns() -> Check:
    """Build and tear down a netns with a veth pair on a bridge: what every testbed host needs."""
    if shutil.which("ip") is None:
        return Check("netns_veth_bridge", Status.FAIL, "ip not found", "apt-get install iproute2")
    ns = f"hamgr-doctor-{os.getpid()}"
    steps = [
        ["ip", "netns", "add", ns],
        ["ip", "-n", ns, "link", "add", "hd0", "type", "veth", "peer", "name", "hd1"],
        ["ip", "-n", ns, "link", "add", "hdbr", "type", "bridge"],
        ["ip", "-n", ns, "link", "set", "hd0", "master", "hdbr"],
        ["ip", "-n", ns, "link", "set", "hdbr", "up"],
    ]
    try:
        for argv in steps:
            proc = _run(argv, timeout=10)
            if proc.returncode != 0:
                return Check(
                    "netns_veth_bridge",
                    Status.FAIL,
                    f"{' '.join(argv)}: {_last_lines(proc.stderr)}",
                    "use a kernel with CONFIG_NET_NS, CONFIG_VETH and CONFIG_BRIDGE",
                )
    finally:
        _run(["ip", "netns", "del", ns], timeout=10)
    return Check("netns_veth_bridge", Status.OK, "netns, veth pair and bridge created and removed")


def check_hugepages() -> Check:
    return classify_hugepages(
        parse_meminfo(Path("/proc/meminfo").read_text()),
        parse_mounts(Path("/proc/mounts").read_text()),
    )


def _criu_path() -> tuple[str | None, Check | None]:
    try:
        cfg = MachineConfig.load()
    except ConfigError as exc:
        return None, Check("criu_version", Status.FAIL, str(exc), SETUP_FIX)
    if cfg.criu_path is None:
        return None, Check(
            "criu_version",
            Status.FAIL,
            "no CRIU configured ([criu] path in /etc/hamgr/hamgr.toml) and none in PATH",
            SETUP_FIX,
        )
    if not os.access(cfg.criu_path, os.X_OK):
        return None, Check(
            "criu_version", Status.FAIL, f"{cfg.criu_path} is not executable", SETUP_FIX
        )
    return cfg.criu_path, None


def check_criu() -> list[Check]:
    path, problem = _criu_path()
    if path is None:
        assert problem is not None
        skipped = "not run: " + problem.detail
        return [
            problem,
            Check("criu_check", Status.FAIL, skipped, SETUP_FIX),
            Check("criu_tcp_dump", Status.FAIL, skipped, SETUP_FIX),
        ]
    runtime = CriuRuntime(path)
    proc = _run([path, "--version"])
    version = classify_criu_version(path, proc.stdout + proc.stderr)
    checks = [version]
    result = runtime.check()
    checks.append(
        Check(
            "criu_check",
            Status.OK if result.ok else Status.FAIL,
            result.detail,
            "" if result.ok else "read the detail; " + SETUP_FIX,
        )
    )
    with tempfile.TemporaryDirectory(prefix="hamgr-doctor-") as tmp:
        probe = runtime.probe_tcp_dump(Path(tmp))
    checks.append(
        Check(
            "criu_tcp_dump",
            Status.OK if probe.ok else Status.FAIL,
            probe.detail,
            ""
            if probe.ok
            else "CRIU cannot dump a process with a TCP socket here; "
            + SETUP_FIX
            + " (criu 4.2 or newer is needed on kernels that refuse SO_PASSCRED on TCP)",
        )
    )
    return checks


def check_conntrack() -> Check:
    # Optional: only the checkpoint pause suffers, by about 19 ms per dump at 262144 buckets.
    buckets = conntrack_buckets()
    if buckets is None:
        return Check("conntrack", Status.OK, "no conntrack in this kernel", required=False)
    if buckets > CONNTRACK_BUCKETS_FOR_DUMPS:
        return Check(
            "conntrack",
            Status.WARN,
            f"{buckets} hash buckets: every CRIU dump walks the whole table, inside the pause",
            f"echo {CONNTRACK_BUCKETS_FOR_DUMPS} > /proc/sys/net/netfilter/nf_conntrack_buckets "
            f"(or {SETUP_FIX})",
            required=False,
        )
    return Check("conntrack", Status.OK, f"{buckets} hash buckets", required=False)


def check_dpdk() -> Check:
    if shutil.which("pkg-config") is None:
        return Check("dpdk", Status.FAIL, "pkg-config not found", "apt-get install pkg-config")
    proc = _run(["pkg-config", "--modversion", "libdpdk"])
    return classify_dpdk(proc.stdout if proc.returncode == 0 else proc.stderr)


def check_dataplane_built() -> Check:
    binary = MachineConfig.load().dataplane_binary
    if binary.is_file() and os.access(binary, os.X_OK):
        return Check("dataplane_built", Status.OK, f"{binary}")
    return Check(
        "dataplane_built", Status.FAIL, f"{binary} is missing", "make -C dpdk_vhost (or make setup)"
    )


def check_qemu() -> Check:
    check = _tool_version(
        "qemu", ["qemu-system-x86_64", "--version"], "apt-get install qemu-system-x86"
    )
    if check.status is not Status.OK:
        return check
    # "Accelerators supported in QEMU binary:" followed by one name per line.
    accels = _run(["qemu-system-x86_64", "-accel", "help"]).stdout.splitlines()[1:]
    if "tcg" not in accels:
        return Check("qemu", Status.FAIL, check.detail + "; no TCG accelerator", "reinstall QEMU")
    return Check("qemu", Status.OK, check.detail + "; accelerators: " + " ".join(accels))


def check_kvm() -> Check:
    # KVM is optional: hamgr runs VMs under TCG. A PVM host (kvm_pvm) hangs stock guest kernels.
    if not Path("/dev/kvm").exists():
        return Check("kvm", Status.WARN, "no /dev/kvm; VMs run under TCG", "", required=False)
    if Path("/sys/module/kvm_pvm").exists():
        return Check(
            "kvm",
            Status.WARN,
            "/dev/kvm is PVM (kvm_pvm), which hangs stock guest kernels; VMs run under TCG",
            "",
            required=False,
        )
    return Check("kvm", Status.OK, "/dev/kvm present", required=False)


def check_libvirt() -> Check:
    if shutil.which("virsh") is None:
        return Check("libvirt", Status.FAIL, "virsh not found", "apt-get install libvirt-clients")
    proc = _run(["virsh", "-c", "qemu:///system", "version"], timeout=60)
    if proc.returncode != 0:
        return Check(
            "libvirt",
            Status.FAIL,
            "libvirtd does not answer on qemu:///system: " + _last_lines(proc.stderr),
            "start it: virtlogd -d && libvirtd -d (or " + SETUP_FIX + ")",
        )
    lib = re.search(r"Using library: libvirt ([\d.]+)", proc.stdout)
    return Check("libvirt", Status.OK, f"libvirtd reachable (libvirt {lib[1] if lib else '?'})")


def check_sshd() -> Check:
    sshd = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)
    if sshd is None:
        return Check("sshd", Status.FAIL, "sshd not found", "apt-get install openssh-server")
    proc = _run(["ssh", "-V"])
    return Check("sshd", Status.OK, f"{sshd} ({_last_lines(proc.stderr or proc.stdout, 1)})")


PYTHON_MODULES = ("attrs", "click", "zmq", "google.protobuf", "pycriu")


def check_python_deps() -> Check:
    missing = []
    for module in PYTHON_MODULES:
        try:
            importlib.import_module(module)
        except Exception as exc:
            missing.append(f"{module} ({type(exc).__name__}: {exc})")
    if missing:
        return Check("python_deps", Status.FAIL, "cannot import " + "; ".join(missing), SETUP_FIX)
    return Check("python_deps", Status.OK, "imports " + ", ".join(PYTHON_MODULES))


def check_nftables() -> Check:
    # CRIU's --network-lock nftables keeps TCP peers from seeing resets during a dump.
    return _tool_version("nftables", ["nft", "--version"], "apt-get install nftables")


def check_runc() -> Check:
    return _tool_version("runc", ["runc", "--version"], "apt-get install runc")


def check_oci_tools() -> Check:
    for tool in ("skopeo", "umoci"):
        check = _tool_version("oci_tools", [tool, "--version"], f"apt-get install {tool}")
        if check.status is not Status.OK:
            return check
    return Check("oci_tools", Status.OK, "skopeo and umoci present (offline image handling)")


CHECKS: tuple[Callable[[], Check | list[Check]], ...] = (
    check_kernel_cr,
    check_cgroup_freezer,
    check_netns,
    check_hugepages,
    check_criu,
    check_nftables,
    check_conntrack,
    check_dpdk,
    check_dataplane_built,
    check_runc,
    check_oci_tools,
    check_qemu,
    check_kvm,
    check_libvirt,
    check_sshd,
    check_python_deps,
)


def run_checks() -> Report:
    checks: list[Check] = []
    for fn in CHECKS:
        try:
            result = fn()
        except Exception as exc:  # a broken check must not hide the others
            name = fn.__name__.removeprefix("check_")
            result = Check(name, Status.FAIL, f"the check itself failed: {exc!r}", SETUP_FIX)
        checks.extend(result if isinstance(result, list) else [result])
    return Report(tuple(checks))
