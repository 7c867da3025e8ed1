"""`hamgr hosts add|list|remove` against a real sshd (Debian's openssh-server) in a test netns.

    client netns <p>-c                      host netns <p>-h
    <p>c 198.18.5.1/24 ────── veth ────── <p>h 198.18.5.2/24
    `hamgr hosts ...` runs here             sshd -D -f CONFIG -e (its own host key, config,
                                            authorized_keys, pid file: all in a tmp dir); the
                                            agent that `hosts add` starts over SSH lives here

The "remote" host shares this machine's filesystem, so its agent runs this checkout's hamgr with
the venv's Python (``--python``) and its own state dir. Everything made here is removed at the
end: the agent and its data plane by PID (through `hamgr down --teardown` and then
`hamgr.agent.topology.reap`), sshd by PID, the namespaces, the tmp dirs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from hamgr import control, keys
from hamgr.agent import procs
from hamgr.agent.topology import reap
from shim import netns

pytestmark = [
    pytest.mark.root,
]

CLIENT_IP = "198.18.5.1"
HOST_IP = "198.18.5.2"
SSHD = "/usr/sbin/sshd"
PRIVSEP_DIR = Path("/run/sshd")


def _gone(pid: int, timeout: float = 15.0) -> bool:
    """Whether process `pid` exits within `timeout` (`hamgr down` returns as it unlocks)."""
    deadline = time.monotonic() + timeout
    while procs.start_ticks(pid) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)],
        check=True,
        timeout=30,
    )


def _fingerprint_of(pub: Path) -> str:
    """The fingerprint as OpenSSH's own ssh-keygen prints it (not hamgr's code)."""
    out = subprocess.run(
        ["ssh-keygen", "-lf", str(pub)], check=True, capture_output=True, text=True, timeout=30
    ).stdout
    return out.split()[1]


@attrs.define
class SshHost:
    """Two namespaces joined by a veth, and sshd in the host one, started and stopped by PID."""

    work: Path
    prefix: str = attrs.field(factory=lambda: f"hs{os.getpid() % 100000}")
    made_ns: list[str] = attrs.Factory(list)
    sshd: subprocess.Popen[bytes] | None = None
    made_privsep: bool = False

    @property
    def client_ns(self) -> str:
        return f"{self.prefix}-c"

    @property
    def host_ns(self) -> str:
        return f"{self.prefix}-h"

    @property
    def host_key(self) -> Path:
        return self.work / "ssh_host_ed25519_key"

    @property
    def client_key(self) -> Path:
        return self.work / "client_key"

    @property
    def other_key(self) -> Path:
        return self.work / "other_key"

    @property
    def authorized(self) -> Path:
        return self.work / "authorized_keys"

    @property
    def log(self) -> Path:
        return self.work / "sshd.log"

    @property
    def fingerprint(self) -> str:
        return _fingerprint_of(self.host_key.with_suffix(".pub"))

    def start(self) -> None:
        for ns in (self.client_ns, self.host_ns):
            netns.create_netns(ns)
            self.made_ns.append(ns)
        c, h = f"{self.prefix}c", f"{self.prefix}h"
        netns.create_veth(netns.VethEnd(c, self.client_ns), netns.VethEnd(h, self.host_ns))
        netns.add_address(c, f"{CLIENT_IP}/24", self.client_ns)
        netns.add_address(h, f"{HOST_IP}/24", self.host_ns)
        netns.set_up(c, self.client_ns)
        netns.set_up(h, self.host_ns)

        for key in (self.host_key, self.client_key, self.other_key):
            _keygen(key)
        self.authorized.write_text(self.client_key.with_suffix(".pub").read_text())
        config = self.work / "sshd_config"
        config.write_text(
            f"Port 22\n"
            f"ListenAddress {HOST_IP}\n"
            f"HostKey {self.host_key}\n"
            f"AuthorizedKeysFile {self.authorized}\n"
            f"PidFile {self.work / 'sshd.pid'}\n"
            "PermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            # The tmp dir's parents (/tmp) are world-writable, which StrictModes refuses.
            "StrictModes no\n"
            "Subsystem sftp internal-sftp\n"
            "LogLevel VERBOSE\n"
        )
        if not PRIVSEP_DIR.exists():
            PRIVSEP_DIR.mkdir(mode=0o755)
            self.made_privsep = True
        with open(self.log, "ab") as log:
            # `ip netns exec` execs sshd in place, so the PID is sshd's own.
            self.sshd = subprocess.Popen(
                ["ip", "netns", "exec", self.host_ns, SSHD, "-D", "-f", str(config), "-e"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        for _ in range(100):
            if self.sshd.poll() is not None:
                raise AssertionError(f"sshd exited {self.sshd.returncode}: {self.log.read_text()}")
            if "Server listening" in self.log.read_text(errors="replace"):
                return
            time.sleep(0.1)
        raise AssertionError(f"sshd did not listen: {self.log.read_text()}")

    def close(self) -> None:
        if self.sshd is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.sshd.pid, signal.SIGTERM)
            try:
                self.sshd.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.sshd.pid, signal.SIGKILL)
                self.sshd.wait(10)
            self.sshd = None
        for ns in reversed(self.made_ns):
            with contextlib.suppress(netns.NetnsError):
                netns.delete_netns(ns)
        self.made_ns.clear()
        if self.made_privsep:
            with contextlib.suppress(OSError):
                PRIVSEP_DIR.rmdir()
            self.made_privsep = False


@pytest.fixture(scope="module")
def ssh_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshHost]:
    host = SshHost(tmp_path_factory.mktemp("sshd"))
    try:
        host.start()
        yield host
    finally:
        host.close()
        shutil.rmtree(host.work, ignore_errors=True)


@attrs.define
class Controller:
    """This machine's side: a state dir with keys, and the CLI run in the client netns."""

    ssh: SshHost
    tmp: Path
    name: str = attrs.field(factory=lambda: f"hb{os.getpid() % 100000}")
    agent_pids: set[int] = attrs.Factory(set)

    @property
    def state_dir(self) -> Path:
        return self.tmp / "local"

    @property
    def remote_state_dir(self) -> Path:
        return self.tmp / "remote"

    @property
    def home(self) -> Path:
        # An empty HOME: no default ~/.ssh keys or known_hosts leak in from the machine.
        return self.tmp / "home"

    def hamgr(
        self, *args: str, netns_name: str | None = None, state_dir: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "hamgr", *args]
        argv += ["--state-dir", str(state_dir or self.state_dir)]
        ns = netns_name or self.ssh.client_ns
        env = {**os.environ, "HOME": str(self.home), "NO_COLOR": "1"}
        proc = subprocess.run(
            ["ip", "netns", "exec", ns, *argv],
            capture_output=True,
            text=True,
            timeout=240,
            env=env,
            check=False,
        )
        for line in proc.stdout.splitlines():
            with contextlib.suppress(ValueError, AttributeError):
                pid = json.loads(line).get("agent_pid")
                if isinstance(pid, int):
                    self.agent_pids.add(pid)
        return proc

    def add(self, *extra: str, key: Path | None = None) -> subprocess.CompletedProcess[str]:
        return self.hamgr(
            "hosts",
            "add",
            self.name,
            "--address",
            HOST_IP,
            "--key",
            str(key or self.ssh.client_key),
            "--python",
            sys.executable,
            "--remote-state-dir",
            str(self.remote_state_dir),
            "--timeout",
            "5",
            "--json",
            *extra,
        )

    def listed(self) -> dict[str, Any]:
        proc = self.hamgr("hosts", "list", "--json")
        assert proc.returncode == 0, proc.stderr
        data: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        return data

    def inventory(self) -> str:
        path = self.state_dir / "hosts.toml"
        return path.read_text() if path.exists() else ""

    def local_authorized(self) -> dict[bytes, str]:
        return keys.AuthorizedKeys(self.state_dir / "authorized_keys").load()

    def close(self) -> list[str]:
        """Stop the remote agent if one runs, then remove by PID whatever it left."""
        if (self.remote_state_dir / "agent.pid").exists():
            ns, rsd = self.ssh.host_ns, self.remote_state_dir
            self.hamgr("down", "--teardown", netns_name=ns, state_dir=rsd)
        left = reap(self.remote_state_dir, self.name)
        for pid in self.agent_pids:
            if not _gone(pid) and "hamgr.agent" in " ".join(procs.cmdline(pid)):
                left.append(f"agent pid {pid}")
                os.kill(pid, signal.SIGKILL)
        return left


@pytest.fixture
def ctl(ssh_host: SshHost, tmp_path: Path) -> Iterator[Controller]:
    c = Controller(ssh_host, tmp_path)
    c.home.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "hamgr", "init", "--host", "ctl", "--state-dir", str(c.state_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    try:
        yield c
    finally:
        left = c.close()
        shutil.rmtree(tmp_path, ignore_errors=True)
        assert not left, f"left behind: {left}"


def _last(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return data


def _ping_in(ns: str, endpoint: str, agent_key: str, state_dir: Path) -> dict[str, Any]:
    cli = keys.load_keypair(keys.keys_dir(state_dir), keys.CLI)

    def ping() -> dict[str, Any]:
        with control.ControlClient(
            endpoint, server_key=agent_key.encode(), keypair=(cli.public, cli.secret), timeout=5
        ) as client:
            return dict(client.ping())

    return netns.run_in_netns(ns, ping)


def _nothing_recorded(ctl: Controller, authorized_before: dict[bytes, str]) -> None:
    assert ctl.inventory() == ""
    assert ctl.local_authorized() == authorized_before
    assert ctl.listed() == {"ok": True, "hosts": []}


# --- the whole life of a host ------------------------------------------------------------------


def test_add_list_readd_remove(ctl: Controller, ssh_host: SshHost) -> None:
    fp = ssh_host.fingerprint
    proc = ctl.add("--fingerprint", fp)
    assert proc.returncode == 0, proc.stderr
    added = _last(proc)
    assert added["ok"] is True
    assert added["name"] == ctl.name
    assert added["fingerprint"] == fp
    assert added["host_key_type"] == "ssh-ed25519"
    assert added["control"] == f"tcp://{HOST_IP}:7311"
    assert added["agent_started"] is True
    agent_pid = added["agent_pid"]
    assert procs.start_ticks(agent_pid) is not None
    assert "verified against --fingerprint" in proc.stderr

    # The agent runs in the host's netns, with its own state dir, and answers here.
    assert os.readlink(f"/proc/{agent_pid}/ns/net") == os.readlink(
        f"/proc/{ssh_host.sshd.pid}/ns/net"  # type: ignore[union-attr]
    )
    info = _ping_in(ssh_host.client_ns, added["control"], added["agent_public_key"], ctl.state_dir)
    assert info["host"] == ctl.name
    assert info["pid"] == agent_pid

    # Keys went both ways.
    remote_agent = keys.load_public(keys.keys_dir(ctl.remote_state_dir), keys.AGENT)
    assert added["agent_public_key"] == remote_agent.decode()
    assert ctl.local_authorized()[remote_agent] == f"{ctl.name} agent"
    remote_auth = keys.AuthorizedKeys(ctl.remote_state_dir / "authorized_keys").load()
    local_cli = keys.load_public(keys.keys_dir(ctl.state_dir), keys.CLI)
    local_agent = keys.load_public(keys.keys_dir(ctl.state_dir), keys.AGENT)
    assert local_cli in remote_auth
    assert local_agent in remote_auth

    listed = ctl.listed()["hosts"]
    assert len(listed) == 1
    entry = listed[0]
    assert entry["name"] == ctl.name
    assert entry["reachable"] is True
    assert entry["agent_pid"] == agent_pid
    assert entry["fingerprint"] == fp
    assert entry["address"] == HOST_IP
    assert entry["port"] == 22
    assert entry["user"] == "root"

    table = ctl.hamgr("hosts", "list")
    assert table.returncode == 0
    assert ctl.name in table.stdout
    assert "yes" in table.stdout

    # Re-adding is idempotent, here verified by a known_hosts entry instead of a fingerprint.
    known = ctl.tmp / "known_hosts"
    pub = ssh_host.host_key.with_suffix(".pub").read_text().split()
    known.write_text(f"{HOST_IP} {pub[0]} {pub[1]}\n")
    again = ctl.add("--known-hosts", str(known))
    assert again.returncode == 0, again.stderr
    assert _last(again)["agent_started"] is False
    assert _last(again)["agent_pid"] == agent_pid
    assert f"verified against {known}" in again.stderr
    assert ctl.inventory().count("[hosts.") == 1

    # An agent that stops shows as unreachable, and the inventory keeps it.
    down = ctl.hamgr("down", netns_name=ssh_host.host_ns, state_dir=ctl.remote_state_dir)
    assert down.returncode == 0, down.stderr
    listed = ctl.listed()["hosts"]
    assert listed[0]["reachable"] is False
    assert listed[0]["error"]

    # `add` starts it again.
    restarted = ctl.add("--fingerprint", fp)
    assert restarted.returncode == 0, restarted.stderr
    assert _last(restarted)["agent_started"] is True
    agent_pid = _last(restarted)["agent_pid"]
    assert ctl.listed()["hosts"][0]["reachable"] is True

    removed = ctl.hamgr("hosts", "remove", ctl.name, "--stop-agent", "--teardown", "--json")
    assert removed.returncode == 0, removed.stderr
    result = _last(removed)
    assert result["removed"] is True
    assert result["agent_stopped"] is True
    assert result["agent_pid"] == agent_pid
    assert _gone(agent_pid)
    assert ctl.listed() == {"ok": True, "hosts": []}
    assert remote_agent not in ctl.local_authorized()
    remote_auth = keys.AuthorizedKeys(ctl.remote_state_dir / "authorized_keys").load()
    assert local_cli not in remote_auth
    assert local_agent not in remote_auth

    gone = ctl.hamgr("hosts", "remove", ctl.name)
    assert gone.returncode == 1
    assert f"there is no host {ctl.name}" in gone.stderr


def test_remove_without_stop_leaves_the_agent(ctl: Controller, ssh_host: SshHost) -> None:
    proc = ctl.add("--fingerprint", ssh_host.fingerprint)
    assert proc.returncode == 0, proc.stderr
    added = _last(proc)
    removed = ctl.hamgr("hosts", "remove", ctl.name, "--json")
    assert removed.returncode == 0, removed.stderr
    assert _last(removed)["agent_stopped"] is False
    assert ctl.listed() == {"ok": True, "hosts": []}
    assert added["agent_public_key"].encode() not in ctl.local_authorized()
    assert procs.start_ticks(added["agent_pid"]) is not None  # stopped by the fixture


# --- refusals: nothing is recorded, nothing is done remotely -----------------------------------


def test_unknown_host_key_is_refused(ctl: Controller, ssh_host: SshHost) -> None:
    before = ctl.local_authorized()
    proc = ctl.add()
    assert proc.returncode == 1, proc.stderr
    fp = ssh_host.fingerprint
    assert "is unknown" in proc.stderr
    assert fp in proc.stderr
    assert f"pass --fingerprint {fp}" in proc.stderr
    assert _last(proc) == {
        "ok": False,
        "error": proc.stderr.strip()[7:],
        "code": "host_key_unknown",
    }
    assert not ctl.remote_state_dir.exists()
    _nothing_recorded(ctl, before)


def test_wrong_fingerprint_is_refused(ctl: Controller, ssh_host: SshHost) -> None:
    before = ctl.local_authorized()
    wrong = _fingerprint_of(ssh_host.other_key.with_suffix(".pub"))
    proc = ctl.add("--fingerprint", wrong)
    assert proc.returncode == 1, proc.stderr
    assert f"not the {wrong} that was given" in proc.stderr
    assert f"pass --fingerprint {ssh_host.fingerprint}" in proc.stderr
    assert _last(proc)["code"] == "host_key_mismatch"
    assert not ctl.remote_state_dir.exists()
    _nothing_recorded(ctl, before)


def test_known_hosts_mismatch_is_refused(ctl: Controller, ssh_host: SshHost) -> None:
    before = ctl.local_authorized()
    known = ctl.tmp / "known_hosts"
    pub = ssh_host.other_key.with_suffix(".pub").read_text().split()
    known.write_text(f"{HOST_IP} {pub[0]} {pub[1]}\n")
    proc = ctl.add("--known-hosts", str(known))
    assert proc.returncode == 1, proc.stderr
    assert f"but {known} has ssh-ed25519" in proc.stderr
    assert ssh_host.fingerprint in proc.stderr
    assert _last(proc)["code"] == "host_key_mismatch"
    _nothing_recorded(ctl, before)


def test_wrong_client_key_gives_the_auth_error(ctl: Controller, ssh_host: SshHost) -> None:
    before = ctl.local_authorized()
    proc = ctl.add("--fingerprint", ssh_host.fingerprint, key=ssh_host.other_key)
    assert proc.returncode == 3, proc.stderr
    assert (
        f"sshd at {HOST_IP}:22 refused the key {ssh_host.other_key} for user root: add its "
        f"public key ({ssh_host.other_key}.pub) to ~root/.ssh/authorized_keys"
    ) in proc.stderr
    assert _last(proc)["code"] == "ssh_auth"
    _nothing_recorded(ctl, before)


def test_closed_port_is_unreachable(ctl: Controller, ssh_host: SshHost) -> None:
    proc = ctl.add("--fingerprint", ssh_host.fingerprint, "--port", "2222")
    assert proc.returncode == 3, proc.stderr
    assert f"{HOST_IP}:2222 refused the connection" in proc.stderr
    assert _last(proc)["code"] == "ssh_unreachable"


def test_bootstrap_names_a_missing_python_or_hamgr(ctl: Controller, ssh_host: SshHost) -> None:
    before = ctl.local_authorized()
    fp = ssh_host.fingerprint
    proc = ctl.add("--fingerprint", fp, "--python", "/nonexistent/python3")
    assert proc.returncode == 1, proc.stderr
    assert "there is no /nonexistent/python3 on" in proc.stderr
    assert _last(proc)["code"] == "no_python"
    # The system interpreter runs, but has no hamgr: the venv's is the one that does.
    bare = shutil.which("python3", path="/usr/bin")
    if (
        bare is not None
        and subprocess.run(
            [bare, "-c", "import hamgr"], capture_output=True, cwd="/", check=False
        ).returncode
    ):
        proc = ctl.add("--fingerprint", fp, "--python", bare)
        assert proc.returncode == 1, proc.stderr
        assert f"hamgr is not installed for {bare}" in proc.stderr
        assert _last(proc)["code"] in ("no_hamgr", "old_python")
    assert not ctl.remote_state_dir.exists()
    _nothing_recorded(ctl, before)


def test_usage_errors(ctl: Controller, ssh_host: SshHost) -> None:
    proc = ctl.add("--fingerprint", "MD5:00:11:22")
    assert proc.returncode == 2
    assert "MD5 fingerprint" in proc.stderr
    proc = ctl.add("--fingerprint", ssh_host.fingerprint, "--known-hosts", "/dev/null")
    assert proc.returncode == 2
    assert "not both" in proc.stderr
    proc = ctl.add("--fingerprint", ssh_host.fingerprint, key=ctl.tmp / "nope")
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr
    uninitialised = ctl.hamgr("hosts", "list", state_dir=ctl.tmp / "empty")
    assert uninitialised.returncode == 0  # an empty inventory needs no keys
    assert "no hosts" in uninitialised.stderr


# --- `add --install`: hamgr shipped as wheels into a venv on a bare host -----------------------
#
# Debian's own /usr/bin/python3 makes the venv on the host (this CLI runs from another Python,
# the checkout's venv); nothing of the checkout or of that venv is used there. The prefix lives
# in the test's tmp dir.

HOST_PYTHON = "/usr/bin/python3"


def _install(ctl: Controller, prefix: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return ctl.hamgr(
        "hosts",
        "add",
        ctl.name,
        "--address",
        HOST_IP,
        "--key",
        str(ctl.ssh.client_key),
        "--remote-state-dir",
        str(ctl.remote_state_dir),
        "--timeout",
        "5",
        "--install",
        "--prefix",
        str(prefix),
        "--python",
        HOST_PYTHON,
        "--json",
        *extra,
    )


def _mapped_files(pid: int) -> set[str]:
    with open(f"/proc/{pid}/maps") as f:
        return {line.split(maxsplit=5)[5].strip() for line in f if len(line.split()) == 6}


def _left_beside(prefix: Path) -> list[str]:
    """What exists of PREFIX and of its hidden release/upload dirs."""
    if not prefix.parent.exists():
        return []
    return sorted(p.name for p in prefix.parent.iterdir() if p.name.lstrip(".").startswith("venv"))


def test_install_on_a_bare_host_then_again_then_reinstall(
    ctl: Controller, ssh_host: SshHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hamgr import hosts

    prefix = ctl.tmp / "opt" / "hamgr" / "venv"
    fp = ssh_host.fingerprint
    proc = _install(ctl, prefix, "--fingerprint", fp)
    assert proc.returncode == 0, proc.stderr
    added = _last(proc)
    install = added["install"]
    assert install["changed"] is True
    assert added["python"] == f"{prefix}/bin/python"
    assert added["prefix"] == str(prefix)
    assert "sha256 verified there" in proc.stderr

    # PREFIX is a symlink to the release dir, which holds a venv and the install record.
    release = Path(install["release"])
    assert prefix.is_symlink()
    assert prefix.resolve() == release.resolve()
    assert release.parent == prefix.parent
    assert _left_beside(prefix) == sorted(["venv", release.name])
    marker = json.loads((release / "hamgr-install.json").read_text())
    assert marker["id"] == install["id"]
    hamgr_wheel = next(w for w in marker["wheels"] if w["name"] == "hamgr")
    assert hamgr_wheel["sha256"] == install["sha256"]
    assert hamgr_wheel["file"] == install["wheel"]
    # pip came along: the host can ship this install on by itself.
    pip = subprocess.run(
        [f"{prefix}/bin/python", "-m", "pip", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert pip.returncode == 0, pip.stderr
    assert f"from {prefix}/lib/" in pip.stdout
    pyvenv = (release / "pyvenv.cfg").read_text()
    assert "home = /usr/bin\n" in pyvenv
    assert "include-system-site-packages = false\n" in pyvenv

    # The agent runs from the prefix's interpreter and the venv's own libraries, in the host's
    # netns, and answers over CURVE from the client netns.
    agent_pid = added["agent_pid"]
    argv0 = procs.cmdline(agent_pid)[0]
    assert argv0 == f"{prefix}/bin/python"
    site = str(release.resolve() / "lib")
    assert any(m.startswith(site) and "zmq" in m for m in _mapped_files(agent_pid))
    assert os.readlink(f"/proc/{agent_pid}/ns/net") == os.readlink(
        f"/proc/{ssh_host.sshd.pid}/ns/net"  # type: ignore[union-attr]
    )
    info = _ping_in(ssh_host.client_ns, added["control"], added["agent_public_key"], ctl.state_dir)
    assert info["host"] == ctl.name
    assert info["pid"] == agent_pid
    dp_pid = info["dataplane_pid"]
    assert os.path.realpath(f"/proc/{dp_pid}/exe").startswith(str(release.resolve()))

    # Recorded with the venv's interpreter and the prefix.
    inventory = ctl.inventory()
    assert f'python = "{prefix}/bin/python"' in inventory
    assert f'prefix = "{prefix}"' in inventory
    assert ctl.listed()["hosts"][0]["reachable"] is True

    # Again: the host has these wheels, so nothing is uploaded and the agent is left alone.
    again = _install(ctl, prefix, "--fingerprint", fp)
    assert again.returncode == 0, again.stderr
    result = _last(again)
    assert result["install"]["changed"] is False
    assert result["install"]["release"] == str(release)
    assert result["agent_started"] is False
    assert result["agent_pid"] == agent_pid
    assert "already has these wheels" in again.stderr
    assert "uploaded" not in again.stderr

    # A reinstall whose new agent "does not answer" (the ping is made to fail) goes back: PREFIX
    # to the first release, the new one removed, the agent it stopped started again from there,
    # the inventory and keys as they were.
    inventory, authorized = ctl.inventory(), ctl.local_authorized()
    with monkeypatch.context() as patch:
        patch.setattr(hosts, "_ping_new", _unreachable)
        error = _add_in_process(ctl, ssh_host, prefix, reinstall=True)
    assert error.code == "agent_unreachable", error.message
    assert prefix.resolve() == release.resolve()
    assert _left_beside(prefix) == sorted(["venv", release.name])
    assert ctl.inventory() == inventory
    assert ctl.local_authorized() == authorized
    assert _gone(agent_pid)
    agent_pid = _agent_of(ctl.remote_state_dir)
    assert agent_pid is not None
    ctl.agent_pids.add(agent_pid)
    assert procs.cmdline(agent_pid)[0] == f"{prefix}/bin/python"
    assert any(m.startswith(site) for m in _mapped_files(agent_pid))
    info = _ping_in(ssh_host.client_ns, added["control"], added["agent_public_key"], ctl.state_dir)
    assert info["pid"] == agent_pid
    assert info["dataplane_pid"] == dp_pid

    # --reinstall: a new release, the agent restarted from it, the data plane adopted, the old
    # release removed.
    fresh = _install(ctl, prefix, "--fingerprint", fp, "--reinstall")
    assert fresh.returncode == 0, fresh.stderr
    result = _last(fresh)
    new_release = Path(result["install"]["release"])
    assert result["install"]["changed"] is True
    assert new_release != release
    assert not release.exists()
    assert prefix.resolve() == new_release.resolve()
    assert _left_beside(prefix) == sorted(["venv", new_release.name])
    assert result["agent_started"] is True
    assert _gone(agent_pid)
    new_pid = result["agent_pid"]
    assert new_pid != agent_pid
    assert any(m.startswith(str(new_release.resolve() / "lib")) for m in _mapped_files(new_pid))
    info = _ping_in(
        ssh_host.client_ns, result["control"], result["agent_public_key"], ctl.state_dir
    )
    assert info["pid"] == new_pid
    assert info["dataplane_pid"] == dp_pid
    assert ctl.inventory().count("[hosts.") == 1

    # `remove --stop-agent` reaches the agent through the recorded interpreter (the venv's).
    removed = ctl.hamgr("hosts", "remove", ctl.name, "--stop-agent", "--teardown", "--json")
    assert removed.returncode == 0, removed.stderr
    assert _last(removed)["agent_stopped"] is True
    assert _gone(new_pid)
    assert ctl.listed() == {"ok": True, "hosts": []}


def _add_in_process(
    ctl: Controller, ssh_host: SshHost, prefix: Path, *, reinstall: bool = False
) -> Any:
    """`add_host` run here, on a thread in the client netns; returns the `HostsError` it raised."""
    from hamgr import hosts

    options = hosts.AddOptions(
        name=ctl.name,
        target=hosts.SshTarget(
            address=HOST_IP,
            key=ssh_host.client_key,
            fingerprint=ssh_host.fingerprint,
            timeout=5,
        ),
        python=HOST_PYTHON,
        remote_state_dir=str(ctl.remote_state_dir),
        install=hosts.InstallOptions(prefix=str(prefix), reinstall=reinstall),
    )

    def add() -> None:
        hosts.add_host(ctl.state_dir, options, lambda _line: None)

    with pytest.raises(hosts.HostsError) as caught:
        netns.run_in_netns(ssh_host.client_ns, add)
    return caught.value


def test_install_refuses_a_corrupted_upload(
    ctl: Controller, ssh_host: SshHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hamgr import hosts

    before = ctl.local_authorized()
    prefix = ctl.tmp / "opt" / "hamgr" / "venv"
    upload = hosts.Remote.upload

    def corrupt(self: hosts.Remote, local: Path, path: str) -> None:
        if not local.name.startswith("hamgr-"):
            upload(self, local, path)
            return
        data = bytearray(local.read_bytes())
        data[len(data) // 2] ^= 0x01  # one bit flipped on the way
        bad = ctl.tmp / "flipped" / local.name
        bad.parent.mkdir(exist_ok=True)
        bad.write_bytes(bytes(data))
        upload(self, bad, path)

    monkeypatch.setattr(hosts.Remote, "upload", corrupt)
    error = _add_in_process(ctl, ssh_host, prefix)
    assert error.code == "upload_corrupt", error.message
    assert error.status == 1
    assert "arrived corrupted" in error.message
    assert "hamgr-" in error.message
    # Nothing was installed, nothing is left: not the prefix, not the dirs made for it, not the
    # upload, not the remote state dir; nothing recorded here.
    assert not (ctl.tmp / "opt").exists()
    assert not ctl.remote_state_dir.exists()
    _nothing_recorded(ctl, before)
    # The lock's process ended with its channel.
    deadline = time.monotonic() + 5
    while _holders(prefix.parent) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _holders(prefix.parent) == []


def _agent_of(state_dir: Path) -> int | None:
    path = state_dir / "agent.pid"
    text = path.read_text().strip() if path.exists() else ""
    pid = int(text) if text.isdigit() else None
    return pid if pid is not None and procs.start_ticks(pid) is not None else None


def _unreachable(*_args: Any) -> Any:
    from hamgr import hosts

    raise hosts.HostsError("no answer (test)", status=3, code="agent_unreachable")


def test_install_rolls_back_a_first_install_whose_agent_does_not_answer(
    ctl: Controller, ssh_host: SshHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hamgr import hosts

    before = ctl.local_authorized()
    prefix = ctl.tmp / "opt" / "hamgr" / "venv"
    # The agent starts from the new venv but "does not answer": it and the data plane it started
    # are stopped, and the venv, PREFIX, the dirs made for it and the state dir this run made go.
    # The fixture then finds nothing to reap.
    started: list[int] = []
    ping_new = hosts._ping_new

    def unreachable(record: Any, agent_key: bytes, identity: Any, options: Any) -> Any:
        started.append(ping_new(record, agent_key, identity, options)["pid"])
        return _unreachable()

    monkeypatch.setattr(hosts, "_ping_new", unreachable)
    error = _add_in_process(ctl, ssh_host, prefix)
    assert error.code == "agent_unreachable", error.message
    assert len(started) == 1  # it did run, and answered
    assert _gone(started[0])
    assert not (ctl.tmp / "opt").exists()
    assert not ctl.remote_state_dir.exists()
    _nothing_recorded(ctl, before)


def _holders(directory: Path) -> list[int]:
    """PIDs of processes whose command line names `directory` (the remote lock's holder)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if str(directory) in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    out.append(int(entry.name))
    return out


def test_install_refuses_an_unknown_host_key_before_uploading(
    ctl: Controller, ssh_host: SshHost
) -> None:
    before = ctl.local_authorized()
    prefix = ctl.tmp / "opt" / "hamgr" / "venv"
    proc = _install(ctl, prefix)
    assert proc.returncode == 1, proc.stderr
    assert _last(proc)["code"] == "host_key_unknown"
    assert f"pass --fingerprint {ssh_host.fingerprint}" in proc.stderr
    assert "wheels built" not in proc.stderr
    assert not (ctl.tmp / "opt").exists()
    assert not ctl.remote_state_dir.exists()
    _nothing_recorded(ctl, before)


def test_install_leaves_a_prefix_it_did_not_make(ctl: Controller, ssh_host: SshHost) -> None:
    before = ctl.local_authorized()
    prefix = ctl.tmp / "opt" / "venv"
    prefix.mkdir(parents=True)
    (prefix / "mine").write_text("an operator's file\n")
    proc = _install(ctl, prefix, "--fingerprint", ssh_host.fingerprint)
    assert proc.returncode == 1, proc.stderr
    assert _last(proc)["code"] == "prefix_taken"
    assert f"{prefix} exists" in proc.stderr
    assert sorted(p.name for p in prefix.parent.iterdir()) == ["venv"]
    assert (prefix / "mine").read_text() == "an operator's file\n"
    assert not ctl.remote_state_dir.exists()
    _nothing_recorded(ctl, before)

    relative = _install(ctl, Path("opt/venv"), "--fingerprint", ssh_host.fingerprint)
    assert relative.returncode == 2
    assert _last(relative)["code"] == "bad_prefix"
    alone = ctl.add("--fingerprint", ssh_host.fingerprint, "--reinstall")
    assert alone.returncode == 2
    assert "go with --install" in alone.stderr
