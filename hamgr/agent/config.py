"""The agent's configuration: ``<state dir>/agent.toml``, written by `hamgr init`.

::

    host = "hostA"                                   # this host's name in the cluster
    control = "ipc:///var/lib/hamgr/control.sock"    # where the agent's control socket listens
    metrics = "127.0.0.1:9464"                       # Prometheus /metrics; "" turns it off
    netns = ""                                       # run the agent in this netns ("" = as started)
    runtime_dir = "/dev/shm/hamgr-hostA"             # tmpfs: checkpoint images, standby stores

    [dataplane]
    cpu = 1                                          # the data plane's pinned lcore
    rt_priority = 0                                  # SCHED_FIFO priority; 0 = nice -10 instead

    [remote]                                         # optional: standbys on other hosts
    data_link = "eth1"                               # the data-plane port of remote units: their
                                                     # wire and egress, and the probes' port
    replication = "tcp://198.18.1.1:7200"            # where this agent's standbys are shipped to
    probe_interval_us = 1000                         # data-plane probes of each peer
    probe_miss = 3                                   # missed probes before peer_down
    confirm_window_us = 10000                        # the peer's agent or kernel must answer within

    [peers.hostB]                                    # one table per host that may hold a standby
    control = "tcp://198.18.1.2:7100"                # its agent's control endpoint
    replication = "tcp://198.18.1.2:7200"            # its replication server
    public_key = "Z85..."                            # its agent's public key

With ``[remote]``, `control` must be a ``tcp://IP:PORT`` endpoint on the management network:
peers send their requests (``standby_add``, ``standby_remove``, the ``ping`` that confirms a
suspect host) there, admitted by the same authorized-keys check as the CLI. A peer's
`control` and `replication` endpoints are on its management address, so both name one IP.

The state directory also holds the keys (`hamgr.keys`), ``state.db`` (`hamgr.agent.state`), the
container runtime's state and the logs of the processes the agent starts.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import attrs
import zmq.utils.z85

__all__ = [
    "CONFIG_FILE",
    "AgentConfig",
    "ConfigError",
    "PeerConfig",
    "RemoteConfig",
    "default_state_dir",
    "tcp_endpoint",
]

CONFIG_FILE: Final = "agent.toml"
DEFAULT_STATE_DIR: Final = Path("/var/lib/hamgr")
_HOST: Final = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,30}[A-Za-z0-9])?$")
_NETNS: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_ENDPOINT: Final = re.compile(r"^(ipc://\S+|tcp://\S+:\d+)$")
_TCP: Final = re.compile(r"^tcp://(\d{1,3}(?:\.\d{1,3}){3}):(\d{1,5})$")
_IFNAME: Final = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


class ConfigError(Exception):
    """agent.toml is missing or wrong; the message names the key and the fix."""


def default_state_dir() -> Path:
    return DEFAULT_STATE_DIR


def _check(pattern: re.Pattern[str], what: str) -> Any:
    def check(_inst: object, attr: attrs.Attribute[str], value: str) -> None:
        if not isinstance(value, str) or not pattern.match(value):
            raise ConfigError(f"{attr.name}: {value!r} is not {what}")

    return check


def _listen(_inst: object, attr: attrs.Attribute[str], value: str) -> None:
    if value == "":
        return
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f'{attr.name}: {value!r} must be HOST:PORT (port 0 picks one) or ""')


def _cpu(_inst: object, attr: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{attr.name}: must be a CPU number, got {value!r}")


def _prio(_inst: object, attr: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 99:
        raise ConfigError(f"{attr.name}: must be 0-99, got {value!r}")


def _optional_netns(inst: object, attr: attrs.Attribute[str], value: str) -> None:
    if value != "":
        _check(_NETNS, "a netns name")(inst, attr, value)


def tcp_endpoint(value: object) -> tuple[str, int]:
    """(IP, port) of a ``tcp://IPv4:PORT`` endpoint; raises ConfigError."""
    m = _TCP.match(value) if isinstance(value, str) else None
    if m is None or int(m.group(2)) > 65535 or any(int(b) > 255 for b in m.group(1).split(".")):
        raise ConfigError(f"{value!r} is not a tcp://IPv4:PORT endpoint")
    return m.group(1), int(m.group(2))


def _tcp(_inst: object, attr: attrs.Attribute[str], value: str) -> None:
    try:
        tcp_endpoint(value)
    except ConfigError as exc:
        raise ConfigError(f"{attr.name}: {exc}") from None


def _public_key(_inst: object, attr: attrs.Attribute[str], value: str) -> None:
    ok = isinstance(value, str) and len(value) == 40
    if ok:
        try:
            ok = len(zmq.utils.z85.decode(value.encode())) == 32
        except (ValueError, KeyError):
            ok = False
    if not ok:
        raise ConfigError(f"{attr.name}: must be a Z85 CURVE public key (40 characters)")


def _positive(low: int, high: int) -> Any:
    def check(_inst: object, attr: attrs.Attribute[int], value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ConfigError(f"{attr.name}: must be an integer in [{low}, {high}], got {value!r}")

    return check


@attrs.frozen
class PeerConfig:
    """Another host's agent that may hold a standby of this host's units, or ask this one to."""

    name: str = attrs.field(validator=_check(_HOST, "a host name (1-32 of [A-Za-z0-9-])"))
    control: str = attrs.field(validator=_tcp)
    replication: str = attrs.field(validator=_tcp)
    public_key: str = attrs.field(validator=_public_key)

    def __attrs_post_init__(self) -> None:
        if tcp_endpoint(self.control)[0] != tcp_endpoint(self.replication)[0]:
            raise ConfigError(
                "control and replication must be on the peer's one management address, got "
                f"{self.control} and {self.replication}"
            )


@attrs.frozen
class RemoteConfig:
    """This host's side of remote protection (module doc)."""

    data_link: str = attrs.field(validator=_check(_IFNAME, "an interface name"))
    replication: str = attrs.field(validator=_tcp)
    probe_interval_us: int = attrs.field(default=1000, validator=_positive(100, 1_000_000))
    probe_miss: int = attrs.field(default=3, validator=_positive(1, 100))
    confirm_window_us: int = attrs.field(default=10_000, validator=_positive(1000, 10_000_000))


_REMOTE_KEYS: Final = {f.name for f in attrs.fields(RemoteConfig)}
_PEER_KEYS: Final = {"control", "replication", "public_key"}


@attrs.frozen
class AgentConfig:
    state_dir: Path
    host: str = attrs.field(validator=_check(_HOST, "a host name (1-32 of [A-Za-z0-9-])"))
    control: str = attrs.field(validator=_check(_ENDPOINT, "an ipc:// or tcp://HOST:PORT endpoint"))
    metrics: str = attrs.field(default="127.0.0.1:9464", validator=_listen)
    netns: str = attrs.field(default="", validator=_optional_netns)
    runtime_dir: Path | None = attrs.field(default=None, converter=attrs.converters.optional(Path))
    dp_cpu: int = attrs.field(default=1, validator=_cpu)
    dp_rt_priority: int = attrs.field(default=0, validator=_prio)
    remote: RemoteConfig | None = None
    peers: Mapping[str, PeerConfig] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        if self.peers and self.remote is None:
            raise ConfigError("[peers] needs a [remote] table (data_link, replication)")
        if self.remote is not None and not self.control.startswith("tcp://"):
            raise ConfigError(
                f"control: {self.control!r} is not reachable from other hosts; with [remote], "
                "control must be the tcp://IP:PORT of this host's management address"
            )
        if self.host in self.peers:
            raise ConfigError(f"peers.{self.host}: a host is not its own peer")
        for name, peer in self.peers.items():
            if peer.name != name:
                raise ConfigError(f"peers.{name}: its name says {peer.name!r}")

    @property
    def runtime(self) -> Path:
        """tmpfs for checkpoint images and standby stores."""
        return self.runtime_dir or Path("/dev/shm") / f"hamgr-{self.host}"

    @property
    def path(self) -> Path:
        return self.state_dir / CONFIG_FILE

    @property
    def db_path(self) -> Path:
        return self.state_dir / "state.db"

    @property
    def pid_path(self) -> Path:
        return self.state_dir / "agent.pid"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "log"

    @staticmethod
    def default(state_dir: Path, host: str) -> AgentConfig:
        return AgentConfig(
            state_dir=state_dir, host=host, control=f"ipc://{state_dir}/control.sock"
        )

    def to_toml(self) -> str:
        def q(s: object) -> str:
            return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"') + '"'

        return (
            "# hamgr agent configuration (hamgr init); see docs/agent.md\n"
            f"host = {q(self.host)}\n"
            f"control = {q(self.control)}\n"
            f"metrics = {q(self.metrics)}\n"
            f"netns = {q(self.netns)}\n"
            f"runtime_dir = {q(self.runtime)}\n"
            "\n[dataplane]\n"
            f"cpu = {self.dp_cpu}\n"
            f"rt_priority = {self.dp_rt_priority}\n" + self._remote_toml(q)
        )

    def _remote_toml(self, q: Any) -> str:
        if self.remote is None:
            return ""
        r = self.remote
        out = (
            "\n[remote]\n"
            f"data_link = {q(r.data_link)}\n"
            f"replication = {q(r.replication)}\n"
            f"probe_interval_us = {r.probe_interval_us}\n"
            f"probe_miss = {r.probe_miss}\n"
            f"confirm_window_us = {r.confirm_window_us}\n"
        )
        for name, p in sorted(self.peers.items()):
            out += (
                f"\n[peers.{name}]\n"
                f"control = {q(p.control)}\n"
                f"replication = {q(p.replication)}\n"
                f"public_key = {q(p.public_key)}\n"
            )
        return out

    @staticmethod
    def load(state_dir: Path) -> AgentConfig:
        path = state_dir / CONFIG_FILE
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(
                f"{path} does not exist; run `hamgr --state-dir {state_dir} init` first"
            ) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        dp = data.pop("dataplane", {})
        if not isinstance(dp, dict):
            raise ConfigError(f"{path}: [dataplane] must be a table")
        remote = data.pop("remote", None)
        peers = data.pop("peers", {})
        if remote is not None and not isinstance(remote, dict):
            raise ConfigError(f"{path}: [remote] must be a table")
        if not isinstance(peers, dict) or not all(isinstance(v, dict) for v in peers.values()):
            raise ConfigError(f"{path}: [peers] must hold one table per peer, [peers.NAME]")
        known = {"host", "control", "metrics", "netns", "runtime_dir"}
        unknown = (
            sorted(set(data) - known)
            + sorted(f"dataplane.{k}" for k in set(dp) - {"cpu", "rt_priority"})
            + sorted(f"remote.{k}" for k in set(remote or {}) - _REMOTE_KEYS)
            + sorted(f"peers.{n}.{k}" for n, p in peers.items() for k in set(p) - _PEER_KEYS)
        )
        if unknown:
            raise ConfigError(f"{path}: unknown key {unknown[0]}")
        for key in ("host", "control"):
            if key not in data:
                raise ConfigError(f"{path}: {key} is required")
        for key in ("data_link", "replication"):
            if remote is not None and key not in remote:
                raise ConfigError(f"{path}: remote.{key} is required")
        for name, peer in peers.items():
            for key in sorted(_PEER_KEYS - set(peer)):
                raise ConfigError(f"{path}: peers.{name}.{key} is required")
        try:
            try:
                remote_config = None if remote is None else RemoteConfig(**remote)
            except ConfigError as exc:
                raise ConfigError(f"remote.{exc}") from None
            peer_configs = {}
            for name, peer in peers.items():
                try:
                    peer_configs[name] = PeerConfig(name=name, **peer)
                except ConfigError as exc:
                    raise ConfigError(f"peers.{name}: {exc}") from None
            return AgentConfig(
                state_dir=state_dir,
                host=data["host"],
                control=data["control"],
                metrics=data.get("metrics", "127.0.0.1:9464"),
                netns=data.get("netns", ""),
                runtime_dir=data.get("runtime_dir"),
                dp_cpu=dp.get("cpu", 1),
                dp_rt_priority=dp.get("rt_priority", 0),
                remote=remote_config,
                peers=peer_configs,
            )
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def write(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(self.to_toml())
        tmp.replace(self.path)
