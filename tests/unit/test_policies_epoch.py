"""When to close an epoch (policies/epoch.py), and that policies/ stays pure."""

from __future__ import annotations

import ast
import random
from collections.abc import Callable
from pathlib import Path

import pytest

import policies
from policies import (
    AdaptiveEpoch,
    CheckpointRetry,
    CommitSample,
    EpochFacts,
    EpochVerdict,
    FixedEpoch,
    added_latency_us,
    decide,
    epoch_length_us,
    next_retry,
    observe,
)


def facts(
    *,
    now: int = 5_000,
    started: int = 0,
    pkts: int = 1,
    inflight: int = 0,
    k: int = 4,
    retry_at: int | None = None,
) -> EpochFacts:
    return EpochFacts(now, started, pkts, inflight, k, retry_at)


def test_an_idle_unit_never_closes_an_epoch() -> None:
    for now in (0, 10**3, 10**9):
        decision = decide(FixedEpoch(1_000), facts(now=now, pkts=0))
        assert decision.verdict is EpochVerdict.IDLE
        assert not decision.close
        assert decision.wake_at_us is None


def test_waiting_output_closes_once_the_length_has_elapsed() -> None:
    policy = FixedEpoch(1_000)
    early = decide(policy, facts(now=999, started=0))
    assert early.verdict is EpochVerdict.TOO_EARLY
    assert early.wake_at_us == 1_000
    assert decide(policy, facts(now=1_000, started=0)).close


def test_at_k_in_flight_nothing_closes() -> None:
    decision = decide(FixedEpoch(1_000), facts(inflight=4, k=4))
    assert decision.verdict is EpochVerdict.INFLIGHT_FULL
    assert decide(FixedEpoch(1_000), facts(inflight=3, k=4)).close


def test_a_pending_retry_waits_for_its_backoff() -> None:
    decision = decide(FixedEpoch(1_000), facts(now=5_000, retry_at=6_000))
    assert decision.verdict is EpochVerdict.BACKING_OFF
    assert decision.wake_at_us == 6_000
    assert decide(FixedEpoch(1_000), facts(now=6_000, retry_at=6_000)).close


def test_added_latency_is_half_an_epoch_plus_pause_plus_commit() -> None:
    assert added_latency_us(2_000, 100, 400) == 1_500


def test_a_fixed_epoch_ignores_observations() -> None:
    policy = FixedEpoch(1_000)
    assert observe(policy, CommitSample(10, 10**6)) is policy


def test_an_adaptive_epoch_shrinks_when_over_target_and_grows_when_under() -> None:
    policy = AdaptiveEpoch(target_added_latency_us=2_000, min_us=200, max_us=10_000)
    assert epoch_length_us(policy) == 200
    slow = CommitSample(pause_us=100, commit_latency_us=1_500)  # ideal 2*(2000-1600) = 800
    fast = CommitSample(pause_us=50, commit_latency_us=150)  # ideal 3600
    grown = observe(policy, fast)
    assert grown.length_us > policy.length_us
    for _ in range(30):
        grown = observe(grown, fast)
    assert grown.length_us == pytest.approx(3_600, abs=2)
    shrunk = observe(grown, slow)
    assert shrunk.length_us < grown.length_us
    for _ in range(30):
        shrunk = observe(shrunk, slow)
    assert shrunk.length_us == pytest.approx(800, abs=2)
    assert added_latency_us(shrunk.length_us, 100, 1_500) == pytest.approx(2_000, abs=2)


def test_an_adaptive_epoch_stays_within_its_bounds() -> None:
    rng = random.Random(7)
    policy: FixedEpoch | AdaptiveEpoch = AdaptiveEpoch(1_000, 300, 3_000)
    for _ in range(500):
        sample = CommitSample(rng.randrange(0, 2_000), rng.randrange(0, 50_000))
        policy = observe(policy, sample)
        assert 300 <= policy.length_us <= 3_000
    # A commit slower than the whole target pins the length at the minimum.
    assert observe(policy, CommitSample(0, 10**6)).length_us == 300
    assert observe(policy, CommitSample(0, 0)).length_us > 300


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda: FixedEpoch(0), "length_us must be > 0"),
        (lambda: AdaptiveEpoch(1_000, 500, 400), "min_us 500 > max_us 400"),
        (lambda: AdaptiveEpoch(1_000, 100, 400, gain=0.0), "gain must be in"),
        (lambda: AdaptiveEpoch(1_000, 100, 400, length_us=401), "outside"),
        (lambda: EpochFacts(0, 0, -1, 0, 1), "buffered_pkts must be >= 0"),
        (lambda: CommitSample(-1, 0), "pause_us must be >= 0"),
    ],
)
def test_nonsense_settings_are_refused(make: Callable[[], object], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        make()


def test_retries_back_off_exponentially_up_to_a_cap() -> None:
    retry = CheckpointRetry(backoff_us=1_000, max_backoff_us=5_000, alarm_after=3)
    assert [next_retry(retry, n, 0).at_us for n in range(1, 6)] == [
        1_000,
        2_000,
        4_000,
        5_000,
        5_000,
    ]
    assert next_retry(retry, 10_000, 7).at_us == 5_007


def test_a_failure_run_raises_one_alarm() -> None:
    retry = CheckpointRetry(alarm_after=3)
    assert [next_retry(retry, n, 0).alarm for n in range(1, 6)] == [
        False,
        False,
        True,
        False,
        False,
    ]
    with pytest.raises(ValueError, match="consecutive_failures must be >= 1"):
        next_retry(retry, 0, 0)


def test_policies_import_nothing_from_the_project() -> None:
    others = {"shim", "hamgr", "dpdk_vhost", "tests"}
    for path in Path(policies.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in others, f"{path.name} imports {name}"
