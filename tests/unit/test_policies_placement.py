"""Where a unit's standby goes (policies/placement.py)."""

from __future__ import annotations

import random

from policies import HostFacts, StandbyNeed, choose_standby

GIB = 1 << 30


def host(
    name: str, *, alive: bool = True, free: int = 8 * GIB, units: int = 0, primary: bool = False
) -> HostFacts:
    return HostFacts(name, alive, free, units, primary)


def test_a_remote_standby_never_goes_to_the_primarys_host() -> None:
    hosts = [host("h1", primary=True, units=0, free=64 * GIB), host("h2", units=5)]
    assert choose_standby(hosts, StandbyNeed(GIB)).host == "h2"
    placement = choose_standby([hosts[0]], StandbyNeed(GIB))
    assert placement.host is None
    assert placement.rejected == (("h1", "primary's host cannot hold a remote standby"),)


def test_a_local_standby_only_goes_to_the_primarys_host() -> None:
    hosts = [host("h1", primary=True, units=9), host("h2")]
    assert choose_standby(hosts, StandbyNeed(GIB, remote=False)).host == "h1"


def test_the_least_loaded_host_wins_then_the_most_free_memory() -> None:
    hosts = [host("a", units=3), host("b", units=1, free=2 * GIB), host("c", units=1, free=4 * GIB)]
    placement = choose_standby(hosts, StandbyNeed(GIB))
    assert placement.host == "c"
    assert "1 units" in placement.reason


def test_ties_break_by_name_whatever_the_order() -> None:
    hosts = [host(n) for n in ("h3", "h1", "h2")]
    rng = random.Random(3)
    for _ in range(10):
        rng.shuffle(hosts)
        assert choose_standby(hosts, StandbyNeed(GIB)).host == "h1"


def test_dead_full_and_excluded_hosts_do_not_fit() -> None:
    hosts = [host("dead", alive=False), host("full", free=GIB // 2), host("bad")]
    placement = choose_standby(hosts, StandbyNeed(GIB, exclude=frozenset({"bad"})))
    assert placement.host is None
    assert "no host fits a remote standby" in placement.reason
    assert dict(placement.rejected) == {
        "dead": "not alive",
        "full": f"{GIB // 2} bytes free, needs {GIB}",
        "bad": "excluded",
    }


def test_no_candidates_says_so() -> None:
    placement = choose_standby([], StandbyNeed(GIB))
    assert placement.host is None
    assert placement.reason == "no candidate hosts for a remote standby"
