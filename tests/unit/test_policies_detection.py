"""When missed probes become a declared failure (policies/detection.py)."""

from __future__ import annotations

import pytest

from policies import (
    AgentCheck,
    Dampening,
    DetectionPolicy,
    ProbeFacts,
    StandbyWatch,
    Verdict,
    assess,
    dampened,
    record_dispute,
)

POLICY = DetectionPolicy(interval_us=1_000, misses=3, hold_down_us=5_000, confirm_window_us=4_000)


def test_defaults_and_keepalived_meanings() -> None:
    policy = DetectionPolicy()
    assert (policy.interval_us, policy.misses) == (1_000, 3)
    assert policy.timeout_us == 3_000
    assert POLICY.max_detection_us == 7_000
    with pytest.raises(ValueError, match=">= 200"):
        DetectionPolicy(interval_us=199)
    assert DetectionPolicy(interval_us=200).interval_us == 200
    with pytest.raises(ValueError, match="misses must be > 0"):
        DetectionPolicy(misses=0)


def test_fewer_than_n_misses_is_alive() -> None:
    decision = assess(POLICY, ProbeFacts(now_us=2_900, last_reply_us=0, consecutive_misses=2))
    assert decision.verdict is Verdict.ALIVE
    assert not decision.ask_agent


def test_n_misses_make_a_suspect_and_ask_the_agent() -> None:
    decision = assess(POLICY, ProbeFacts(3_000, 0, 3))
    assert decision.verdict is Verdict.SUSPECT
    assert decision.ask_agent
    assert decision.wake_at_us == 7_000


def test_a_short_burst_is_held_down_even_if_the_agent_cannot_tell() -> None:
    # A stalled prober counted 5 misses within 3.5 ms; even a failing agent check (a loaded
    # host answers late too) must wait for the hold-down.
    facts = ProbeFacts(3_500, 0, 5, AgentCheck.DEAD, agent_asked_us=3_000)
    decision = assess(POLICY, facts)
    assert decision.verdict is Verdict.SUSPECT
    assert decision.wake_at_us == 5_000
    assert "hold-down" in decision.reason


def test_a_long_silence_confirmed_by_the_agent_fails() -> None:
    facts = ProbeFacts(5_000, 0, 5, AgentCheck.DEAD, agent_asked_us=3_000)
    decision = assess(POLICY, facts)
    assert decision.verdict is Verdict.FAILED
    assert "agent's check fails" in decision.reason


def test_an_unanswered_agent_check_confirms_after_its_window() -> None:
    pending = ProbeFacts(6_999, 0, 7, AgentCheck.PENDING, agent_asked_us=3_000)
    assert assess(POLICY, pending).verdict is Verdict.SUSPECT
    assert assess(POLICY, pending).wake_at_us == 7_000
    timed_out = ProbeFacts(7_000, 0, 7, AgentCheck.PENDING, agent_asked_us=3_000)
    decision = assess(POLICY, timed_out)
    assert decision.verdict is Verdict.FAILED
    assert "timed out" in decision.reason


def test_an_agent_that_sees_the_peer_alive_vetoes_failover() -> None:
    facts = ProbeFacts(20_000, 0, 20, AgentCheck.ALIVE, agent_asked_us=18_000)
    decision = assess(POLICY, facts)
    assert decision.verdict is Verdict.DISPUTED
    # The answer stands for disputed_recheck_us (300 ms), not one window: a check that used
    # its whole window would otherwise answer already expired, and be asked again at once.
    assert decision.wake_at_us == 318_000
    still = assess(POLICY, ProbeFacts(22_000, 0, 22, AgentCheck.ALIVE, agent_asked_us=18_000))
    assert still.verdict is Verdict.DISPUTED
    # Then it expires: the agent is asked again.
    later = assess(POLICY, ProbeFacts(318_000, 0, 318, AgentCheck.ALIVE, agent_asked_us=18_000))
    assert later.verdict is Verdict.SUSPECT
    assert later.ask_agent


def test_an_agent_answer_from_before_the_silence_does_not_count() -> None:
    facts = ProbeFacts(10_000, 2_000, 8, AgentCheck.DEAD, agent_asked_us=1_000)
    decision = assess(POLICY, facts)
    assert decision.verdict is Verdict.SUSPECT
    assert decision.ask_agent


def test_a_reply_resets_everything() -> None:
    facts = ProbeFacts(50_000, 49_900, 0, AgentCheck.DEAD, agent_asked_us=10_000)
    assert assess(POLICY, facts).verdict is Verdict.ALIVE


def test_each_dispute_doubles_hold_down_and_window_up_to_the_cap() -> None:
    p = DetectionPolicy(hold_down_us=5_000, confirm_window_us=30_000, dampen_max_us=500_000)
    d = Dampening()
    assert dampened(p, d, 0) is p
    seen = []
    for i in range(8):
        d = record_dispute(p, d, i * 1_000)
        q = dampened(p, d, i * 1_000)
        seen.append((q.hold_down_us, q.confirm_window_us))
    assert seen == [
        (10_000, 60_000),
        (20_000, 120_000),
        (40_000, 240_000),
        (80_000, 480_000),
        (160_000, 500_000),
        (320_000, 500_000),
        (500_000, 500_000),
        (500_000, 500_000),  # the level stops growing once both are capped
    ]
    assert d.level == 7
    # The probes' own knobs never change.
    assert (q.interval_us, q.misses) == (p.interval_us, p.misses)


def test_dampening_decays_one_doubling_per_quiet_period_and_can_be_turned_off() -> None:
    p = DetectionPolicy(confirm_window_us=5_000, dampen_decay_us=1_000_000)
    d = record_dispute(p, record_dispute(p, Dampening(), 0), 10)
    assert dampened(p, d, 10).confirm_window_us == 20_000
    assert dampened(p, d, 1_000_009).confirm_window_us == 20_000
    assert dampened(p, d, 1_000_010).confirm_window_us == 10_000
    assert dampened(p, d, 2_000_010) is p
    # A dispute after some decay builds on what is left.
    assert dampened(p, record_dispute(p, d, 1_500_000), 1_500_000).confirm_window_us == 20_000
    off = DetectionPolicy(dampen_max_us=0)
    assert record_dispute(off, Dampening(), 5) == Dampening()
    assert dampened(off, Dampening(3, 0), 1) is off


# --- a primary's watch of its standby -----------------------------------------------------


def test_a_standby_that_answers_is_disputed_once_and_checked_again_while_silent() -> None:
    policy = DetectionPolicy(
        confirm_window_us=30_000,
        hold_down_us=5_000,
        dampen_max_us=60_000,
        disputed_recheck_us=300_000,
    )
    watch = StandbyWatch(policy)
    assert watch.window_us(0) == 30_000
    assert watch.answered(True, 1_000, 30_000) is Verdict.DISPUTED
    # The dispute dampened the next window; the silence is checked again 300 ms later.
    assert watch.window_us(2_000) == 60_000
    assert not watch.due(300_999)
    assert watch.due(301_000)
    assert not watch.due(301_001)  # once per recheck
    # Alive again in the same silence: no second dispute (no second event, no more dampening).
    assert watch.answered(True, 362_000, 60_000) is Verdict.SUSPECT
    assert watch.due(662_000)
    # It died meanwhile: lost, and nothing more to check.
    assert watch.answered(False, 93_000, 60_000) is Verdict.FAILED
    assert not watch.due(10**9)


def test_probes_coming_back_end_the_silence() -> None:
    watch = StandbyWatch(DetectionPolicy(confirm_window_us=30_000, hold_down_us=5_000))
    assert watch.answered(True, 0, 30_000) is Verdict.DISPUTED
    watch.heard()
    assert not watch.due(10**9)
    # The next silence is a new one: its first alive answer is a dispute again.
    assert watch.answered(True, 100_000, 60_000) is Verdict.DISPUTED


def test_a_standby_being_seeded_starts_dampened() -> None:
    policy = DetectionPolicy(confirm_window_us=5_000, hold_down_us=5_000, dampen_max_us=60_000)
    watch = StandbyWatch(policy)
    watch.busy(0)
    assert watch.window_us(0) == 20_000  # two doublings
    assert watch.window_us(2 * policy.dampen_decay_us) == 5_000  # decayed
