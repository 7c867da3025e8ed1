"""The main agent's peers: other hosts' agents that hold its standbys, or whose standbys it holds.

Peers come from ``[peers.NAME]`` in ``agent.toml`` (`hamgr.agent.config`), and are read when the
agent starts. Every request to a peer goes over `hamgr.control` (CURVE; the peer admits this
agent's key only if it is in its own ``authorized_keys``):

- `ControlLinks`: one long-lived DEALER per peer, for the requests of the remote roles
  (`hamgr.agent.remote`): ``ping``, which confirms a suspect host within a window of tens of
  milliseconds, so its CURVE handshake is done once, ahead of time.
- `PeerCaller`: one short-lived client per operation, for ``standby_add`` and
  ``standby_remove``, which take seconds and must not hold up a ping on the same link. It turns
  every failure into a `PeerError` whose message names the peer and the fix.

`host_plan` builds the `hamgr.agent.remote.HostPlan` (without units) that the remote roles run
with inside the main agent.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Mapping
from typing import Any

import attrs

from hamgr import control
from hamgr.agent.config import AgentConfig, tcp_endpoint
from hamgr.agent.remote import HostPlan, PeerPlan
from hamgr.keys import Keypair

__all__ = ["ControlLinks", "PeerCaller", "PeerError", "host_plan", "peer_plans"]

log = logging.getLogger(__name__)


def peer_plans(config: AgentConfig) -> dict[str, PeerPlan]:
    out = {}
    for name, peer in config.peers.items():
        ip, control_port = tcp_endpoint(peer.control)
        _ip, repl_port = tcp_endpoint(peer.replication)
        out[name] = PeerPlan(ip, control_port, repl_port, peer.public_key)
    return out


def host_plan(config: AgentConfig, keypair: Keypair) -> HostPlan:
    """The remote roles' plan inside the main agent: this host, its data link and peers."""
    remote = config.remote
    if remote is None:
        raise ValueError("no [remote] in the agent's configuration")
    mgmt_ip, repl_port = tcp_endpoint(remote.replication)
    _ip, control_port = tcp_endpoint(config.control)
    return HostPlan(
        host=config.host,
        work=config.state_dir,
        runtime=config.runtime,
        data_iface=remote.data_link,
        mgmt_ip=mgmt_ip,
        control_port=control_port,
        repl_port=repl_port,
        public_key=keypair.public.decode(),
        secret_key=keypair.secret.decode(),
        peers=peer_plans(config),
        units=(),
        cpu=config.dp_cpu,
        probe_interval_us=remote.probe_interval_us,
        probe_miss=remote.probe_miss,
        confirm_window_us=remote.confirm_window_us,
    )


class ControlLinks:
    """`hamgr.agent.remote.Links` over the peers' control channels (`hamgr.control`).

    One `ControlClient` per peer, made once and kept: its connection (and CURVE handshake) is
    up before the first ping that counts. Requests to one peer go one at a time.
    """

    def __init__(self, peers: Mapping[str, PeerPlan], keypair: Keypair) -> None:
        self._clients: dict[str, control.ControlClient] = {}
        self._locks: dict[str, threading.Lock] = {}
        for name, p in peers.items():
            self._clients[name] = control.ControlClient(
                p.control,
                server_key=p.public_key.encode(),
                keypair=(keypair.public, keypair.secret),
                timeout=1.0,
            )
            self._locks[name] = threading.Lock()

    def request(self, peer: str, body: dict[str, Any], timeout_s: float) -> dict[str, Any] | None:
        client = self._clients.get(peer)
        if client is None:
            return {"error": f"{peer} is not a peer"}
        fields = {k: v for k, v in body.items() if k != "type"}
        try:
            message = control.check_request(
                {"v": control.PROTOCOL_VERSION, "id": client.new_id(), "type": body["type"]}
                | fields
            )
        except control.SchemaError as exc:
            return {"error": exc.message, "code": exc.code}
        with self._locks[peer]:
            try:
                return dict(client.call(message, timeout=timeout_s))
            except control.ControlTimeoutError:
                return None
            except control.ControlError as exc:
                return {"error": exc.message, "code": exc.code}
            except Exception as exc:  # a closed link, a socket error: no answer
                log.debug("request to %s failed: %s", peer, exc)
                return None

    def ping(self, peer: str, timeout_s: float) -> bool:
        reply = self.request(peer, {"type": "ping"}, timeout_s)
        return reply is not None and "error" not in reply

    def close(self) -> None:
        for peer, client in self._clients.items():
            with self._locks[peer], contextlib.suppress(Exception):
                client.close()
        self._clients.clear()


class PeerError(Exception):
    """A request to a peer failed; `sent` is False when it certainly never reached the peer
    (so the peer did nothing), and `code` is the peer's error code, if it answered one."""

    def __init__(self, message: str, *, sent: bool, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.sent = sent
        self.code = code


@attrs.frozen
class PeerCaller:
    """One request per call to a peer's agent, each with a client of its own.

    A ``ping`` goes first, bounded by `reach_timeout`: a peer that is down, unreachable or
    refuses this agent's key is known within seconds, and then certainly got no request.
    """

    host: str
    peers: Mapping[str, PeerPlan]
    keypair: Keypair
    reach_timeout: float = 5.0

    def call(self, peer: str, fn: Any, *, timeout: float) -> Mapping[str, Any]:
        """`fn(client)` against `peer`'s agent (`fn` passes its own `timeout`); raises
        `PeerError`."""
        p = self.peers.get(peer)
        if p is None:
            raise PeerError(f"{peer} is not a peer of {self.host}", sent=False)
        client = control.ControlClient(
            p.control,
            server_key=p.public_key.encode(),
            keypair=(self.keypair.public, self.keypair.secret),
            timeout=self.reach_timeout,
        )
        try:
            try:
                client.ping()
            except control.ControlTimeoutError:
                raise PeerError(
                    f"{peer}'s agent at {p.control} could not be reached within "
                    f"{self.reach_timeout:g} s; is it running, and is {p.control} right in "
                    f"[peers.{peer}]?",
                    sent=False,
                    code="timeout",
                ) from None
            result: Mapping[str, Any] = fn(client)
            return result
        except control.ControlAuthError:
            raise PeerError(
                f"{peer}'s agent at {p.control} refused {self.host}'s key: add {self.host}'s "
                f"agent public key ({self.keypair.public.decode()}) to {peer}'s authorized_keys, "
                f"and check {peer}'s public_key in [peers.{peer}]",
                sent=False,
                code="refused",
            ) from None
        except control.ControlTimeoutError as exc:
            what = "did not answer" if exc.sent else "could not be reached"
            raise PeerError(
                f"{peer}'s agent at {p.control} {what} within {timeout:g} s; is it running, "
                f"and is {p.control} right in [peers.{peer}]?",
                sent=exc.sent,
                code="timeout",
            ) from None
        except control.ControlError as exc:
            raise PeerError(
                f"{peer} refused: {exc.code}: {exc.message}", sent=True, code=exc.code
            ) from None
        finally:
            client.close()
