"""How many epochs may be in flight and when to back-pressure (policies/inflight.py)."""

from __future__ import annotations

import pytest

from policies import (
    DEFAULT_BUDGET_BYTES,
    DEFAULT_MAX_INFLIGHT,
    InflightFacts,
    InflightPolicy,
    back_pressure,
    may_start_epoch,
)


def test_defaults() -> None:
    policy = InflightPolicy()
    assert policy.max_inflight == DEFAULT_MAX_INFLIGHT
    assert policy.budget_bytes == DEFAULT_BUDGET_BYTES == 64 * 1024 * 1024
    assert policy.resume_bytes == 48 * 1024 * 1024


def test_at_most_k_epochs_start() -> None:
    policy = InflightPolicy(max_inflight=2)
    assert may_start_epoch(policy, 0)
    assert may_start_epoch(policy, 1)
    assert not may_start_epoch(policy, 2)
    assert not may_start_epoch(policy, 3)


@pytest.mark.parametrize("paused", [False, True])
def test_k_in_flight_pauses_ingress_and_fewer_resumes_it(paused: bool) -> None:
    policy = InflightPolicy(max_inflight=3, budget_bytes=1_000)
    assert back_pressure(policy, InflightFacts(3, 0, paused)).on
    assert not back_pressure(policy, InflightFacts(2, 0, paused)).on


def test_the_byte_budget_pauses_and_the_low_water_mark_resumes() -> None:
    policy = InflightPolicy(max_inflight=8, budget_bytes=1_000, resume_bytes=600)
    assert not back_pressure(policy, InflightFacts(1, 999, paused=False)).on
    on = back_pressure(policy, InflightFacts(1, 1_000, paused=False))
    assert on.on
    assert "budget 1000" in on.reason
    assert back_pressure(policy, InflightFacts(1, 700, paused=True)).on
    assert not back_pressure(policy, InflightFacts(1, 599, paused=True)).on
    assert not back_pressure(policy, InflightFacts(1, 700, paused=False)).on


def test_nonsense_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="max_inflight must be > 0"):
        InflightPolicy(max_inflight=0)
    with pytest.raises(ValueError, match="resume_bytes 101 > budget_bytes 100"):
        InflightPolicy(budget_bytes=100, resume_bytes=101)
