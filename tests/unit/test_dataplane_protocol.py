"""The data plane's line protocol, without a data plane."""

from __future__ import annotations

import pytest

from dpdk_vhost.client import DataPlaneError
from dpdk_vhost.protocol import (
    ErrorReply,
    Event,
    PeerDown,
    PeerUp,
    ProtocolError,
    Reply,
    decode_message,
    encode_request,
    parse_stats,
)


def test_encode_request_orders_fields_and_skips_none() -> None:
    line = encode_request(
        "7",
        "add_unit",
        {"unit": "u1", "wire": ["w0", "w1"], "k": 4, "mirror": None, "client": True},
    )
    assert line == b"7 add_unit unit=u1 wire=w0,w1 k=4 client=1\n"


@pytest.mark.parametrize(
    ("req_id", "cmd", "args"),
    [
        ("", "ping", {}),
        ("*", "ping", {}),
        ("1", "two words", {}),
        ("1", "ping", {"bad key": 1}),
        ("1", "ping", {"k": "has space"}),
        ("1", "ping", {"k": ""}),
        ("1", "ping", {"k": -1}),
        ("1", "ping", {"k": 1.5}),
        ("1", "ping", {"k": "x" * 5000}),
        ("1", "ping", {"k": "caf\u00e9"}),
    ],
)
def test_encode_request_rejects_what_the_data_plane_would(
    req_id: str, cmd: str, args: dict[str, object]
) -> None:
    with pytest.raises(ProtocolError):
        encode_request(req_id, cmd, args)


def test_decode_reply_error_and_events() -> None:
    assert decode_message(b"3 ok\n") == Reply(id="3", fields={})
    assert decode_message(b"3 ok cut=12 epoch=4\n") == Reply(
        id="3", fields={"cut": "12", "epoch": "4"}
    )
    assert decode_message(b"4 err stale_term term 1 is older\n") == ErrorReply(
        id="4", code="stale_term", message="term 1 is older"
    )
    assert decode_message(b"* peer_up peer=b port=fab seq=9 term=2 mono_us=100\n") == PeerUp(
        peer="b", port="fab", seq=9, term=2, mono_us=100
    )
    down = decode_message(
        b"* peer_down peer=b port=fab last_rx_mono_us=10 mono_us=3020 silent_us=3010 last_seq=5"
    )
    assert isinstance(down, PeerDown)
    assert down.mono_us - down.last_rx_mono_us == 3010
    assert decode_message(b"* port_gone name=x\n") == Event(name="port_gone", fields={"name": "x"})


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"3",
        b"3 maybe x=1",
        b"3 ok novalue",
        b"3 err",
        b"\xff\xfe ok",
        b"* peer_down peer=b",
        b"* peer_up peer=b port=p seq=x term=1 mono_us=1",
    ],
)
def test_decode_rejects_malformed(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_message(data)


STATS = (
    "name=dp loops=10 sleeps=2 ctl_polls=3 ctl_requests=4 ctl_errors=1 events_sent=0"
    " events_dropped=0 mbuf_avail=100 mbuf_in_use=5 mono_us=99 busy_loops=1 busy_cycles=2"
    " tsc_hz=3"
    " port.w0.type=af_packet port.w0.port_id=0 port.w0.link=1 port.w0.rx=5 port.w0.tx=0"
    " port.w0.rx_bytes=300 port.w0.tx_bytes=0 port.w0.rx_missed=0 port.w0.rx_nombuf=0"
    " port.w0.tx_errors=0 port.w0.probe_rx=0 port.w0.probe_tx=0 port.w0.probe_bad=0"
    " port.w0.unowned_drops=0"
    " unit.u1.mode=ha unit.u1.tag=3 unit.u1.wire=w0,w1 unit.u1.nf=n0 unit.u1.egress=o0"
    " unit.u1.mirror=- unit.u1.paused=0 unit.u1.bp=k,bytes unit.u1.term=2 unit.u1.epoch=7"
    " unit.u1.k=2 unit.u1.budget_bytes=1000 unit.u1.ring_size=1024"
    " unit.u1.epochs_in_flight=2"
    + "".join(
        f" unit.u1.{k}={i}"
        for i, k in enumerate(
            [
                "rx",
                "in_seq",
                "nf_rx",
                "nf_rx_bytes",
                "tx",
                "tx_bytes",
                "buffered_pkts",
                "buffered_bytes",
                "releasable_pkts",
                "released_pkts",
                "released_bytes",
                "discarded_pkts",
                "discarded_bytes",
                "epochs_closed",
                "epochs_released",
                "epochs_discarded",
                "bp_k",
                "bp_bytes",
                "bp_ring",
                "nf_stalls",
                "refused_stale",
                "hwm_bytes",
                "hwm_pkts",
                "mirror_pkts",
                "stash_to_nf",
                "stash_to_egress",
            ]
        )
    )
    + " unit.u1.drop_ring_full=0 unit.u1.drop_stale_term=4"
    " probe.hb.port=w0 probe.hb.state=down probe.hb.interval_us=1000 probe.hb.miss=3"
    " probe.hb.rx=1 probe.hb.tx=2 probe.hb.tx_fail=0 probe.hb.downs=1 probe.hb.ups=1"
)


def test_parse_stats_types_every_section() -> None:
    msg = decode_message(f"1 ok {STATS}\n".encode())
    assert isinstance(msg, Reply)
    s = parse_stats(msg.fields)
    assert (s.name, s.loops, s.mbuf_in_use) == ("dp", 10, 5)
    assert s.ports["w0"].type == "af_packet"
    assert s.ports["w0"].link
    assert s.ports["w0"].rx == 5
    u = s.units["u1"]
    assert u.wire == ("w0", "w1")
    assert u.mirror is None
    assert u.bp == frozenset({"k", "bytes"})
    assert (u.term, u.epoch, u.epochs_in_flight, u.in_seq) == (2, 7, 2, 1)
    assert u.drops == {"ring_full": 0, "stale_term": 4}
    assert u.dropped == 4
    assert s.probes["hb"].state == "down"
    assert s.probes["hb"].downs == 1


def test_parse_stats_types_the_wire_stash_and_defaults_it_to_zero() -> None:
    new = " unit.u1.stash_wire=7 unit.u1.stash_wire_pkts=900 unit.u1.stash_wire_full=2"
    msg = decode_message(f"1 ok {STATS}{new}\n".encode())
    assert isinstance(msg, Reply)
    u = parse_stats(msg.fields).units["u1"]
    assert (u.stash_wire, u.stash_wire_pkts, u.stash_wire_full) == (7, 900, 2)
    msg = decode_message(f"1 ok {STATS}\n".encode())
    assert isinstance(msg, Reply)
    u = parse_stats(msg.fields).units["u1"]
    assert (u.stash_wire, u.stash_wire_pkts, u.stash_wire_full) == (0, 0, 0)


def test_parse_stats_names_the_missing_field() -> None:
    with pytest.raises(ProtocolError, match="mode"):
        parse_stats({"name": "dp", "unit.u1.tag": "1"})


def test_error_carries_code_and_a_hint() -> None:
    e = DataPlaneError("epoch_limit", "4 epochs are in flight (k=4)")
    assert e.code == "epoch_limit"
    assert "release" in str(e)
    assert "4 epochs" in str(e)
