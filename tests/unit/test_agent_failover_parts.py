"""The pure parts of failover in the agent: the `failover` request's schema, the failover history
and the term in the state database, and which recorded container is the unit's NF."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hamgr import control
from hamgr.agent import local
from hamgr.agent.state import StateDB
from hamgr.cli import _last_failover
from shim.local_failover import LocalFailoverError


def _msg(**fields: Any) -> dict[str, Any]:
    return {"v": 1, "id": "r1", "type": "failover", **fields}


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"unit": "seq0"}, control.Failover("r1", "seq0")),
        (
            {"unit": "seq0", "planned": False, "term": 3, "reason": "upgrade"},
            control.Failover("r1", "seq0", planned=False, term=3, reason="upgrade"),
        ),
        ({"unit": "seq0", "lossless": True}, control.Failover("r1", "seq0", lossless=True)),
    ],
)
def test_good_failover_requests_round_trip(
    fields: dict[str, Any], expected: control.Failover
) -> None:
    request = control.check_request(_msg(**fields))
    assert request == expected
    assert control.check_request(control.request_json(request)) == expected


@pytest.mark.parametrize(
    ("fields", "text"),
    [
        ({}, "failover.unit: is required"),
        ({"unit": "a b"}, "failover.unit: 'a b' does not match"),
        ({"unit": "seq0", "planned": "yes"}, "failover.planned: must be true or false"),
        ({"unit": "seq0", "term": 0}, "failover.term: must be in [1, "),
        ({"unit": "seq0", "term": 1.5}, "failover.term: must be an integer, got a number"),
        ({"unit": "seq0", "term": True}, "failover.term: must be an integer, got a boolean"),
        ({"unit": "seq0", "reason": "x" * 300}, "failover.reason: must be at most 256"),
        ({"unit": "seq0", "now": True}, "failover.now: is not a field of this message"),
    ],
)
def test_bad_failover_requests_name_the_field(fields: dict[str, Any], text: str) -> None:
    with pytest.raises(control.SchemaError) as info:
        control.check_request(_msg(**fields))
    assert info.value.code == "bad_field"
    assert text in info.value.message


@pytest.fixture
def db(tmp_path: Path) -> StateDB:
    db = StateDB(tmp_path / "state.db", host="h1")
    db.add_unit("seq0", {"name": "seq0"}, {"primary": "h1", "standby": "h1"}, 1)
    return db


def test_the_failover_history_counts_finished_ones_and_goes_with_its_unit(db: StateDB) -> None:
    assert db.failover_summary("seq0") == (0, None)
    db.add_failover("seq0", 2, "finished", {"term": 2, "status": "finished"})
    db.add_failover("seq0", 3, "failed", {"term": 3, "status": "failed", "detail": "no image"})
    count, last = db.failover_summary("seq0")
    assert count == 1
    assert last == {"term": 3, "status": "failed", "detail": "no image"}
    assert [(r.term, r.status) for r in db.failovers("seq0")] == [(2, "finished"), (3, "failed")]
    db.remove_unit("seq0")
    assert db.failovers("seq0") == []


def test_the_term_store_is_the_primary_role_and_never_goes_down(db: StateDB) -> None:
    store = local.DbTermStore(db, "seq0")
    assert store.read() == 1
    store.write(2)
    store.write(2)
    role = db.role("seq0", "primary")
    assert role is not None
    assert (store.read(), role.term) == (2, 2)
    with pytest.raises(LocalFailoverError, match="never go down"):
        store.write(1)
    assert local.DbTermStore(db, "nosuch").read() is None


def test_the_newest_container_is_the_nf_and_older_ones_are_stale(db: StateDB) -> None:
    assert local.newest_container(db, "seq0") is None
    db.add_resource("seq0", "netns", "hamgr-h1-seq0")
    db.add_resource("seq0", "container", "h1-seq0", {"pid": 10})
    newest = local.newest_container(db, "seq0")
    assert newest is not None
    assert newest.name == "h1-seq0"
    assert local.stale_containers(db, "seq0") == []
    # A failover records the restored copy after the one it replaces.
    db.add_resource("seq0", "container", "h1-seq0-t2", {"pid": 20})
    db.add_resource("seq0", "container", "h1-seq0-t3", {"pid": 30})
    newest = local.newest_container(db, "seq0")
    assert newest is not None
    assert newest.name == "h1-seq0-t3"
    assert [r.name for r in local.stale_containers(db, "seq0")] == ["h1-seq0-t2", "h1-seq0"]


@pytest.mark.parametrize(
    ("record", "cell"),
    [
        (None, "-"),
        (
            {"status": "finished", "term": 2, "outage_ms": 134.4, "elapsed_ms": 140},
            "finished t2 134ms",
        ),
        ({"status": "failed", "term": 3, "outage_ms": None, "elapsed_ms": 12.2}, "failed t3 12ms"),
        ({"status": "aborted", "term": 4}, "aborted t4"),
    ],
)
def test_the_status_table_shows_the_last_failover(record: Any, cell: str) -> None:
    assert _last_failover(record) == cell
