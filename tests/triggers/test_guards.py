"""Quiet hours, frequency caps, holdouts, variants, reentry and stale events."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tests.factories import (
    CART_RULE,
    NO_GUARDS,
    cart_add,
    consent,
    event,
    identify,
    minutes,
    ruleset,
)
from tests.triggers.timeline import Timeline
from triggers.guards import in_holdout, pick_variant, quiet_until, stable_fraction

SEOUL_MORNING = datetime(2026, 3, 2, 1, 0, tzinfo=UTC)  # 10:00 in Seoul
ONE_STEP = {**CART_RULE, "steps": [CART_RULE["steps"][0]]}


def email_customer(t: Timeline, at: datetime, **traits: str) -> None:
    t.send(identify(at=at, **traits))
    t.send(consent("email", at=at))


def test_quiet_hours_defer_to_the_end_of_the_window_in_the_customer_timezone() -> None:
    from schemas.rules import QuietHours

    window = QuietHours.model_validate("21:00-08:00")
    # 22:30 in New York (EST, UTC-5) on 2 March 2026.
    now = datetime(2026, 3, 3, 3, 30, tzinfo=UTC)
    assert quiet_until(window, now, "America/New_York") == datetime(2026, 3, 3, 13, 0, tzinfo=UTC)
    assert quiet_until(window, now, "Asia/Seoul") is None  # 12:30 in Seoul


def test_a_marketing_step_due_at_night_waits_for_the_morning_in_new_york() -> None:
    rules = ruleset(ONE_STEP, policy={})
    t = Timeline(rules)
    evening = datetime(2026, 3, 3, 2, 0, tzinfo=UTC)  # 21:00 New York
    t.send(identify(at=evening, email="ny@example.com"))
    t.send(identify(at=evening, email=None))  # no-op identify: traits stay
    from tests.factories import event

    t.send(event("identify", {"traits": {"timezone": "America/New_York"}}, at=evening))
    t.send(consent("email", at=evening))
    t.send(cart_add(at=evening))
    t.advance(evening + timedelta(hours=12))
    actions, decisions = t.of("cart_abandonment")
    morning = datetime(2026, 3, 3, 13, 0, tzinfo=UTC)  # 08:00 New York
    assert [(d.outcome, d.reason, d.until) for d in decisions] == [
        ("deferred", "quiet_hours", morning), ("fired", None, None)
    ]
    assert actions[0].created_at == morning
    assert actions[0].due_at == evening + timedelta(minutes=30)


def test_quiet_hours_past_expiry_suppress_the_step() -> None:
    rule = {**ONE_STEP, "expires_after": "1h"}
    t = Timeline(ruleset(rule, policy={}))
    night = datetime(2026, 3, 2, 13, 0, tzinfo=UTC)  # 22:00 in Seoul
    email_customer(t, night)
    t.send(cart_add(at=night))
    t.advance(night + timedelta(days=1))
    assert [(d.outcome, d.reason) for d in t.decisions] == [
        ("suppressed", "quiet_hours_expired")
    ]
    assert t.actions == []


def test_transactional_messages_ignore_quiet_hours_and_caps() -> None:
    confirm = {
        "id": "order_confirmation",
        "category": "transactional",
        "trigger": {"event": "order.completed"},
        "steps": [{"after": "0s", "channels": ["email"], "template": "order_confirmation"}],
    }
    from tests.factories import order

    t = Timeline(ruleset(confirm, policy={"caps": {"total": {"limit": 0}}}))
    night = datetime(2026, 3, 2, 15, 0, tzinfo=UTC)  # midnight in Seoul
    t.send(identify(at=night))
    for i in range(3):
        t.send(order(cart_id=None, at=night + minutes(i)))
    assert len(t.actions) == 3


def test_caps_limit_marketing_per_channel_and_across_channels() -> None:
    # Three one-step rules on different carts, all due at once, caps 2 total / 1 per channel.
    rules = ruleset(ONE_STEP, policy={"quiet_hours": None,
                                      "caps": {"total": {"limit": 2, "window": "24h"}}})
    t = Timeline(rules)
    email_customer(t, SEOUL_MORNING)
    from tests.factories import device

    t.send(device(at=SEOUL_MORNING))
    t.send(consent("push", at=SEOUL_MORNING))
    for cart in ("A", "B", "C"):
        t.send(cart_add(cart, at=SEOUL_MORNING))
    t.advance(SEOUL_MORNING + minutes(31))
    assert sorted(a.channel for a in t.actions) == ["email", "push"], "one per channel"
    assert [d.reason for d in t.decisions if d.outcome == "suppressed"] == ["frequency_cap"]


def test_on_cap_defer_sends_when_the_window_allows() -> None:
    rules = ruleset(ONE_STEP, policy={"quiet_hours": None, "on_cap": "defer"})
    t = Timeline(rules)
    email_customer(t, SEOUL_MORNING)
    t.send(cart_add("A", at=SEOUL_MORNING))
    t.send(cart_add("B", at=SEOUL_MORNING + minutes(10)))
    t.advance(SEOUL_MORNING + timedelta(days=2))
    first, second = t.actions
    assert second.created_at == first.created_at + timedelta(hours=24)
    deferred = [d for d in t.decisions if d.outcome == "deferred"]
    assert [(d.reason, d.until) for d in deferred] == [("frequency_cap", second.created_at)]


def test_priority_wins_when_caps_force_a_choice() -> None:
    low = {**ONE_STEP, "id": "low", "priority": 1}
    high = {**ONE_STEP, "id": "high", "priority": 5}
    t = Timeline(ruleset(low, high, policy={"quiet_hours": None}))
    email_customer(t, SEOUL_MORNING)
    t.send(cart_add(at=SEOUL_MORNING))
    t.advance(SEOUL_MORNING + minutes(31))
    assert [a.rule_id for a in t.actions] == ["high"]
    assert [(d.rule_id, d.reason) for d in t.decisions if d.outcome == "suppressed"] == [
        ("low", "frequency_cap")
    ]


def test_holdout_groups_are_stable_and_close_to_the_fraction() -> None:
    customers = [f"c{i}" for i in range(20_000)]
    held = [c for c in customers if in_holdout(0.1, "cart_abandonment", c)]
    assert 0.09 < len(held) / len(customers) < 0.11
    assert held == [c for c in customers if in_holdout(0.1, "cart_abandonment", c)]
    assert stable_fraction("x", "c1") == stable_fraction("x", "c1")


def test_rule_holdout_customers_get_a_held_out_decision_and_no_action() -> None:
    customer = next(
        c for c in (f"c{i}" for i in range(1000)) if in_holdout(0.5, "cart_abandonment", c)
    )
    from triggers.engine import new_state

    t = Timeline(ruleset({**ONE_STEP, "holdout": 0.5}), state=new_state(customer))
    email_customer(t, SEOUL_MORNING)
    t.send(cart_add(at=SEOUL_MORNING))
    t.advance(SEOUL_MORNING + minutes(31))
    assert t.actions == []
    assert [(d.outcome, d.group) for d in t.decisions] == [("held_out", "rule:cart_abandonment")]


def test_global_holdout_applies_before_rule_holdouts() -> None:
    customer = next(c for c in (f"c{i}" for i in range(1000)) if in_holdout(0.5, "global", c))
    from triggers.engine import new_state

    t = Timeline(ruleset(ONE_STEP, policy={**NO_GUARDS, "holdout": 0.5}),
                 state=new_state(customer))
    email_customer(t, SEOUL_MORNING)
    t.send(cart_add(at=SEOUL_MORNING))
    t.advance(SEOUL_MORNING + minutes(31))
    assert [(d.outcome, d.group) for d in t.decisions] == [("held_out", "global")]


def test_variants_are_sticky_weighted_and_override_the_template() -> None:
    from schemas.rules import Variant

    variants = {"a": Variant(weight=1), "b": Variant(weight=3, template="cart_b")}
    picks = [pick_variant("r", variants, f"c{i}") for i in range(8000)]
    assert 0.72 < picks.count("b") / len(picks) < 0.78
    assert picks == [pick_variant("r", variants, f"c{i}") for i in range(8000)]

    rule = {**ONE_STEP, "variants": {"a": {"weight": 1}, "b": {"weight": 1, "template": "cart_b",
                                                                 "payload": {"tone": "warm"}}}}
    t = Timeline(ruleset(rule))
    email_customer(t, SEOUL_MORNING)
    t.send(cart_add(at=SEOUL_MORNING))
    t.advance(SEOUL_MORNING + minutes(31))
    [action] = t.actions
    expected = pick_variant("cart_abandonment", ruleset(rule).rules[0].rule.variants, "c1")
    assert action.variant == expected
    assert action.template == ("cart_b" if expected == "b" else "cart_reminder_1")


def test_reentry_blocks_a_new_journey_within_the_window() -> None:
    t = Timeline(ruleset({**ONE_STEP, "reentry": "7d"}))
    email_customer(t, SEOUL_MORNING)
    t.send(cart_add("A", at=SEOUL_MORNING))
    t.send(cart_add("B", at=SEOUL_MORNING + timedelta(days=2)))
    t.send(cart_add("C", at=SEOUL_MORNING + timedelta(days=8)))
    t.advance(SEOUL_MORNING + timedelta(days=9))
    assert [a.journey_key for a in t.actions] == ["A", "C"]
    assert [(d.journey_key, d.reason) for d in t.decisions if d.outcome == "suppressed"] == [
        ("B", "reentry")
    ]


def test_stale_trigger_events_are_ignored_with_a_decision() -> None:
    t = Timeline(ruleset({**ONE_STEP, "max_event_age": "6h"}))
    email_customer(t, SEOUL_MORNING)
    late = cart_add(at=SEOUL_MORNING - timedelta(hours=7))
    from triggers.engine import evolve

    out = evolve(t.state, late, SEOUL_MORNING, t.rules, t.policy)
    assert [(d.outcome, d.reason) for d in out.decisions] == [("suppressed", "stale_event")]
    assert t.state.journeys == {} and "cart-1" in t.state.carts, "state still updated"


def test_stale_events_do_not_count_toward_a_repeat_trigger() -> None:
    browse = {
        "id": "browse",
        "category": "marketing",
        "trigger": {"event": "product.viewed", "key": "properties.product_id",
                    "repeat": {"count": 3, "within": "1d"}},
        "max_event_age": "1h",
        "steps": [{"after": "0s", "channels": ["email"], "template": "browse"}],
    }
    t = Timeline(ruleset(browse))
    email_customer(t, SEOUL_MORNING)
    from triggers.engine import evolve

    # Two views that arrive 4-5 hours late (offline data), then one fresh view.
    for age in (5, 4):
        late = event("product.viewed", {"product_id": "p"},
                     at=SEOUL_MORNING - timedelta(hours=age))
        evolve(t.state, late, SEOUL_MORNING, t.rules, t.policy)
    out = evolve(t.state, event("product.viewed", {"product_id": "p"}, at=SEOUL_MORNING),
                 SEOUL_MORNING, t.rules, t.policy)
    assert t.state.journeys == {} and out.actions == []
    assert t.state.occurrences["browse|p"] == [SEOUL_MORNING], "only the fresh view counts"
