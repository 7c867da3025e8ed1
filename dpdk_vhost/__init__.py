"""dpdk_vhost: the data plane (C, in src/) and its Python control client.

See docs/dataplane.md for the control protocol and the epoch buffer semantics.
"""

from dpdk_vhost.client import (
    Cut,
    DataPlane,
    DataPlaneClient,
    DataPlaneError,
    DataPlaneUnavailableError,
    EpochClosed,
    Replayed,
    Retired,
    Xmitted,
)
from dpdk_vhost.process import DataPlaneConfig, DataPlaneProcess
from dpdk_vhost.protocol import InputLogStats, PeerDown, PeerUp, Stats, UnitStats

__all__ = [
    "Cut",
    "DataPlane",
    "DataPlaneClient",
    "DataPlaneConfig",
    "DataPlaneError",
    "DataPlaneProcess",
    "DataPlaneUnavailableError",
    "EpochClosed",
    "InputLogStats",
    "PeerDown",
    "PeerUp",
    "Replayed",
    "Retired",
    "Stats",
    "UnitStats",
    "Xmitted",
]
