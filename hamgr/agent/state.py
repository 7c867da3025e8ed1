"""The agent's durable state: one SQLite database, ``<state dir>/state.db``.

An agent that restarts reads everything it needs to re-adopt its units from here, without
touching them: which units it protects and with which spec, each unit's roles on this host with
their terms and last committed epochs, every resource it made for a unit (so a half-done protect
can be undone, and a finished one found again), and the data plane process it owns.

Schema (version 2; a version 1 database is migrated when it is opened)::

    meta(key PRIMARY KEY, value)                      schema_version, host
    units(name PRIMARY KEY, spec JSON, state, error, created_at, updated_at)
        state: starting | running | stopping | error
    roles(unit, role, peer, term, protection, last_committed, commits_total, updated_at)
        PRIMARY KEY (unit, role); role: primary | standby | spare (version 2); peer: the other
        role's host (this host for a local standby, "" for a primary that has no standby, the
        primary that asked for a spare)
    resources(unit, kind, name, detail JSON, created_at)
        PRIMARY KEY (unit, kind, name); kind: netns | veth | dp_port | dp_unit | standby |
        images | container | remote_standby (a standby on another host, named after it) |
        remote_spare (a spare on another host, named after it) | remote_store (this host's
        store of a unit whose primary is elsewhere), in the order they were made
    dataplane(id = 1, pid, start_ticks, ctl_path, file_prefix, log_path, started_at)
    failovers(seq, unit, term, status, record JSON, at)
        one row per failover attempt that ended (status: finished | failed | aborted); removed
        with its unit. Added to version 1 as a new table: an older agent ignores it.

A unit that failed over has the restored container (``<name>-t<term>``) recorded after the one
it replaced; the replaced one is forgotten once it is reaped.

Writes are transactions in WAL mode with synchronous=FULL: a row the agent acted on is on disk
before the action is reported. One connection serves every thread, behind a lock.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

import attrs

__all__ = [
    "SCHEMA_VERSION",
    "DataPlaneRow",
    "FailoverRow",
    "Resource",
    "RoleRow",
    "StateDB",
    "StateError",
    "UnitRow",
]

SCHEMA_VERSION: Final = 2

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS units (
    name TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('starting', 'running', 'stopping', 'error')),
    error TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS roles (
    unit TEXT NOT NULL REFERENCES units(name) ON DELETE CASCADE,
    role TEXT NOT NULL CHECK (role IN ('primary', 'standby', 'spare')),
    peer TEXT NOT NULL,
    term INTEGER NOT NULL CHECK (term >= 0),
    protection TEXT,
    last_committed INTEGER,
    commits_total INTEGER NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL,
    PRIMARY KEY (unit, role)
);
CREATE TABLE IF NOT EXISTS resources (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    unit TEXT NOT NULL REFERENCES units(name) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    UNIQUE (unit, kind, name)
);
CREATE TABLE IF NOT EXISTS dataplane (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    pid INTEGER NOT NULL,
    start_ticks INTEGER NOT NULL,
    ctl_path TEXT NOT NULL,
    file_prefix TEXT NOT NULL,
    log_path TEXT NOT NULL,
    started_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS failovers (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    unit TEXT NOT NULL REFERENCES units(name) ON DELETE CASCADE,
    term INTEGER NOT NULL,
    status TEXT NOT NULL,
    record TEXT NOT NULL DEFAULT '{}',
    at REAL NOT NULL
);
"""


class StateError(Exception):
    """The state database cannot be used; the message says why and what to do."""


@attrs.frozen
class UnitRow:
    name: str
    spec: Mapping[str, Any]
    state: str
    error: str | None
    created_at: float


@attrs.frozen
class RoleRow:
    unit: str
    role: str
    peer: str
    term: int
    protection: str | None
    last_committed: int | None
    commits_total: int


@attrs.frozen
class Resource:
    unit: str
    kind: str
    name: str
    detail: Mapping[str, Any]


@attrs.frozen
class FailoverRow:
    unit: str
    term: int
    status: str
    record: Mapping[str, Any]
    at: float


@attrs.frozen
class DataPlaneRow:
    pid: int
    start_ticks: int
    ctl_path: str
    file_prefix: str
    log_path: str


class StateDB:
    def __init__(self, path: Path, *, host: str) -> None:
        self.path = path
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise StateError(f"{path}: {exc}; move it aside to start from an empty state") from None
        version = self.meta("schema_version")
        if version is None:
            self.set_meta("schema_version", str(SCHEMA_VERSION))
            self.set_meta("host", host)
        elif version == "1":
            self._migrate_roles_to_2()
        elif version != str(SCHEMA_VERSION):
            raise StateError(f"{path} has schema {version}; this agent reads {SCHEMA_VERSION}")
        owner = self.meta("host")
        if owner != host:
            raise StateError(
                f"{path} belongs to host {owner!r}, not {host!r}: the state dir holds another "
                "host's units; use its own state dir"
            )

    def _migrate_roles_to_2(self) -> None:
        """Version 2 allows the role ``spare``: SQLite cannot change a CHECK in place, so the
        roles table is copied into one with the new CHECK, in one transaction."""
        columns = "unit, role, peer, term, protection, last_committed, commits_total, updated_at"
        table = _SCHEMA.split("CREATE TABLE IF NOT EXISTS roles", 1)[1].split(";", 1)[0]
        with self._tx() as db:
            db.execute(f"CREATE TABLE roles_v2 {table}")
            db.execute(f"INSERT INTO roles_v2({columns}) SELECT {columns} FROM roles")
            db.execute("DROP TABLE roles")
            db.execute("ALTER TABLE roles_v2 RENAME TO roles")
            db.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # --- meta ---

    def meta(self, key: str) -> str | None:
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def set_meta(self, key: str, value: str) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    # --- units and roles ---

    def add_unit(
        self, name: str, spec: Mapping[str, Any], roles: Mapping[str, str], term: int
    ) -> None:
        """Record a unit being protected (state starting) with its roles on this host."""
        now = time.time()
        with self._tx() as db:
            db.execute(
                "INSERT INTO units(name, spec, state, created_at, updated_at) "
                "VALUES (?, ?, 'starting', ?, ?)",
                (name, json.dumps(dict(spec), sort_keys=True), now, now),
            )
            for role, peer in roles.items():
                db.execute(
                    "INSERT INTO roles(unit, role, peer, term, updated_at) VALUES (?, ?, ?, ?, ?)",
                    (name, role, peer, term, now),
                )

    def set_spec(self, name: str, spec: Mapping[str, Any]) -> None:
        """A unit's spec changed (a spare became its standby, under a spec naming it so)."""
        with self._tx() as db:
            db.execute(
                "UPDATE units SET spec = ?, updated_at = ? WHERE name = ?",
                (json.dumps(dict(spec), sort_keys=True), time.time(), name),
            )

    def set_unit_state(self, name: str, state: str, error: str | None = None) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE units SET state = ?, error = ?, updated_at = ? WHERE name = ?",
                (state, error, time.time(), name),
            )

    def remove_unit(self, name: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM units WHERE name = ?", (name,))

    def unit(self, name: str) -> UnitRow | None:
        rows = self._query(
            "SELECT name, spec, state, error, created_at FROM units WHERE name = ?", (name,)
        )
        return _unit(rows[0]) if rows else None

    def units(self) -> list[UnitRow]:
        rows = self._query("SELECT name, spec, state, error, created_at FROM units ORDER BY name")
        return [_unit(r) for r in rows]

    def roles(self, unit: str | None = None) -> list[RoleRow]:
        sql = "SELECT unit, role, peer, term, protection, last_committed, commits_total FROM roles"
        rows = (
            self._query(sql + " WHERE unit = ? ORDER BY role", (unit,))
            if unit is not None
            else self._query(sql + " ORDER BY unit, role")
        )
        return [RoleRow(*r) for r in rows]

    def role(self, unit: str, role: str) -> RoleRow | None:
        for r in self.roles(unit):
            if r.role == role:
                return r
        return None

    def update_role(
        self,
        unit: str,
        role: str,
        *,
        protection: str | None = None,
        last_committed: int | None = None,
        commits_total: int | None = None,
        term: int | None = None,
    ) -> None:
        """Set the given columns (None leaves a column as it is)."""
        sets, args = [], []
        for column, value in (
            ("protection", protection),
            ("last_committed", last_committed),
            ("commits_total", commits_total),
            ("term", term),
        ):
            if value is not None:
                sets.append(f"{column} = ?")
                args.append(value)
        if not sets:
            return
        with self._tx() as db:
            db.execute(
                f"UPDATE roles SET {', '.join(sets)}, updated_at = ? WHERE unit = ? AND role = ?",
                (*args, time.time(), unit, role),
            )

    def set_role(self, unit: str, role: str, peer: str, term: int) -> None:
        """Record (or replace) this host's `role` of `unit`: a remote standby that took the unit
        over becomes its primary, a primary that re-protected gets a new peer."""
        with self._tx() as db:
            updated = db.execute(
                "UPDATE roles SET peer = ?, term = ?, updated_at = ? WHERE unit = ? AND role = ?",
                (peer, term, time.time(), unit, role),
            ).rowcount
            if not updated:
                db.execute(
                    "INSERT INTO roles(unit, role, peer, term, updated_at) VALUES (?, ?, ?, ?, ?)",
                    (unit, role, peer, term, time.time()),
                )

    def remove_role(self, unit: str, role: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM roles WHERE unit = ? AND role = ?", (unit, role))

    # --- resources ---

    def add_resource(
        self, unit: str, kind: str, name: str, detail: Mapping[str, Any] | None = None
    ) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO resources(unit, kind, name, detail, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (unit, kind, name, json.dumps(dict(detail or {}), sort_keys=True), time.time()),
            )

    def remove_resource(self, unit: str, kind: str, name: str) -> None:
        with self._tx() as db:
            db.execute(
                "DELETE FROM resources WHERE unit = ? AND kind = ? AND name = ?", (unit, kind, name)
            )

    def resources(self, unit: str | None = None, kind: str | None = None) -> list[Resource]:
        """In the order they were made."""
        sql = "SELECT unit, kind, name, detail FROM resources"
        where, args = [], []
        if unit is not None:
            where.append("unit = ?")
            args.append(unit)
        if kind is not None:
            where.append("kind = ?")
            args.append(kind)
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = self._query(sql + " ORDER BY seq", tuple(args))
        return [Resource(u, k, n, json.loads(d)) for u, k, n, d in rows]

    # --- failovers ---

    def add_failover(
        self, unit: str, term: int, status: str, record: Mapping[str, Any] | None = None
    ) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO failovers(unit, term, status, record, at) VALUES (?, ?, ?, ?, ?)",
                (unit, term, status, json.dumps(dict(record or {}), sort_keys=True), time.time()),
            )

    def failovers(self, unit: str) -> list[FailoverRow]:
        """Oldest first."""
        rows = self._query(
            "SELECT unit, term, status, record, at FROM failovers WHERE unit = ? ORDER BY seq",
            (unit,),
        )
        return [FailoverRow(u, t, st, json.loads(r), at) for u, t, st, r, at in rows]

    def failover_summary(self, unit: str) -> tuple[int, Mapping[str, Any] | None]:
        """How many failovers of `unit` finished, and the record of the last attempt."""
        count = self._query(
            "SELECT COUNT(*) FROM failovers WHERE unit = ? AND status = 'finished'", (unit,)
        )[0][0]
        last = self._query(
            "SELECT record FROM failovers WHERE unit = ? ORDER BY seq DESC LIMIT 1", (unit,)
        )
        return int(count), (json.loads(last[0][0]) if last else None)

    # --- the data plane ---

    def dataplane(self) -> DataPlaneRow | None:
        rows = self._query(
            "SELECT pid, start_ticks, ctl_path, file_prefix, log_path FROM dataplane WHERE id = 1"
        )
        return DataPlaneRow(*rows[0]) if rows else None

    def set_dataplane(self, row: DataPlaneRow | None) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM dataplane")
            if row is not None:
                db.execute(
                    "INSERT INTO dataplane(id, pid, start_ticks, ctl_path, file_prefix, log_path, "
                    "started_at) VALUES (1, ?, ?, ?, ?, ?, ?)",
                    (
                        row.pid,
                        row.start_ticks,
                        row.ctl_path,
                        row.file_prefix,
                        row.log_path,
                        time.time(),
                    ),
                )


def _unit(row: tuple[Any, ...]) -> UnitRow:
    name, spec, state, error, created = row
    return UnitRow(name, json.loads(spec), state, error, created)
