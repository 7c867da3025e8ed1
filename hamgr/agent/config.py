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

The state directory also holds the keys (`hamgr.keys`), ``state.db`` (`hamgr.agent.state`), the
container runtime's state and the logs of the processes the agent starts.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Final

import attrs

__all__ = ["CONFIG_FILE", "AgentConfig", "ConfigError", "default_state_dir"]

CONFIG_FILE: Final = "agent.toml"
DEFAULT_STATE_DIR: Final = Path("/var/lib/hamgr")
_HOST: Final = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,30}[A-Za-z0-9])?$")
_NETNS: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_ENDPOINT: Final = re.compile(r"^(ipc://\S+|tcp://\S+:\d+)$")


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
            f"rt_priority = {self.dp_rt_priority}\n"
        )

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
        known = {"host", "control", "metrics", "netns", "runtime_dir"}
        unknown = sorted(set(data) - known) + sorted(
            f"dataplane.{k}" for k in set(dp) - {"cpu", "rt_priority"}
        )
        if unknown:
            raise ConfigError(f"{path}: unknown key {unknown[0]}")
        for key in ("host", "control"):
            if key not in data:
                raise ConfigError(f"{path}: {key} is required")
        try:
            return AgentConfig(
                state_dir=state_dir,
                host=data["host"],
                control=data["control"],
                metrics=data.get("metrics", "127.0.0.1:9464"),
                netns=data.get("netns", ""),
                runtime_dir=data.get("runtime_dir"),
                dp_cpu=dp.get("cpu", 1),
                dp_rt_priority=dp.get("rt_priority", 0),
            )
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def write(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(self.to_toml())
        tmp.replace(self.path)
