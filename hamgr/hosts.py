"""Remote hosts: verify one over SSH, start its agent, exchange CURVE keys, keep an inventory.

`add_host` is what `hamgr hosts add` does, in this order; nothing is recorded unless every step
worked:

1. SSH to ``user@address:port`` with paramiko. The host key must match the operator's
   ``--fingerprint`` or an entry in a known_hosts file; an unknown or different key is refused
   and its actual SHA256 fingerprint is printed, so that the operator can check it out of band.
   There is no "accept on first use".
2. Check the remote Python (3.11 or later) and that ``PYTHON -m hamgr --version`` runs there and
   reports this CLI's version. hamgr is not copied over: the remote interpreter must already have
   it (see docs/hosts.md for why).
3. ``hamgr init`` there, with the host's own state dir and the control endpoint
   ``tcp://ADDRESS:CONTROL_PORT``; its JSON names the remote agent's public key, read over the
   verified SSH channel.
4. Key exchange: this machine's CLI and agent public keys go into the remote authorized_keys
   (over SFTP, written to a temporary file and renamed); the remote agent's key goes into the
   local authorized_keys.
5. ``hamgr up`` there. sshd's children live in sshd's network namespace, so the agent runs in the
   host's netns, as any process started over SSH does.
6. Ping the agent over the control channel at the host's address, from here, with this CLI's key.

Every failure is a `HostsError` that names the problem and the fix, with the exit status the CLI
documents: 1 failed (a refused host key, a missing Python or hamgr, an agent that does not
start), 2 bad usage (bad options, no local keys), 3 unreachable (no TCP connection, sshd refused
the client key, the agent does not answer).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime
import hashlib
import hmac
import importlib.metadata
import ipaddress
import json
import os
import re
import select
import shlex
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import attrs
import paramiko  # type: ignore[import-untyped, unused-ignore]

from hamgr import keys
from hamgr.inventory import HostRecord, Inventory, InventoryError, check_host_name

__all__ = [
    "DEFAULT_CONTROL_PORT",
    "DEFAULT_KEYS",
    "AddOptions",
    "HostsError",
    "LocalIdentity",
    "Remote",
    "RemoteResult",
    "SshTarget",
    "add_host",
    "edit_authorized_keys",
    "fingerprint",
    "list_hosts",
    "local_identity",
    "parse_fingerprint",
    "probe",
    "remove_host",
]

FAILED: Final = 1
USAGE: Final = 2
UNREACHABLE: Final = 3

DEFAULT_CONTROL_PORT: Final = 7311
DEFAULT_KEYS: Final = ("id_ed25519", "id_ecdsa", "id_rsa")
MIN_PYTHON: Final = (3, 11)
_PY_VERSION: Final = "import sys; print('%d.%d.%d' % sys.version_info[:3])"
_VERSION_LINE: Final = re.compile(r"version (\S+)\s*$")
_AUTHORIZED_HEADER: Final = "# hamgr: CURVE public keys allowed to reach this agent (key comment)\n"

Say = Callable[[str], None]


class HostsError(Exception):
    """A `hamgr hosts` step failed; `message` names the problem and the fix, `status` the exit."""

    def __init__(self, message: str, *, status: int = FAILED, code: str = "failed") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code


# --- fingerprints ------------------------------------------------------------------------------


def fingerprint(blob: bytes) -> str:
    """OpenSSH's SHA256 fingerprint of a public key blob (what `ssh-keygen -lf` prints)."""
    digest = hashlib.sha256(blob).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def parse_fingerprint(text: str) -> str:
    """The canonical form of a SHA256 fingerprint the operator typed; raises `HostsError`."""
    value = text.strip()
    prefix, sep, body = value.partition(":")
    how = "give it as `ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` prints it on the host"
    if not sep:
        raise HostsError(
            f"{text!r} is not a host key fingerprint: {how} (SHA256:...)",
            status=USAGE,
            code="bad_fingerprint",
        )
    if prefix.upper() == "MD5":
        raise HostsError(
            f"{text!r} is an MD5 fingerprint, which is too weak to verify a host: "
            "give the SHA256 one (`ssh-keygen -E sha256 -lf KEY.pub` on the host)",
            status=USAGE,
            code="bad_fingerprint",
        )
    if prefix.upper() != "SHA256":
        raise HostsError(
            f"{text!r}: only SHA256 fingerprints are accepted; {how}",
            status=USAGE,
            code="bad_fingerprint",
        )
    body = body.rstrip("=")
    try:
        raw = base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise HostsError(
            f"{text!r} is not a SHA256 fingerprint (43 base64 characters after SHA256:); {how}",
            status=USAGE,
            code="bad_fingerprint",
        )
    return "SHA256:" + base64.b64encode(raw).decode().rstrip("=")


def _host_key_file(key_type: str) -> str:
    kind = "ed25519"
    if key_type.startswith("ecdsa"):
        kind = "ecdsa"
    elif "rsa" in key_type:
        kind = "rsa"
    return f"/etc/ssh/ssh_host_{kind}_key.pub"


# --- authorized_keys ---------------------------------------------------------------------------


def edit_authorized_keys(
    text: str, *, add: Mapping[bytes, str] | None = None, remove: Iterable[bytes] = ()
) -> str:
    """`text` (an authorized_keys file, `hamgr.keys` format) with keys added and removed.

    Lines that are kept stay as they are, comments and unknown lines included; keys to add that
    are already there keep their line.
    """
    add = dict(add or {})
    drop = {keys.check_public_key(k) for k in remove}
    out: list[str] = []
    present: set[bytes] = set()
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        token = stripped.split(" ", 1)[0].encode() if stripped else b""
        if token and not stripped.startswith("#"):
            if token in drop:
                continue
            present.add(token)
        out.append(line if line.endswith("\n") else line + "\n")
    if not out:
        out.append(_AUTHORIZED_HEADER)
    for raw, comment in add.items():
        key = keys.check_public_key(raw)
        if key not in present and key not in drop:
            out.append(f"{key.decode()} {comment.replace(chr(10), ' ')}".rstrip() + "\n")
            present.add(key)
    return "".join(out)


# --- SSH ---------------------------------------------------------------------------------------


@attrs.frozen
class SshTarget:
    """Where to SSH to, with what, and how its host key is verified."""

    address: str
    port: int = 22
    user: str = "root"
    key: Path = attrs.field(factory=lambda: Path("~/.ssh/id_ed25519").expanduser())
    known_hosts: Path | None = None
    fingerprint: str | None = None
    timeout: float = 10.0

    @property
    def where(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"


@attrs.frozen
class RemoteResult:
    status: int
    stdout: str
    stderr: str

    def last_json(self) -> dict[str, Any] | None:
        lines = self.stdout.strip().splitlines()
        if not lines:
            return None
        try:
            value = json.loads(lines[-1])
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    def why(self) -> str:
        """The end of stderr (or stdout), for an error message."""
        text = (self.stderr.strip() or self.stdout.strip()).splitlines()
        return " / ".join(line.strip() for line in text[-4:]) or f"exit status {self.status}"


class _HostKeyRefusedError(Exception):
    def __init__(self, key_type: str, actual: str) -> None:
        super().__init__(actual)
        self.key_type = key_type
        self.actual = actual


class _VerifyHostKey:
    """paramiko's policy for a host key that known_hosts lacks: accept only `expected`.

    It never records a key anywhere; with no expected fingerprint it refuses every key.
    """

    def __init__(self, expected: str | None) -> None:
        self.expected = expected

    def missing_host_key(self, _client: Any, _hostname: str, key: Any) -> None:
        actual = fingerprint(bytes(key.asbytes()))
        if self.expected is not None and hmac.compare_digest(actual, self.expected):
            return
        raise _HostKeyRefusedError(str(key.get_name()), actual)


def _load_client_key(path: Path) -> Any:
    try:
        return paramiko.PKey.from_path(path)
    except FileNotFoundError:
        raise HostsError(
            f"the SSH client key {path} does not exist: pass --key with the private key that "
            "the remote host's sshd accepts",
            status=USAGE,
            code="no_client_key",
        ) from None
    except paramiko.PasswordRequiredException:
        raise HostsError(
            f"the SSH client key {path} is protected by a passphrase, which hamgr does not "
            "ask for: give hamgr a key of its own without one (ssh-keygen -t ed25519 -N '')",
            status=USAGE,
            code="bad_client_key",
        ) from None
    except (paramiko.SSHException, ValueError, OSError) as exc:
        raise HostsError(
            f"cannot load the SSH client key {path}: {exc}; pass --key with an OpenSSH "
            "private key (ed25519, ecdsa or rsa)",
            status=USAGE,
            code="bad_client_key",
        ) from None


class Remote:
    """One verified, authenticated SSH connection to a host."""

    def __init__(self, target: SshTarget, client: Any) -> None:
        self.target = target
        self._client = client
        self._sftp: Any = None
        server_key = client.get_transport().get_remote_server_key()
        self.host_key_type = str(server_key.get_name())
        self.fingerprint = fingerprint(bytes(server_key.asbytes()))

    @staticmethod
    def connect(target: SshTarget) -> Remote:
        """Connect, verify the host key, authenticate with `target.key`; raises `HostsError`."""
        pkey = _load_client_key(target.key)
        client = paramiko.SSHClient()
        known = target.known_hosts
        if target.fingerprint is None and known is not None and known.exists():
            try:
                # Read-only: nothing is ever written back to the operator's known_hosts.
                client.load_system_host_keys(str(known))
            except (OSError, paramiko.SSHException) as exc:
                client.close()
                raise HostsError(
                    f"cannot read known_hosts {known}: {exc}", status=USAGE, code="bad_known_hosts"
                ) from None
        client.set_missing_host_key_policy(_VerifyHostKey(target.fingerprint))
        t = target.timeout
        try:
            client.connect(
                hostname=target.address,
                port=target.port,
                username=target.user,
                pkey=pkey,
                look_for_keys=False,
                allow_agent=False,
                timeout=t,
                banner_timeout=t,
                auth_timeout=t,
                channel_timeout=t,
            )
            return Remote(target, client)
        except _HostKeyRefusedError as exc:
            client.close()
            raise _host_key_error(target, exc.key_type, exc.actual) from None
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise _known_hosts_mismatch(target, exc.key, exc.expected_key) from None
        except paramiko.AuthenticationException:
            client.close()
            raise HostsError(
                f"sshd at {target.where} refused the key {target.key} for user {target.user}: "
                f"add its public key ({target.key}.pub) to ~{target.user}/.ssh/authorized_keys "
                "on the remote host, or pass --key with a key that it accepts",
                status=UNREACHABLE,
                code="ssh_auth",
            ) from None
        except paramiko.SSHException as exc:
            client.close()
            raise HostsError(
                f"no SSH session with {target.where}: {exc}; check that sshd listens there",
                status=UNREACHABLE,
                code="ssh_failed",
            ) from None
        except TimeoutError:
            client.close()
            raise HostsError(
                f"no answer from {target.where} within {t:g} s: check that the host is up, the "
                "address and port are right, and nothing filters the port",
                status=UNREACHABLE,
                code="ssh_unreachable",
            ) from None
        except paramiko.ssh_exception.NoValidConnectionsError:
            client.close()
            raise HostsError(
                f"{target.where} refused the connection: start sshd there, or pass the --port "
                "it listens on",
                status=UNREACHABLE,
                code="ssh_unreachable",
            ) from None
        except OSError as exc:
            client.close()
            raise HostsError(
                f"cannot reach {target.where}: {exc.strerror or exc}; check the address and "
                "the route to it",
                status=UNREACHABLE,
                code="ssh_unreachable",
            ) from None

    def close(self) -> None:
        if self._sftp is not None:
            self._sftp.close()
            self._sftp = None
        self._client.close()

    def __enter__(self) -> Remote:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def run(self, argv: list[str], *, timeout: float) -> RemoteResult:
        """Run `argv` through the remote shell (each word quoted); bounded by `timeout`."""
        command = shlex.join(argv)
        try:
            chan = self._client.get_transport().open_session(timeout=self.target.timeout)
        except (paramiko.SSHException, OSError) as exc:
            raise HostsError(
                f"the SSH connection to {self.target.where} broke: {exc}",
                status=UNREACHABLE,
                code="ssh_failed",
            ) from None
        out: list[bytes] = []
        err: list[bytes] = []
        deadline = time.monotonic() + timeout
        try:
            chan.exec_command(command)
            while True:
                while chan.recv_ready():
                    out.append(bytes(chan.recv(65536)))
                while chan.recv_stderr_ready():
                    err.append(bytes(chan.recv_stderr(65536)))
                if chan.exit_status_ready() and (chan.eof_received or chan.closed):
                    if not (chan.recv_ready() or chan.recv_stderr_ready()):
                        break
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    raise HostsError(
                        f"`{command}` on {self.target.where} did not finish within {timeout:g} s",
                        code="remote_timeout",
                    )
                select.select([chan], [], [], min(left, 0.2))
            status = int(chan.recv_exit_status())
        except (paramiko.SSHException, OSError) as exc:
            raise HostsError(
                f"`{command}` on {self.target.where} failed: {exc}",
                status=UNREACHABLE,
                code="ssh_failed",
            ) from None
        finally:
            chan.close()
        return RemoteResult(
            status,
            b"".join(out).decode(errors="replace"),
            b"".join(err).decode(errors="replace"),
        )

    def _sftp_client(self) -> Any:
        if self._sftp is None:
            try:
                self._sftp = self._client.open_sftp()
            except (paramiko.SSHException, OSError) as exc:
                raise HostsError(
                    f"sshd at {self.target.where} offers no SFTP ({exc}): enable it "
                    "(`Subsystem sftp internal-sftp` in sshd_config)",
                    code="no_sftp",
                ) from None
        return self._sftp

    def read_text(self, path: str) -> str | None:
        """The remote file's text, or None if it does not exist."""
        sftp = self._sftp_client()
        try:
            with sftp.open(path, "r") as f:
                return bytes(f.read()).decode()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise HostsError(
                f"cannot read {path} on {self.target.where}: {exc}", code="remote_io"
            ) from None

    def write_text(self, path: str, text: str, mode: int = 0o644) -> None:
        """Replace the remote file atomically: a temporary file, then a POSIX rename."""
        sftp = self._sftp_client()
        tmp = f"{path}.hamgr-{os.getpid()}.tmp"
        try:
            with sftp.open(tmp, "w") as f:
                f.write(text.encode())
            sftp.chmod(tmp, mode)
            sftp.posix_rename(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                sftp.remove(tmp)
            raise HostsError(
                f"cannot write {path} on {self.target.where}: {exc}", code="remote_io"
            ) from None


def _host_key_error(target: SshTarget, key_type: str, actual: str) -> HostsError:
    check = f"ssh-keygen -lf {_host_key_file(key_type)}"
    if target.fingerprint is not None:
        return HostsError(
            f"the host key of sshd at {target.where} is {key_type} {actual}, not the "
            f"{target.fingerprint} that was given: refused, nothing was changed. Someone may be "
            f"intercepting the connection, or the host was reinstalled: check the key out of "
            f"band (run `{check}` on the host) and, if it is right, pass --fingerprint {actual}",
            code="host_key_mismatch",
        )
    where = f"not in {target.known_hosts}" if target.known_hosts else "not in any known_hosts"
    return HostsError(
        f"the host key of sshd at {target.where} ({key_type} {actual}) is unknown: it is "
        f"{where} and no --fingerprint was given; refused, nothing was changed. Check it out of "
        f"band (run `{check}` on the host) and, if it matches, pass --fingerprint {actual}",
        code="host_key_unknown",
    )


def _known_hosts_mismatch(target: SshTarget, got: Any, expected: Any) -> HostsError:
    actual = fingerprint(bytes(got.asbytes()))
    wanted = fingerprint(bytes(expected.asbytes()))
    name = target.address if target.port == 22 else f"[{target.address}]:{target.port}"
    return HostsError(
        f"the host key of sshd at {target.where} is {got.get_name()} {actual}, but "
        f"{target.known_hosts} has {expected.get_name()} {wanted} for it: refused, nothing was "
        "changed. Someone may be intercepting the connection, or the host was reinstalled: "
        f"check the key out of band (run `ssh-keygen -lf {_host_key_file(str(got.get_name()))}` "
        f"on the host); if it is right, drop the old entry (ssh-keygen -R '{name}' -f "
        f"{target.known_hosts}) and pass --fingerprint {actual}",
        code="host_key_mismatch",
    )


# --- this machine ------------------------------------------------------------------------------


@attrs.frozen
class LocalIdentity:
    """This machine's agent name and keys (from `hamgr init`)."""

    host: str
    cli: keys.Keypair
    agent_public: bytes


def local_identity(state_dir: Path) -> LocalIdentity:
    from hamgr.agent.config import AgentConfig, ConfigError

    try:
        config = AgentConfig.load(state_dir)
        directory = keys.keys_dir(state_dir)
        return LocalIdentity(
            config.host,
            keys.load_keypair(directory, keys.CLI),
            keys.load_public(directory, keys.AGENT),
        )
    except (ConfigError, keys.KeysError) as exc:
        raise HostsError(
            f"{exc} (hosts are managed from an initialised state dir: "
            f"`hamgr --state-dir {state_dir} init`)",
            status=USAGE,
            code="not_initialised",
        ) from None


def _version() -> str:
    try:
        return importlib.metadata.version("hamgr")
    except importlib.metadata.PackageNotFoundError:
        return "0"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _control_endpoint(address: str, port: int) -> str:
    ip = ipaddress.ip_address(address)
    if ip.version == 6:
        raise HostsError(
            f"{address}: IPv6 control endpoints are not supported yet; give the host's IPv4 "
            "address",
            status=USAGE,
            code="bad_address",
        )
    return f"tcp://{address}:{port}"


def _ping(
    endpoint: str, agent_key: bytes, identity: LocalIdentity, timeout: float
) -> Mapping[str, Any]:
    from hamgr.control import ControlClient

    with ControlClient(
        endpoint,
        server_key=agent_key,
        keypair=(identity.cli.public, identity.cli.secret),
        timeout=timeout,
    ) as client:
        return client.ping()


# --- add ---------------------------------------------------------------------------------------


@attrs.frozen
class AddOptions:
    name: str
    target: SshTarget
    python: str = "python3"
    remote_state_dir: str = "/var/lib/hamgr"
    control_port: int = DEFAULT_CONTROL_PORT
    agent_timeout: float = 60.0
    ping_timeout: float = 5.0


def _check_conflicts(records: Mapping[str, HostRecord], options: AddOptions, control: str) -> None:
    old = records.get(options.name)
    target = options.target
    if old is not None and (old.address, old.port) != (target.address, target.port):
        raise HostsError(
            f"host {options.name} is already in the inventory at {old.address}:{old.port}: "
            f"remove it first (`hamgr hosts remove {options.name}`) or pick another name",
            code="exists",
        )
    for other in records.values():
        if other.name != options.name and other.control == control:
            raise HostsError(
                f"{control} is already host {other.name}'s agent: remove that host first "
                f"(`hamgr hosts remove {other.name}`)",
                code="exists",
            )


def _check_python(remote: Remote, options: AddOptions) -> str:
    py = options.python
    where = f"{options.name} ({remote.target.where})"
    result = remote.run([py, "-c", _PY_VERSION], timeout=30)
    if result.status == 127:
        raise HostsError(
            f"there is no {py} on {where}: install Python 3.11 or later there, or pass "
            "--python with the path of an interpreter that has hamgr installed",
            code="no_python",
        )
    if result.status != 0:
        raise HostsError(f"{py} on {where} does not run: {result.why()}", code="no_python")
    version = result.stdout.strip()
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if parts < MIN_PYTHON:
        raise HostsError(
            f"{py} on {where} is Python {version}; hamgr needs 3.11 or later: install it there "
            "and pass --python with its path",
            code="old_python",
        )
    return version


def _check_hamgr(remote: Remote, options: AddOptions) -> str:
    py = options.python
    where = f"{options.name} ({remote.target.where})"
    mine = _version()
    result = remote.run([py, "-m", "hamgr", "--version"], timeout=60)
    if result.status != 0:
        if "No module named hamgr" in result.stderr:
            raise HostsError(
                f"hamgr is not installed for {py} on {where}: install hamgr {mine} into that "
                "environment (`pip install .` from a checkout), or pass --python with the "
                "interpreter of an environment that has it",
                code="no_hamgr",
            )
        raise HostsError(
            f"`{py} -m hamgr --version` fails on {where}: {result.why()}; repair that "
            f"installation (hamgr {mine} and its dependencies)",
            code="no_hamgr",
        )
    match = _VERSION_LINE.search(result.stdout.strip())
    theirs = match.group(1) if match else result.stdout.strip()
    if theirs != mine:
        raise HostsError(
            f"{where} has hamgr {theirs} and this machine has {mine}: install hamgr {mine} there "
            "(both ends of the control channel must be the same version)",
            code="version_mismatch",
        )
    return theirs


def _remote_init(remote: Remote, options: AddOptions, control: str) -> bytes:
    rsd = options.remote_state_dir
    result = remote.run(
        [
            options.python,
            "-m",
            "hamgr",
            "init",
            "--state-dir",
            rsd,
            "--host",
            options.name,
            "--control",
            control,
            "--json",
        ],
        timeout=60,
    )
    data = result.last_json()
    if result.status != 0 or not data or not data.get("ok"):
        fix = (
            f"pass --remote-state-dir with a dir of its own for this host, or rerun `hamgr "
            f"init --force` in {rsd} there"
            if result.status == USAGE
            else "fix what the message says, on the host"
        )
        raise HostsError(
            f"`hamgr init` in {rsd} on {options.name} failed: {result.why()}; {fix}",
            code="remote_init",
        )
    try:
        return keys.check_public_key(str(data.get("agent_public_key", "")))
    except keys.KeysError as exc:
        raise HostsError(
            f"`hamgr init` on {options.name} reported no valid agent key: {exc}", code="remote_init"
        ) from None


def _remote_authorized(rsd: str) -> str:
    return f"{rsd.rstrip('/')}/{keys.AUTHORIZED_KEYS}"


def _remote_up(remote: Remote, options: AddOptions) -> dict[str, Any]:
    rsd = options.remote_state_dir
    result = remote.run(
        [
            options.python,
            "-m",
            "hamgr",
            "up",
            "--state-dir",
            rsd,
            "--timeout",
            f"{options.agent_timeout:g}",
            "--json",
        ],
        timeout=options.agent_timeout + 30,
    )
    data = result.last_json()
    if result.status != 0 or not data or not data.get("ok"):
        raise HostsError(
            f"the agent on {options.name} did not start: {result.why()}; see "
            f"{rsd}/log/agent.log there, and `hamgr doctor` on the host",
            code="agent_start",
        )
    return data


def add_host(state_dir: Path, options: AddOptions, say: Say) -> dict[str, Any]:
    """Verify, bootstrap and record one host (see the module's docstring); returns the result."""
    try:
        check_host_name(options.name)
    except InventoryError as exc:
        raise HostsError(str(exc), status=USAGE, code="bad_name") from None
    target = options.target
    control = _control_endpoint(target.address, options.control_port)
    identity = local_identity(state_dir)
    inventory = _inventory(state_dir)
    _check_conflicts(_load(inventory), options, control)

    with Remote.connect(target) as remote:
        how = "--fingerprint" if target.fingerprint else str(target.known_hosts)
        say(
            f"connected to {target.user}@{target.where}: host key {remote.host_key_type} "
            f"{remote.fingerprint} verified against {how}"
        )
        python_version = _check_python(remote, options)
        version = _check_hamgr(remote, options)
        say(f"{options.python} on {options.name}: Python {python_version}, hamgr {version}")
        agent_key = _remote_init(remote, options, control)

        path = _remote_authorized(options.remote_state_dir)
        before = remote.read_text(path) or ""
        after = edit_authorized_keys(
            before,
            add={
                identity.cli.public: f"{identity.host} cli (hamgr hosts add)",
                identity.agent_public: f"{identity.host} agent (hamgr hosts add)",
            },
        )
        if after != before:
            remote.write_text(path, after)
        local = keys.AuthorizedKeys(state_dir / keys.AUTHORIZED_KEYS)
        try:
            added_locally = local.add(agent_key, f"{options.name} agent")
        except (keys.KeysError, OSError) as exc:
            raise HostsError(f"cannot update {local.path}: {exc}", code="local_io") from None
        say(f"keys exchanged: {path} on {options.name}, {local.path} here")
        try:
            started = _remote_up(remote, options)
            record = _record(options, remote, agent_key, control, version)
            info = _ping_new(record, agent_key, identity, options)
            # Checked again under the inventory's lock: another `hosts add` may have run.
            inventory.put(record, check=lambda records: _check_conflicts(records, options, control))
        except BaseException:
            if added_locally:
                local.remove(agent_key)
            raise
    verb = "started" if started.get("started") else "already running"
    say(f"agent on {options.name} {verb} (pid {info.get('pid')}), answers at {control}")
    return {
        "ok": True,
        **record.to_json(),
        "agent_pid": info.get("pid"),
        "agent_started": bool(started.get("started")),
        "uptime_s": info.get("uptime_s"),
        "inventory": str(inventory.path),
    }


def _record(
    options: AddOptions, remote: Remote, agent_key: bytes, control: str, version: str
) -> HostRecord:
    target = options.target
    return HostRecord(
        name=options.name,
        address=target.address,
        port=target.port,
        user=target.user,
        key=str(target.key),
        fingerprint=remote.fingerprint,
        host_key_type=remote.host_key_type,
        agent_public_key=agent_key.decode(),
        control=control,
        state_dir=options.remote_state_dir,
        python=options.python,
        version=version,
        added=_now(),
    )


def _ping_new(
    record: HostRecord, agent_key: bytes, identity: LocalIdentity, options: AddOptions
) -> Mapping[str, Any]:
    from hamgr.control import ControlAuthError, ControlError

    try:
        info = _ping(record.control, agent_key, identity, options.ping_timeout)
    except ControlAuthError:
        raise HostsError(
            f"the agent on {record.name} refused this CLI's key although it was added to "
            f"{_remote_authorized(record.state_dir)} there: check that file on the host",
            status=UNREACHABLE,
            code="refused",
        ) from None
    except ControlError as exc:
        raise HostsError(
            f"the agent on {record.name} runs but does not answer at {record.control} from "
            f"here ({exc.message}): check that TCP port {options.control_port} on "
            f"{record.address} is reachable from this machine",
            status=UNREACHABLE,
            code="agent_unreachable",
        ) from None
    if info.get("host") != record.name:
        raise HostsError(
            f"{record.control} answered as host {info.get('host')!r}, not {record.name}: another "
            "agent holds that address and port; pass another --control-port",
            code="wrong_agent",
        )
    return info


# --- list --------------------------------------------------------------------------------------


def _inventory(state_dir: Path) -> Inventory:
    return Inventory(state_dir)


def _load(inventory: Inventory) -> dict[str, HostRecord]:
    try:
        return inventory.load()
    except InventoryError as exc:
        raise HostsError(
            f"{exc}; fix or remove that file (it is rewritten by `hamgr hosts add`)",
            status=USAGE,
            code="bad_inventory",
        ) from None


def probe(record: HostRecord, identity: LocalIdentity, timeout: float) -> dict[str, Any]:
    """The record plus a live control-channel ping: reachable, pid, uptime_s, error."""
    from hamgr.control import ControlAuthError, ControlError

    out: dict[str, Any] = {**record.to_json(), "reachable": False, "error": None}
    try:
        info = _ping(record.control, record.agent_public_key.encode(), identity, timeout)
    except ControlAuthError:
        out["error"] = "the agent refused this CLI's key"
    except ControlError as exc:
        out["error"] = "no answer" if exc.code == "timeout" else exc.message
    else:
        out.update(
            reachable=True,
            agent_pid=info.get("pid"),
            agent_version=info.get("version"),
            uptime_s=info.get("uptime_s"),
        )
    return out


def list_hosts(state_dir: Path, timeout: float) -> list[dict[str, Any]]:
    """Every host in the inventory, each probed (in parallel) within `timeout`."""
    import concurrent.futures

    records = _load(_inventory(state_dir))
    if not records:
        return []
    identity = local_identity(state_dir)
    with concurrent.futures.ThreadPoolExecutor(min(16, len(records))) as pool:
        return list(
            pool.map(lambda r: probe(r, identity, timeout), [records[n] for n in sorted(records)])
        )


# --- remove ------------------------------------------------------------------------------------


def remove_host(
    state_dir: Path,
    name: str,
    *,
    stop_agent: bool,
    teardown: bool,
    timeout: float,
    say: Say,
) -> dict[str, Any]:
    """Drop `name` from the inventory and the local authorized_keys.

    With `stop_agent`, first SSH there (host key checked against the recorded fingerprint), run
    `hamgr down` and take this machine's keys out of the remote authorized_keys; if that fails,
    nothing is dropped.
    """
    inventory = _inventory(state_dir)
    record = _load(inventory).get(name)
    if record is None:
        raise HostsError(
            f"there is no host {name} in {inventory.path}: `hamgr hosts list` shows the hosts",
            code="no_such_host",
        )
    stopped: dict[str, Any] | None = None
    if stop_agent or teardown:
        identity = local_identity(state_dir)
        target = SshTarget(
            address=record.address,
            port=record.port,
            user=record.user,
            key=Path(record.key),
            fingerprint=record.fingerprint,
            timeout=timeout,
        )
        with Remote.connect(target) as remote:
            argv = [record.python, "-m", "hamgr", "down", "--state-dir", record.state_dir]
            argv += ["--teardown", "--json"] if teardown else ["--json"]
            result = remote.run(argv, timeout=300)
            stopped = result.last_json()
            if result.status != 0 or not stopped or not stopped.get("ok"):
                raise HostsError(
                    f"could not stop the agent on {name}: {result.why()}; nothing was removed. "
                    f"Run `hamgr down` there, or remove the host without --stop-agent",
                    code="agent_stop",
                )
            path = _remote_authorized(record.state_dir)
            before = remote.read_text(path)
            if before is not None:
                after = edit_authorized_keys(
                    before, remove=(identity.cli.public, identity.agent_public)
                )
                if after != before:
                    remote.write_text(path, after)
        say(
            f"agent on {name} stopped (pid {stopped.get('pid')})"
            if stopped.get("stopped")
            else f"the agent on {name} was not running"
        )
    removed = inventory.remove(name)
    local = keys.AuthorizedKeys(state_dir / keys.AUTHORIZED_KEYS)
    others = {r.agent_public_key for r in _load(inventory).values()}
    unauthorized = False
    if record.agent_public_key not in others:
        try:
            unauthorized = local.remove(record.agent_public_key)
        except (keys.KeysError, OSError) as exc:
            raise HostsError(f"cannot update {local.path}: {exc}", code="local_io") from None
    say(f"host {name} removed from {inventory.path}")
    return {
        "ok": True,
        "host": name,
        "removed": removed is not None,
        "key_unauthorized": unauthorized,
        "agent_stopped": bool(stopped and stopped.get("stopped")),
        "agent_pid": stopped.get("pid") if stopped else None,
        "teardown": teardown,
    }
