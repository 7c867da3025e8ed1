"""Where hamgr finds its machine-level configuration and runtimes.

`make setup` writes ``/etc/hamgr/hamgr.toml``. Environment variables override single keys so tests
and operators can point at another runtime without editing the file.
"""

from __future__ import annotations

import os
import shutil
import tomllib
from pathlib import Path
from typing import Any

import attrs

DEFAULT_CONFIG = Path("/etc/hamgr/hamgr.toml")
REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(Exception):
    """The configuration file exists but cannot be used."""


@attrs.frozen
class MachineConfig:
    """Machine-level settings shared by the CLI, the agent and the tests."""

    source: Path | None
    criu_path: str | None
    dataplane_binary: Path

    @staticmethod
    def load(path: Path | None = None) -> MachineConfig:
        path = path or Path(os.environ.get("HAMGR_CONFIG", str(DEFAULT_CONFIG)))
        data: dict[str, Any] = {}
        source: Path | None = None
        if path.exists():
            try:
                data = tomllib.loads(path.read_text())
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(
                    f"{path}: not valid TOML ({exc}); fix the file or re-run `make setup` "
                    "to rewrite it"
                ) from exc
            source = path
        criu = os.environ.get("HAMGR_CRIU") or _table(data, "criu", path).get("path")
        if criu is None:
            criu = shutil.which("criu")
        if criu is not None and not isinstance(criu, str):
            raise ConfigError(f"{path}: [criu] path must be a string, got {criu!r}")
        dataplane = os.environ.get("HAMGR_DPDK_VHOST") or _table(data, "dataplane", path).get(
            "binary", str(REPO_ROOT / "dpdk_vhost" / "build" / "dpdk-vhost")
        )
        return MachineConfig(source=source, criu_path=criu, dataplane_binary=Path(dataplane))


def _table(data: dict[str, Any], name: str, path: Path) -> dict[str, Any]:
    table = data.get(name, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [{name}] must be a table")
    return table
