"""A unit's NF as an agent starts, prepares and restores it: one container, or the chain of
containers a spec's ``[[chain]]`` tables describe (`shim.chain`).

Every function takes the container spec of the unit's first NF (``[nf]``, as the agent builds it:
name, netns, cgroup parent) and derives the other members from the spec's ``[[chain]]`` tables:
same netns and cgroup parent, their own image, args and env.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import attrs

from hamgr.unitspec import ChainMemberSpec, UnitSpec
from shim.chain import CHAIN_META, ChainBackend
from shim.container import RuncBackend
from shim.local_failover import ProtectedNf
from shim.oci import ContainerSpec

__all__ = ["prepare_unit_images", "restore_unit_nf", "start_unit_nf", "unit_container_specs"]


def _image(member: ChainMemberSpec) -> Path:
    if member.builtin:
        from hamgr.nfs import images

        return images.build_image(member.image)
    return Path(member.image)


def unit_container_specs(spec: UnitSpec, first: ContainerSpec) -> list[ContainerSpec]:
    """`first`, then one container spec per ``[[chain]]`` table, upstream first."""
    return [
        first,
        *(
            attrs.evolve(
                first,
                name=f"{first.name}-{i + 1}",
                image=_image(m),
                image_ref=m.image_ref,
                args=m.args,
                env=m.env,
            )
            for i, m in enumerate(spec.chain)
        ),
    ]


def start_unit_nf(backend: RuncBackend, spec: UnitSpec, first: ContainerSpec) -> ProtectedNf:
    """Start the unit's NF (a chain when the spec has ``[[chain]]`` tables), its first dump
    prepared so that it pauses no longer than the others."""
    nf: ProtectedNf
    if spec.chain:
        chain = ChainBackend(backend).start(first.name, unit_container_specs(spec, first))
        chain.prepare_checkpoint()
        nf = chain
    else:
        container = backend.start(first)
        container.prepare_checkpoint()
        nf = container
    return nf


def prepare_unit_images(backend: RuncBackend, spec: UnitSpec, first: ContainerSpec) -> None:
    """Unpack every member's image ahead (a standby, when it is prepared): a takeover's
    restores then find them ready (`RuncBackend.prepare_image`)."""
    for cspec in unit_container_specs(spec, first):
        backend.prepare_image(cspec)


def restore_unit_nf(
    backend: RuncBackend,
    image: Path,
    netns: str,
    *,
    name: str,
    abort: Callable[[], bool] | None = None,
) -> ProtectedNf:
    """Restore the checkpoint at `image` into `netns`: every member of a chain image, or the
    one container of a plain image. `abort`: see `ChainBackend.restore` (a chain's only)."""
    if (image / CHAIN_META).exists():
        return ChainBackend(backend).restore(image, netns, name=name, abort=abort)
    return backend.restore(image, netns, name=name)
