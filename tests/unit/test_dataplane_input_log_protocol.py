"""Input logs in the data plane's line protocol, without a data plane."""

from __future__ import annotations

import attrs
import pytest

from dpdk_vhost.client import Replayed
from dpdk_vhost.protocol import InputLogStats, ProtocolError, Reply, decode_message, parse_stats
from tests.unit.test_dataplane_protocol import STATS

LOG_FIELDS = [
    "capacity",
    "max_bytes",
    "frames",
    "bytes",
    "first_seq",
    "last_seq",
    "high_seq",
    "received",
    "gaps",
    "gap_seq",
    "duplicates",
    "too_big",
    "overflow",
    "overflow_seq",
    "trimmed",
    "trim_seq",
    "replayed",
]

LOG = " log.L1.port=m1 log.L1.tag=2779054081" + "".join(
    f" log.L1.{k}={i + 10}" for i, k in enumerate(LOG_FIELDS)
)
NEW_UNIT = " unit.u1.mirror_tag=9 unit.u1.replayed_pkts=40"
NEW_PORT = " port.w0.mirror_rx=100 port.w0.mirror_unknown=3 port.w0.mirror_bad=1"


def _stats(text: str) -> dict[str, str]:
    msg = decode_message(f"1 ok {text}\n".encode())
    assert isinstance(msg, Reply)
    return dict(msg.fields)


def test_input_logs_are_typed() -> None:
    s = parse_stats(_stats(STATS + LOG + NEW_UNIT + NEW_PORT))
    log = s.input_logs["L1"]
    assert (log.name, log.port, log.tag) == ("L1", "m1", 0xA5A50001)
    assert [getattr(log, k) for k in LOG_FIELDS] == list(range(10, 10 + len(LOG_FIELDS)))
    assert (s.units["u1"].mirror_tag, s.units["u1"].replayed_pkts) == (9, 40)
    p = s.ports["w0"]
    assert (p.mirror_rx, p.mirror_unknown, p.mirror_bad) == (100, 3, 1)


def test_replies_without_the_new_fields_still_parse() -> None:
    s = parse_stats(_stats(STATS))
    assert s.input_logs == {}
    assert s.units["u1"].mirror_tag is None
    assert s.units["u1"].replayed_pkts == 0
    assert (s.ports["w0"].mirror_rx, s.ports["w0"].mirror_unknown) == (0, 0)


@pytest.mark.parametrize("drop", ["port", "tag", "frames", "trim_seq", "replayed"])
def test_a_log_missing_a_field_is_malformed(drop: str) -> None:
    fields = _stats(STATS + LOG)
    del fields[f"log.L1.{drop}"]
    with pytest.raises(ProtocolError, match=drop):
        parse_stats(fields)


def test_a_log_with_a_non_integer_counter_is_malformed() -> None:
    fields = _stats(STATS + LOG)
    fields["log.L1.gaps"] = "many"
    with pytest.raises(ProtocolError):
        parse_stats(fields)


def test_values_are_frozen() -> None:
    r = Replayed(delivered=3, first=5, last=7)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        r.delivered = 4  # type: ignore[misc]
    log = parse_stats(_stats(STATS + LOG)).input_logs["L1"]
    assert isinstance(log, InputLogStats)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        log.frames = 0  # type: ignore[misc]
