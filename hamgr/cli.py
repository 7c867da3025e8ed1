"""The `hamgr` command line."""

from __future__ import annotations

import importlib
import importlib.util
import sys

import click

from hamgr.bench import BENCHMARKS


class _BenchGroup(click.Group):
    """Loads each benchmark module only when it is asked for (they import heavy parts)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name in BENCHMARKS if importlib.util.find_spec(f"hamgr.bench.{name}")]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in BENCHMARKS or importlib.util.find_spec(f"hamgr.bench.{cmd_name}") is None:
            return None
        module = importlib.import_module(f"hamgr.bench.{cmd_name}")
        command = getattr(module, "command", None)
        return command if isinstance(command, click.Command) else None


@click.group()
@click.version_option(package_name="hamgr")
def cli() -> None:
    """hamgr keeps unmodified network functions available through process and host failures."""


@cli.group(cls=_BenchGroup)
def bench() -> None:
    """Run a benchmark; with --json the last line of stdout is one JSON object."""


def main() -> None:
    sys.exit(cli.main(standalone_mode=True))
