"""Where to place a unit's standby.

A remote standby covers a host failure, so it must never share the primary's host. A local
standby covers an NF crash only, so it must be on the primary's host. Among the hosts that fit,
the least loaded wins: fewest units hosted, then most free memory, then the host name, so that
every agent given the same facts picks the same host.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

__all__ = ["HostFacts", "Placement", "StandbyNeed", "choose_standby"]


@attrs.frozen
class HostFacts:
    name: str
    alive: bool
    free_mem_bytes: int
    units_hosted: int
    same_host_as_primary: bool


@attrs.frozen
class StandbyNeed:
    mem_bytes: int
    remote: bool = True
    # Hosts ruled out by the caller, e.g. one that just failed a re-protection attempt.
    exclude: frozenset[str] = frozenset()


@attrs.frozen
class Placement:
    host: str | None
    reason: str
    # Why each host that was not chosen was unfit, in candidate order; for `hamgr` to show.
    rejected: tuple[tuple[str, str], ...] = ()


def _unfit(host: HostFacts, need: StandbyNeed) -> str | None:
    if host.name in need.exclude:
        return "excluded"
    if not host.alive:
        return "not alive"
    if need.remote and host.same_host_as_primary:
        return "primary's host cannot hold a remote standby"
    if not need.remote and not host.same_host_as_primary:
        return "a local standby must be on the primary's host"
    if host.free_mem_bytes < need.mem_bytes:
        return f"{host.free_mem_bytes} bytes free, needs {need.mem_bytes}"
    return None


def choose_standby(candidates: Iterable[HostFacts], need: StandbyNeed) -> Placement:
    fit: list[HostFacts] = []
    rejected: list[tuple[str, str]] = []
    for host in candidates:
        why = _unfit(host, need)
        if why is None:
            fit.append(host)
        else:
            rejected.append((host.name, why))
    if not fit:
        kind = "remote" if need.remote else "local"
        if not rejected:
            return Placement(None, f"no candidate hosts for a {kind} standby")
        return Placement(
            None, f"no host fits a {kind} standby ({len(rejected)} rejected)", tuple(rejected)
        )
    best = min(fit, key=lambda h: (h.units_hosted, -h.free_mem_bytes, h.name))
    return Placement(
        best.name,
        f"least loaded: {best.units_hosted} units, {best.free_mem_bytes} bytes free",
        tuple(rejected),
    )
