"""The replication link end to end: a real ReplicationServer and ReplicationClient over TCP on
127.0.0.1, shipping a synthetic CRIU-like image set (a 64 MiB pages file plus small files), then
1% changes, with damage injected by a man-in-the-middle. No root needed; everything runs in a few
seconds. The wire codec and the standby's `Receiver`, which need no sockets, are tested in
tests/unit/test_replication.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
import zmq

from shim import delta as dl
from shim.delta import BLOCK_SIZE
from shim.replication import (
    Ack,
    Begin,
    Blocks,
    ClosedError,
    Code,
    Confirm,
    End,
    Message,
    Nack,
    NackedError,
    ReplicationClient,
    ReplicationServer,
    decode,
    encode,
)
from shim.standby import output_name
from shim.store import Store

PAGES = 64 << 20
SMALL = {
    "core-1.img": 2100,
    "mm-1.img": 7000,
    "pagemap-1.img": 400,
    "fs-1.img": 60,
    "inventory.img": 30,
}
UNITS = ("fw0", "nat0")


def write_checkpoint(path: Path, pages: bytes, small: dict[str, bytes]) -> Path:
    path.mkdir(parents=True)
    (path / "pages-1.img").write_bytes(pages)
    for name, data in small.items():
        (path / name).write_bytes(data)
    return path


def change_pages(pages: bytearray, fraction: float, seed: int) -> int:
    nblocks = len(pages) // BLOCK_SIZE
    changed = random.Random(seed).sample(range(nblocks), int(nblocks * fraction))
    for i in changed:
        pages[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE] = os.urandom(BLOCK_SIZE)
    return len(changed)


def digests_of(path: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in path.iterdir() if p.is_file()
    }


def make_checkpoints(tmp_path: Path, size: int) -> tuple[Path, Path, int]:
    """Epoch 1, and epoch 2 with 1% of the pages and one small file changed."""
    pages = os.urandom(size)
    small = {name: os.urandom(n) for name, n in SMALL.items()}
    src1 = write_checkpoint(tmp_path / "src1", pages, small)
    changed_pages = bytearray(pages)
    changed = change_pages(changed_pages, 0.01, seed=1)
    small["core-1.img"] = os.urandom(SMALL["core-1.img"])
    src2 = write_checkpoint(tmp_path / "src2", bytes(changed_pages), small)
    return src1, src2, changed + 1


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int]:
    """64 MiB of pages, for the measured transfer. Read-only, shared by the module."""
    return make_checkpoints(tmp_path_factory.mktemp("checkpoints"), PAGES)


@pytest.fixture(scope="module")
def checkpoints16(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int]:
    """16 MiB of pages, for tests about behaviour rather than volume."""
    return make_checkpoints(tmp_path_factory.mktemp("checkpoints16"), 16 << 20)


@pytest.fixture
def stores(tmp_path: Path) -> dict[str, Store]:
    return {unit: Store(tmp_path / "standby" / unit) for unit in UNITS}


@pytest.fixture
def server(stores: dict[str, Store]) -> Iterator[ReplicationServer]:
    with ReplicationServer("tcp://127.0.0.1:*", stores) as srv:
        yield srv


@pytest.fixture
def client(server: ReplicationServer) -> Iterator[ReplicationClient]:
    with ReplicationClient(server.endpoint) as cli:
        yield cli


def committed_digests(server: ReplicationServer, unit: str = "fw0") -> tuple[int, dict[str, str]]:
    committed = server.committed(unit)
    assert committed is not None
    return committed.epoch, digests_of(committed.path)


# --- end to end ---------------------------------------------------------------------------------


def test_full_image_then_one_percent_delta(
    server: ReplicationServer, client: ReplicationClient, checkpoints: tuple[Path, Path, int]
) -> None:
    src1, src2, changed = checkpoints
    status = client.hello("fw0", 1)
    assert status.committed_epoch is None

    first = client.ship("fw0", 1, 1, src1, meta={"cut_seq": 100})
    assert first.full
    assert committed_digests(server) == (1, digests_of(src1))

    t0 = time.perf_counter()
    manifest = dl.scan(src2, 2)
    scanned = time.perf_counter() - t0
    second = client.ship("fw0", 2, 1, src2, manifest=manifest)
    total = time.perf_counter() - t0
    assert not second.full
    assert second.blocks == changed
    total_blocks = manifest.nblocks
    assert second.blocks / total_blocks < 0.0102
    wire = second.block_bytes + second.manifest_bytes
    assert wire < 0.02 * manifest.total_size
    assert committed_digests(server) == (2, digests_of(src2))
    committed = server.committed("fw0")
    assert committed is not None
    assert dict(committed.meta) == {}
    print(
        f"\n64 MiB/1%: full {first.seconds:.3f}s; delta scan {scanned * 1e3:.0f} ms, "
        f"ship+commit {second.seconds * 1e3:.0f} ms, end to end {total * 1e3:.0f} ms; "
        f"{second.blocks}/{total_blocks} blocks, {wire} B on the wire "
        f"({100 * wire / manifest.total_size:.2f}%), manifest {second.manifest_bytes} B"
    )


def test_stale_term_gets_a_nack_carrying_the_standby_term(
    server: ReplicationServer, client: ReplicationClient, checkpoints16: tuple[Path, Path, int]
) -> None:
    src1, src2, _ = checkpoints16
    client.ship("fw0", 1, 5, src1)
    with pytest.raises(NackedError) as err:
        client.ship("fw0", 2, 4, src2)
    assert err.value.nack.code is Code.STALE_TERM
    assert err.value.nack.term == 5
    with pytest.raises(NackedError, match="stale_term"):
        client.hello("fw0", 4)
    assert committed_digests(server) == (1, digests_of(src1))


def test_promoted_standby_fences_its_old_primary(
    server: ReplicationServer, client: ReplicationClient, checkpoints16: tuple[Path, Path, int]
) -> None:
    src1, src2, _ = checkpoints16
    client.ship("fw0", 1, 1, src1)
    restore = server.promote("fw0", 2)
    assert restore is not None
    assert restore.epoch == 1
    for term in (1, 2):
        with pytest.raises(NackedError) as err:
            client.ship("fw0", 2, term, src2)
        assert err.value.nack.code is Code.STALE_TERM
    assert committed_digests(server) == (1, digests_of(src1))
    # The other unit on the same standby is not affected.
    assert client.ship("nat0", 1, 1, src1).full


class Tamper:
    """A man in the middle that damages the next blocks message from client to server."""

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], upstream: str) -> None:
        self.mode: str | None = None
        self.tampered = 0
        self._front = context.socket(zmq.ROUTER)
        self._front.setsockopt(zmq.LINGER, 0)
        self._front.bind("tcp://127.0.0.1:*")
        self.endpoint = self._front.getsockopt_string(zmq.LAST_ENDPOINT)
        self._back = context.socket(zmq.DEALER)
        self._back.setsockopt(zmq.LINGER, 0)
        self._back.connect(upstream)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def _damage(self, frames: list[bytes]) -> list[bytes]:
        if self.mode is None or json.loads(frames[0])["type"] != "blocks":
            return frames
        data = bytearray(frames[2])
        data[len(data) // 2] ^= 0x01
        self.tampered += 1
        mode, self.mode = self.mode, None
        if mode == "frame":  # the frame crc no longer matches
            return [frames[0], frames[1], bytes(data)]
        # A consistent message around a wrong block: only the block digest can tell.
        msg = decode(frames)
        assert isinstance(msg, Blocks)
        batch = dl.Batch(msg.batch.digests, msg.batch.lengths, bytes(data))
        return encode(attrs.evolve(msg, batch=batch))

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._front, zmq.POLLIN)
        poller.register(self._back, zmq.POLLIN)
        peer = b""
        try:
            while not self._stop.is_set():
                for sock, _ in poller.poll(20):
                    if sock is self._front:
                        peer, *frames = self._front.recv_multipart()
                        self._back.send_multipart(self._damage(frames))
                    else:
                        self._front.send_multipart([peer, *self._back.recv_multipart()])
        finally:
            self._front.close()
            self._back.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture
def tamper(server: ReplicationServer) -> Iterator[Tamper]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    proxy = Tamper(context, server.endpoint)
    yield proxy
    proxy.close()
    context.term()


@pytest.mark.parametrize("mode", ["frame", "block"])
def test_corrupted_block_in_flight_is_nacked_and_the_commit_survives(
    server: ReplicationServer, tamper: Tamper, checkpoints16: tuple[Path, Path, int], mode: str
) -> None:
    src1, src2, _ = checkpoints16
    with ReplicationClient(tamper.endpoint) as cli:
        cli.ship("fw0", 1, 1, src1)
        tamper.mode = mode
        with pytest.raises(NackedError) as err:
            cli.ship("fw0", 2, 1, src2)
        assert tamper.tampered == 1
        assert err.value.nack.code is Code.BAD_CHECKSUM
        assert ("crc" if mode == "frame" else "does not match its checksum") in str(err.value)
        assert committed_digests(server) == (1, digests_of(src1))
        store_root = server.committed("fw0")
        assert store_root is not None
        assert not list(store_root.path.parent.parent.glob("assembling.*"))
        # The same epoch, shipped again undamaged, commits.
        assert not cli.ship("fw0", 2, 1, src2).full
    assert committed_digests(server) == (2, digests_of(src2))


def test_restarted_standby_gets_a_full_image(
    tmp_path: Path, checkpoints16: tuple[Path, Path, int]
) -> None:
    src1, src2, _ = checkpoints16
    root = tmp_path / "fresh-standby"
    srv = ReplicationServer("tcp://127.0.0.1:*", {"fw0": Store(root)})
    endpoint = srv.start()
    try:
        with ReplicationClient(endpoint) as cli:
            cli.ship("fw0", 1, 1, src1)
            assert cli.base("fw0") is not None
            # The standby loses its tmpfs and comes back empty on the same port.
            srv.stop()
            shutil.rmtree(root)
            with ReplicationServer(endpoint, {"fw0": Store(root)}) as again:
                shipped = cli.ship("fw0", 2, 1, src2, timeout=10)
                assert shipped.full  # the delta was refused with base_mismatch, then resent
                assert committed_digests(again) == (2, digests_of(src2))
    finally:
        srv.stop()


def test_resend_after_a_lost_ack_is_acked_again(
    server: ReplicationServer, client: ReplicationClient, checkpoints16: tuple[Path, Path, int]
) -> None:
    src1, _, _ = checkpoints16
    client.ship("fw0", 1, 1, src1)
    client.forget("fw0")  # as if the ack never arrived: the primary resends in full
    again = client.ship("fw0", 1, 1, src1)
    assert again.full
    assert committed_digests(server) == (1, digests_of(src1))


def test_a_large_transfer_does_not_hold_up_another_unit(
    server: ReplicationServer,
    client: ReplicationClient,
    checkpoints: tuple[Path, Path, int],
    tmp_path: Path,
) -> None:
    src1, _, _ = checkpoints
    small = write_checkpoint(tmp_path / "small", os.urandom(64 << 10), {"core-1.img": b"c"})
    big_manifest, small_manifest = dl.scan(src1, 1), dl.scan(small, 1)
    done: dict[str, float] = {}
    big = client.ship_nowait("fw0", 1, 1, src1, manifest=big_manifest)
    tiny = client.ship_nowait("nat0", 1, 1, small, manifest=small_manifest)
    big.add_done_callback(lambda _f: done.setdefault("fw0", time.perf_counter()))
    tiny.add_done_callback(lambda _f: done.setdefault("nat0", time.perf_counter()))
    assert big.result(30).full
    assert tiny.result(30).full
    assert done["nat0"] < done["fw0"]
    assert committed_digests(server, "nat0") == (1, digests_of(small))


def test_heartbeat_reports_the_standby_term(client: ReplicationClient) -> None:
    beat = client.heartbeat("fw0", 3)
    assert beat.term == 3
    assert client.heartbeat("fw0", 7).term == 7
    with pytest.raises(NackedError, match="stale_term"):
        client.heartbeat("fw0", 6)


def _raw_exchange(endpoint: str, messages: list[list[bytes]]) -> list[Message]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    try:
        sock.connect(endpoint)
        replies = []
        for frames in messages:
            sock.send_multipart(frames)
            replies.append(decode(sock.recv_multipart()))
        return replies
    finally:
        sock.close()
        context.term()


def _header(**fields: object) -> bytes:
    base: dict[str, object] = {"v": 1, "type": "hello", "unit": "fw0", "epoch": 0, "term": 1}
    base["seq"] = 1
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not None}).encode()


def test_the_server_nacks_garbage_and_keeps_serving(
    server: ReplicationServer, client: ReplicationClient, checkpoints16: tuple[Path, Path, int]
) -> None:
    bad_begin = encode(Begin(unit="fw0", epoch=1, term=1, seq=1, manifest=b"HMF1..."))
    bad_begin[1] = b"HMF1!!!"
    replies = _raw_exchange(
        server.endpoint,
        [
            [b"not json"],
            [_header(type="teleport")],
            [_header(term=None)],
            [_header(term=True)],
            [_header(unit="other")],
            [_header(unit="../../etc")],
            bad_begin,
            encode(End(unit="fw0", epoch=9, term=1, seq=3, first_seq=1, messages=0, blocks=0)),
        ],
    )
    got = [(r.code, r.reason) for r in replies if isinstance(r, Nack)]
    assert len(got) == len(replies)
    assert [code for code, _ in got] == [
        Code.BAD_MESSAGE,
        Code.BAD_MESSAGE,
        Code.BAD_MESSAGE,
        Code.BAD_MESSAGE,
        Code.UNKNOWN_UNIT,
        Code.BAD_MESSAGE,
        Code.BAD_CHECKSUM,
        Code.NO_TRANSFER,
    ]
    assert "unknown message type 'teleport'" in got[1][1]
    assert "missing field 'term'" in got[2][1]
    src1, _, _ = checkpoints16
    assert client.ship("fw0", 1, 1, src1).full


# --- CURVE --------------------------------------------------------------------------------------


@attrs.frozen
class CurveSetup:
    server: ReplicationServer
    server_public: bytes
    client_keypair: tuple[bytes, bytes]


@pytest.fixture
def curve(stores: dict[str, Store]) -> Iterator[CurveSetup]:
    server_public, server_secret = zmq.curve_keypair()
    client_keypair = zmq.curve_keypair()
    with ReplicationServer(
        "tcp://127.0.0.1:*",
        stores,
        secret_key=server_secret,
        allowed_clients=[client_keypair[0]],
    ) as srv:
        yield CurveSetup(srv, server_public, client_keypair)


def test_curve_with_the_right_keys_commits(curve: CurveSetup, tmp_path: Path) -> None:
    src = write_checkpoint(tmp_path / "src", os.urandom(1 << 20), {"core-1.img": b"c"})
    with ReplicationClient(
        curve.server.endpoint, server_key=curve.server_public, keypair=curve.client_keypair
    ) as cli:
        assert cli.ship("fw0", 1, 1, src, timeout=10).full
    assert committed_digests(curve.server) == (1, digests_of(src))


@pytest.mark.parametrize("who", ["wrong server key", "unknown client", "no curve"])
def test_curve_refuses_the_wrong_keys_with_no_ack(
    curve: CurveSetup, tmp_path: Path, who: str
) -> None:
    src = write_checkpoint(tmp_path / "src", os.urandom(64 << 10), {})
    endpoint = curve.server.endpoint
    if who == "wrong server key":
        cli = ReplicationClient(
            endpoint, server_key=zmq.curve_keypair()[0], keypair=curve.client_keypair
        )
    elif who == "unknown client":
        cli = ReplicationClient(endpoint, server_key=curve.server_public)  # its own new keypair
    else:
        cli = ReplicationClient(endpoint)
    with cli, pytest.raises(TimeoutError):
        cli.ship("fw0", 1, 1, src, timeout=0.7)
    assert curve.server.committed("fw0") is None


def test_closing_the_client_fails_a_pending_transfer(tmp_path: Path) -> None:
    src = write_checkpoint(tmp_path / "src", os.urandom(64 << 10), {})
    # Nobody listens there, so the transfer cannot even start sending.
    cli = ReplicationClient("tcp://127.0.0.1:9")
    pending = cli.ship_nowait("fw0", 1, 1, src, timeout=30)
    time.sleep(0.2)
    cli.close()
    with pytest.raises(ClosedError):
        pending.result(5)
    with pytest.raises(ClosedError):
        cli.ship_nowait("fw0", 2, 1, src)


def test_allowed_clients_asked_at_each_handshake_and_units_added_while_serving(
    tmp_path: Path,
) -> None:
    """A server whose allowed keys come from a callable (an authorized-keys file): a key added
    later is admitted without a restart; a unit added while it serves is served, and a
    removed one refused."""
    server_public, server_secret = zmq.curve_keypair()
    client_keypair = zmq.curve_keypair()
    allowed: list[bytes] = []
    src = write_checkpoint(tmp_path / "src", os.urandom(64 << 10), {})
    with ReplicationServer(
        "tcp://127.0.0.1:*", {}, secret_key=server_secret, allowed_clients=lambda: allowed
    ) as srv:
        with (
            ReplicationClient(srv.endpoint, server_key=server_public, keypair=client_keypair) as c,
            pytest.raises(TimeoutError),
        ):
            c.hello("fw0", 1, timeout=0.7)
        allowed.append(client_keypair[0])
        srv.add_store("fw0", Store(tmp_path / "fw0"))
        assert srv.holds("fw0")
        with ReplicationClient(srv.endpoint, server_key=server_public, keypair=client_keypair) as c:
            assert c.ship("fw0", 1, 1, src, timeout=10).full
            assert srv.committed("fw0") is not None
            assert srv.remove_store("fw0") is not None
            assert not srv.holds("fw0")
            with pytest.raises(NackedError) as info:
                c.hello("fw0", 1, timeout=5)
            assert info.value.nack.code is Code.UNKNOWN_UNIT


# --- release at the standby: the confirm round --------------------------------------------------


def test_held_output_leaves_only_on_the_confirm_and_the_ship_waits_for_it(tmp_path: Path) -> None:
    """A checkpoint that carries held output: the standby commits and acks it unsent; the
    client confirms; only then does the output leave (once), and the ship ends on `released`."""
    sending = threading.Event()
    go = threading.Event()
    sent: list[tuple[str, bytes]] = []

    def emit(unit: str, path: Path) -> None:
        sending.set()
        assert go.wait(10)
        sent.append((unit, path.read_bytes()))

    store = Store(tmp_path / "standby" / "fw0")
    src = write_checkpoint(tmp_path / "src", os.urandom(64 << 10), {output_name(1): b"out-1"})
    with (
        ReplicationServer("tcp://127.0.0.1:*", {"fw0": store}, emit=emit) as srv,
        ReplicationClient(srv.endpoint) as cli,
    ):
        pending = cli.ship_nowait("fw0", 1, 1, src, timeout=10)
        assert sending.wait(10)
        # Committed (the output rides in the committed image), and being sent: the ship is not
        # over until it has been.
        time.sleep(0.1)
        assert not pending.done()
        go.set()
        shipped = pending.result(10)
        assert (shipped.epoch, shipped.term) == (1, 1)
        assert sent == [("fw0", b"out-1")]
        assert store.released == (1, 1)
        status = cli.hello("fw0", 1)
        assert (status.committed_epoch, status.released) == (1, (1, 1))
        # The same image again (its answer lost): a plain ack, nothing sent twice.
        cli.forget("fw0")
        cli.ship("fw0", 1, 1, src, timeout=10)
        # Checkpoint 2 carries epoch 1 again, and epoch 2.
        src2 = write_checkpoint(
            tmp_path / "src2",
            os.urandom(64 << 10),
            {output_name(1): b"out-1", output_name(2): b"o2"},
        )
        cli.ship("fw0", 2, 1, src2, timeout=10)
    assert sent == [("fw0", b"out-1"), ("fw0", b"o2")]


def test_a_refused_confirm_fails_the_ship(tmp_path: Path) -> None:
    """A standby (here a scripted ROUTER) acks unsent, then refuses the confirm with a higher
    term, as a promoted standby does: the ship raises NackedError with that term, and the
    confirm named the acked (unit, term, epoch)."""
    src = write_checkpoint(tmp_path / "src", os.urandom(64 << 10), {output_name(1): b"out-1"})
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    got: list[Message] = []

    def standby() -> None:
        while True:
            if not router.poll(5000):
                return
            peer, *frames = router.recv_multipart()
            msg = decode(frames)
            got.append(msg)
            if isinstance(msg, End):
                reply: Message = Ack(unit="fw0", epoch=1, term=1, seq=msg.seq, unsent=True)
            elif isinstance(msg, Confirm):
                reply = Nack(
                    unit="fw0", epoch=1, term=2, seq=msg.seq, code=Code.STALE_TERM, reason="x"
                )
            else:
                continue
            router.send_multipart([peer, *encode(reply)])
            if isinstance(msg, Confirm):
                return

    thread = threading.Thread(target=standby, daemon=True)
    thread.start()
    try:
        with (
            ReplicationClient(f"tcp://127.0.0.1:{port}") as cli,
            pytest.raises(NackedError) as refused,
        ):
            cli.ship("fw0", 1, 1, src, timeout=10)
        thread.join(10)
    finally:
        router.close()
        ctx.term()
    assert (refused.value.nack.code, refused.value.nack.term) == (Code.STALE_TERM, 2)
    confirm = got[-1]
    assert isinstance(confirm, Confirm)
    assert (confirm.unit, confirm.epoch, confirm.term) == ("fw0", 1, 1)
    assert confirm.seq > got[-2].seq
