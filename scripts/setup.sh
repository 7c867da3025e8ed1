#!/usr/bin/env bash
# One-command, idempotent setup of everything hamgr needs on a Debian 12 machine.
# Called by `make setup`, which `make test` and `make demo` both depend on.
# Every step checks first and only acts when something is missing, so a second run is fast.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${HAMGR_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}
HUGEPAGES=${HAMGR_HUGEPAGES:-512}
CRIU_PREFIX=${HAMGR_CRIU_PREFIX:-/opt/hamgr/criu}
CONFIG_DIR=${HAMGR_CONFIG_DIR:-/etc/hamgr}

# Debian packages the project uses. Keep this list the single source: doctor names it in fixes.
APT_PACKAGES=(
    build-essential pkg-config meson ninja-build
    dpdk libdpdk-dev
    nftables iptables iproute2 procps psmisc util-linux
    runc crun skopeo umoci busybox-static
    qemu-system-x86 qemu-utils
    libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev
    openssh-server openssh-client
    iperf3 socat ethtool systemd
)

step() { printf '==> %s\n' "$*"; }
fail() {
    # $1: what failed, $2: the fix
    printf 'setup: FAILED: %s\nsetup: fix: %s\n' "$1" "$2" >&2
    exit 1
}
run() {
    # Runs a command; on failure names it and the fix given after `--fix`.
    local fix=$1
    shift
    "$@" || fail "command failed: $*" "$fix"
}

[ "$(id -u)" = 0 ] || fail "setup must run as root (it installs packages, reserves hugepages)" \
    "run: sudo make setup"

step_packages() {
    local missing=()
    local p
    for p in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        step "Debian packages: all ${#APT_PACKAGES[@]} present"
        return
    fi
    step "Debian packages: installing ${missing[*]}"
    run "check network access to the Debian mirror, then re-run make setup" \
        apt-get update -q
    DEBIAN_FRONTEND=noninteractive run "run: apt-get install ${missing[*]} and read its error" \
        apt-get install -y -q --no-install-recommends "${missing[@]}"
}

step_criu() {
    step "CRIU >= 4.2 (system criu if it passes, otherwise a private runtime in $CRIU_PREFIX)"
    local out criu
    out=$("$ROOT/scripts/provision-criu.sh" --prefix "$CRIU_PREFIX" --venv "$VENV") ||
        fail "scripts/provision-criu.sh --prefix $CRIU_PREFIX --venv $VENV" \
            "read the step that failed above; remove $CRIU_PREFIX and re-run make setup"
    printf '%s\n' "$out" | sed '$d'
    criu=$(printf '%s\n' "$out" | tail -n 1)
    [ -x "$criu" ] || fail "provision-criu.sh did not name an executable criu (got '$criu')" \
        "remove $CRIU_PREFIX and re-run make setup"
    mkdir -p "$CONFIG_DIR"
    local want="[criu]
path = \"$criu\""
    if [ ! -f "$CONFIG_DIR/hamgr.toml" ] || ! grep -qF "path = \"$criu\"" "$CONFIG_DIR/hamgr.toml"; then
        step "writing $CONFIG_DIR/hamgr.toml (criu.path = $criu)"
        printf '# Written by hamgr setup.\n%s\n' "$want" > "$CONFIG_DIR/hamgr.toml.tmp"
        mv "$CONFIG_DIR/hamgr.toml.tmp" "$CONFIG_DIR/hamgr.toml"
    fi
}

step_hugepages() {
    local have
    have=$(cat /proc/sys/vm/nr_hugepages)
    if [ "$have" -lt "$HUGEPAGES" ]; then
        step "hugepages: reserving $HUGEPAGES x 2 MiB (had $have)"
        echo "$HUGEPAGES" > /proc/sys/vm/nr_hugepages ||
            fail "echo $HUGEPAGES > /proc/sys/vm/nr_hugepages" "free memory, or set HAMGR_HUGEPAGES lower"
        have=$(cat /proc/sys/vm/nr_hugepages)
        [ "$have" -ge "$HUGEPAGES" ] ||
            fail "only $have of $HUGEPAGES hugepages could be reserved" \
                "free memory (e.g. drop caches: sync; echo 3 > /proc/sys/vm/drop_caches) and re-run"
    else
        step "hugepages: $have reserved"
    fi
    if ! awk '$2 == "/dev/hugepages" && $3 == "hugetlbfs" {found=1} END {exit !found}' /proc/mounts; then
        step "hugetlbfs: mounting at /dev/hugepages"
        mkdir -p /dev/hugepages
        run "check that the kernel has CONFIG_HUGETLBFS" mount -t hugetlbfs nodev /dev/hugepages
    else
        step "hugetlbfs: mounted at /dev/hugepages"
    fi
}

step_venv() {
    local stamp="$VENV/.hamgr-setup-stamp" want
    want=$(cat "$ROOT/setup.py" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)
    if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        step "virtualenv: $VENV up to date"
        return
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        step "virtualenv: creating $VENV with $PYTHON"
        run "install python3-venv (apt-get install python3-venv) or set PYTHON=/path/to/python3.11" \
            "$PYTHON" -m venv "$VENV"
    fi
    step "virtualenv: installing hamgr with its dev extras"
    run "check access to PyPI, then re-run make setup" \
        "$VENV/bin/python" -m pip install -q --upgrade pip
    run "read pip's error above; fix setup.py or PyPI access" \
        "$VENV/bin/python" -m pip install -q -e "$ROOT[dev]"
    printf '%s\n' "$want" > "$stamp"
}

step_libvirt() {
    # Debian 12 without systemd: virtlogd then libvirtd, both daemonized. libvirt insists on the
    # libvirt-qemu user and group even when qemu.conf runs QEMU as root.
    getent group libvirt-qemu >/dev/null || run "groupadd failed" groupadd --system libvirt-qemu
    getent passwd libvirt-qemu >/dev/null ||
        run "useradd failed" useradd --system -g libvirt-qemu -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu
    mkdir -p /var/log/libvirt /var/lib/libvirt /run/libvirt
    if [ -S /run/libvirt/libvirt-sock ] && virsh -c qemu:///system uri >/dev/null 2>&1; then
        step "libvirtd: running"
        return
    fi
    step "libvirtd: starting virtlogd and libvirtd"
    pgrep -x virtlogd >/dev/null || run "read /var/log/libvirt; reinstall libvirt-daemon" virtlogd -d
    pgrep -x libvirtd >/dev/null || run "read /var/log/libvirt/libvirtd.log" libvirtd -d
    local i
    for i in $(seq 1 100); do
        virsh -c qemu:///system uri >/dev/null 2>&1 && return
        sleep 0.2
    done
    fail "libvirtd did not answer on qemu:///system within 20 s" "read /var/log/libvirt/libvirtd.log"
}

step_conntrack() {
    # CRIU walks the whole global conntrack table twice per dump, so its size is paid inside
    # every checkpoint pause (about 19 ms at 262144 buckets here). Host-wide, hence a setup step.
    local file=/proc/sys/net/netfilter/nf_conntrack_buckets want=16384 have
    if [ ! -w "$file" ]; then
        step "conntrack: no nf_conntrack in this kernel; nothing to size"
        return
    fi
    have=$(cat "$file")
    if [ "$have" -gt "$want" ]; then
        step "conntrack: shrinking the hash table from $have to $want buckets (faster CRIU dumps)"
        echo "$want" > "$file" || fail "echo $want > $file" "run as root on the host, not in a container"
    else
        step "conntrack: $have buckets"
    fi
    if [ ! -f /etc/sysctl.d/90-hamgr.conf ] || ! grep -q nf_conntrack_buckets /etc/sysctl.d/90-hamgr.conf; then
        printf '# Written by hamgr setup: CRIU dumps walk the conntrack table.\nnet.netfilter.nf_conntrack_buckets = %s\n' "$want" \
            > /etc/sysctl.d/90-hamgr.conf
    fi
}

step_cgroup_dynmods() {
    # runc and CRIU move every started or restored NF process into its cgroups. Unless a cgroup
    # root favours dynamic modifications, each such move after an idle moment waits for an RCU
    # grace period (5-14 ms here), inside a failover's restore step. Host-wide runtime state
    # (lost at reboot: re-run make setup), hence a setup step; optional, so never fatal.
    local line mnt opts
    line=$(awk '$3 == "cgroup2" { print $2, $4; exit }' /proc/mounts)
    if [ -n "$line" ]; then
        mnt=${line%% *}
        opts=${line#* }
        case ",$opts," in
        *,favordynmods,*)
            step "cgroups: favordynmods already on $mnt"
            return
            ;;
        esac
        # Remount with the options it has: a cgroup2 mount applies its flags to the one root.
        if mount -o "remount,$opts,favordynmods" "$mnt" 2>/dev/null; then
            step "cgroups: favordynmods on $mnt (restores skip an RCU grace period)"
        else
            step "cgroups: WARNING: this kernel refuses favordynmods on $mnt; restores pay 5-14 ms more"
        fi
        return
    fi
    mkdir -p /run/hamgr/cgroup2
    if mount -t cgroup2 -o favordynmods none /run/hamgr/cgroup2 2>/dev/null; then
        step "cgroups: favordynmods on /run/hamgr/cgroup2 (restores skip an RCU grace period)"
    else
        rmdir /run/hamgr/cgroup2 2>/dev/null || true
        step "cgroups: WARNING: this kernel refuses favordynmods; restores pay 5-14 ms more"
    fi
}

step_dataplane() {
    step "data plane: building dpdk_vhost (make -C dpdk_vhost)"
    run "read the compiler error above; check that libdpdk-dev is installed (pkg-config --modversion libdpdk)" \
        make -s -C "$ROOT/dpdk_vhost"
}

step_packages
step_venv
step_criu
step_hugepages
step_libvirt
step_conntrack
step_cgroup_dynmods
step_dataplane
step "setup complete"
