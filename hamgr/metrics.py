"""Prometheus metrics of an agent, on a registry of its own.

Per unit (label ``unit``; ``role`` where a unit has a primary and a standby on one host):

- ``hamgr_epochs_total``: epochs the data plane closed for the unit (a counter kept by the data
  plane, so it survives agent restarts);
- ``hamgr_commits_total``: epochs whose output was released after the standby committed their
  checkpoint (counted by the data plane too, so it survives agent restarts);
- ``hamgr_buffered_packets``, ``hamgr_buffered_bytes``: output held for the unit right now;
- ``hamgr_checkpoint_pause_seconds``: histogram of the pause of each cut (freeze to thaw);
- ``hamgr_failover_seconds``: histogram of local failovers (their outage, as the failover
  record measures it);
- ``hamgr_term``: the unit's fencing term;
- ``hamgr_protected``: 1 while the unit is protected, 0 when stalled or unprotected.

And for the agent: ``hamgr_control_requests_total``, ``hamgr_control_refused_total`` (handshakes
refused by key) and ``hamgr_control_bad_requests_total``.

Counters and gauges are read from the agent's status snapshot at scrape time (a custom
collector), so a scrape never waits on the epoch loop and never sees a half-updated unit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["PAUSE_BUCKETS", "AgentMetrics"]

PAUSE_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
FAILOVER_BUCKETS: Final = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

Snapshot = Callable[[], Mapping[str, Any]]


class _SnapshotCollector(Collector):
    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        snap = self._snapshot()
        epochs = CounterMetricFamily(
            "hamgr_epochs", "Epochs the data plane closed for the unit", labels=["unit"]
        )
        commits = CounterMetricFamily(
            "hamgr_commits", "Epochs released after their checkpoint committed", labels=["unit"]
        )
        pkts = GaugeMetricFamily(
            "hamgr_buffered_packets", "Output packets held for the unit", labels=["unit"]
        )
        nbytes = GaugeMetricFamily(
            "hamgr_buffered_bytes", "Output bytes held for the unit", labels=["unit"]
        )
        term = GaugeMetricFamily("hamgr_term", "The unit's fencing term", labels=["unit", "role"])
        protected = GaugeMetricFamily(
            "hamgr_protected", "1 while the unit is protected", labels=["unit"]
        )
        for u in snap.get("units", ()):
            name = u["unit"]
            term.add_metric([name, u["role"]], u.get("term") or 0)
            if u["role"] != "primary":
                continue
            epochs.add_metric([name], u.get("epochs_total") or 0)
            commits.add_metric([name], u.get("commits_total") or 0)
            pkts.add_metric([name], u.get("buffered_pkts") or 0)
            nbytes.add_metric([name], u.get("buffered_bytes") or 0)
            protected.add_metric([name], 1 if u.get("protection") == "protected" else 0)
        control = snap.get("control", {})
        requests = CounterMetricFamily(
            "hamgr_control_requests", "Control requests received", value=control.get("requests", 0)
        )
        refused = CounterMetricFamily(
            "hamgr_control_refused",
            "Control handshakes refused because the key is not authorized",
            value=control.get("refused", 0),
        )
        bad = CounterMetricFamily(
            "hamgr_control_bad_requests",
            "Control requests refused by the schema check",
            value=control.get("bad", 0),
        )
        return [epochs, commits, pkts, nbytes, term, protected, requests, refused, bad]


class AgentMetrics:
    """The agent's registry: histograms fed by the epoch loops, the rest from snapshots."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_SnapshotCollector(snapshot))
        self.pause = Histogram(
            "hamgr_checkpoint_pause_seconds",
            "Pause of each cut, from freeze to thaw",
            ["unit"],
            buckets=PAUSE_BUCKETS,
            registry=self.registry,
        )
        self.failover = Histogram(
            "hamgr_failover_seconds",
            "Duration of each failover, from detection to resumed output",
            ["unit"],
            buckets=FAILOVER_BUCKETS,
            registry=self.registry,
        )
        self._server: Any = None
        self.address: str | None = None

    def serve(self, listen: str) -> str:
        """Serve /metrics on HOST:PORT (port 0 picks one); returns the bound HOST:PORT."""
        host, _, port = listen.rpartition(":")
        server, _thread = start_http_server(
            int(port), addr=host or "0.0.0.0", registry=self.registry
        )
        self._server = server
        self.address = f"{host}:{server.server_port}"
        return self.address

    def forget(self, unit: str) -> None:
        for hist in (self.pause, self.failover):
            with contextlib.suppress(KeyError):
                hist.remove(unit)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
