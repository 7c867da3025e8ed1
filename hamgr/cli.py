"""The `hamgr` command line.

Data goes to stdout and messages to stderr. With --json, the last line of stdout is one JSON
object. Exit codes: 0 success, 1 a check or operation failed, 2 bad usage (click's own).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys

import click

from hamgr.bench import BENCHMARKS


def _color() -> bool | None:
    # NO_COLOR (https://no-color.org) wins over everything; otherwise click decides by TTY.
    return False if os.environ.get("NO_COLOR") else None


class _BenchGroup(click.Group):
    """Loads each benchmark module only when it is asked for (they import heavy parts)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name in BENCHMARKS if importlib.util.find_spec(f"hamgr.bench.{name}")]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.list_commands(ctx):
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


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (last line).")
def doctor(as_json: bool) -> None:
    """Check every requirement; exit 0 only when all required checks are ok."""
    from hamgr.doctor import Status, run_checks

    report = run_checks()
    if as_json:
        click.echo(json.dumps(report.as_json()))
    else:
        colors = {Status.OK: "green", Status.WARN: "yellow", Status.FAIL: "red"}
        width = max(len(c.name) for c in report.checks)
        for check in report.checks:
            status = click.style(f"{check.status:<4}", fg=colors[check.status])
            optional = "" if check.required else " (optional)"
            click.echo(f"{status}  {check.name:<{width}}  {check.detail}{optional}", color=_color())
            if check.status is not Status.OK and check.fix:
                click.echo(f"      {'':<{width}}  fix: {check.fix}", color=_color())
        verdict = "all required checks ok" if report.ok else "some required checks failed"
        click.echo(verdict, err=True)
    sys.exit(0 if report.ok else 1)


# The parts `hamgr demo` needs, in build order, with the issue that delivers each.
_DEMO_PARTS = (
    ("dpdk_vhost.client", "data plane with epoch output buffering"),
    ("shim.engine", "epoch engine driving container checkpoints and replication"),
    ("hamgr.failover", "failure detection and failover"),
    ("hamgr.demo", "3-host demo testbed and report"),
)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (last line).")
@click.pass_context
def demo(ctx: click.Context, as_json: bool) -> None:
    """Protect a stateful NF on a 3-host testbed, kill the primary host, report the failover."""
    if importlib.util.find_spec("hamgr.demo") is not None:
        module = importlib.import_module("hamgr.demo")
        ctx.invoke(module.command, as_json=as_json)
        return
    # Until the demo lands, say what the machine can do and which parts are still missing.
    from hamgr.doctor import run_checks

    report = run_checks()
    missing = [what for mod, what in _DEMO_PARTS if importlib.util.find_spec(mod) is None]
    click.echo(f"doctor: {'all required checks ok' if report.ok else 'some checks failed'}")
    for check in report.checks:
        click.echo(f"  {check.status:<4}  {check.name}: {check.detail}")
    click.echo("the demo cannot run yet; not built: " + "; ".join(missing), err=True)
    if as_json:
        click.echo(json.dumps({"ok": report.ok, "demo": "not built", "missing": missing}))
    sys.exit(0 if report.ok else 1)


def main() -> None:
    cli.main(standalone_mode=True)
