"""A step whose evaluation raises is isolated: retried later, never in a loop, and it
never fails the input that woke it."""

from __future__ import annotations

from typing import Any

import pytest

from tests.factories import T0, cart_add, consent, identify, minutes, ruleset
from triggers import engine
from triggers.engine import STEP_RETRY_FIRST, EnginePolicy, TimerFired, decide, evolve
from triggers.state import CustomerState

RULES = ruleset()
POLICY = EnginePolicy()


def with_cart() -> CustomerState:
    state = None
    for item in (identify(), consent("email"), cart_add()):
        state = decide(state, item, T0, RULES, POLICY, "c1").state
    assert state is not None
    return state


@pytest.fixture
def broken_channels(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Channel selection raises, as a bug would; the list counts the calls."""
    calls: list[int] = []

    def broken(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        raise RuntimeError("channel lookup broke")

    monkeypatch.setattr(engine, "candidates", broken)
    return calls


def test_a_failing_step_is_deferred_with_backoff_not_left_due(broken_channels: list[int]) -> None:
    state = with_cart()
    now = T0 + minutes(30)
    out = evolve(state, TimerFired(due_at=now), now, RULES, POLICY)
    journey = state.journeys["cart_abandonment|cart-1"]
    assert journey.due_at == now + STEP_RETRY_FIRST, "re-armed in the future, not the past"
    assert journey.failures == 1 and journey.next_step == 1
    assert out.actions == [] and state.sent_log == []
    assert [(d.outcome, d.reason) for d in out.decisions] == [("deferred", "step_error")]
    assert out.step_errors == [("cart_abandonment", "RuntimeError: channel lookup broke")]

    # Another tick at once evaluates nothing: no hot loop.
    evolve(state, TimerFired(due_at=now), now, RULES, POLICY)
    assert len(broken_channels) == 1
    # The next retry waits twice as long.
    later = now + STEP_RETRY_FIRST
    evolve(state, TimerFired(due_at=later), later, RULES, POLICY)
    assert state.journeys["cart_abandonment|cart-1"].due_at == later + 2 * STEP_RETRY_FIRST


def test_a_failing_step_does_not_fail_the_customers_later_events(
    broken_channels: list[int],
) -> None:
    state = with_cart()
    now = T0 + minutes(30)
    evolve(state, TimerFired(due_at=now), now, RULES, POLICY)
    out = evolve(state, cart_add(cart_id="cart-2", at=now), now, RULES, POLICY)
    assert out.applied and "cart-2" in state.carts
    assert "cart_abandonment|cart-2" in state.journeys


def test_a_failing_step_ends_as_expired_once_past_its_expiry(broken_channels: list[int]) -> None:
    state = with_cart()
    expired = T0 + minutes(30) + RULES.by_id["cart_abandonment"].rule.expires_after
    out = evolve(state, TimerFired(due_at=expired), expired + minutes(1), RULES, POLICY)
    assert ("suppressed", "expired") in [(d.outcome, d.reason) for d in out.decisions]


def test_the_step_runs_normally_once_the_fault_is_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    state = with_cart()
    now = T0 + minutes(30)
    real = engine.candidates
    monkeypatch.setattr(engine, "candidates", lambda *a, **k: (_ for _ in ()).throw(OSError()))
    evolve(state, TimerFired(due_at=now), now, RULES, POLICY)
    monkeypatch.setattr(engine, "candidates", real)
    retry = now + STEP_RETRY_FIRST
    out = evolve(state, TimerFired(due_at=retry), retry, RULES, POLICY)
    assert [(a.step, a.channel) for a in out.actions] == [(1, "email")]
    assert state.journeys["cart_abandonment|cart-1"].failures == 0


def test_decide_leaves_the_given_state_untouched_when_the_input_raises(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    state = with_cart()
    before = state.model_dump()

    def broken_start(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(engine, "_start_journeys", broken_start)
    with pytest.raises(RuntimeError):
        decide(state, cart_add(cart_id="cart-2"), T0, RULES, POLICY, "c1")
    assert state.model_dump() == before
