"""Chains: a unit made of 2-3 container NFs that is checkpointed at one cut and fails over as one.

The members are separate runc containers that share the unit's NF network namespace, as the
containers of a Kubernetes pod do. The unit keeps one veth and one data-plane NF port: the first
member receives the unit's input, member i sends to member i+1 inside the netns (loopback), and
only the last member sends to the egress, the unit's only buffered output. docs/containers.md
("Chains") has the reasons.

`Chain` is the handle the epoch engine and `shim.local_failover.LocalFailover` drive, with the
same calls as one `shim.container.Container`:

- ``freeze`` freezes the members upstream-first, each only once the netns's receive queues have
  drained: CRIU drops UDP receive queues, so a member frozen while its upstream could still send
  it a datagram, or with a datagram unread in its socket, would lose it. Frozen upstream, a
  member gets nothing new; drained, it holds nothing CRIU would drop. Packets in flight between
  members are thus either read (in the downstream member's memory) or not yet sent (in the
  upstream member's), and both are in the checkpoint.
- ``checkpoint`` dumps every member into one image directory, a subdirectory per member, plus
  ``hamgr-chain.json`` naming them. It is all members or nothing: the image appears under its
  name only when every dump succeeded; a failed dump of one member fails the whole cut and
  leaves nothing (`ChainImage.load` refuses a directory without the chain metadata, or with a
  member missing or torn).
- ``pidfd`` is an epoll descriptor on every member's pidfd: it polls readable as soon as any
  member dies, so the death of one member is the death of the unit.
- ``kill`` and ``destroy`` act on every member.

`ChainBackend.restore` restores every member, downstream-first, so nothing an upstream member
sends after its restore finds its receiver missing; a failed restore of one member destroys the
ones already restored. `load_image` reads either kind of image (one container, or a chain).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import os
import secrets
import select
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs

from shim.container import (
    CheckpointError,
    CheckpointImage,
    Container,
    ContainerError,
    FreezeError,
    RestoreAbortedError,
    RestoreError,
    RuncBackend,
    RxDrain,
    read_image_meta,
)
from shim.oci import ContainerSpec

__all__ = [
    "CHAIN_META",
    "MAX_MEMBERS",
    "Chain",
    "ChainBackend",
    "ChainError",
    "ChainImage",
    "load_image",
    "member_dir",
    "member_name",
]

log = logging.getLogger(__name__)

CHAIN_META = "hamgr-chain.json"
CHAIN_FORMAT = 1
MIN_MEMBERS = 2
MAX_MEMBERS = 3
# How long a member may take to read what its upstream sent before it is frozen anyway. What
# it has not read then is not in the checkpoint (CRIU drops UDP receive queues), and a restore
# from it shows the upstream member's count of those datagrams as a gap. The wait covers the
# member's own sockets only and lasts only while something is queued for it (well under a
# millisecond on a quiet host). 20 ms ran out under a load of 4 on this 2-CPU testbed, and one
# remote chain run then missed 7 of the first member's counters (docs/containers.md).
DRAIN_TIMEOUT_S = 0.2


class ChainError(ContainerError):
    """A chain operation failed, or a chain was described wrongly; the message says how."""


def member_dir(index: int) -> str:
    """The subdirectory of a chain image that holds member `index`'s checkpoint."""
    return f"member-{index}"


def member_name(chain: str, index: int) -> str:
    """The runc container name of member `index` of the chain named `chain`."""
    return f"{chain}-m{index}"


def check_members(specs: Sequence[ContainerSpec]) -> None:
    """Refuse a chain that cannot work: too few or too many members, or members that do not
    share one netns (a chain is one unit with one NF port)."""
    if not MIN_MEMBERS <= len(specs) <= MAX_MEMBERS:
        raise ChainError(
            f"a chain has {MIN_MEMBERS} to {MAX_MEMBERS} members, got {len(specs)}; protect a "
            "single NF as a plain unit and split longer chains into several units"
        )
    netns = {s.netns for s in specs}
    if len(netns) != 1:
        raise ChainError(
            f"the members of a chain share one network namespace, got {sorted(netns)}; give "
            "every member the unit's NF netns"
        )
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ChainError(f"member names must differ, got {names}")


# --------------------------------------------------------------------------- images


@attrs.frozen
class ChainImage:
    """A complete chain checkpoint: one `CheckpointImage` per member, upstream first."""

    path: Path
    epoch: int
    name: str
    members: tuple[CheckpointImage, ...]

    @property
    def size_bytes(self) -> int:
        return sum(m.size_bytes for m in self.members)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": CHAIN_FORMAT,
            "epoch": self.epoch,
            "name": self.name,
            "members": [m.path.name for m in self.members],
        }

    @staticmethod
    def load(path: Path) -> ChainImage:
        """Read a chain image and check every member's image is complete (sizes included)."""
        data = read_image_meta(path, CHAIN_META, CHAIN_FORMAT, what="chain checkpoint")
        meta_path = path / CHAIN_META
        dirs = data.get("members")
        if not isinstance(dirs, list) or not MIN_MEMBERS <= len(dirs) <= MAX_MEMBERS:
            raise RestoreError(f"{meta_path}: names no valid member list ({dirs!r})")
        members = []
        for d in dirs:
            if not isinstance(d, str) or "/" in d or d in ("", ".", ".."):
                raise RestoreError(f"{meta_path}: bad member directory {d!r}")
            image = CheckpointImage.load(path / d)
            if image.epoch != data["epoch"]:
                raise RestoreError(
                    f"{path / d}: epoch {image.epoch}, the chain's is {data['epoch']}; the image "
                    "mixes two cuts, use an older epoch"
                )
            members.append(image)
        return ChainImage(path, int(data["epoch"]), str(data["name"]), tuple(members))


def load_image(path: Path) -> CheckpointImage | ChainImage:
    """The checkpoint at `path`, of one container or of a chain, checked complete."""
    if (path / CHAIN_META).exists():
        return ChainImage.load(path)
    return CheckpointImage.load(path)


# --------------------------------------------------------------------------- the handle


@attrs.define(eq=False)
class Chain:
    """The running members of one chain, upstream first. Build it with `ChainBackend`."""

    name: str
    members: tuple[Container, ...]
    drain_timeout: float = DRAIN_TIMEOUT_S
    _epoll: select.epoll | None = None
    _frozen: int = 0  # how many members, from the first, this handle froze
    _dumpers: concurrent.futures.ThreadPoolExecutor | None = None

    def __attrs_post_init__(self) -> None:
        self._epoll = select.epoll()
        for m in self.members:
            # A member gone before it was watched has no pidfd: exited() reports the death.
            with contextlib.suppress(ContainerError):
                self._epoll.register(m.pidfd, select.EPOLLIN)

    # -- identity ----------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        """The first member's PID: the chain's identity for the failover machine."""
        return self.members[0].pid

    @property
    def spec(self) -> ContainerSpec:
        """The first member's spec (its netns is every member's)."""
        return self.members[0].spec

    @property
    def pidfd(self) -> int:
        """An fd that polls readable once any member has died (epoll on their pidfds)."""
        if self._epoll is None:
            raise ChainError(f"chain {self.name} is destroyed")
        return self._epoll.fileno()

    def exited(self, timeout: float = 0.0) -> bool:
        """True once any member has died; waits up to `timeout` seconds for that."""
        if self._epoll is None or any(m.exited() for m in self.members):
            return True
        return bool(self._epoll.poll(timeout))

    # -- the cut -------------------------------------------------------------------------------

    def wait_rx_drained(self, timeout: float = 0.02, *, settle: float = 0.0002) -> RxDrain:
        """Wait until every socket in the shared netns has an empty receive queue."""
        # /proc/PID/net lists the netns's sockets, which every member shares.
        for m in self.members:
            if not m.exited():
                return m.wait_rx_drained(timeout, settle=settle)
        raise ChainError(f"every member of chain {self.name} has died")

    def freeze(self, timeout: float = 2.0) -> None:
        """Freeze upstream-first, each member once what its upstream sent has been read."""
        try:
            for i, m in enumerate(self.members):
                if i > 0:
                    drained = m.wait_rx_drained(self.drain_timeout, own=True)
                    if not drained.drained:
                        log.warning(
                            "chain %s: %d bytes still queued for member %d at the cut; they "
                            "are not in the checkpoint",
                            self.name,
                            drained.pending_bytes,
                            i,
                        )
                m.freeze(timeout)
                self._frozen = i + 1
        except BaseException:
            self._thaw_frozen()
            raise

    def thaw(self, timeout: float = 2.0) -> None:
        """Thaw downstream-first, so a receiver runs before its sender does."""
        errors = self._thaw_frozen(timeout, every=True)
        if errors:
            raise FreezeError(f"chain {self.name}: " + "; ".join(errors))

    def _thaw_frozen(self, timeout: float = 2.0, *, every: bool = False) -> list[str]:
        errors = []
        count = len(self.members) if every else self._frozen
        for m in reversed(self.members[:count]):
            try:
                m.thaw(timeout)
            except (ContainerError, OSError) as exc:
                errors.append(str(exc))
        self._frozen = 0
        return errors

    def checkpoint(self, epoch: int, dest_dir: Path) -> ChainImage:
        """Dump every member into `dest_dir`, which appears only if all of them succeeded.

        The members are dumped at the same time (one CRIU each): the pause is the slowest
        dump, not their sum. A chain that is not frozen is frozen for the dump (one cut).
        """
        if dest_dir.exists():
            raise CheckpointError(
                f"{dest_dir} already exists; checkpoints are never overwritten, pick a new "
                "directory per epoch"
            )
        for i, m in enumerate(self.members):
            if m.exited():
                raise CheckpointError(
                    f"member {i} of chain {self.name} ({m.name}, pid {m.pid}) has died; "
                    "restore the chain"
                )
        hold = self._frozen == 0
        dest_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest_dir.parent / f".{dest_dir.name}.partial-{secrets.token_hex(4)}"
        tmp.mkdir(mode=0o700)
        ok = False
        try:
            if hold:
                self.freeze()
            try:
                images = self._dump_all(epoch, tmp)
            finally:
                if hold:
                    self.thaw()
            image = ChainImage(dest_dir, epoch, self.name, tuple(images))
            (tmp / CHAIN_META).write_text(json.dumps(image.to_json()))
            os.rename(tmp, dest_dir)
            ok = True
            return attrs.evolve(
                image,
                members=tuple(attrs.evolve(m, path=dest_dir / m.path.name) for m in image.members),
            )
        finally:
            if not ok:
                shutil.rmtree(tmp, ignore_errors=True)

    def _dump_all(self, epoch: int, tmp: Path) -> list[CheckpointImage]:
        if self._dumpers is None:
            self._dumpers = concurrent.futures.ThreadPoolExecutor(
                max_workers=len(self.members), thread_name_prefix=f"chain-{self.name}"
            )
        futures = [
            self._dumpers.submit(m.checkpoint, epoch, tmp / member_dir(i))
            for i, m in enumerate(self.members)
        ]
        # Every dump is waited for, even after one failed: they all write into `tmp`.
        concurrent.futures.wait(futures)
        errors = [
            f"member {i} ({self.members[i].name}): {f.exception()}"
            for i, f in enumerate(futures)
            if f.exception() is not None
        ]
        if errors:
            raise CheckpointError(
                f"checkpoint of chain {self.name} epoch {epoch} failed, so no member's image "
                f"is kept: {'; '.join(errors)}"
            )
        return [f.result() for f in futures]

    def prepare_checkpoint(self, *, wait: bool = True) -> None:
        for m in self.members:
            m.prepare_checkpoint(wait=wait)

    # -- the end -------------------------------------------------------------------------------

    def kill(self) -> None:
        """SIGKILL every member that still runs (the death of one is the death of the chain)."""
        errors = []
        for m in self.members:
            try:
                m.kill()
            except ContainerError as exc:
                errors.append(str(exc))
        if errors:
            raise ChainError(f"chain {self.name}: " + "; ".join(errors))

    def kill_survivors(self) -> list[int]:
        """Kill the members still running after one died; returns their PIDs.

        A chain lives and dies as one unit: the survivors would keep their sockets bound (the
        restored members need them) and keep sending what they still hold.
        """
        alive = [m for m in self.members if not m.exited()]
        self.kill()
        return [m.pid for m in alive]

    def stop(self, timeout: float = 5.0) -> None:
        """Stop every member, the first first (so nothing is sent to a stopped member)."""
        try:
            for m in self.members:
                m.stop(timeout)
        finally:
            self.destroy()

    def destroy(self) -> None:
        """Kill what runs, then remove every member's runc state, cgroups, bundle, work dir.

        Idempotent; every member is destroyed even if one of them fails.
        """
        errors = []
        for m in self.members:
            try:
                m.destroy()
            except (ContainerError, OSError) as exc:
                errors.append(str(exc))
        if self._dumpers is not None:
            self._dumpers.shutdown(wait=False)
            self._dumpers = None
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
        if errors:
            raise ChainError(f"destroying chain {self.name}: " + "; ".join(errors))


# --------------------------------------------------------------------------- the backend


@attrs.define(eq=False)
class ChainBackend:
    """Starts and restores chains on a `RuncBackend`; restores plain images too."""

    runc: RuncBackend

    def start(self, name: str, specs: Sequence[ContainerSpec]) -> Chain:
        """Start the members downstream-first (each is listening before its upstream sends).

        `specs` are upstream first; their names are replaced by `member_name(name, i)`.
        """
        check_members(specs)
        named = [attrs.evolve(s, name=member_name(name, i)) for i, s in enumerate(specs)]
        started: dict[int, Container] = {}
        try:
            for i in reversed(range(len(named))):
                started[i] = self.runc.start(named[i])
        except BaseException:
            _destroy_all(started.values())
            raise
        return Chain(name, tuple(started[i] for i in range(len(named))))

    def restore(
        self,
        image_dir: Path,
        netns: str,
        *,
        name: str | None = None,
        abort: Callable[[], bool] | None = None,
    ) -> Chain:
        """Restore every member of the chain checkpoint at `image_dir` into `netns`,
        downstream-first.

        The members are named `member_name(name, i)`. If any member fails to restore, the ones
        already restored are destroyed and the error names the member. `abort` is asked before
        each member after the first: True gives the restore up (`RestoreAbortedError`), the members
        already restored destroyed. A copy restored ahead for a peer that proved alive stops
        there instead of holding its thread for every member's restore.
        """
        image = ChainImage.load(image_dir)
        chain = name or image.name
        restored: dict[int, Container] = {}
        try:
            for i in reversed(range(len(image.members))):
                if restored and abort is not None and abort():
                    raise RestoreAbortedError(
                        f"restore of chain {chain} given up before member {i}; the members "
                        "already restored were destroyed"
                    )
                try:
                    restored[i] = self.runc.restore(
                        image.members[i].path, netns, name=member_name(chain, i)
                    )
                except ContainerError as exc:
                    raise RestoreError(
                        f"restore of chain {chain}: member {i} failed, the members already "
                        f"restored were destroyed: {exc}"
                    ) from exc
        except BaseException:
            _destroy_all(restored.values())
            raise
        return Chain(chain, tuple(restored[i] for i in range(len(image.members))))


def _destroy_all(containers: Iterable[Container]) -> None:
    """Destroy what a failed start or restore had made; its own error is what matters."""
    for c in containers:
        with contextlib.suppress(Exception):
            c.destroy()
