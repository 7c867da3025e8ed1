"""Stall or run unprotected when the standby is gone (policies/standby_loss.py)."""

from __future__ import annotations

from policies import StandbyLossAction, StandbyLossFacts, StandbyLossPolicy, on_standby_loss

FACTS = StandbyLossFacts(unit="nat0", held_epochs=3, cause="probes")


def test_the_default_stalls_and_keeps_output_held() -> None:
    decision = on_standby_loss(StandbyLossPolicy(), FACTS)
    assert decision.action is StandbyLossAction.STALL
    assert not decision.release_held
    assert decision.protected
    assert "output stalled" in decision.alarm
    assert "nat0" in decision.alarm


def test_run_unprotected_releases_and_says_so() -> None:
    decision = on_standby_loss(StandbyLossPolicy(StandbyLossAction.RUN_UNPROTECTED), FACTS)
    assert decision.release_held
    assert not decision.protected
    assert "UNPROTECTED" in decision.alarm
    assert "3 held epochs released without commit" in decision.alarm
