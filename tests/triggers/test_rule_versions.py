"""A journey keeps the rule version it started with, whatever rules are loaded later."""

from __future__ import annotations

from typing import Any

from tests.factories import CART_RULE, T0, cart_add, consent, identify, minutes, ruleset
from triggers.engine import EnginePolicy, TimerFired, decide
from triggers.state import CustomerState

POLICY = EnginePolicy()
# The same rule, edited: one step only, and another template.
CART_RULE_V2: dict[str, Any] = {
    **CART_RULE,
    "steps": [{"after": "30m", "channels": ["email"], "template": "cart_reminder_v2"}],
}


def started_under_v1() -> CustomerState:
    rules = ruleset(CART_RULE)
    state = None
    for item in (identify(), consent("email"), cart_add()):
        state = decide(state, item, T0, rules, POLICY, "c1").state
    assert state is not None
    return state


def timer(minute: float) -> tuple[TimerFired, Any]:
    return TimerFired(due_at=T0 + minutes(minute)), T0 + minutes(minute)


def test_a_worker_with_only_the_new_version_loaded_runs_the_old_journeys_steps() -> None:
    state = started_under_v1()
    v1 = ruleset(CART_RULE).by_id["cart_abandonment"].version
    # A restarted worker: it has loaded v2 and never saw v1.
    v2_only = ruleset(CART_RULE_V2)
    assert v1 not in v2_only.by_version

    result = decide(state, *timer(30), v2_only, POLICY, "c1")
    result = decide(result.state, *timer(24 * 60), v2_only, POLICY, "c1")
    first = decide(state, *timer(30), v2_only, POLICY, "c1").actions
    assert [(a.step, a.template, a.rule_version) for a in first] == [
        (1, "cart_reminder_1", v1)
    ]
    # v1's second step, which v2 does not have (before: IndexError, dead-lettered).
    assert [(a.step, a.template, a.payload.get("coupon"), a.rule_version)
            for a in result.actions] == [(2, "cart_reminder_2", "CART10", v1)]
    assert result.state.journeys == {}
    assert result.state.rule_versions == {}, "no definition kept once no journey uses it"


def test_new_journeys_start_on_the_loaded_version_beside_old_ones() -> None:
    state = started_under_v1()
    v2_only = ruleset(CART_RULE_V2)
    v2 = v2_only.by_id["cart_abandonment"].version
    result = decide(state, cart_add(cart_id="cart-2"), T0 + minutes(1), v2_only, POLICY, "c1")
    versions = {j.key: j.rule_version for j in result.state.journeys.values()}
    assert versions["cart-2"] == v2 and versions["cart-1"] != v2
    assert set(result.state.rule_versions) == set(versions.values())
    result = decide(result.state, *timer(31), v2_only, POLICY, "c1")
    assert sorted((a.journey_key, a.template) for a in result.actions) == [
        ("cart-1", "cart_reminder_1"), ("cart-2", "cart_reminder_v2")
    ]


def test_the_stored_definition_survives_serialization() -> None:
    state = started_under_v1()
    restored = CustomerState.model_validate_json(state.model_dump_json(exclude_defaults=True))
    result = decide(restored, *timer(30), ruleset(CART_RULE_V2), POLICY, "c1")
    assert [a.template for a in result.actions] == ["cart_reminder_1"]


def test_a_version_found_nowhere_ends_the_journey_with_a_decision() -> None:
    state = started_under_v1()
    state.rule_versions.clear()  # as in a state written before versions were stored
    result = decide(state, *timer(30), ruleset(CART_RULE_V2), POLICY, "c1")
    assert result.actions == []
    assert [(d.outcome, d.reason) for d in result.decisions] == [
        ("cancelled", "rule_version_missing")
    ]
    assert result.state.journeys == {}


def test_a_definition_that_does_not_hash_to_its_version_is_not_run() -> None:
    state = started_under_v1()
    [version] = state.rule_versions
    state.rule_versions[version] = state.rule_versions[version].replace(
        "cart_reminder_1", "tampered"
    )
    result = decide(state, *timer(30), ruleset(CART_RULE_V2), POLICY, "c1")
    assert [(d.outcome, d.reason) for d in result.decisions] == [
        ("cancelled", "rule_version_missing")
    ]
