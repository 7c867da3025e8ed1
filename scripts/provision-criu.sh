#!/usr/bin/env bash
# Provision a CRIU >= 4.2 for hamgr, plus pycriu for a Python venv.
#
# Usage: scripts/provision-criu.sh [--prefix /opt/hamgr/criu] [--venv PATH]
#
# The last line of stdout is the absolute path of the criu executable to use.
#
# Why a private runtime: Debian 12's criu 3.17 cannot handle the vDSO layout of kernels >= 6.13,
# and trixie's 4.1.1 cannot dump INET sockets on kernels that refuse SO_PASSCRED on TCP. sid's
# criu (4.2.x) works, but it needs a newer glibc than bookworm's. Upgrading the system libc is not
# an option, so criu and the libraries it links are unpacked into a prefix and run through that
# prefix's own dynamic loader. apt runs with a private configuration so the system's sources,
# lists, caches and dpkg state are never touched.
set -euo pipefail

PREFIX=/opt/hamgr/criu
VENV=""
CACHE=/var/cache/hamgr
MIN_MAJOR=4
MIN_MINOR=2
# These come from sid because trixie's versions are too old (criu/libcompel1 4.1.1 cannot dump
# INET sockets here; criu 4.2 needs libnl-3 >= 3.11; libnet9 exists only in sid). Everything else
# is resolved from trixie, whose glibc (2.41) is new enough and whose packages are stable.
SID_PACKAGES="criu libcompel1 libnet9 libnl-3-200 python3-pycriu"
ARCHIVE_URL=http://deb.debian.org/debian
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

usage() {
    sed -n '4p' "$0" | sed 's/^# //'
}

while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) [ $# -ge 2 ] || { usage >&2; exit 2; }; PREFIX=$2; shift 2 ;;
        --prefix=*) PREFIX=${1#--prefix=}; shift ;;
        --venv) [ $# -ge 2 ] || { usage >&2; exit 2; }; VENV=$2; shift 2 ;;
        --venv=*) VENV=${1#--venv=}; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done

say() { echo "==> $*"; }

# die CMD FIX: name the failed command and how to fix it.
die() {
    echo "ERROR: command failed: $1" >&2
    echo "FIX:   $2" >&2
    exit 1
}

# run FIX CMD...: run a command; on failure show its output and die with FIX.
run() {
    local fix=$1; shift
    local out
    if ! out=$("$@" 2>&1); then
        printf '%s\n' "$out" | tail -n 20 >&2
        die "$*" "$fix"
    fi
}

[ "$(id -u)" -eq 0 ] || die "id -u" "run this script as root"
case "$PREFIX" in /*) ;; *) PREFIX=$(pwd)/$PREFIX ;; esac
if [ -n "$VENV" ]; then
    case "$VENV" in /*) ;; *) VENV=$(pwd)/$VENV ;; esac
    [ -x "$VENV/bin/python" ] || die "test -x $VENV/bin/python" "pass --venv a virtualenv that exists"
fi

# version_ok CRIU: criu --version reports >= MIN_MAJOR.MIN_MINOR
version_ok() {
    local text major minor
    text=$(timeout 10 "$1" --version 2>/dev/null) || return 1
    [[ $text =~ Version:[[:space:]]*([0-9]+)\.([0-9]+) ]] || return 1
    major=${BASH_REMATCH[1]}
    minor=${BASH_REMATCH[2]}
    [ "$major" -gt "$MIN_MAJOR" ] || { [ "$major" -eq "$MIN_MAJOR" ] && [ "$minor" -ge "$MIN_MINOR" ]; }
}

criu_version_of() {
    timeout 10 "$1" --version 2>/dev/null | sed -n 's/^Version: *//p'
}

ensure_runtime_deps() {
    # nft/iptables-restore back --network-lock; ip and nsenter are what hamgr drives criu with.
    local missing=""
    command -v nft >/dev/null 2>&1 || missing="$missing nftables"
    command -v iptables-restore >/dev/null 2>&1 || missing="$missing iptables"
    command -v ip >/dev/null 2>&1 || missing="$missing iproute2"
    command -v nsenter >/dev/null 2>&1 || missing="$missing util-linux"
    if [ -z "$missing" ]; then
        say "runtime dependencies present (nftables, iptables, iproute2, util-linux)"
        return
    fi
    say "installing missing runtime dependencies:$missing"
    # shellcheck disable=SC2086
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $missing \
        >/dev/null 2>&1; then
        run "check network access to the Debian mirror, then re-run" apt-get update
        # shellcheck disable=SC2086
        run "run: apt-get install$missing" \
            env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $missing
    fi
}

APT_DIR=$CACHE/apt
DEB_DIR=$CACHE/debs

write_private_apt_config() {
    mkdir -p "$APT_DIR/lists/partial" "$APT_DIR/archives/partial" "$APT_DIR/state" \
        "$APT_DIR/empty" "$DEB_DIR"
    : >"$APT_DIR/status"
    cat >"$APT_DIR/sources.list" <<EOF
deb [signed-by=$KEYRING] $ARCHIVE_URL sid main
deb [signed-by=$KEYRING] $ARCHIVE_URL trixie main
EOF
    {
        printf 'Package: *\nPin: release n=trixie\nPin-Priority: 500\n\n'
        printf 'Package: *\nPin: release n=sid\nPin-Priority: 100\n\n'
        printf 'Package: %s\nPin: release n=sid\nPin-Priority: 990\n' "$SID_PACKAGES"
    } >"$APT_DIR/preferences"
    # An empty status file makes apt resolve the complete closure criu links against, instead of
    # assuming bookworm's installed libraries will do. The hooks are cleared so that a private
    # update does not trigger the system's post-update actions.
    cat >"$APT_DIR/apt.conf" <<EOF
Dir::Etc::SourceList "$APT_DIR/sources.list";
Dir::Etc::SourceParts "$APT_DIR/empty";
Dir::Etc::Preferences "$APT_DIR/preferences";
Dir::Etc::PreferencesParts "$APT_DIR/empty";
Dir::State "$APT_DIR/state";
Dir::State::Lists "$APT_DIR/lists";
Dir::State::status "$APT_DIR/status";
Dir::Cache "$APT_DIR";
Dir::Cache::Archives "$APT_DIR/archives";
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
// The reachable mirror serves frozen snapshots whose Release files are past Valid-Until; the
// signatures are still checked, only the freshness window is not.
Acquire::Check-Valid-Until "false";
APT::Install-Recommends "false";
APT::Install-Suggests "false";
#clear APT::Update::Pre-Invoke;
#clear APT::Update::Post-Invoke;
#clear APT::Update::Post-Invoke-Success;
#clear DPkg::Pre-Invoke;
#clear DPkg::Post-Invoke;
#clear DPkg::Pre-Install-Pkgs;
EOF
    # apt drops privileges to _apt for downloads; letting it write here keeps the sandbox on.
    if id _apt >/dev/null 2>&1; then
        chown _apt "$DEB_DIR" "$APT_DIR/lists" "$APT_DIR/lists/partial" "$APT_DIR/archives/partial"
    fi
}

papt() { apt-get -c "$APT_DIR/apt.conf" -q "$@"; }

check_keyring() {
    [ -r "$KEYRING" ] || die "test -r $KEYRING" "apt-get install debian-archive-keyring"
    # sid and trixie Release files are signed by the 12/bookworm and 13/trixie archive keys;
    # bookworm's debian-archive-keyring (2023.3+deb12u2 and later) already ships the trixie keys.
    # apt verifies InRelease against this keyring and every .deb against the signed index.
    if command -v gpg >/dev/null 2>&1; then
        if ! gpg --no-default-keyring --keyring "$KEYRING" --with-colons --list-keys \
            2>/dev/null | grep -q 'trixie'; then
            echo "warning: $KEYRING has no trixie key; the sid/trixie index may fail to verify" >&2
        fi
    fi
}

update_private_lists() {
    say "updating private apt lists for sid and trixie (signature-checked against $KEYRING)"
    local out
    if ! out=$(papt update 2>&1); then
        if ls "$APT_DIR"/lists/*_InRelease >/dev/null 2>&1; then
            printf '%s\n' "$out" | tail -n 5 >&2
            echo "warning: apt-get update failed; using the lists from the previous run" >&2
            return
        fi
        printf '%s\n' "$out" | tail -n 20 >&2
        die "apt-get -c $APT_DIR/apt.conf update" \
            "make deb.debian.org reachable; on NO_PUBKEY, upgrade debian-archive-keyring"
    fi
    if printf '%s\n' "$out" | grep -Eq '^(W|E): .*(GPG error|not signed)'; then
        printf '%s\n' "$out" | grep -E '^(W|E):' >&2
        die "apt-get -c $APT_DIR/apt.conf update" \
            "the archive signature did not verify; upgrade debian-archive-keyring"
    fi
}

# Prints "package=version" for criu's full runtime closure.
resolve_closure() {
    local out
    if ! out=$(papt -s install criu 2>&1); then
        printf '%s\n' "$out" | tail -n 20 >&2
        die "apt-get -c $APT_DIR/apt.conf -s install criu" \
            "sid's criu needs a dependency trixie cannot satisfy; add it to SID_PACKAGES"
    fi
    printf '%s\n' "$out" | awk '/^Inst /{v=$3; gsub(/[()]/, "", v); print $2 "=" v}'
}

# download_debs PKG=VER...: fetch into the cache and verify each file's SHA256 against the signed
# index. Prints the cached file names.
download_debs() {
    local manifest tmp out
    tmp=$(mktemp -d)
    # --print-uris only lists files that are not in the current directory, so ask from an empty one.
    if ! out=$(cd "$tmp" && papt --print-uris download "$@" 2>&1); then
        rm -rf "$tmp"
        printf '%s\n' "$out" | tail -n 20 >&2
        die "apt-get --print-uris download $*" "re-run; if it persists, delete $APT_DIR/lists"
    fi
    rm -rf "$tmp"
    manifest=$(printf '%s\n' "$out" | grep "^'" || true)
    if ! out=$(cd "$DEB_DIR" && papt download "$@" 2>&1); then
        printf '%s\n' "$out" | tail -n 20 >&2
        die "apt-get download $*" "make deb.debian.org reachable and re-run"
    fi
    local name size sum
    while read -r _ name size sum; do
        [ -n "${name:-}" ] || continue
        sum=${sum#SHA256:}
        [ -f "$DEB_DIR/$name" ] || die "test -f $DEB_DIR/$name" "re-run; the download was incomplete"
        if [ "$(sha256sum "$DEB_DIR/$name" | cut -d' ' -f1)" != "$sum" ]; then
            rm -f "$DEB_DIR/$name"
            die "sha256sum $DEB_DIR/$name" "the cached file was corrupt and has been removed; re-run"
        fi
        printf '%s\n' "$name"
    done <<<"$manifest"
}

write_wrapper() {
    local root=$1 libdir loader
    libdir=$root/usr/lib/x86_64-linux-gnu
    loader=$libdir/ld-linux-x86-64.so.2
    mkdir -p "$PREFIX/bin"
    # --library-path, not LD_LIBRARY_PATH: the private libraries must not leak into the programs
    # criu itself runs (iptables-restore, action scripts) or into restored tasks.
    cat >"$PREFIX/bin/criu.new" <<EOF
#!/bin/sh
# Generated by hamgr's scripts/provision-criu.sh: runs the private criu with its own loader.
exec "$loader" --library-path "$libdir" --argv0 "\$0" "$root/usr/sbin/criu" "\$@"
EOF
    chmod 0755 "$PREFIX/bin/criu.new"
    mv -f "$PREFIX/bin/criu.new" "$PREFIX/bin/criu"
}

STAMP=$PREFIX/.provisioned

provision_private() {
    local wrapper=$PREFIX/bin/criu
    if [ -f "$STAMP" ] && [ -x "$wrapper" ] && version_ok "$wrapper"; then
        say "private criu $(criu_version_of "$wrapper") already provisioned in $PREFIX (stamp $STAMP)"
        CRIU=$wrapper
        return
    fi
    [ "$(dpkg --print-architecture)" = amd64 ] ||
        die "dpkg --print-architecture" "the private runtime is only provisioned for amd64"
    check_keyring
    write_private_apt_config
    update_private_lists
    say "resolving criu's runtime closure (sid: $SID_PACKAGES; the rest from trixie)"
    local closure pycriu_ver
    mapfile -t closure < <(resolve_closure)
    [ "${#closure[@]}" -gt 0 ] || die "apt-get -s install criu" "no packages resolved; delete $APT_DIR and re-run"
    printf '    %s\n' "${closure[@]}"
    pycriu_ver=$(printf '%s\n' "${closure[@]}" | sed -n 's/^criu=//p')
    say "downloading ${#closure[@]} packages + python3-pycriu=$pycriu_ver into $DEB_DIR"
    local files
    mapfile -t files < <(download_debs "${closure[@]}" "python3-pycriu=$pycriu_ver")
    [ "${#files[@]}" -eq $((${#closure[@]} + 1)) ] ||
        die "apt-get download" "some packages were not downloaded; re-run"

    local stage=$PREFIX/root.new
    say "unpacking into $PREFIX/root"
    rm -rf "$stage"
    mkdir -p "$stage"
    local f
    for f in "${files[@]}"; do
        run "re-run; if it persists delete $DEB_DIR/$f" dpkg-deb -x "$DEB_DIR/$f" "$stage"
    done
    rm -rf "$PREFIX/root.old"
    [ ! -e "$PREFIX/root" ] || mv "$PREFIX/root" "$PREFIX/root.old"
    mv "$stage" "$PREFIX/root"
    rm -rf "$PREFIX/root.old"

    say "writing wrapper $wrapper"
    write_wrapper "$PREFIX/root"
    version_ok "$wrapper" || die "$wrapper --version" \
        "the unpacked criu does not run or is older than $MIN_MAJOR.$MIN_MINOR; delete $PREFIX and re-run"
    {
        echo "# hamgr private criu runtime; delete this file to force re-provisioning"
        printf '%s\n' "${closure[@]}" "python3-pycriu=$pycriu_ver"
    } >"$STAMP"
    CRIU=$wrapper
}

# pycriu is pure Python; the copy unpacked from the same sid release talks to any criu >= 4.2 over
# the RPC protocol, whose protobuf schema only ever grows.
install_pycriu() {
    local src=$PREFIX/root/usr/lib/python3/dist-packages/pycriu
    if [ ! -d "$src" ]; then
        # The system criu is in use, so only python3-pycriu is needed from sid.
        check_keyring
        write_private_apt_config
        update_private_lists
        say "fetching python3-pycriu from sid"
        local files
        mapfile -t files < <(download_debs python3-pycriu)
        mkdir -p "$PREFIX/root"
        run "delete $DEB_DIR/${files[0]} and re-run" dpkg-deb -x "$DEB_DIR/${files[0]}" "$PREFIX/root"
    fi
    # Only pycriu goes on sys.path, not the crit CLI's package and dist-info next to it.
    mkdir -p "$PREFIX/python"
    ln -sfn "$src" "$PREFIX/python/pycriu"
    local site
    site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))') ||
        die "$VENV/bin/python -c 'import sysconfig'" "recreate the venv at $VENV"
    say "making pycriu importable from $VENV ($site/hamgr-pycriu.pth)"
    printf '%s\n' "$PREFIX/python" >"$site/hamgr-pycriu.pth"
    # Debian generates pycriu's *_pb2 modules with protoc 3.21 (the only protoc Debian ships,
    # trixie and sid alike), so regenerating them with Debian's protoc would give the same code.
    # The venv's protobuf runtime (7.x) accepts that generated code; this proves it by building
    # and round-tripping an RPC request and loading the image descriptors.
    local check='
import pycriu, pycriu.images.images
from pycriu.images import core_pb2
r = pycriu.rpc.criu_req(type=pycriu.rpc.DUMP)
r.opts.images_dir_fd = 3
r.opts.tcp_established = True
r.opts.external.append("net[1]:k")
r2 = pycriu.rpc.criu_req()
r2.ParseFromString(r.SerializeToString())
assert r2 == r and core_pb2.core_entry.DESCRIPTOR.full_name == "core_entry"
'
    run "the venv's protobuf cannot load pycriu's generated code; install a protobuf release that accepts protoc-3.21 code, e.g. $VENV/bin/pip install 'protobuf<8'" \
        "$VENV/bin/python" -W error -c "$check"
    say "pycriu $(cd / && "$VENV/bin/python" -c 'import pycriu; print(pycriu.__version__)') imports with protobuf $("$VENV/bin/python" -c 'import google.protobuf as p; print(p.__version__)')"
}

CRIU=""
mkdir -p "$CACHE"
# A concurrent run (e.g. setup and a test both provisioning) must not swap the prefix under us.
exec 9>"$CACHE/.provision.lock"
flock -w 600 9 || die "flock $CACHE/.provision.lock" "another provision-criu.sh is stuck; kill it"
ensure_runtime_deps

say "looking for a usable system criu (>= $MIN_MAJOR.$MIN_MINOR with a passing 'criu check')"
if SYS_CRIU=$(command -v criu 2>/dev/null) && version_ok "$SYS_CRIU" &&
    timeout 30 "$SYS_CRIU" check >/dev/null 2>&1; then
    say "using system criu $(criu_version_of "$SYS_CRIU") at $SYS_CRIU"
    CRIU=$SYS_CRIU
else
    if [ -n "${SYS_CRIU:-}" ]; then
        say "system criu $(criu_version_of "$SYS_CRIU" || true) at $SYS_CRIU is unusable here; using a private one in $PREFIX"
    else
        say "no system criu; using a private one in $PREFIX"
    fi
    provision_private
fi

if [ -n "$VENV" ]; then
    install_pycriu
else
    say "no --venv given; skipping pycriu"
fi

say "checking the kernel with $CRIU check"
run "see the criu check output above; the kernel lacks a feature criu needs" timeout 30 "$CRIU" check
say "criu $(criu_version_of "$CRIU") is ready"
echo "$CRIU"
