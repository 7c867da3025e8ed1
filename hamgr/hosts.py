"""Remote hosts: verify one over SSH, start its agent, exchange CURVE keys, keep an inventory.

`add_host` is what `hamgr hosts add` does, in this order; nothing is recorded unless every step
worked:

1. SSH to ``user@address:port`` with paramiko. The host key must match the operator's
   ``--fingerprint`` or an entry in a known_hosts file; an unknown or different key is refused
   and its actual SHA256 fingerprint is printed, so that the operator can check it out of band.
   There is no "accept on first use".
2. Check the remote Python (3.11 or later) and that ``PYTHON -m hamgr --version`` runs there and
   reports this CLI's version. Without ``--install`` the remote interpreter must already have
   hamgr. With ``--install`` (`_install`, `_stop_agent`, `_point`), the hamgr this CLI runs and its
   dependencies are first built here as wheels (`hamgr.wheelhouse`), uploaded over SFTP,
   checked by sha256 there, installed into a new venv beside PREFIX with pip and no index,
   verified, and switched to by pointing the PREFIX symlink at it; PYTHON is then
   ``PREFIX/bin/python``. A failure before the switch leaves the host as it was, one after it is
   rolled back (`_roll_back`).
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
import secrets
import select
import shlex
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import attrs
import paramiko  # type: ignore[import-untyped, unused-ignore]

from hamgr import keys, wheelhouse
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
_SFTP_TIMEOUT: Final = 60.0
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
                # Each SFTP request waits at most this long: a stalled link fails, never hangs.
                self._sftp.get_channel().settimeout(_SFTP_TIMEOUT)
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

    def listdir(self, path: str) -> list[str]:
        try:
            return [str(n) for n in self._sftp_client().listdir(path)]
        except OSError as exc:
            raise HostsError(
                f"cannot list {path} on {self.target.where}: {exc}", code="remote_io"
            ) from None

    def mkdir(self, path: str, mode: int = 0o700) -> None:
        try:
            self._sftp_client().mkdir(path, mode)
        except OSError as exc:
            raise HostsError(
                f"cannot create {path} on {self.target.where}: {exc}", code="remote_io"
            ) from None

    def upload(self, local: Path, path: str) -> None:
        """Copy the local file to `path` there, over SFTP (mode 0600)."""
        sftp = self._sftp_client()
        try:
            sftp.put(str(local), path, confirm=True)
            sftp.chmod(path, 0o600)
        except (OSError, paramiko.SSHException) as exc:
            raise HostsError(
                f"cannot upload {local.name} to {path} on {self.target.where}: {exc}",
                code="remote_io",
            ) from None

    @contextlib.contextmanager
    def lock(self, directory: str, python: str) -> Iterator[list[str]]:
        """Hold an exclusive flock on `directory` there (made if missing) for the block.

        Yields the directories that had to be made, deepest first. A remote process holds the
        lock for as long as its channel stays open; closing the channel ends it.
        """
        command = shlex.join([python, "-c", _LOCK_PY, directory])
        try:
            chan = self._client.get_transport().open_session(timeout=self.target.timeout)
            chan.exec_command(command)
        except (paramiko.SSHException, OSError) as exc:
            raise HostsError(
                f"the SSH connection to {self.target.where} broke: {exc}",
                status=UNREACHABLE,
                code="ssh_failed",
            ) from None
        try:
            line = b""
            deadline = time.monotonic() + 30
            while not line.endswith(b"\n") and time.monotonic() < deadline:
                if chan.recv_ready():
                    line += bytes(chan.recv(4096))
                elif chan.exit_status_ready() and not chan.recv_ready():
                    break
                else:
                    select.select([chan], [], [], 0.2)
            try:
                answer = json.loads(line.decode(errors="replace") or "{}")
            except ValueError:
                answer = {}
            if not answer.get("locked"):
                if answer.get("busy"):
                    raise HostsError(
                        f"another `hamgr hosts add --install` is installing into {directory} on "
                        f"{self.target.where}: wait for it to finish, then run this again",
                        code="busy",
                    )
                err = bytes(chan.recv_stderr(65536)) if chan.recv_stderr_ready() else b""
                why = answer.get("error") or err.decode(errors="replace").strip()
                raise HostsError(
                    f"cannot lock {directory} on {self.target.where}: {why or 'no answer'}",
                    code="remote_io",
                )
            yield [str(d) for d in answer.get("created") or ()]
        finally:
            with contextlib.suppress(paramiko.SSHException, OSError):
                chan.shutdown_write()
            chan.close()


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
    # `--install`: ship this CLI's hamgr and its dependencies, and run the agent from there.
    install: InstallOptions | None = None


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
        which = "a Python 3.11 or later" if options.install else "an interpreter that has hamgr"
        raise HostsError(
            f"there is no {py} on {where}: install Python 3.11 or later there, or pass "
            f"--python with the path of {which} there",
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


# --- add --install: hamgr and its dependencies, as wheels, into a venv on the host ---------------

DEFAULT_PREFIX: Final = "/opt/hamgr/venv"
INSTALL_FILE: Final = "hamgr-install.json"
# Where the agent looks for its data plane in an installed hamgr (dpdk_vhost.process).
DATAPLANE_IN_WHEEL: Final = "dpdk_vhost/build/dpdk-vhost"
_RELEASE_ID: Final = 12  # hex digits of the wheelhouse id in a release dir's name
# Imported by the new venv before it is switched to: the CLI, the agent and what they need.
_MODULES: Final = (
    "hamgr.cli",
    "hamgr.agent.daemon",
    "hamgr.hosts",
    "zmq",
    "attrs",
    "click",
    "paramiko",
    "prometheus_client",
    "google.protobuf",
)

# Run by the host's own Python (the venv does not exist yet): what decides what can be installed.
_FACTS_PY: Final = r"""
import importlib.util, json, os, platform, sys
prefix, marker, state_dir = sys.argv[1], sys.argv[2], sys.argv[3]
def read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None
release = {}
for line in (read("/etc/os-release") or "").splitlines():
    key, sep, value = line.partition("=")
    if sep:
        release[key] = value.strip().strip('"')
try:
    libc = os.confstr("CS_GNU_LIBC_VERSION")
except (AttributeError, ValueError, OSError):
    libc = None
link = os.readlink(prefix) if os.path.islink(prefix) else None
print(json.dumps({
    "python": "%d.%d.%d" % sys.version_info[:3],
    "implementation": sys.implementation.name,
    "system": platform.system(),
    "machine": platform.machine(),
    "libc": libc,
    "os": release.get("PRETTY_NAME") or platform.platform(),
    "venv": importlib.util.find_spec("venv") is not None,
    "prefix_exists": os.path.lexists(prefix),
    "prefix_link": link,
    "prefix_marker": read(os.path.join(prefix, marker)) if link else None,
    "state_dir_exists": os.path.lexists(state_dir),
}))
"""

_SHA256_PY: Final = r"""
import hashlib, json, sys
out = {}
for path in sys.argv[1:]:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        out[path] = digest.hexdigest()
    except OSError as exc:
        out[path] = "unreadable: %s" % exc.strerror
print(json.dumps(out))
"""

# Run by the new venv's Python: is it whole? Also makes pycriu importable in it, as
# scripts/provision-criu.sh does for the checkout's venv, when the host has that pycriu.
_VERIFY_PY: Final = r"""
import importlib, importlib.metadata, json, os, sys, sysconfig
out = {"errors": {}, "purelib": sysconfig.get_path("purelib"), "pycriu": None}
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception as exc:
        out["errors"][name] = "%s: %s" % (type(exc).__name__, exc)
try:
    out["version"] = importlib.metadata.version("hamgr")
    from dpdk_vhost.process import default_binary
    out["binary"] = str(default_binary())
    from hamgr.config import MachineConfig
    criu = MachineConfig.load().criu_path
except Exception as exc:
    out["errors"]["hamgr"] = "%s: %s" % (type(exc).__name__, exc)
    criu = None
places = ["/opt/hamgr/criu/python"]
if criu:
    places.insert(0, os.path.join(os.path.dirname(os.path.dirname(criu)), "python"))
for place in places:
    if os.path.isfile(os.path.join(place, "pycriu", "__init__.py")):
        with open(os.path.join(out["purelib"], "hamgr-pycriu.pth"), "w") as f:
            f.write(place + "\n")
        out["pycriu"] = place
        break
print(json.dumps(out))
"""

# The agent that runs on a state dir (its pid file is locked while it runs), and the
# interpreter it runs from, so that a rollback can start it again the way it was.
_AGENT_PY: Final = r"""
import fcntl, json, os, sys
out = {"pid": None, "python": None}
try:
    fd = os.open(os.path.join(sys.argv[1], "agent.pid"), os.O_RDONLY)
except OSError:
    fd = None
if fd is not None:
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if text.isdigit():
            out["pid"] = int(text)
            try:
                with open("/proc/%s/cmdline" % text, "rb") as f:
                    out["python"] = f.read().split(b"\0")[0].decode(errors="replace")
            except OSError:
                pass
print(json.dumps(out))
"""

_SWITCH_PY: Final = r"""
import os, sys
target, link = sys.argv[1], sys.argv[2]
if target:
    tmp = "%s.hamgr-%d.tmp" % (link, os.getpid())
    os.symlink(target, tmp)
    os.replace(tmp, link)
elif os.path.islink(link):
    os.unlink(link)
"""

# Creates PREFIX's parent dir if need be and holds an exclusive flock on it while one `add
# --install` works on PREFIX. The lock goes when this process ends, which it does when the SSH
# channel closes (stdin reaches EOF), so a run that dies cannot leave it held.
_LOCK_PY: Final = r"""
import fcntl, json, os, sys
directory, missing, d = sys.argv[1], [], sys.argv[1]
while d and d != "/" and not os.path.exists(d):
    missing.append(d)
    d = os.path.dirname(d)
try:
    os.makedirs(directory, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
except OSError as exc:
    print(json.dumps({"locked": False, "error": "%s: %s" % (directory, exc.strerror)}), flush=True)
    sys.exit(1)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
except BlockingIOError:
    print(json.dumps({"locked": False, "busy": True}), flush=True)
    sys.exit(1)
print(json.dumps({"locked": True, "created": missing}), flush=True)
sys.stdin.read()
"""


@attrs.frozen
class InstallOptions:
    """`hosts add --install [--prefix P] [--reinstall]`."""

    prefix: str = DEFAULT_PREFIX
    reinstall: bool = False


def check_prefix(prefix: str) -> str:
    """The install prefix in canonical form; it must be an absolute path below a directory."""
    if not prefix.startswith("/"):
        raise HostsError(
            f"--prefix {prefix!r} must be an absolute path (e.g. {DEFAULT_PREFIX})",
            status=USAGE,
            code="bad_prefix",
        )
    parts = [p for p in prefix.split("/") if p not in ("", ".")]
    if not parts or ".." in parts or any(ch in prefix for ch in "\n\0"):
        raise HostsError(
            f"--prefix {prefix!r} is not a directory hamgr can own: give an absolute path "
            f"without '..', such as {DEFAULT_PREFIX}",
            status=USAGE,
            code="bad_prefix",
        )
    return "/" + "/".join(parts)


def release_dir(prefix: str, house_id: str, token: str) -> str:
    """Where one install really lives: ``.NAME-ID-TOKEN`` beside PREFIX, which links to it."""
    parent, base = prefix.rsplit("/", 1)
    return f"{parent}/.{base}-{house_id[:_RELEASE_ID]}-{token}"


def is_release_of(prefix: str, link: str) -> bool:
    """Whether the symlink target `link` is a release dir that `add --install` made for PREFIX."""
    base = prefix.rsplit("/", 1)[1]
    pattern = rf"\.{re.escape(base)}-[0-9a-f]{{{_RELEASE_ID}}}-[0-9a-f]{{6}}"
    return re.fullmatch(pattern, link) is not None


def missing_libraries(ldd_output: str) -> list[str]:
    """The libraries `ldd` could not find (``libfoo.so.1 => not found`` lines)."""
    return [
        line.split("=>", 1)[0].strip() for line in ldd_output.splitlines() if "=> not found" in line
    ]


def doctor_failures(report: Mapping[str, Any] | None) -> list[dict[str, str]]:
    """The required checks that failed in `hamgr doctor --json`'s report."""
    out: list[dict[str, str]] = []
    for check in (report or {}).get("checks", []):
        if isinstance(check, dict) and check.get("status") == "fail" and check.get("required"):
            out.append({k: str(check.get(k, "")) for k in ("name", "detail", "fix")})
    return out


def platform_facts(facts: Mapping[str, Any]) -> wheelhouse.PlatformFacts:
    """The remote's `_FACTS_PY` answer as what decides which wheels fit it."""
    major, minor = (int(p) for p in str(facts.get("python", "0.0")).split(".")[:2])
    return wheelhouse.PlatformFacts(
        implementation=str(facts.get("implementation", "")),
        python=(major, minor),
        machine=str(facts.get("machine", "")),
        glibc=wheelhouse.parse_glibc(str(facts.get("libc") or "")),
    )


def unfit_error(
    unfit: Iterable[wheelhouse.Wheel], remote: wheelhouse.PlatformFacts, where: str
) -> HostsError:
    local = wheelhouse.PlatformFacts.local()
    names = ", ".join(f"{w.name} {w.version} ({w.filename})" for w in unfit)
    return HostsError(
        f"these wheels from this machine ({local.describe()}) do not fit the Python on {where} "
        f"({remote.describe()}): {names}. Pass --python with a Python "
        f"{local.python[0]}.{local.python[1]} on that host, or run `hamgr hosts add --install` "
        "from an environment that matches the host's Python and machine",
        code="wheels_unfit",
    )


@attrs.frozen
class _Installed:
    """What `_install` did: `release` is the venv PREFIX now points at (or will, on switch)."""

    prefix: str
    release: str
    changed: bool
    old_release: str | None
    house_id: str
    wheel: str
    sha256: str
    wheels: int
    size: int  # bytes of wheels
    doctor: dict[str, Any]
    pycriu: str | None
    created_dirs: tuple[str, ...]
    # The remote state dir did not exist before this run: a rollback may remove all of it.
    new_state_dir: bool = False

    @property
    def python(self) -> str:
        return f"{self.prefix}/bin/python"

    def as_json(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "release": self.release,
            "changed": self.changed,
            "id": self.house_id,
            "wheel": self.wheel,
            "sha256": self.sha256,
            "wheels": self.wheels,
            "bytes": self.size,
            "pycriu": self.pycriu,
            "doctor": self.doctor,
        }


def _remote_json(remote: Remote, argv: list[str], *, timeout: float, what: str) -> dict[str, Any]:
    result = remote.run(argv, timeout=timeout)
    data = result.last_json()
    if result.status != 0 or data is None:
        raise HostsError(f"{what} failed on {remote.target.where}: {result.why()}", code="install")
    return data


def _install_facts(remote: Remote, options: AddOptions, prefix: str) -> dict[str, Any]:
    where = f"{options.name} ({remote.target.where})"
    facts = _remote_json(
        remote,
        [options.python, "-c", _FACTS_PY, prefix, INSTALL_FILE, options.remote_state_dir],
        timeout=30,
        what="inspecting the host",
    )
    if facts.get("system") != "Linux":
        raise HostsError(
            f"{where} runs {facts.get('system')}, and the hamgr agent runs on Linux only",
            code="unsupported_os",
        )
    if not facts.get("venv"):
        raise HostsError(
            f"{options.python} on {where} has no venv module, which --install needs: install "
            "it there (Debian: apt-get install python3-venv)",
            code="no_venv",
        )
    link = facts.get("prefix_link")
    if facts.get("prefix_exists") and not (isinstance(link, str) and is_release_of(prefix, link)):
        base = prefix.rsplit("/", 1)[1]
        raise HostsError(
            f"{prefix} exists on {where} and is not an install made by `hamgr hosts add "
            f"--install` (those are symlinks to a .{base}-ID dir beside them): remove it there, "
            "or pass --prefix with another path",
            code="prefix_taken",
        )
    return facts


def _installed_marker(facts: Mapping[str, Any]) -> dict[str, Any] | None:
    text = facts.get("prefix_marker")
    if not isinstance(text, str):
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _doctor(remote: Remote, python: str, name: str, say: Say) -> dict[str, Any]:
    result = remote.run([python, "-m", "hamgr", "doctor", "--json"], timeout=180)
    report = result.last_json()
    if report is None:
        say(f"warning: `hamgr doctor` did not run on {name}: {result.why()}")
        return {"ok": False, "failed": [], "error": result.why()}
    failed = doctor_failures(report)
    for check in failed:
        say(f"warning: doctor on {name}: {check['name']}: {check['detail']}; fix: {check['fix']}")
    if not failed:
        say(f"doctor on {name}: every requirement is met")
    return {"ok": bool(report.get("ok")), "failed": failed}


def _check_release(remote: Remote, release: str, options: AddOptions, version: str) -> str | None:
    """Refuse a venv that does not import, reports another version, or whose data plane cannot
    load its libraries. Returns where pycriu was linked from, if the host has it."""
    where = f"{options.name} ({remote.target.where})"
    python = f"{release}/bin/python"
    data = _remote_json(
        remote, [python, "-c", _VERIFY_PY, *_MODULES], timeout=120, what="checking the new venv"
    )
    errors = data.get("errors") or {}
    if errors:
        listed = "; ".join(f"{k}: {v}" for k, v in sorted(errors.items()))
        raise HostsError(
            f"the new venv on {where} does not import what hamgr needs ({listed}); nothing was "
            "switched. These wheels come from this machine's environment: repair it here "
            "(`pip install --force-reinstall` of the packages named) and run --install again",
            code="install_broken",
        )
    if data.get("version") != version:
        raise HostsError(
            f"the new venv on {where} reports hamgr {data.get('version')}, not {version}; "
            "nothing was switched",
            code="install_broken",
        )
    binary = str(data.get("binary") or "")
    if not binary:
        raise HostsError(
            f"the new venv on {where} names no data plane binary; nothing was switched",
            code="install_broken",
        )
    ldd = remote.run(["ldd", binary], timeout=30)
    missing = missing_libraries(ldd.stdout)
    if ldd.status != 0 and not missing:
        raise HostsError(
            f"the data plane {binary} does not load on {where}: {ldd.why()}; nothing was "
            "switched. It was built on this machine: install hamgr from a machine of the "
            "host's kind",
            code="dataplane_libs",
        )
    if missing:
        raise HostsError(
            f"the data plane {binary} cannot run on {where}: its libraries "
            f"{', '.join(missing)} are missing; nothing was switched. Install the DPDK runtime "
            "it was built against there (Debian 12: apt-get install dpdk) and run --install "
            "again",
            code="dataplane_libs",
        )
    pycriu = data.get("pycriu")
    return pycriu if isinstance(pycriu, str) else None


def _pip_install(
    remote: Remote, release: str, upload: str, house: wheelhouse.Wheelhouse, where: str
) -> None:
    installer = f"{upload}/{house.installer.filename}"
    root = house.root_wheel
    argv = [
        # No config file, no environment: only the wheels uploaded from here, no index.
        "env",
        "PIP_CONFIG_FILE=/dev/null",
        f"{release}/bin/python",
        f"{installer}/pip",
        "--isolated",
        "install",
        "--no-index",
        "--find-links",
        upload,
        "--only-binary",
        ":all:",
        "--no-cache-dir",
        "--disable-pip-version-check",
        "--no-warn-script-location",
        "--quiet",
        f"{root.name}=={root.version}",
        # pip too, so that the host can itself ship this install on (`hosts add --install` there).
        f"{house.installer.name}=={house.installer.version}",
    ]
    result = remote.run(argv, timeout=600)
    if result.status != 0:
        missing = re.findall(r"No matching distribution found for (\S+)", result.stderr)
        fix = (
            f"install {', '.join(sorted(set(missing)))} into this machine's environment "
            "(`pip install NAME`), so that --install can ship it"
            if missing
            else "read pip's message; the host's Python may not accept these wheels"
        )
        raise HostsError(
            f"pip could not install hamgr into {release} on {where}: {result.why()}; nothing "
            f"was switched. Fix: {fix}",
            code="pip_failed",
        )


def _install(
    remote: Remote, options: AddOptions, version: str, created: Sequence[str], say: Say
) -> _Installed:
    """Build the wheels here, install them into a new venv on the host, and verify it there.

    Runs under the prefix lock. PREFIX is not switched here (`add_host` does that), so a failure
    leaves the host's install as it was: the new venv and the upload are removed again.
    """
    assert options.install is not None
    prefix = check_prefix(options.install.prefix)
    parent = prefix.rsplit("/", 1)[0] or "/"
    where = f"{options.name} ({remote.target.where})"
    facts = _install_facts(remote, options, prefix)
    say(
        f"{where}: {facts.get('os')}, {facts.get('machine')}, Python {facts.get('python')} "
        f"({options.python})"
    )
    target = platform_facts(facts)
    marker = _installed_marker(facts)
    link = facts.get("prefix_link")
    current = f"{parent.rstrip('/')}/{link}" if isinstance(link, str) else None

    with tempfile.TemporaryDirectory(prefix="hamgr-wheels-") as tmp:
        try:
            house = wheelhouse.build(Path(tmp))
        except wheelhouse.WheelError as exc:
            raise HostsError(f"cannot build the wheels here: {exc}", code="wheels") from None
        root = house.root_wheel
        size = sum(w.size for w in house.wheels)
        say(
            f"wheels built here: {root.filename} (sha256 {root.sha256}) and "
            f"{len(house.wheels) - 1} more, {size / 1e6:.1f} MB, id {house.id[:_RELEASE_ID]}"
        )
        if root.version != version:
            raise HostsError(
                f"the hamgr wheel built here is {root.version} but this CLI is {version}: "
                "reinstall hamgr in this environment (`pip install -e .` in the checkout)",
                code="wheels",
            )
        if not house.root_contains(DATAPLANE_IN_WHEEL):
            raise HostsError(
                f"the data plane is not built here, so the hamgr wheel has no "
                f"{DATAPLANE_IN_WHEEL} and the agent could not start on the host: build it "
                "(`make -C dpdk_vhost`, or `make setup`) and run --install again",
                code="no_dataplane",
            )
        unfit = house.unfit(target)
        if unfit:
            raise unfit_error(unfit, target, where)
        base = _Installed(
            prefix=prefix,
            release=current or "",
            changed=False,
            old_release=None,
            house_id=house.id,
            wheel=root.filename,
            sha256=root.sha256,
            wheels=len(house.wheels),
            size=size,
            doctor={},
            pycriu=None,
            created_dirs=(),
        )
        if (
            marker is not None
            and current is not None
            and marker.get("id") == house.id
            and not options.install.reinstall
        ):
            python = f"{prefix}/bin/python"
            check = remote.run([python, "-m", "hamgr", "--version"], timeout=60)
            if check.status == 0 and check.stdout.strip().endswith(version):
                say(f"{prefix} on {options.name} already has these wheels: nothing to install")
                pycriu = marker.get("pycriu")
                return attrs.evolve(
                    base,
                    doctor=_doctor(remote, python, options.name, say),
                    pycriu=pycriu if isinstance(pycriu, str) else None,
                )
            say(f"{prefix} on {options.name} has these wheels but does not run: reinstalling")

        release = release_dir(prefix, house.id, secrets.token_hex(3))
        upload = f"{release}.upload"
        try:
            remote.mkdir(upload)
            for wheel in house.wheels:
                remote.upload(wheel.path, f"{upload}/{wheel.filename}")
            _verify_upload(remote, options, upload, house, where)
            say(f"uploaded {len(house.wheels)} wheels to {upload}; sha256 verified there")
            venv = remote.run([options.python, "-m", "venv", "--without-pip", release], timeout=120)
            if venv.status != 0:
                raise HostsError(
                    f"`{options.python} -m venv` failed on {where}: {venv.why()}; install the "
                    "venv module there (Debian: apt-get install python3-venv)",
                    code="no_venv",
                )
            _pip_install(remote, release, upload, house, where)
            pycriu = _check_release(remote, release, options, version)
            doctor = _doctor(remote, f"{release}/bin/python", options.name, say)
            # Written last: a release without it is never switched to, nor taken as current.
            marker_text = json.dumps(
                {
                    **house.manifest(),
                    "id": house.id,
                    "installed": _now(),
                    "python": options.python,
                    "python_version": facts.get("python"),
                    "pycriu": pycriu,
                },
                indent=1,
            )
            remote.write_text(f"{release}/{INSTALL_FILE}", marker_text + "\n")
        except BaseException:
            _remove(remote, [release, upload], ())
            raise
        _remove(remote, [upload], ())
    say(f"installed hamgr {version} into {release} on {options.name}")
    return attrs.evolve(
        base,
        release=release,
        changed=True,
        old_release=current,
        doctor=doctor,
        pycriu=pycriu,
        created_dirs=tuple(created) if current is None else (),
        new_state_dir=not facts.get("state_dir_exists", True),
    )


def _verify_upload(
    remote: Remote, options: AddOptions, upload: str, house: wheelhouse.Wheelhouse, where: str
) -> None:
    paths = {w.filename: f"{upload}/{w.filename}" for w in house.wheels}
    sums = _remote_json(
        remote,
        [options.python, "-c", _SHA256_PY, *paths.values()],
        timeout=120,
        what="hashing the upload",
    )
    bad = [w for w in house.wheels if sums.get(paths[w.filename]) != w.sha256]
    if bad:
        detail = "; ".join(
            f"{w.filename}: sha256 {sums.get(paths[w.filename])} there, {w.sha256} here"
            for w in bad
        )
        raise HostsError(
            f"the upload to {where} arrived corrupted ({detail}); refused, nothing was "
            "installed. Check the link and the host's disk, then run --install again",
            code="upload_corrupt",
        )


def _remove(remote: Remote, paths: Sequence[str], dirs: Sequence[str]) -> None:
    """Best effort: remove `paths` (trees this run made), then the empty `dirs`, deepest first."""
    with contextlib.suppress(HostsError):
        if paths:
            remote.run(["rm", "-rf", "--", *paths], timeout=120)
        if dirs:
            remote.run(["rmdir", "--ignore-fail-on-non-empty", "--", *dirs], timeout=30)


def _collect_garbage(remote: Remote, installed: _Installed) -> None:
    """Remove every release and upload of PREFIX but the current one: the one it replaced, and
    what a run that died mid-way left. Safe under the prefix lock, which every install holds."""
    parent, _base = installed.prefix.rsplit("/", 1)
    keep = installed.release.rsplit("/", 1)[1]
    try:
        names = remote.listdir(parent or "/")
    except HostsError:
        return
    garbage = [
        f"{parent}/{name}"
        for name in names
        if name != keep and is_release_of(installed.prefix, name.removesuffix(".upload"))
    ]
    _remove(remote, garbage, ())


def _point(remote: Remote, options: AddOptions, prefix: str, release: str | None) -> None:
    """Make PREFIX a symlink to `release` (atomically, by rename), or remove it (None)."""
    target = release.rsplit("/", 1)[1] if release else ""
    result = remote.run([options.python, "-c", _SWITCH_PY, target, prefix], timeout=30)
    if result.status != 0:
        raise HostsError(
            f"cannot point {prefix} at {release or 'nothing'} on {options.name}: {result.why()}",
            code="install",
        )


def _stop_agent(remote: Remote, options: AddOptions, installed: _Installed, say: Say) -> str | None:
    """Stop the agent of the remote state dir, if one runs, before PREFIX is switched.

    Returns the interpreter of the agent it stopped. The agent imports code lazily, so it must
    not run on while PREFIX changes under it; `hamgr down` leaves the units and the data plane
    running, and the agent started next adopts them.
    """
    rsd = options.remote_state_dir
    running = _remote_json(
        remote, [options.python, "-c", _AGENT_PY, rsd], timeout=30, what="looking for the agent"
    )
    python = running.get("python") if running.get("pid") else None
    result = remote.run(
        [f"{installed.release}/bin/python", "-m", "hamgr", "down", "--state-dir", rsd, "--json"],
        timeout=options.agent_timeout + 150,
    )
    data = result.last_json()
    if result.status != 0 or not data or not data.get("ok"):
        raise HostsError(
            f"could not stop the agent on {options.name} to switch it to the new install: "
            f"{result.why()}; nothing was switched. Stop it there (`hamgr down --state-dir "
            f"{rsd}`) and run --install again",
            code="agent_stop",
        )
    if data.get("stopped"):
        say(
            f"stopped the agent on {options.name} (pid {data.get('pid')}) to switch it to the "
            "new install; its units and data plane keep running"
        )
    return python if isinstance(python, str) and data.get("stopped") else None


def _roll_back(
    remote: Remote,
    options: AddOptions,
    installed: _Installed,
    stopped: str | None,
    say: Say,
) -> None:
    """After a failure past the install: back to the old install (or none), best effort.

    The agent started from the new venv is stopped, PREFIX points at the old release again (or
    is removed), the new release goes, and an agent that `_stop_agent` stopped is started again
    with the interpreter it ran from. A state dir that this run made holds nothing older than
    the run, so it is torn down (the data plane the new agent started) and removed; any other
    state dir keeps its units and data plane, for the next agent to adopt.
    """
    rsd = options.remote_state_dir
    down = [f"{installed.release}/bin/python", "-m", "hamgr", "down", "--state-dir", rsd]
    with contextlib.suppress(HostsError):
        remote.run(
            [*down, "--teardown"] if installed.new_state_dir else down,
            timeout=options.agent_timeout + 150,
        )
    if installed.new_state_dir:
        _remove(remote, [rsd], ())
    try:
        _point(remote, options, installed.prefix, installed.old_release)
    except HostsError as exc:
        say(f"warning: {exc.message}")
    _remove(remote, [installed.release], installed.created_dirs)
    say(
        f"rolled back: {installed.prefix} -> {installed.old_release} on {options.name} again"
        if installed.old_release
        else f"rolled back: nothing is left at {installed.prefix} on {options.name}"
    )
    if stopped is None:
        return
    with contextlib.suppress(HostsError):
        again = remote.run(
            [stopped, "-m", "hamgr", "up", "--state-dir", rsd, "--json"],
            timeout=options.agent_timeout + 30,
        )
        say(
            f"the agent on {options.name} runs again from {stopped}"
            if again.status == 0
            else f"warning: the agent on {options.name} did not start again: {again.why()}"
        )


def add_host(state_dir: Path, options: AddOptions, say: Say) -> dict[str, Any]:
    """Verify, bootstrap and record one host (see the module's docstring); returns the result."""
    try:
        check_host_name(options.name)
    except InventoryError as exc:
        raise HostsError(str(exc), status=USAGE, code="bad_name") from None
    target = options.target
    control = _control_endpoint(target.address, options.control_port)
    prefix = check_prefix(options.install.prefix) if options.install else None
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
        if prefix is None:
            return _bootstrap(
                remote,
                state_dir,
                options,
                identity=identity,
                python_version=python_version,
                installed=None,
                say=say,
            )
        parent = prefix.rsplit("/", 1)[0] or "/"
        with remote.lock(parent, options.python) as created:
            try:
                installed = _install(remote, options, _version(), created, say)
            except BaseException:
                _remove(remote, (), created)  # the dirs the lock had to make, if still empty
                raise
            installed_options = attrs.evolve(options, python=installed.python)
            stopped: str | None = None
            try:
                if installed.changed:
                    stopped = _stop_agent(remote, options, installed, say)
                    _point(remote, options, prefix, installed.release)
                    say(f"{prefix} -> {installed.release} on {options.name}")
                result = _bootstrap(
                    remote,
                    state_dir,
                    installed_options,
                    identity=identity,
                    python_version=python_version,
                    installed=installed,
                    say=say,
                )
            except BaseException:
                if installed.changed:
                    _roll_back(remote, options, installed, stopped, say)
                raise
            _collect_garbage(remote, installed)
        return result


def _bootstrap(
    remote: Remote,
    state_dir: Path,
    options: AddOptions,
    *,
    identity: LocalIdentity,
    python_version: str,
    installed: _Installed | None,
    say: Say,
) -> dict[str, Any]:
    """Steps 3 to 8 of docs/hosts.md, with `options.python` (the venv's, after --install)."""
    target = options.target
    control = _control_endpoint(target.address, options.control_port)
    inventory = _inventory(state_dir)
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
        record = _record(options, remote, agent_key, control, version, installed=installed)
        info = _ping_new(record, agent_key, identity, options)
        # Checked again under the inventory's lock: another `hosts add` may have run.
        inventory.put(record, check=lambda records: _check_conflicts(records, options, control))
    except BaseException:
        if added_locally:
            local.remove(agent_key)
        raise
    verb = "started" if started.get("started") else "already running"
    say(f"agent on {options.name} {verb} (pid {info.get('pid')}), answers at {control}")
    result = {
        "ok": True,
        **record.to_json(),
        "agent_pid": info.get("pid"),
        "agent_started": bool(started.get("started")),
        "uptime_s": info.get("uptime_s"),
        "inventory": str(inventory.path),
    }
    if installed is not None:
        result["install"] = installed.as_json()
    return result


def _record(
    options: AddOptions,
    remote: Remote,
    agent_key: bytes,
    control: str,
    version: str,
    *,
    installed: _Installed | None,
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
        prefix=installed.prefix if installed else "",
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
