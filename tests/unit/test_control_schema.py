"""The control channel's message schemas: every request and reply type, good and bad."""

from __future__ import annotations

import json
from typing import Any

import pytest

from hamgr import control
from hamgr.control import SchemaError, check_reply, check_request, decode_request


def _req(kind: str, **fields: Any) -> dict[str, Any]:
    return {"v": 1, "id": "r1", "type": kind, **fields}


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (_req("ping"), control.Ping("r1")),
        (_req("status"), control.Status("r1", None)),
        (_req("status", unit="seq0"), control.Status("r1", "seq0")),
        (_req("status", unit=None), control.Status("r1", None)),
        (_req("protect", spec={"name": "x"}), control.Protect("r1", {"name": "x"}, "<request>")),
        (
            _req("protect", spec={}, source="a.toml"),
            control.Protect("r1", {}, "a.toml"),
        ),
        (_req("unprotect", unit="seq0"), control.Unprotect("r1", "seq0")),
        (_req("events", seconds=2), control.Events("r1", 2.0, None)),
        (
            _req("events", seconds=0.5, kinds=["commit", "alarm"]),
            control.Events("r1", 0.5, ("commit", "alarm")),
        ),
        (_req("shutdown"), control.Shutdown("r1", False)),
        (_req("shutdown", teardown=True), control.Shutdown("r1", True)),
        (
            _req("standby_add", spec={"name": "x"}, primary="hostA", term=1),
            control.StandbyAdd("r1", {"name": "x"}, "hostA", 1, (), "<request>"),
        ),
        (
            _req(
                "standby_add",
                spec={},
                primary="hostA",
                term=7,
                spares=["hostC", "hostD"],
                source="hostA:seq0",
            ),
            control.StandbyAdd("r1", {}, "hostA", 7, ("hostC", "hostD"), "hostA:seq0"),
        ),
        (
            _req("standby_remove", unit="seq0", primary="hostA"),
            control.StandbyRemove("r1", "seq0", "hostA"),
        ),
        (
            _req("spare_add", spec={"name": "x"}, primary="hostA", term=1),
            control.SpareAdd("r1", {"name": "x"}, "hostA", 1, "<request>"),
        ),
        (
            _req("spare_add", spec={}, primary="hostA", term=3, source="hostA:seq0"),
            control.SpareAdd("r1", {}, "hostA", 3, "hostA:seq0"),
        ),
        (
            _req("spare_remove", unit="seq0", primary="hostA"),
            control.SpareRemove("r1", "seq0", "hostA"),
        ),
        (
            _req("spare_join", unit="seq0", host="hostA", term=2),
            control.SpareJoin("r1", "seq0", "hostA", 2),
        ),
    ],
)
def test_good_requests(message: dict[str, Any], expected: control.Request) -> None:
    assert check_request(message) == expected
    # What the client encodes is what the server accepts.
    assert check_request(control.request_json(expected)) == expected


@pytest.mark.parametrize(
    ("message", "code", "text"),
    [
        ([1, 2], "bad_request", "must be a JSON object, got an array"),
        ("ping", "bad_request", "must be a JSON object, got a string"),
        ({"id": "r1", "type": "ping"}, "bad_request", "protocol version None"),
        ({"v": 2, "id": "r1", "type": "ping"}, "bad_request", "protocol version 2"),
        ({"v": 1, "type": "ping"}, "bad_field", "id must be a string"),
        ({"v": 1, "id": "has space", "type": "ping"}, "bad_field", "id must be a string"),
        ({"v": 1, "id": 7, "type": "ping"}, "bad_field", "id must be a string"),
        ({"v": 1, "id": "r1"}, "bad_field", "type must be a string, got null"),
        ({"v": 1, "id": "r1", "type": 3}, "bad_field", "type must be a string, got a number"),
        (_req("reboot"), "unknown_type", "unknown request type 'reboot'"),
        (_req("ping", extra=1), "bad_field", "ping.extra: is not a field of this message"),
        (_req("status", unit=5), "bad_field", "status.unit: must be a string, got a number"),
        (_req("status", unit="../etc"), "bad_field", "status.unit: '../etc' does not match"),
        (_req("protect"), "bad_field", "protect.spec: is required"),
        (_req("protect", spec="x.toml"), "bad_field", "protect.spec: must be an object"),
        (_req("protect", spec={}, source=1), "bad_field", "protect.source: must be a string"),
        (_req("unprotect"), "bad_field", "unprotect.unit: is required"),
        (_req("unprotect", unit=None), "bad_field", "unprotect.unit: is required, got null"),
        (_req("unprotect", unit=""), "bad_field", "unprotect.unit: '' does not match"),
        (_req("events"), "bad_field", "events.seconds: is required"),
        (_req("events", seconds="5"), "bad_field", "events.seconds: must be a number"),
        (_req("events", seconds=True), "bad_field", "events.seconds: must be a number"),
        (_req("events", seconds=0), "bad_field", "events.seconds: must be in (0, 86400]"),
        (_req("events", seconds=1e9), "bad_field", "events.seconds: must be in (0, 86400]"),
        (_req("events", seconds=1, kinds="commit"), "bad_field", "events.kinds: must be an array"),
        (_req("events", seconds=1, kinds=["Commit"]), "bad_field", "events.kinds: item 'Commit'"),
        (_req("shutdown", teardown="yes"), "bad_field", "shutdown.teardown: must be true or false"),
        (_req("standby_add", primary="a", term=1), "bad_field", "standby_add.spec: is required"),
        (_req("standby_add", spec={}, term=1), "bad_field", "standby_add.primary: is required"),
        (
            _req("standby_add", spec={}, primary="-a", term=1),
            "bad_field",
            "standby_add.primary: '-a' does not match",
        ),
        (_req("standby_add", spec={}, primary="a"), "bad_field", "standby_add.term: is required"),
        (
            _req("standby_add", spec={}, primary="a", term=0),
            "bad_field",
            "standby_add.term: must be in [1,",
        ),
        (
            _req("standby_add", spec={}, primary="a", term="1"),
            "bad_field",
            "standby_add.term: must be an integer, got a string",
        ),
        (
            _req("standby_add", spec={}, primary="a", term=1, spares="b"),
            "bad_field",
            "standby_add.spares: must be an array",
        ),
        (
            _req("standby_add", spec={}, primary="a", term=1, spares=["a"]),
            "bad_field",
            "standby_add.spares: 'a' is the primary",
        ),
        (
            _req("standby_add", spec={}, primary="a", term=1, spares=["b", "b"]),
            "bad_field",
            "standby_add.spares: names a host twice",
        ),
        (
            _req("standby_add", spec={}, primary="a", term=1, spares=["b"] * 9),
            "bad_field",
            "standby_add.spares: must be an array of at most 8",
        ),
        (
            _req("standby_add", spec={}, primary="a", term=1, standby="b"),
            "bad_field",
            "standby_add.standby: is not a field of this message",
        ),
        (_req("standby_remove", unit="u"), "bad_field", "standby_remove.primary: is required"),
        (
            _req("standby_remove", unit="../u", primary="a"),
            "bad_field",
            "standby_remove.unit: '../u' does not match",
        ),
        (_req("spare_add", primary="a", term=1), "bad_field", "spare_add.spec: is required"),
        (_req("spare_add", spec={}, primary="a"), "bad_field", "spare_add.term: is required"),
        (
            _req("spare_add", spec={}, primary="a", term=0),
            "bad_field",
            "spare_add.term: must be in [1,",
        ),
        (
            _req("spare_add", spec={}, primary="a", term=1, spares=["b"]),
            "bad_field",
            "spare_add.spares: is not a field of this message",
        ),
        (_req("spare_remove", unit="u"), "bad_field", "spare_remove.primary: is required"),
        (
            _req("spare_remove", unit="u/1", primary="a"),
            "bad_field",
            "spare_remove.unit: 'u/1' does not match",
        ),
        (_req("spare_join", unit="u", host="a"), "bad_field", "spare_join.term: is required"),
        (
            _req("spare_join", unit="u", host="a", term=0),
            "bad_field",
            "spare_join.term: must be in [1,",
        ),
    ],
)
def test_bad_requests_name_the_problem(message: Any, code: str, text: str) -> None:
    with pytest.raises(SchemaError) as info:
        check_request(message)
    assert info.value.code == code
    assert text in info.value.message


def test_the_request_id_comes_back_when_it_can_be_read() -> None:
    with pytest.raises(SchemaError) as info:
        check_request(_req("unprotect"))
    assert info.value.request_id == "r1"
    with pytest.raises(SchemaError) as info:
        check_request({"v": 1, "id": ["x"], "type": "ping"})
    assert info.value.request_id is None


@pytest.mark.parametrize(
    ("frames", "text"),
    [
        ([b"{not json"], "not JSON"),
        ([b"\xff\xfe"], "not JSON"),
        ([b"{}", b"{}"], "a request is one frame, got 2"),
        ([], "a request is one frame, got 0"),
        ([b" " * (control.MAX_MESSAGE + 1)], "at most"),
    ],
)
def test_undecodable_frames(frames: list[bytes], text: str) -> None:
    with pytest.raises(SchemaError) as info:
        decode_request(frames)
    assert info.value.code == "bad_request"
    assert text in info.value.message


def test_decode_request_accepts_a_good_frame() -> None:
    frame = json.dumps(_req("status", unit="u1")).encode()
    assert decode_request([frame]) == control.Status("r1", "u1")


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            {"v": 1, "id": "r1", "type": "result", "data": {"a": 1}},
            control.Reply("r1", "result", {"a": 1}),
        ),
        (
            {"v": 1, "id": None, "type": "error", "code": "bad_request", "message": "m"},
            control.Reply(None, "error", code="bad_request", message="m"),
        ),
        (
            {"v": 1, "id": "r1", "type": "event", "event": {"kind": "commit"}},
            control.Reply("r1", "event", {"kind": "commit"}),
        ),
        (
            {"v": 1, "id": "r1", "type": "end", "data": {"events": 0}},
            control.Reply("r1", "end", {"events": 0}),
        ),
    ],
)
def test_good_replies(message: dict[str, Any], expected: control.Reply) -> None:
    assert check_reply(message) == expected


@pytest.mark.parametrize(
    "message",
    [
        {"v": 1, "id": "r1", "type": "result"},
        {"v": 1, "id": "r1", "type": "result", "data": []},
        {"v": 1, "id": "r1", "type": "result", "data": {}, "x": 1},
        {"v": 1, "id": "r1", "type": "error", "code": "Bad Code", "message": "m"},
        {"v": 1, "id": "r1", "type": "error", "code": "x"},
        {"v": 1, "id": "r1", "type": "event", "data": {}},
        {"v": 1, "id": "r1", "type": "bogus", "data": {}},
        {"v": 1, "id": 5, "type": "result", "data": {}},
        {"v": 0, "id": "r1", "type": "result", "data": {}},
        "result",
    ],
)
def test_bad_replies_are_refused(message: Any) -> None:
    with pytest.raises(SchemaError):
        check_reply(message)


def test_encode_refuses_oversized_messages() -> None:
    with pytest.raises(ValueError, match="over"):
        control.encode({"blob": "x" * control.MAX_MESSAGE})
