"""The chain handle's own logic, on fake members (no root, no runc): the order of the cut, all or
nothing for the image, the refusals of a torn chain image, and what makes a valid chain."""

from __future__ import annotations

import json
import os
import select
from pathlib import Path

import attrs
import pytest

from shim.chain import (
    CHAIN_META,
    Chain,
    ChainBackend,
    ChainError,
    ChainImage,
    check_members,
    load_image,
    member_dir,
    member_name,
)
from shim.container import (
    IMAGE_META,
    CheckpointError,
    CheckpointImage,
    FreezeError,
    RestoreError,
    RuncBackend,
    RxDrain,
)
from shim.oci import ContainerSpec

NETNS = "h-chain-nf"


def spec(name: str, netns: str = NETNS) -> ContainerSpec:
    return ContainerSpec(name=name, image=Path("/nonexistent"), args=("nf",), netns=netns)


@attrs.define
class FakeMember:
    """A member that records what the chain asks of it, in one log shared by all members."""

    name: str
    pid: int
    log: list[tuple[str, str]]
    spec: ContainerSpec
    fail: str = ""  # "freeze" or "checkpoint"
    drained: bool = True
    rfd: int = -1
    wfd: int = -1

    @staticmethod
    def make(name: str, pid: int, log: list[tuple[str, str]], **kw: object) -> FakeMember:
        r, w = os.pipe()
        return FakeMember(name, pid, log, spec(name), rfd=r, wfd=w, **kw)  # type: ignore[arg-type]

    @property
    def pidfd(self) -> int:
        return self.rfd

    def die(self) -> None:
        os.write(self.wfd, b"x")

    def exited(self, timeout: float = 0.0) -> bool:
        return bool(select.select([self.rfd], [], [], timeout)[0])

    def wait_rx_drained(
        self, timeout: float = 0.02, *, settle: float = 0.0, own: bool = False
    ) -> RxDrain:
        # A member waits for its own sockets only, and long enough for a loaded host.
        assert own
        assert timeout >= 0.2
        self.log.append(("drain", self.name))
        return RxDrain(self.drained, 0.0, 0 if self.drained else 100, 0 if self.drained else 1)

    def freeze(self, timeout: float = 2.0) -> None:
        if self.fail == "freeze":
            raise FreezeError(f"{self.name} stuck")
        self.log.append(("freeze", self.name))

    def thaw(self, timeout: float = 2.0) -> None:
        self.log.append(("thaw", self.name))

    def checkpoint(self, epoch: int, dest_dir: Path) -> CheckpointImage:
        self.log.append(("checkpoint", self.name))
        if self.fail == "checkpoint":
            # What a real failed dump leaves: nothing at dest_dir.
            raise CheckpointError(f"checkpoint of {self.name} epoch {epoch}: criu dump failed")
        tmp = dest_dir.with_name(f".{dest_dir.name}.tmp")
        tmp.mkdir()
        (tmp / "pages-1.img").write_bytes(b"p" * 100)
        return RuncBackend._seal(
            tmp, dest_dir, epoch=epoch, spec=self.spec, engine="criu", elapsed=0.01
        )

    def kill(self) -> None:
        self.log.append(("kill", self.name))
        if not self.exited():
            self.die()

    def destroy(self) -> None:
        self.log.append(("destroy", self.name))

    def close(self) -> None:
        os.close(self.rfd)
        os.close(self.wfd)


def make_chain(n: int = 2, **fails: str) -> tuple[Chain, list[FakeMember], list[tuple[str, str]]]:
    log: list[tuple[str, str]] = []
    members = [
        FakeMember.make(f"c-m{i}", 100 + i, log, fail=fails.get(f"m{i}", "")) for i in range(n)
    ]
    return Chain("c", tuple(members)), members, log  # type: ignore[arg-type]


def test_freeze_goes_upstream_first_each_member_after_the_netns_drained() -> None:
    chain, _, log = make_chain(3)
    chain.freeze()
    assert log == [
        ("freeze", "c-m0"),
        ("drain", "c-m1"),
        ("freeze", "c-m1"),
        ("drain", "c-m2"),
        ("freeze", "c-m2"),
    ]
    log.clear()
    chain.thaw()
    assert log == [("thaw", "c-m2"), ("thaw", "c-m1"), ("thaw", "c-m0")]


def test_a_member_that_cannot_be_frozen_thaws_the_ones_already_frozen() -> None:
    chain, _, log = make_chain(3, m1="freeze")
    with pytest.raises(FreezeError, match="c-m1 stuck"):
        chain.freeze()
    assert log == [("freeze", "c-m0"), ("drain", "c-m1"), ("thaw", "c-m0")]


def test_a_member_that_did_not_drain_is_frozen_anyway_and_said_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    chain, members, log = make_chain(2)
    members[1].drained = False
    chain.freeze()
    assert ("freeze", "c-m1") in log
    assert "100 bytes still queued for member 1" in caplog.text


def test_a_checkpoint_holds_every_member_in_one_image(tmp_path: Path) -> None:
    chain, _, log = make_chain(2)
    dest = tmp_path / "epoch-00000007"
    image = chain.checkpoint(7, dest)
    # Not frozen by the engine: the chain is frozen for the dump as one cut, then thawed.
    assert log[:3] == [("freeze", "c-m0"), ("drain", "c-m1"), ("freeze", "c-m1")]
    assert log[-2:] == [("thaw", "c-m1"), ("thaw", "c-m0")]
    assert sorted(p.name for p in dest.iterdir()) == [CHAIN_META, member_dir(0), member_dir(1)]
    loaded = ChainImage.load(dest)
    assert loaded == image
    assert [m.spec.name for m in loaded.members] == ["c-m0", "c-m1"]
    assert loaded.size_bytes == 2 * 100  # what the member images list: the dump's files
    assert isinstance(load_image(dest), ChainImage)
    assert isinstance(load_image(dest / member_dir(0)), CheckpointImage)


def test_a_failed_dump_of_one_member_leaves_no_image_at_all(tmp_path: Path) -> None:
    chain, _, log = make_chain(3, m2="checkpoint")
    dest = tmp_path / "epoch-00000003"
    with pytest.raises(CheckpointError, match=r"no member's image is kept: member 2 \(c-m2\)"):
        chain.checkpoint(3, dest)
    # Every member was dumped (at the same time); the good images went with the bad one.
    assert {("checkpoint", f"c-m{i}") for i in range(3)} <= set(log)
    assert list(tmp_path.iterdir()) == []
    assert log[-3:] == [("thaw", "c-m2"), ("thaw", "c-m1"), ("thaw", "c-m0")]


def test_a_dead_member_fails_the_cut_before_any_dump(tmp_path: Path) -> None:
    chain, members, log = make_chain(2)
    members[1].die()
    assert chain.exited()
    with pytest.raises(CheckpointError, match="member 1 of chain c"):
        chain.checkpoint(1, tmp_path / "e")
    assert not any(op == "checkpoint" for op, _ in log)
    assert list(tmp_path.iterdir()) == []


def test_the_pidfd_polls_readable_when_any_member_dies() -> None:
    for victim in range(3):
        chain, members, log = make_chain(3)
        poller = select.poll()
        poller.register(chain.pidfd, select.POLLIN)
        assert not poller.poll(0)
        assert not chain.exited()
        members[victim].die()
        assert poller.poll(0)
        assert chain.exited()
        # The fence kills the others: the chain lives and dies as one.
        assert chain.kill_survivors() == [m.pid for i, m in enumerate(members) if i != victim]
        assert all(m.exited() for m in members)
        chain.destroy()
        assert [name for op, name in log if op == "destroy"] == [m.name for m in members]
        with pytest.raises(ChainError, match="destroyed"):
            _ = chain.pidfd
        for m in members:
            m.close()


def torn(tmp_path: Path) -> Path:
    chain, _, _ = make_chain(2)
    return chain.checkpoint(5, tmp_path / "epoch-00000005").path


def test_a_chain_image_without_its_metadata_is_refused(tmp_path: Path) -> None:
    path = torn(tmp_path)
    (path / CHAIN_META).unlink()
    with pytest.raises(RestoreError, match="not a complete chain checkpoint"):
        ChainImage.load(path)


def test_a_chain_image_with_a_member_missing_or_torn_is_refused(tmp_path: Path) -> None:
    path = torn(tmp_path)
    (path / member_dir(1) / "pages-1.img").write_bytes(b"short")
    with pytest.raises(RestoreError, match=r"pages-1\.img is 5 bytes"):
        ChainImage.load(path)
    os.rename(path / member_dir(1), tmp_path / "gone")
    with pytest.raises(RestoreError, match="not a complete hamgr checkpoint"):
        ChainImage.load(path)


def test_a_chain_image_that_mixes_two_cuts_is_refused(tmp_path: Path) -> None:
    path = torn(tmp_path)
    meta = path / member_dir(1) / IMAGE_META
    data = json.loads(meta.read_text())
    data["epoch"] = 4
    meta.write_text(json.dumps(data))
    with pytest.raises(RestoreError, match="epoch 4, the chain's is 5"):
        ChainImage.load(path)


@pytest.mark.parametrize("members", [["../x", "member-1"], ["member-0"], [], "member-0"])
def test_a_chain_image_naming_bad_members_is_refused(tmp_path: Path, members: object) -> None:
    path = torn(tmp_path)
    meta = json.loads((path / CHAIN_META).read_text())
    meta["members"] = members
    (path / CHAIN_META).write_text(json.dumps(meta))
    with pytest.raises(RestoreError):
        ChainImage.load(path)


def test_a_chain_has_two_or_three_members_in_one_netns() -> None:
    check_members([spec("a"), spec("b")])
    check_members([spec("a"), spec("b"), spec("c")])
    with pytest.raises(ChainError, match="2 to 3 members, got 1"):
        check_members([spec("a")])
    with pytest.raises(ChainError, match="2 to 3 members, got 4"):
        check_members([spec(n) for n in "abcd"])
    with pytest.raises(ChainError, match="share one network namespace"):
        check_members([spec("a"), spec("b", netns="other")])
    with pytest.raises(ChainError, match="must differ"):
        check_members([spec("a"), spec("a")])


def test_member_names_follow_the_chain_across_generations() -> None:
    assert [member_name("u-chain", i) for i in range(2)] == ["u-chain-m0", "u-chain-m1"]
    assert member_name("u-chain-t3", 1) == "u-chain-t3-m1"


@attrs.define
class FakeRunc:
    """A `RuncBackend` stand-in: restores and starts FakeMembers, and fails where told."""

    log: list[tuple[str, str]]
    fail: str = ""  # the name whose restore or start fails
    made: list[FakeMember] = attrs.Factory(list)

    def _make(self, op: str, name: str) -> FakeMember:
        self.log.append((op, name))
        if name == self.fail:
            raise RestoreError(f"runc {op} of {name}: criu failed")
        member = FakeMember.make(name, 200 + len(self.made), self.log)
        self.made.append(member)
        return member

    def restore(self, image_dir: Path, netns: str, *, name: str | None = None) -> FakeMember:
        assert name is not None
        return self._make("restore", name)

    def start(self, spec: ContainerSpec) -> FakeMember:
        return self._make("start", spec.name)


def test_a_chain_is_restored_downstream_first_under_new_names(tmp_path: Path) -> None:
    path = torn(tmp_path)
    log: list[tuple[str, str]] = []
    chain = ChainBackend(FakeRunc(log)).restore(path, NETNS, name="c-t2")  # type: ignore[arg-type]
    assert log == [("restore", "c-t2-m1"), ("restore", "c-t2-m0")]
    assert (chain.name, [m.name for m in chain.members]) == ("c-t2", ["c-t2-m0", "c-t2-m1"])


def test_a_member_that_fails_to_restore_takes_the_restored_ones_with_it(tmp_path: Path) -> None:
    path = torn(tmp_path)
    log: list[tuple[str, str]] = []
    backend = ChainBackend(FakeRunc(log, fail="c-t2-m0"))  # type: ignore[arg-type]
    with pytest.raises(RestoreError, match="member 0 failed, the members already restored"):
        backend.restore(path, NETNS, name="c-t2")
    assert log == [("restore", "c-t2-m1"), ("restore", "c-t2-m0"), ("destroy", "c-t2-m1")]


def test_a_member_that_fails_to_start_takes_the_started_ones_with_it() -> None:
    log: list[tuple[str, str]] = []
    backend = ChainBackend(FakeRunc(log, fail="c-m0"))  # type: ignore[arg-type]
    with pytest.raises(RestoreError, match="runc start of c-m0"):
        backend.start("c", [spec("a"), spec("b")])
    # Downstream first, so that each member listens before its upstream sends.
    assert log == [("start", "c-m1"), ("start", "c-m0"), ("destroy", "c-m1")]
    chain = ChainBackend(FakeRunc(log)).start("c", [spec("a"), spec("b")])  # type: ignore[arg-type]
    assert [m.name for m in chain.members] == ["c-m0", "c-m1"]
