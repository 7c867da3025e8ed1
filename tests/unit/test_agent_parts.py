"""The agent's pieces that need no root: keys, config, state database, sd_notify, logs."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import sqlite3
import stat
from pathlib import Path

import pytest
import zmq
import zmq.auth

from hamgr import keys
from hamgr.agent.config import AgentConfig, ConfigError, PeerConfig, RemoteConfig
from hamgr.agent.sdnotify import Notifier
from hamgr.agent.state import DataPlaneRow, StateDB, StateError
from hamgr.logs import JsonFormatter, setup_logging

# --- keys --------------------------------------------------------------------------------------


def test_init_keys_writes_private_files_and_authorizes_both(tmp_path: Path) -> None:
    made = keys.init_keys(tmp_path, host="h1")
    assert made.created == ("agent", "cli")
    kdir = keys.keys_dir(tmp_path)
    assert stat.S_IMODE(kdir.stat().st_mode) == 0o700
    for name in ("agent", "cli"):
        assert stat.S_IMODE((kdir / f"{name}.key_secret").stat().st_mode) == 0o600
        assert stat.S_IMODE((kdir / f"{name}.key").stat().st_mode) == 0o644
    # The files are ZeroMQ certificates: pyzmq's own loader reads them.
    public, secret = zmq.auth.load_certificate(str(kdir / "agent.key_secret"))
    assert public == made.agent.public
    assert secret == made.agent.secret
    assert zmq.auth.load_certificate(str(kdir / "agent.key"))[1] is None
    authorized = keys.AuthorizedKeys(made.authorized).load()
    assert authorized == {made.agent.public: "h1 agent", made.cli.public: "h1 cli"}


def test_init_keys_is_idempotent_and_force_replaces(tmp_path: Path) -> None:
    first = keys.init_keys(tmp_path, host="h1")
    again = keys.init_keys(tmp_path, host="h1")
    assert again.created == ()
    assert again.agent == first.agent
    peer = keys.generate()
    keys.AuthorizedKeys(first.authorized).add(peer.public, "peer h2")
    forced = keys.init_keys(tmp_path, host="h1", force=True)
    assert forced.agent != first.agent
    authorized = keys.AuthorizedKeys(first.authorized).load()
    assert first.agent.public not in authorized
    assert authorized[peer.public] == "peer h2"
    assert authorized[forced.agent.public] == "h1 agent"


def test_a_readable_secret_is_refused(tmp_path: Path) -> None:
    keys.init_keys(tmp_path, host="h1")
    secret = keys.keys_dir(tmp_path) / "agent.key_secret"
    os.chmod(secret, 0o644)
    with pytest.raises(keys.KeysError, match="must be 0600"):
        keys.load_keypair(keys.keys_dir(tmp_path), "agent")


def test_mismatched_halves_are_refused(tmp_path: Path) -> None:
    a, b = keys.generate(), keys.generate()
    keys.write_keypair(tmp_path, "x", keys.Keypair(a.public, b.secret))
    with pytest.raises(keys.KeysError, match="does not belong"):
        keys.load_keypair(tmp_path, "x")


def test_missing_keys_say_how_to_make_them(tmp_path: Path) -> None:
    with pytest.raises(keys.KeysError, match="hamgr init"):
        keys.load_public(tmp_path, "agent")


def test_authorized_keys_file_checks_every_line(tmp_path: Path) -> None:
    path = tmp_path / "authorized_keys"
    good = keys.generate().public.decode()
    path.write_text(f"# comment\n\n{good} someone\nnot-a-key x\n")
    with pytest.raises(keys.KeysError, match=r"authorized_keys:4: "):
        keys.AuthorizedKeys(path).load()
    ak = keys.AuthorizedKeys(tmp_path / "other")
    assert ak.add(good, "a") is True
    assert ak.add(good, "a") is False
    assert ak.remove(good) is True
    assert ak.remove(good) is False
    with pytest.raises(keys.KeysError):
        ak.add("short")


# --- config ------------------------------------------------------------------------------------


def test_config_round_trip(tmp_path: Path) -> None:
    config = AgentConfig.default(tmp_path, "hostA")
    config.write()
    loaded = AgentConfig.load(tmp_path)
    assert loaded.host == "hostA"
    assert loaded.control == f"ipc://{tmp_path}/control.sock"
    assert loaded.runtime == Path("/dev/shm/hamgr-hostA")
    assert loaded.dp_cpu == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('control = "ipc:///x"\n', "host is required"),
        ('host = "a b"\ncontrol = "ipc:///x"\n', "host: 'a b' is not a host name"),
        ('host = "a"\ncontrol = "http://x"\n', "control: 'http://x' is not"),
        ('host = "a"\ncontrol = "ipc:///x"\nmetrics = "9464"\n', "metrics: '9464' must be"),
        ('host = "a"\ncontrol = "ipc:///x"\nbogus = 1\n', "unknown key bogus"),
        ('host = "a"\ncontrol = "ipc:///x"\n[dataplane]\ncpu = -1\n', "dp_cpu: must be a CPU"),
        ("host = ", "not valid TOML"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "agent.toml").write_text(text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        AgentConfig.load(tmp_path)


_PEER_KEY = keys.generate().public.decode()
_REMOTE = (
    'host = "hA"\ncontrol = "tcp://198.18.1.1:7100"\n'
    '[remote]\ndata_link = "fA"\nreplication = "tcp://198.18.1.1:7200"\n'
)
_PEER = (
    '[peers.hB]\ncontrol = "tcp://198.18.1.2:7100"\nreplication = "tcp://198.18.1.2:7200"\n'
    f'public_key = "{_PEER_KEY}"\n'
)


def test_config_with_remote_and_peers_round_trips(tmp_path: Path) -> None:
    (tmp_path / "agent.toml").write_text(_REMOTE + "probe_miss = 5\n" + _PEER)
    config = AgentConfig.load(tmp_path)
    assert config.remote == RemoteConfig("fA", "tcp://198.18.1.1:7200", probe_miss=5)
    assert config.peers == {
        "hB": PeerConfig("hB", "tcp://198.18.1.2:7100", "tcp://198.18.1.2:7200", _PEER_KEY)
    }
    config.write()
    again = AgentConfig.load(tmp_path)
    assert (again.remote, again.peers, again.control) == (
        config.remote,
        config.peers,
        config.control,
    )
    # Without [remote] nothing of it is written.
    AgentConfig.default(tmp_path, "hA").write()
    assert "[remote]" not in (tmp_path / "agent.toml").read_text()
    assert AgentConfig.load(tmp_path).remote is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('host = "a"\ncontrol = "ipc:///x"\n' + _PEER, r"\[peers\] needs a \[remote\] table"),
        (
            _REMOTE.replace("tcp://198.18.1.1:7100", "ipc:///x"),
            "control: 'ipc:///x' is not reachable from other hosts",
        ),
        (_REMOTE.replace('data_link = "fA"\n', ""), "remote.data_link is required"),
        (_REMOTE.replace('"fA"', '"a b"'), "remote.data_link: 'a b' is not an interface"),
        (_REMOTE.replace(":7200", ""), "remote.replication: 'tcp://198.18.1.1' is not a tcp"),
        (_REMOTE + "probe_miss = 0\n", r"remote.probe_miss: must be an integer in \[1, 100\]"),
        (_REMOTE + "probes = 1\n", "unknown key remote.probes"),
        (_REMOTE + _PEER + "port = 1\n", "unknown key peers.hB.port"),
        (_REMOTE + _PEER.replace(f'public_key = "{_PEER_KEY}"\n', ""), "peers.hB.public_key is"),
        (_REMOTE + _PEER.replace(_PEER_KEY, "short"), "peers.hB: public_key: must be a Z85"),
        (
            _REMOTE + _PEER.replace("198.18.1.2:7200", "198.18.9.9:7200"),
            "peers.hB: control and replication must be on the peer's one management address",
        ),
        (_REMOTE + _PEER.replace("[peers.hB]", "[peers.hA]"), "peers.hA: a host is not its own"),
        (_REMOTE + _PEER.replace("[peers.hB]", "[peers.x_y]"), "peers.x_y: name: 'x_y' is not"),
        (_REMOTE + "[peers]\nhB = 1\n", r"\[peers\] must hold one table per peer"),
    ],
)
def test_bad_remote_config_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "agent.toml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        AgentConfig.load(tmp_path)


def test_missing_config_says_run_init(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="init"):
        AgentConfig.load(tmp_path)


# --- state -------------------------------------------------------------------------------------


def test_state_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    db = StateDB(path, host="h1")
    db.add_unit("u1", {"name": "u1"}, {"primary": "h1", "standby": "h1"}, term=1)
    db.add_resource("u1", "netns", "ns1")
    db.add_resource("u1", "dp_port", "p1", {"iface": "eth1"})
    db.update_role("u1", "primary", protection="protected", last_committed=7, commits_total=3)
    db.set_unit_state("u1", "running")
    db.set_dataplane(DataPlaneRow(10, 20, "/x.sock", "pfx", "/x.log"))
    db.close()

    db = StateDB(path, host="h1")
    unit = db.unit("u1")
    assert unit is not None
    assert unit.state == "running"
    assert unit.spec == {"name": "u1"}
    primary = db.role("u1", "primary")
    assert primary is not None
    assert (primary.term, primary.last_committed, primary.commits_total) == (1, 7, 3)
    assert [(r.kind, r.name) for r in db.resources("u1")] == [("netns", "ns1"), ("dp_port", "p1")]
    assert db.resources(kind="dp_port")[0].detail == {"iface": "eth1"}
    assert db.dataplane() == DataPlaneRow(10, 20, "/x.sock", "pfx", "/x.log")
    db.remove_unit("u1")
    assert db.roles() == []
    assert db.resources() == []
    db.close()


def test_a_remote_standby_becomes_the_primary_in_the_roles(tmp_path: Path) -> None:
    db = StateDB(tmp_path / "state.db", host="hB")
    db.add_unit("u1", {"name": "u1"}, {"standby": "hA"}, term=1)
    db.update_role("u1", "standby", last_committed=4)
    # The takeover finished at term 2, with no standby to ship to.
    db.set_role("u1", "primary", "", 2)
    db.remove_role("u1", "standby")
    (role,) = db.roles("u1")
    assert (role.role, role.peer, role.term, role.commits_total) == ("primary", "", 2, 0)
    # Re-protected later: the same row, a new peer, the counters kept.
    db.update_role("u1", "primary", commits_total=9)
    db.set_role("u1", "primary", "hC", 2)
    (role,) = db.roles("u1")
    assert (role.peer, role.term, role.commits_total) == ("hC", 2, 9)
    db.remove_unit("u1")
    assert db.roles() == []
    db.close()


def test_a_version_1_database_gets_the_spare_role(tmp_path: Path) -> None:
    """An agent of the previous version left roles under a CHECK without 'spare': opening the
    database keeps every row and accepts spares from then on."""
    path = tmp_path / "state.db"
    db = StateDB(path, host="hC")
    db.add_unit("u1", {"name": "u1"}, {"standby": "hA"}, term=3)
    db.update_role("u1", "standby", last_committed=7)
    db.close()
    raw = sqlite3.connect(path)
    with raw:
        rows = raw.execute("SELECT * FROM roles").fetchall()
        raw.execute("DROP TABLE roles")
        raw.execute(
            "CREATE TABLE roles (unit TEXT NOT NULL REFERENCES units(name) ON DELETE CASCADE, "
            "role TEXT NOT NULL CHECK (role IN ('primary', 'standby')), peer TEXT NOT NULL, "
            "term INTEGER NOT NULL CHECK (term >= 0), protection TEXT, last_committed INTEGER, "
            "commits_total INTEGER NOT NULL DEFAULT 0, updated_at REAL NOT NULL, "
            "PRIMARY KEY (unit, role))"
        )
        raw.executemany("INSERT INTO roles VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
        raw.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            raw.execute(
                "INSERT INTO roles(unit, role, peer, term, updated_at) "
                "VALUES ('u1', 'spare', 'hA', 1, 0)"
            )
    raw.close()
    db = StateDB(path, host="hC")
    assert db.meta("schema_version") == "2"
    (standby,) = db.roles("u1")
    assert (standby.role, standby.peer, standby.term, standby.last_committed) == (
        "standby",
        "hA",
        3,
        7,
    )
    db.add_unit("u2", {"name": "u2"}, {"spare": "hA"}, term=1)
    assert [(r.role, r.peer) for r in db.roles("u2")] == [("spare", "hA")]
    db.remove_unit("u1")
    assert [r.unit for r in db.roles()] == ["u2"]
    db.close()


def test_a_teardown_keeps_what_the_role_had_before(tmp_path: Path) -> None:
    """A spare whose change into a standby failed: what the change made goes, its store stays
    (and stays recorded)."""
    from hamgr.agent import unitnet

    db = StateDB(tmp_path / "state.db", host="hC")
    db.add_unit("u1", {"name": "u1"}, {"spare": "hA"}, term=1)
    store, images = tmp_path / "store", tmp_path / "images"
    store.mkdir()
    images.mkdir()
    db.add_resource("u1", "standby", "u1", {"root": str(store), "remote": True})
    kept = {(r.kind, r.name) for r in db.resources("u1")}
    db.add_resource("u1", "images", "u1", {"root": str(images)})
    problems = unitnet.teardown(
        db,
        "u1",
        dp=None,
        backend=None,  # type: ignore[arg-type]
        keep=lambda r: (r.kind, r.name) in kept,
    )
    assert problems == []
    assert store.is_dir()
    assert not images.exists()
    assert [(r.kind, r.name) for r in db.resources("u1")] == [("standby", "u1")]
    db.close()


def test_state_belongs_to_one_host(tmp_path: Path) -> None:
    StateDB(tmp_path / "state.db", host="h1").close()
    with pytest.raises(StateError, match="belongs to host 'h1'"):
        StateDB(tmp_path / "state.db", host="h2")


def test_unit_state_is_checked(tmp_path: Path) -> None:
    db = StateDB(tmp_path / "state.db", host="h1")
    db.add_unit("u1", {}, {"primary": "h1"}, term=1)
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
        db.set_unit_state("u1", "bogus")
    with pytest.raises(sqlite3.IntegrityError, match=r"UNIQUE|PRIMARY"):
        db.add_unit("u1", {}, {"primary": "h1"}, term=1)
    db.close()


# --- sd_notify ---------------------------------------------------------------------------------


def test_notifier_speaks_the_datagram_protocol(tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(path)
        listener.settimeout(2)
        n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"})
        assert n.enabled
        assert n.watchdog_seconds == 2.0
        assert n.ready("1 unit")
        assert listener.recv(100) == b"READY=1\nSTATUS=1 unit"
        assert n.watchdog(now=100.0)
        assert listener.recv(100) == b"WATCHDOG=1"
        # At most twice per interval.
        assert not n.watchdog(now=100.5)
        assert n.watchdog(now=101.0)
        assert listener.recv(100) == b"WATCHDOG=1"
        assert n.stopping()
        assert listener.recv(100) == b"STOPPING=1"


def test_notifier_is_silent_without_systemd() -> None:
    n = Notifier({})
    assert not n.enabled
    assert not n.ready()
    assert not n.watchdog()


def test_watchdog_for_another_pid_is_ignored() -> None:
    n = Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"})
    assert n.watchdog_seconds is None


# --- logs --------------------------------------------------------------------------------------


def test_json_logs_carry_the_extras() -> None:
    stream = io.StringIO()
    setup_logging("INFO", json_lines=True, stream=stream)
    try:
        logging.getLogger("hamgr.test").warning("refused %s", "x", extra={"peer_key": "K"})
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("hamgr.test").exception("failed")
    finally:
        logging.getLogger().handlers.clear()
    first, second = (json.loads(line) for line in stream.getvalue().splitlines()[:2])
    assert first["msg"] == "refused x"
    assert first["level"] == "warning"
    assert first["peer_key"] == "K"
    assert first["logger"] == "hamgr.test"
    assert first["ts"].endswith("Z")
    assert "ValueError: boom" in second["exc"]


def test_json_formatter_survives_odd_extras() -> None:
    record = logging.LogRecord("x", logging.INFO, "f", 1, "m", None, None)
    record.path = Path("/p")
    assert json.loads(JsonFormatter().format(record))["path"] == "/p"


# --- thread stacks ---------------------------------------------------------------------------


def test_sigusr1_and_an_unhealthy_agent_write_every_threads_stack(tmp_path: Path) -> None:
    import faulthandler
    import signal
    import time

    from hamgr.agent.daemon import Agent, stacks_on_sigusr1

    path = tmp_path / "log" / "stacks.txt"
    agent = Agent.__new__(Agent)  # only the stacks file is used
    agent._stacks = stacks_on_sigusr1(path)
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while "test_agent_parts.py" not in path.read_text() and time.monotonic() < deadline:
            time.sleep(0.01)
        first = path.read_text()
        assert "in test_sigusr1_and_an_unhealthy_agent_write_every_threads_stack" in first
        note = agent._dump_stacks()
        assert note == f" (every thread's stack: {path})"
        second = path.read_text()[len(first) :]
        assert "the agent is unhealthy" in second
        assert "in test_sigusr1_and_an_unhealthy_agent_write_every_threads_stack" in second
    finally:
        faulthandler.unregister(signal.SIGUSR1)
        agent._stacks.close()
