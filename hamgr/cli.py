"""The `hamgr` command line.

Data goes to stdout and messages to stderr. With --json, the last line of stdout is one JSON
object. Exit codes: 0 success, 1 a check or operation failed (the agent refused or could not do
it), 2 bad usage (click's own, and a spec file that does not validate), 3 the agent could not be
reached (not running, no answer in time, or this CLI's key refused).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

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


EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3


@click.group()
@click.version_option(package_name="hamgr")
def cli() -> None:
    """hamgr keeps unmodified network functions available through process and host failures.

    \b
    Data goes to stdout, messages to stderr; with --json the last line of stdout is one JSON
    object. NO_COLOR turns colour off. The agent's state dir comes from --state-dir, else
    $HAMGR_STATE_DIR, else /var/lib/hamgr.

    \b
    Exit codes:
      0  success
      1  a check or operation failed (the agent refused or could not do it)
      2  bad usage, or a spec file that does not validate
      3  the agent could not be reached (not running, no answer, or this CLI's key refused)
    """


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


@cli.command(
    add_help_option=False,
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
)
@click.pass_context
def demo(ctx: click.Context) -> None:
    """Protect a stateful NF on a 3-host testbed, kill the primary host, report the failover.

    See `hamgr demo --help` for its options (--json, --report-dir, --pps, --epoch-ms).
    """
    # Loaded on use: the demo pulls in the whole testbed, which `hamgr --help` should not.
    from hamgr.demo import command

    command.main(args=ctx.args, prog_name="hamgr demo", standalone_mode=True)


# --- the agent and its units ----------------------------------------------------------------

STATE_DIR_ENV = "HAMGR_STATE_DIR"
DEFAULT_STATE_DIR = "/var/lib/hamgr"


def _state_dir_option(f: Any) -> Any:
    return click.option(
        "--state-dir",
        type=click.Path(file_okay=False, path_type=Path),
        envvar=STATE_DIR_ENV,
        default=DEFAULT_STATE_DIR,
        show_default=True,
        help=f"The agent's state directory (or ${STATE_DIR_ENV}).",
    )(f)


def _json_option(f: Any) -> Any:
    return click.option("--json", "as_json", is_flag=True, help="Machine output (last line).")(f)


def _say(message: str) -> None:
    click.echo(message, err=True, color=_color())


def _fail(
    message: str, status: int = EXIT_FAILED, as_json: bool = False, **fields: Any
) -> NoReturn:
    _say(f"hamgr: {message}")
    if as_json:
        click.echo(json.dumps({"ok": False, "error": message, **fields}))
    sys.exit(status)


def _config(state_dir: Path, as_json: bool = False) -> Any:
    from hamgr.agent.config import AgentConfig, ConfigError

    try:
        return AgentConfig.load(state_dir)
    except ConfigError as exc:
        _fail(str(exc), EXIT_USAGE, as_json)


def _client(state_dir: Path, *, timeout: float = 10.0, as_json: bool = False) -> Any:
    from hamgr import keys
    from hamgr.control import ControlClient

    config = _config(state_dir, as_json)
    directory = keys.keys_dir(state_dir)
    try:
        server_key = keys.load_public(directory, keys.AGENT)
        cli_key = keys.load_keypair(directory, keys.CLI)
    except keys.KeysError as exc:
        _fail(str(exc), EXIT_USAGE, as_json)
    return ControlClient(
        config.control,
        server_key=server_key,
        keypair=(cli_key.public, cli_key.secret),
        timeout=timeout,
    )


def _call(state_dir: Path, as_json: bool, fn: Any, *, timeout: float = 10.0) -> Any:
    """Run `fn(client)`; agent errors exit 1, an unreachable agent exits 3."""
    from hamgr.control import ControlAuthError, ControlError, ControlTimeoutError

    client = _client(state_dir, timeout=timeout, as_json=as_json)
    if client.endpoint.startswith("ipc://") and _agent_pid(state_dir) is None:
        client.close()
        _fail(
            f"the agent on {state_dir} is not running; start it with `hamgr up`",
            EXIT_UNREACHABLE,
            as_json,
            code="not_running",
        )
    try:
        return fn(client)
    except (ControlAuthError, ControlTimeoutError) as exc:
        _fail(exc.message, EXIT_UNREACHABLE, as_json, code=exc.code)
    except ControlError as exc:
        _fail(exc.message, EXIT_FAILED, as_json, code=exc.code)
    finally:
        client.close()


@cli.command()
@_state_dir_option
@click.option("--host", help="This host's name (default: the system's short host name).")
@click.option(
    "--control", "control_ep", help="Control endpoint (default ipc://STATE_DIR/control.sock)."
)
@click.option("--metrics", help='Prometheus listen HOST:PORT ("" turns it off).')
@click.option("--netns", help="Run the agent inside this netns.")
@click.option(
    "--runtime-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="tmpfs for checkpoint images (default /dev/shm/hamgr-HOST).",
)
@click.option("--dp-cpu", type=click.IntRange(min=0), help="The data plane's CPU.")
@click.option("--force", is_flag=True, help="Rewrite the config and make new keys.")
@_json_option
def init(  # noqa: PLR0917 - one parameter per click option
    state_dir: Path,
    host: str | None,
    control_ep: str | None,
    metrics: str | None,
    netns: str | None,
    runtime_dir: Path | None,
    dp_cpu: int | None,
    force: bool,
    as_json: bool,
) -> None:
    """Write this host's agent config and CURVE keys (idempotent without --force)."""
    import socket

    import attrs

    from hamgr import keys
    from hamgr.agent.config import AgentConfig, ConfigError

    state_dir = state_dir.absolute()
    path = state_dir / "agent.toml"
    try:
        if path.exists() and not force:
            config = AgentConfig.load(state_dir)
            wrote = False
            given = {
                "host": host,
                "control": control_ep,
                "metrics": metrics,
                "netns": netns,
                "runtime_dir": runtime_dir,
                "dp_cpu": dp_cpu,
            }
            changed = [k for k, v in given.items() if v is not None and getattr(config, k) != v]
            if changed:
                _fail(
                    f"{path} exists with other {', '.join(changed)}; use --force to rewrite it",
                    EXIT_USAGE,
                    as_json,
                )
        else:
            config = AgentConfig.default(state_dir, host or socket.gethostname().split(".")[0])
            updates: dict[str, Any] = {}
            if control_ep is not None:
                updates["control"] = control_ep
            if metrics is not None:
                updates["metrics"] = metrics
            if netns is not None:
                updates["netns"] = netns
            if runtime_dir is not None:
                updates["runtime_dir"] = runtime_dir
            if dp_cpu is not None:
                updates["dp_cpu"] = dp_cpu
            config = attrs.evolve(config, **updates)
            config.write()
            wrote = True
        made = keys.init_keys(state_dir, host=config.host, force=force)
    except (ConfigError, keys.KeysError, OSError) as exc:
        _fail(str(exc), EXIT_FAILED, as_json)
    result = {
        "ok": True,
        "host": config.host,
        "state_dir": str(state_dir),
        "config": str(path),
        "config_written": wrote,
        "keys_created": list(made.created),
        "agent_public_key": made.agent.public.decode(),
        "cli_public_key": made.cli.public.decode(),
        "authorized_keys": str(made.authorized),
    }
    created = ", ".join(made.created)
    key_note = f"created: {created}" if created else "kept"
    _say(f"{'wrote' if wrote else 'kept'} {path}; keys {key_note}")
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"host             {config.host}")
        click.echo(f"agent public key {result['agent_public_key']}")
        click.echo(f"cli public key   {result['cli_public_key']}")


@cli.group()
def agent() -> None:
    """The per-host daemon (normally started by `hamgr up` or systemd)."""


@agent.command("run")
@_state_dir_option
@click.option("--netns", help="Enter this netns first (overrides the config).")
def agent_run(state_dir: Path, netns: str | None) -> None:
    """Run the agent in the foreground until SIGTERM (systemd's Type=notify service)."""
    from hamgr.agent.daemon import Agent
    from hamgr.agent.procs import enter_netns
    from hamgr.logs import setup_logging

    config = _config(state_dir.absolute())
    namespace = netns if netns is not None else config.netns
    if namespace:
        try:
            # Before any thread exists: threads and children inherit the netns.
            enter_netns(namespace)
        except OSError as exc:
            _fail(f"cannot enter netns {namespace}: {exc}", EXIT_FAILED)
    setup_logging()
    sys.exit(Agent(config).run())


def _agent_pid(state_dir: Path) -> int | None:
    """The PID of a running agent on `state_dir`, from its locked pid file."""
    import fcntl

    path = state_dir / "agent.pid"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None  # nobody holds the lock: a stale file
    finally:
        os.close(fd)


@cli.command()
@_state_dir_option
@click.option("--netns", help="Start the agent inside this netns (overrides the config).")
@click.option(
    "--timeout",
    type=float,
    default=60.0,
    show_default=True,
    help="Seconds to wait until it answers.",
)
@_json_option
def up(state_dir: Path, netns: str | None, timeout: float, as_json: bool) -> None:
    """Start the local agent in the background and wait until it answers."""
    import subprocess
    import time

    from hamgr.control import ControlError

    state_dir = state_dir.absolute()
    config = _config(state_dir, as_json)
    running = _agent_pid(state_dir)
    if running is not None:
        _say(f"the agent already runs (pid {running})")
        if as_json:
            click.echo(json.dumps({"ok": True, "pid": running, "started": False}))
        return
    config.log_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "hamgr.agent", "run", "--state-dir", str(state_dir)]
    if netns is not None:
        argv += ["--netns", netns]
    log_path = config.log_dir / "agent.log"
    env = {**os.environ, "HAMGR_LOG_FORMAT": "json"}
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            start_new_session=True,
            env=env,
        )
    deadline = time.monotonic() + timeout
    client = _client(state_dir, timeout=1.0, as_json=as_json)
    try:
        while True:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace").splitlines()[-15:]
                _fail(
                    f"the agent exited with {proc.returncode}; {log_path} ends with:\n"
                    + "\n".join(tail),
                    EXIT_FAILED,
                    as_json,
                )
            try:
                info = client.ping()
                break
            except ControlError:
                if time.monotonic() > deadline:
                    _fail(
                        f"the agent (pid {proc.pid}) did not answer within {timeout:g} s; "
                        f"see {log_path}",
                        EXIT_UNREACHABLE,
                        as_json,
                    )
    finally:
        client.close()
    proc.returncode = 0  # it runs on, detached; this CLI does not wait for it
    _say(f"agent {info['host']} up (pid {info['pid']}); logs in {log_path}")
    if as_json:
        click.echo(json.dumps({"ok": True, "started": True, **info}))
    else:
        click.echo(info["pid"])


@cli.command()
@_state_dir_option
@click.option(
    "--teardown",
    is_flag=True,
    help="Also stop every unit's NF and the data plane (default: leave them running; "
    "`hamgr up` re-adopts them).",
)
@click.option("--timeout", type=float, default=120.0, show_default=True)
@_json_option
def down(state_dir: Path, teardown: bool, timeout: float, as_json: bool) -> None:
    """Stop the local agent."""
    import signal
    import time

    from hamgr.control import ControlAuthError, ControlError

    state_dir = state_dir.absolute()
    pid = _agent_pid(state_dir)
    if pid is None:
        _say("the agent is not running")
        if as_json:
            click.echo(json.dumps({"ok": True, "stopped": False}))
        return
    client = _client(state_dir, timeout=10.0, as_json=as_json)
    try:
        client.shutdown(teardown=teardown, timeout=10.0)
    except ControlAuthError as exc:
        _fail(exc.message, EXIT_UNREACHABLE, as_json)
    except ControlError as exc:
        if teardown:
            _fail(
                f"the agent did not take the request ({exc.message}); nothing was torn down",
                EXIT_UNREACHABLE,
                as_json,
            )
        _say(f"the agent does not answer ({exc.message}); sending SIGTERM to pid {pid}")
        os.kill(pid, signal.SIGTERM)
    finally:
        client.close()
    deadline = time.monotonic() + timeout
    while _agent_pid(state_dir) is not None:
        if time.monotonic() > deadline:
            _fail(
                f"the agent (pid {pid}) is still running after {timeout:g} s", EXIT_FAILED, as_json
            )
        time.sleep(0.1)
    _say(f"agent stopped (pid {pid}){'; units and data plane torn down' if teardown else ''}")
    if as_json:
        click.echo(json.dumps({"ok": True, "stopped": True, "pid": pid, "teardown": teardown}))


@cli.command()
@click.argument("spec_file", metavar="SPEC.toml", type=click.Path(dir_okay=False, path_type=Path))
@_state_dir_option
@click.option("--timeout", type=float, default=180.0, show_default=True)
@_json_option
def protect(spec_file: Path, state_dir: Path, timeout: float, as_json: bool) -> None:
    """Protect the unit SPEC.toml describes (see docs/agent.md for the format)."""
    from hamgr import unitspec

    try:
        spec = unitspec.load(spec_file)
    except unitspec.SpecError as exc:
        for problem in exc.problems:
            _say(problem.render(exc.source))
        if as_json:
            click.echo(
                json.dumps(
                    {
                        "ok": False,
                        "error": "bad spec",
                        "problems": [attrs_asdict(p) for p in exc.problems],
                    }
                )
            )
        sys.exit(EXIT_USAGE)
    result = _call(
        state_dir.absolute(),
        as_json,
        lambda c: c.protect(spec.to_json(), str(spec_file), timeout=timeout),
        timeout=timeout,
    )
    _say(
        f"unit {result['unit']} protected (term {result['term']}, NF pid {result['nf_pid']}, "
        f"standby on {result['standby']})"
    )
    if as_json:
        click.echo(json.dumps({"ok": True, **result}))
    else:
        click.echo(result["unit"])


def attrs_asdict(value: Any) -> dict[str, Any]:
    import attrs

    return attrs.asdict(value)


@cli.command()
@click.argument("unit")
@_state_dir_option
@click.option("--timeout", type=float, default=120.0, show_default=True)
@_json_option
def unprotect(unit: str, state_dir: Path, timeout: float, as_json: bool) -> None:
    """Stop protecting UNIT: let committed output out, stop its NF, remove what hamgr made."""
    result = _call(
        state_dir.absolute(), as_json, lambda c: c.unprotect(unit, timeout=timeout), timeout=timeout
    )
    _say(f"unit {unit} unprotected")
    if as_json:
        click.echo(json.dumps({"ok": True, **result}))


@cli.command()
@click.argument("unit")
@click.option(
    "--planned/--now",
    default=True,
    show_default=True,
    help="--planned: a switchover with no input loss (a last checkpoint of the running copy, "
    "committed, then restored). --now: stop the running copy and restore the last committed "
    "checkpoint, as after a crash (its output since that commit is dropped).",
)
@click.option(
    "--term",
    type=click.IntRange(min=1),
    help="The unit's term as you saw it (`hamgr status`); a request whose term is no longer "
    "current is refused, so a retry cannot fail the unit over twice. Default: the current one.",
)
@click.option(
    "--lossless",
    is_flag=True,
    help="Ask for input replay (lossless mode); refused by this agent.",
)
@click.option("--reason", help="Why, for the agent's log and events.")
@_state_dir_option
@click.option("--timeout", type=float, default=120.0, show_default=True)
@_json_option
def failover(  # noqa: PLR0917 - one parameter per click option
    unit: str,
    planned: bool,
    term: int | None,
    lossless: bool,
    reason: str | None,
    state_dir: Path,
    timeout: float,
    as_json: bool,
) -> None:
    """Fail UNIT over to a restored copy on this host, and print the attempt's record.

    Exits 0 when the failover finished; 1 when the agent refused it (unknown unit, a failover
    already running, a stale --term, --lossless) or the attempt failed or was aborted (the
    record says why; an aborted switchover leaves the running copy as it was).

    On the host of a unit's remote standby, --now asks that standby to take the unit over, as
    when its primary dies: the takeover runs in the background, and the command exits 0 once
    it is queued (`hamgr status` and `hamgr events` show the outcome).
    """
    result = _call(
        state_dir.absolute(),
        as_json,
        lambda c: c.failover(
            unit, planned=planned, term=term, lossless=lossless, reason=reason, timeout=timeout
        ),
        timeout=timeout,
    )
    if result.get("queued"):
        # This host is the unit's remote standby: the takeover runs on its own (events
        # `failover`, `failover_record`; `hamgr status` shows the result).
        _say(f"{unit}: takeover requested at term {result.get('term')}; it runs in the background")
        if as_json:
            click.echo(json.dumps({"ok": True, **result}))
        else:
            click.echo(f"{unit} term {result.get('term')} queued")
        sys.exit(EXIT_OK)
    ok = result.get("status") == "finished"
    kind = "switchover" if result.get("planned") else "failover"
    steps = ", ".join(f"{k} {v:g}" for k, v in (result.get("steps_ms") or {}).items())
    _say(
        f"{unit}: {kind} {result.get('status')} at term {result.get('term')} in "
        f"{result.get('elapsed_ms')} ms (NF pid {result.get('old_pid')} -> "
        f"{result.get('new_pid')}); steps ms: {steps or '-'}"
    )
    if not ok:
        _say(f"{unit}: {result.get('detail')}")
    if as_json:
        click.echo(json.dumps({"ok": ok, **result}))
    else:
        click.echo(f"{unit} term {result.get('term')} pid {_cell(result.get('new_pid'))}")
    sys.exit(EXIT_OK if ok else EXIT_FAILED)


_PROTECTION_COLOURS = {"protected": "green", "stalled": "yellow", "unprotected": "red"}


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def _last_failover(record: Any) -> str:
    """`finished t2 312ms` for a failover record (status, term, detection to resumed input)."""
    if not isinstance(record, dict):
        return "-"
    took = record.get("outage_ms") or record.get("elapsed_ms")
    return f"{record.get('status')} t{record.get('term')}" + (
        f" {took:.0f}ms" if isinstance(took, int | float) else ""
    )


@cli.command()
@click.argument("unit", required=False)
@_state_dir_option
@_json_option
def status(unit: str | None, state_dir: Path, as_json: bool) -> None:
    """Show every unit on this host (or UNIT): role, peer (the other role's host), term,
    protection, commits, held output."""
    data = _call(state_dir.absolute(), as_json, lambda c: c.status(unit))
    if as_json:
        click.echo(json.dumps({"ok": True, **data}))
        return
    _say(f"host {data['host']}, agent pid {data['pid']}, up {data['uptime_s']:.0f} s")
    header = (
        "UNIT",
        "ROLE",
        "PEER",
        "TERM",
        "STATE",
        "PROTECTION",
        "COMMITTED",
        "EPOCHS",
        "COMMITS",
        "HELD_PKTS",
        "HELD_BYTES",
        "NF_PID",
        "FAILOVERS",
        "LAST_FAILOVER",
    )
    rows = [
        (
            u["unit"],
            u["role"],
            _cell(u.get("peer") or None),
            _cell(u.get("term")),
            _cell(u.get("state")),
            _cell(u.get("protection")),
            _cell(u.get("last_committed")),
            _cell(u.get("epochs_total")),
            _cell(u.get("commits_total")),
            _cell(u.get("buffered_pkts")),
            _cell(u.get("buffered_bytes")),
            _cell(u.get("nf_pid")),
            _cell(u.get("failovers")),
            _last_failover(u.get("last_failover")) if u["role"] == "primary" else "-",
        )
        for u in data["units"]
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    click.echo("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
    for row, u in zip(rows, data["units"], strict=True):
        cells = [c.ljust(w) for c, w in zip(row, widths, strict=True)]
        colour = _PROTECTION_COLOURS.get(u.get("protection") or "")
        if colour:
            cells[5] = click.style(cells[5], fg=colour)
        click.echo("  ".join(cells).rstrip(), color=_color())
        if u.get("error"):
            _say(f"{u['unit']}/{u['role']}: {u['error']}")
    if not rows:
        _say("no units")


@cli.command()
@_state_dir_option
@click.option(
    "--seconds",
    type=click.FloatRange(min=0, min_open=True, max=86400),
    default=3600.0,
    show_default=True,
    help="Stop after this long.",
)
@click.option(
    "--kind",
    "kinds",
    multiple=True,
    help="Only events of this kind (repeatable): commit, alarm, protect, ...",
)
@_json_option
def events(state_dir: Path, seconds: float, kinds: tuple[str, ...], as_json: bool) -> None:
    """Stream the agent's events live (JSON lines with --json, then a summary line)."""
    import datetime

    def stream(client: Any) -> int:
        count = 0
        for event in client.events(seconds, kinds or None):
            count += 1
            if as_json:
                click.echo(json.dumps(event))
            else:
                when = datetime.datetime.fromtimestamp(event["ts"]).strftime("%H:%M:%S.%f")[:-3]
                rest = " ".join(f"{k}={v}" for k, v in event.items() if k not in ("ts", "kind"))
                click.echo(f"{when} {event['kind']:<12} {rest}")
        return count

    count = _call(state_dir.absolute(), as_json, stream)
    if as_json:
        click.echo(json.dumps({"ok": True, "events": count, "seconds": seconds}))


# --- remote hosts (hamgr/hosts.py, docs/hosts.md) --------------------------------------------


@cli.group()
def hosts() -> None:
    """Remote hosts: verify over SSH, start their agents, keep the inventory (docs/hosts.md)."""


def _hosts_call(as_json: bool, fn: Any) -> Any:
    from hamgr.hosts import HostsError

    try:
        return fn()
    except HostsError as exc:
        _fail(exc.message, exc.status, as_json, code=exc.code)


@hosts.command("add")
@click.argument("name")
@click.option("--address", required=True, help="The host's IPv4 address (sshd and the agent).")
@click.option("--port", type=click.IntRange(1, 65535), default=22, show_default=True)
@click.option("--user", default="root", show_default=True, help="The SSH user.")
@click.option(
    "--key",
    type=click.Path(dir_okay=False, path_type=Path),
    help="SSH private key (default: the first of ~/.ssh/id_ed25519, id_ecdsa, id_rsa).",
)
@click.option(
    "--known-hosts",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Verify the host key against this file (default ~/.ssh/known_hosts).",
)
@click.option(
    "--fingerprint",
    help="Accept only the host key with this SHA256 fingerprint (checked out of band).",
)
@click.option(
    "--python",
    "python",
    default="python3",
    show_default=True,
    help="The remote interpreter that has hamgr installed (with --install: the one that makes "
    "the venv).",
)
@click.option(
    "--remote-state-dir",
    default=DEFAULT_STATE_DIR,
    show_default=True,
    help="The remote agent's state dir.",
)
@click.option(
    "--control-port",
    type=click.IntRange(1, 65535),
    default=7311,
    show_default=True,
    help="TCP port of the remote agent's control socket, on --address.",
)
@click.option(
    "--timeout", type=float, default=10.0, show_default=True, help="SSH connect timeout (s)."
)
@click.option(
    "--agent-timeout",
    type=float,
    default=60.0,
    show_default=True,
    help="Seconds for the remote agent to start.",
)
@click.option(
    "--install",
    is_flag=True,
    help="Install this CLI's hamgr and its dependencies (wheels built here) into a venv at "
    "--prefix on the host, and run the agent from there; --python is then the host's Python "
    "that makes the venv.",
)
@click.option(
    "--prefix",
    help="With --install: the venv's path on the host, a symlink to the current install "
    "[default: /opt/hamgr/venv].",
)
@click.option(
    "--reinstall",
    is_flag=True,
    help="With --install: install anew even when the host already has these wheels "
    "(restarts its agent).",
)
@_state_dir_option
@_json_option
def hosts_add(  # noqa: PLR0917 - one parameter per click option
    name: str,
    address: str,
    port: int,
    user: str,
    key: Path | None,
    known_hosts: Path | None,
    fingerprint: str | None,
    python: str,
    remote_state_dir: str,
    control_port: int,
    timeout: float,
    agent_timeout: float,
    install: bool,
    prefix: str | None,
    reinstall: bool,
    state_dir: Path,
    as_json: bool,
) -> None:
    """Verify host NAME over SSH, start its agent, exchange keys, and record it.

    The host key must match --fingerprint or an entry of the known_hosts file; an unknown or
    different key is refused and its fingerprint printed. Exit 3 when the host, its sshd (or
    the key for it) or its agent cannot be reached. With --install, hamgr is installed there
    first, from wheels built here, so the host needs no checkout and no package index.
    """
    import ipaddress

    from hamgr import hosts as h

    if known_hosts is not None and fingerprint is not None:
        _fail("give --known-hosts or --fingerprint, not both", EXIT_USAGE, as_json)
    if (prefix is not None or reinstall) and not install:
        _fail("--prefix and --reinstall go with --install", EXIT_USAGE, as_json)
    try:
        ipaddress.ip_address(address)
    except ValueError:
        _fail(f"--address {address!r} is not an IP address", EXIT_USAGE, as_json)

    def run() -> dict[str, Any]:
        expected = h.parse_fingerprint(fingerprint) if fingerprint is not None else None
        if key is not None:
            client_key = key.expanduser().absolute()
        else:
            home = Path("~/.ssh").expanduser()
            found = [home / n for n in h.DEFAULT_KEYS if (home / n).exists()]
            if not found:
                raise h.HostsError(
                    f"no SSH client key in {home} (tried {', '.join(h.DEFAULT_KEYS)}): pass "
                    "--key with the private key that the host's sshd accepts",
                    status=EXIT_USAGE,
                    code="no_client_key",
                )
            client_key = found[0]
        if known_hosts is not None and not known_hosts.exists():
            raise h.HostsError(
                f"--known-hosts {known_hosts} does not exist", status=EXIT_USAGE, code="usage"
            )
        target = h.SshTarget(
            address=address,
            port=port,
            user=user,
            key=client_key,
            known_hosts=None
            if expected
            else (known_hosts or Path("~/.ssh/known_hosts").expanduser()).absolute(),
            fingerprint=expected,
            timeout=timeout,
        )
        options = h.AddOptions(
            name=name,
            target=target,
            python=python,
            remote_state_dir=remote_state_dir,
            control_port=control_port,
            agent_timeout=agent_timeout,
            install=h.InstallOptions(
                prefix=h.check_prefix(prefix or h.DEFAULT_PREFIX), reinstall=reinstall
            )
            if install
            else None,
        )
        return h.add_host(state_dir.absolute(), options, _say)

    result = _hosts_call(as_json, run)
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(result["name"])


@hosts.command("list")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="Seconds to wait for each agent's ping.",
)
@_state_dir_option
@_json_option
def hosts_list(timeout: float, state_dir: Path, as_json: bool) -> None:
    """The inventory, with each agent's live reachability (a control-channel ping)."""
    from hamgr import hosts as h

    rows = _hosts_call(as_json, lambda: h.list_hosts(state_dir.absolute(), timeout))
    if as_json:
        click.echo(json.dumps({"ok": True, "hosts": rows}))
        return
    if not rows:
        _say("no hosts; add one with `hamgr hosts add`")
        return
    header = ("NAME", "SSH", "FINGERPRINT", "CONTROL", "REACHABLE", "AGENT_PID")
    table = [
        (
            r["name"],
            f"{r['user']}@{r['address']}:{r['port']}",
            r["fingerprint"],
            r["control"],
            "yes" if r["reachable"] else f"no ({r['error']})",
            _cell(r.get("agent_pid")),
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in [header, *table]) for i in range(len(header))]
    click.echo("  ".join(c.ljust(w) for c, w in zip(header, widths, strict=True)).rstrip())
    for row, r in zip(table, rows, strict=True):
        cells = [c.ljust(w) for c, w in zip(row, widths, strict=True)]
        cells[4] = click.style(cells[4], fg="green" if r["reachable"] else "red")
        click.echo("  ".join(cells).rstrip(), color=_color())


@hosts.command("remove")
@click.argument("name")
@click.option(
    "--stop-agent",
    is_flag=True,
    help="Also stop the remote agent over SSH (`hamgr down` there) and take this machine's keys "
    "out of its authorized_keys.",
)
@click.option(
    "--teardown",
    is_flag=True,
    help="With --stop-agent: also stop the host's units and data plane (`hamgr down --teardown`).",
)
@click.option(
    "--timeout", type=float, default=10.0, show_default=True, help="SSH connect timeout (s)."
)
@_state_dir_option
@_json_option
def hosts_remove(  # noqa: PLR0917 - one parameter per click option
    name: str, stop_agent: bool, teardown: bool, timeout: float, state_dir: Path, as_json: bool
) -> None:
    """Drop host NAME from the inventory and from this machine's authorized_keys."""
    from hamgr import hosts as h

    if teardown and not stop_agent:
        _fail("--teardown needs --stop-agent", EXIT_USAGE, as_json)
    result = _hosts_call(
        as_json,
        lambda: h.remove_host(
            state_dir.absolute(),
            name,
            stop_agent=stop_agent,
            teardown=teardown,
            timeout=timeout,
            say=_say,
        ),
    )
    if as_json:
        click.echo(json.dumps(result))


def main() -> None:
    cli.main(standalone_mode=True)
