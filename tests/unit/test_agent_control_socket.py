"""The control channel's sockets, without root: CURVE, the ZAP handler, timeouts, streams."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hamgr import control, keys


class _Server:
    def __init__(self, tmp_path: Path) -> None:
        self.server_keys = keys.generate()
        self.client_keys = keys.generate()
        self.allowed = {self.client_keys.public}
        self.refused: list[tuple[str, str]] = []
        self.endpoint = f"ipc://{tmp_path}/ctl.sock"
        self.server = control.ControlServer(
            self.endpoint,
            secret_key=self.server_keys.secret,
            authorized=lambda: frozenset(self.allowed),
            handler=self.handle,
            on_refused=lambda k, a: self.refused.append((k, a)),
        )
        self.server.start()

    def handle(self, request: control.Request, responder: control.Responder) -> None:
        match request:
            case control.Ping():
                responder.result({"pong": True, "peer": responder.peer_key})
            case control.Events(seconds=seconds):

                def stream() -> None:
                    for i in range(3):
                        responder.event({"kind": "tick", "i": i})
                    time.sleep(seconds)
                    responder.end({"events": 3})

                threading.Thread(target=stream, daemon=True).start()
            case control.Unprotect(unit="slow"):
                threading.Timer(0.2, lambda: responder.result({"late": True})).start()
            case _:
                raise RuntimeError("handler bug")

    def client(self, kp: keys.Keypair | None = None, timeout: float = 5.0) -> control.ControlClient:
        kp = kp or self.client_keys
        return control.ControlClient(
            self.endpoint,
            server_key=self.server_keys.public,
            keypair=(kp.public, kp.secret),
            timeout=timeout,
        )


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[_Server]:
    s = _Server(tmp_path)
    yield s
    s.server.stop()


def test_request_reply_and_the_peer_key(srv: _Server) -> None:
    with srv.client() as c:
        assert c.ping() == {"pong": True, "peer": srv.client_keys.public.decode()}


def test_a_slow_answer_comes_from_another_thread(srv: _Server) -> None:
    with srv.client() as c:
        assert c.unprotect("slow") == {"late": True}
        assert c.ping()["pong"]


def test_events_stream_until_end(srv: _Server) -> None:
    with srv.client() as c:
        assert list(c.events(0.1)) == [{"kind": "tick", "i": i} for i in range(3)]


def test_a_handler_bug_is_an_error_reply_not_a_crash(
    srv: _Server, caplog: pytest.LogCaptureFixture
) -> None:
    with srv.client() as c:
        with pytest.raises(control.ControlError) as info:
            c.status()
        assert info.value.code == "internal"
        assert "handler bug" in info.value.message
        assert c.ping()["pong"]
    assert srv.server.alive()


def test_an_unknown_key_is_refused_at_once_and_logged(
    srv: _Server, caplog: pytest.LogCaptureFixture
) -> None:
    stranger = keys.generate()
    caplog.set_level(logging.WARNING, logger="hamgr.control")
    started = time.monotonic()
    with srv.client(stranger, timeout=10) as c, pytest.raises(control.ControlAuthError):
        c.ping()
    assert time.monotonic() - started < 5
    assert srv.refused
    assert srv.refused[0][0] == stranger.public.decode()
    records = [r for r in caplog.records if "refused a client" in r.getMessage()]
    assert records
    assert getattr(records[0], "peer_key", None) == stranger.public.decode()
    assert srv.server.refused_total >= 1
    # The authorized keys are asked at every handshake: adding the key admits it.
    srv.allowed.add(stranger.public)
    with srv.client(stranger) as c:
        assert c.ping()["pong"]


def test_a_wrong_server_key_fails_fast_or_times_out(srv: _Server) -> None:
    impostor = keys.generate()
    c = control.ControlClient(
        srv.endpoint,
        server_key=impostor.public,
        keypair=(srv.client_keys.public, srv.client_keys.secret),
        timeout=1.0,
    )
    try:
        with pytest.raises((control.ControlAuthError, control.ControlTimeoutError)):
            c.ping()
    finally:
        c.close()


def test_no_agent_is_a_timeout(tmp_path: Path) -> None:
    kp = keys.generate()
    c = control.ControlClient(
        f"ipc://{tmp_path}/nobody.sock",
        server_key=kp.public,
        keypair=(kp.public, kp.secret),
        timeout=0.3,
    )
    try:
        started = time.monotonic()
        with pytest.raises(control.ControlTimeoutError, match="is it running"):
            c.ping()
        assert time.monotonic() - started < 2
    finally:
        c.close()
