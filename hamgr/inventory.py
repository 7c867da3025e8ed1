"""The hosts this machine manages: ``<state dir>/hosts.toml``, written by `hamgr hosts add`.

::

    # hamgr hosts inventory (hamgr hosts add|remove); see docs/hosts.md
    [hosts.hostB]
    address = "198.18.5.2"                        # where sshd and the agent's control socket listen
    port = 22                                     # sshd's port
    user = "root"
    key = "/root/.ssh/id_ed25519"                 # the SSH client key used to reach it
    fingerprint = "SHA256:..."                    # the host key that was verified at `add`
    host_key_type = "ssh-ed25519"
    agent_public_key = "..."                      # the remote agent's CURVE key (z85)
    control = "tcp://198.18.5.2:7311"             # the remote agent's control endpoint
    state_dir = "/var/lib/hamgr"                  # the remote agent's state dir
    python = "python3"                            # the remote interpreter that runs hamgr
    version = "0.1.0"                             # hamgr's version there at `add`
    added = "2025-01-01T00:00:00Z"
    prefix = "/opt/hamgr/venv"                    # only for `add --install`: hamgr's venv there

Every write goes to a temporary file that is renamed over the old one, under an exclusive lock
on ``.hosts.lock``, so two `hamgr hosts` commands never lose each other's change and a reader
never sees half a file. The file is data, not configuration: edit it with `hamgr hosts`.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final

import attrs

from hamgr import keys

__all__ = [
    "INVENTORY_FILE",
    "HostRecord",
    "Inventory",
    "InventoryError",
    "check_fingerprint",
    "check_host_name",
]

INVENTORY_FILE: Final = "hosts.toml"
_LOCK_FILE: Final = ".hosts.lock"
# The same names as an agent's `host` (hamgr.agent.config): the remote agent is named after it.
_NAME: Final = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,30}[A-Za-z0-9])?$")
_USER: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$")
_FINGERPRINT: Final = re.compile(r"^SHA256:[A-Za-z0-9+/]{43}$")
_ENDPOINT: Final = re.compile(r"^tcp://\S+:\d+$")


class InventoryError(Exception):
    """hosts.toml or a value for it is wrong; the message names the file, key and fix."""


def check_host_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise InventoryError(
            f"{name!r} is not a host name: use 1-32 characters from [A-Za-z0-9-], "
            "starting and ending with a letter or digit"
        )
    return name


def check_fingerprint(value: str) -> str:
    """A canonical OpenSSH SHA256 fingerprint (``SHA256:`` + 43 unpadded base64 characters)."""
    if not isinstance(value, str) or not _FINGERPRINT.match(value):
        raise InventoryError(f"{value!r} is not a SHA256 fingerprint (SHA256: + 43 characters)")
    return value


def _validator(check: Any) -> Any:
    def run(_inst: object, attr: attrs.Attribute[Any], value: Any) -> None:
        try:
            check(value)
        except (InventoryError, keys.KeysError, ValueError, TypeError) as exc:
            raise InventoryError(f"{attr.name}: {exc}") from None

    return run


def _address(value: str) -> None:
    if not isinstance(value, str):
        raise InventoryError(f"must be an IP address, got {value!r}")
    ipaddress.ip_address(value)


def _port(value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise InventoryError(f"must be a port number 1-65535, got {value!r}")


def _user(value: str) -> None:
    if not isinstance(value, str) or not _USER.match(value):
        raise InventoryError(f"{value!r} is not a user name")


def _endpoint(value: str) -> None:
    if not isinstance(value, str) or not _ENDPOINT.match(value):
        raise InventoryError(f"{value!r} is not a tcp://HOST:PORT endpoint")


def _string(value: str) -> None:
    if not isinstance(value, str) or "\n" in value:
        raise InventoryError(f"must be a one-line string, got {value!r}")


def _agent_key(value: str) -> None:
    if not isinstance(value, str):
        raise InventoryError(f"must be a string, got {value!r}")
    keys.check_public_key(value)


@attrs.frozen
class HostRecord:
    """One managed host, as `hamgr hosts add` verified and bootstrapped it."""

    name: str = attrs.field(validator=_validator(check_host_name))
    address: str = attrs.field(validator=_validator(_address))
    port: int = attrs.field(validator=_validator(_port))
    user: str = attrs.field(validator=_validator(_user))
    key: str = attrs.field(validator=_validator(_string))
    fingerprint: str = attrs.field(validator=_validator(check_fingerprint))
    host_key_type: str = attrs.field(validator=_validator(_string))
    agent_public_key: str = attrs.field(validator=_validator(_agent_key))
    control: str = attrs.field(validator=_validator(_endpoint))
    state_dir: str = attrs.field(validator=_validator(_string))
    python: str = attrs.field(validator=_validator(_string))
    version: str = attrs.field(validator=_validator(_string))
    added: str = attrs.field(validator=_validator(_string))
    # Set by `hosts add --install`: the venv it made there (`python` is then PREFIX/bin/python).
    # Optional, so that files written before --install existed still load.
    prefix: str = attrs.field(default="", validator=_validator(_string))

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @staticmethod
    def from_mapping(name: str, data: Mapping[str, Any]) -> HostRecord:
        fields = [f.name for f in attrs.fields(HostRecord) if f.name != "name"]
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise InventoryError(f"hosts.{name}.{unknown[0]}: unknown key")
        missing = [f for f in fields if f not in data and f not in _DEFAULTS]
        if missing:
            raise InventoryError(f"hosts.{name}.{missing[0]}: is required")
        try:
            return HostRecord(name=name, **{f: data[f] for f in fields if f in data})
        except InventoryError as exc:
            raise InventoryError(f"hosts.{name}.{exc}") from None


# The optional fields, with the value that is left out of the file.
_DEFAULTS: Final[dict[str, Any]] = {
    f.name: f.default for f in attrs.fields(HostRecord) if f.default is not attrs.NOTHING
}


def _toml_string(value: str) -> str:
    out = ['"']
    for ch in value:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def render(records: Mapping[str, HostRecord]) -> str:
    """hosts.toml's text for `records` (in name order)."""
    lines = ["# hamgr hosts inventory (hamgr hosts add|remove); see docs/hosts.md"]
    for name in sorted(records):
        lines += ["", f"[hosts.{check_host_name(name)}]"]
        for key, value in records[name].to_json().items():
            if key == "name" or (key in _DEFAULTS and value == _DEFAULTS[key]):
                continue
            rendered = str(value) if isinstance(value, int) else _toml_string(value)
            lines.append(f"{key} = {rendered}")
    return "\n".join(lines) + "\n"


def parse(text: str, source: str = INVENTORY_FILE) -> dict[str, HostRecord]:
    """The records in hosts.toml's `text`; raises `InventoryError` naming `source`."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InventoryError(f"{source}: not valid TOML: {exc}") from None
    unknown = sorted(set(data) - {"hosts"})
    if unknown:
        raise InventoryError(f"{source}: unknown key {unknown[0]}")
    hosts = data.get("hosts", {})
    if not isinstance(hosts, dict):
        raise InventoryError(f"{source}: hosts must be a table")
    records: dict[str, HostRecord] = {}
    for name, entry in hosts.items():
        if not isinstance(entry, dict):
            raise InventoryError(f"{source}: hosts.{name} must be a table")
        try:
            check_host_name(name)
            records[name] = HostRecord.from_mapping(name, entry)
        except InventoryError as exc:
            raise InventoryError(f"{source}: {exc}") from None
    return records


@attrs.define
class Inventory:
    """hosts.toml in one state dir."""

    state_dir: Path

    @property
    def path(self) -> Path:
        return self.state_dir / INVENTORY_FILE

    def load(self) -> dict[str, HostRecord]:
        """Every record; a missing file is an empty inventory."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise InventoryError(f"cannot read {self.path}: {exc.strerror}") from None
        return parse(text, str(self.path))

    def get(self, name: str) -> HostRecord | None:
        return self.load().get(name)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.state_dir / _LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _save(self, records: Mapping[str, HostRecord]) -> None:
        tmp = self.path.with_name(f".{INVENTORY_FILE}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(render(records))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise

    def put(
        self,
        record: HostRecord,
        check: Callable[[Mapping[str, HostRecord]], None] | None = None,
    ) -> None:
        """Add or replace `record` (by name); `check(records)` may refuse, under the lock."""
        with self._locked():
            records = self.load()
            if check is not None:
                check(records)
            records[record.name] = record
            self._save(records)

    def remove(self, name: str) -> HostRecord | None:
        """Drop `name`; returns its record, or None if it was not there."""
        with self._locked():
            records = self.load()
            record = records.pop(name, None)
            if record is not None:
                self._save(records)
            return record
