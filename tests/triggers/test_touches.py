"""Touches and holdout entries in customer state, for the live attribution records."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from tests.factories import T0, consent, device, event, identify, minutes, order, ruleset
from tests.triggers.timeline import Timeline
from triggers.engine import EnginePolicy, Output, evolve
from triggers.identity import merge_profiles
from triggers.state import CustomerState, TouchRecord, record_touch

NUDGE: dict[str, Any] = {
    "id": "nudge",
    "category": "marketing",
    "trigger": {"event": "product.viewed", "key": "properties.product_id"},
    "steps": [{"after": "1m", "channels": ["push"], "template": "browse_reminder"}],
}
LOOSE = {"quiet_hours": None, "caps": {"total": {"limit": 1000}, "per_channel": {"limit": 1000}}}
DAY = timedelta(days=1)


def customer(*rules: dict[str, Any], policy: dict[str, Any] | None = None) -> Timeline:
    t = Timeline(ruleset(*(rules or (NUDGE,)), policy=policy or LOOSE))
    for e in (identify(at=T0), device(at=T0), consent("push", at=T0)):
        t.send(e)
    return t


def view(t: Timeline, product: str, at: timedelta) -> None:
    t.send(event("product.viewed", {"product_id": product}, at=T0 + at))
    t.advance(T0 + at + minutes(1))


def apply(t: Timeline, e: Any) -> Output:
    t.advance(e.occurred_at)
    return evolve(t.state, e, e.occurred_at, t.rules, t.policy)


def test_every_action_is_a_touch_and_feedback_is_kept_with_it() -> None:
    t = customer()
    view(t, "p1", minutes(0))
    [action] = t.actions
    [touch] = t.state.touches
    assert (touch.action_id, touch.channel, touch.rule_id, touch.at) == (
        action.action_id, "push", "nudge", action.created_at,
    )  # fmt: skip
    failed = event("message.failed", {"action_id": action.action_id}, channel="push",
                   at=T0 + minutes(5))  # fmt: skip
    t.send(failed)
    assert t.state.touches[0].feedback == [("message.failed", T0 + minutes(5))]


def test_touches_are_bounded_by_the_lookback() -> None:
    t = customer()
    t.policy = EnginePolicy(touch_lookback=2 * DAY)
    for day in range(4):
        view(t, f"p{day}", day * DAY)
    # The newest at day 3: those before day 1 are gone, day 1 itself (the edge) is kept.
    assert [r.at for r in t.state.touches] == [T0 + d * DAY + minutes(1) for d in (1, 2, 3)]


def test_record_touch_keeps_time_order_and_one_record_per_action() -> None:
    state = CustomerState(customer_id="c1")
    record_touch(state, "b", "push", "r", T0, None, DAY)
    record_touch(state, "a", "push", "r", T0, None, DAY)
    record_touch(state, "c", "sms", "r", T0 - minutes(1), None, DAY)
    record_touch(state, "a", "push", "r", T0, None, DAY)
    assert [r.action_id for r in state.touches] == ["c", "a", "b"]


def test_states_stored_before_touches_load() -> None:
    state = CustomerState.model_validate_json('{"customer_id": "c1"}')
    assert state.touches == []
    stored = CustomerState(customer_id="c1", touches=[
        TouchRecord(action_id="a", channel="push", rule_id="r", at=T0,
                    feedback=[("message.opened", T0)])])  # fmt: skip
    again = CustomerState.model_validate_json(stored.model_dump_json(exclude_defaults=True))
    assert again == stored


def test_a_merge_keeps_both_profiles_touches_in_time_order() -> None:
    a = CustomerState(customer_id="anon:x")
    b = CustomerState(customer_id="c1")
    record_touch(a, "a2", "push", "r", T0 + minutes(2), None, DAY)
    record_touch(b, "b1", "email", "r", T0 + minutes(1), None, DAY)
    record_touch(b, "b3", "email", "r", T0 + minutes(3), None, DAY)
    merged = merge_profiles(a, b)
    assert [r.action_id for r in merged.touches] == ["b1", "a2", "b3"]


def test_an_order_is_a_conversion_with_the_touches_and_entries_before_it() -> None:
    rule = {**NUDGE, "holdout": 0.5, "conversion": {"within": "2d"}}
    t = customer(rule)
    view(t, "p1", minutes(0))
    out = apply(t, order(cart_id=None, value=50.0, at=T0 + DAY))
    assert out.conversion is not None
    assert out.conversion.customer_id == "c1"
    assert out.conversion.event.properties.value == 50.0
    assert [r.action_id for r in out.conversion.touches] == [a.action_id for a in t.actions]
    [entry] = out.conversion.entries
    assert (entry.rule_id, entry.at, entry.within) == ("nudge", T0, 2 * DAY)
    # The snapshot is a copy: feedback applied later does not change it.
    out.conversion.touches[0].feedback.append(("message.failed", T0))
    assert t.state.touches[0].feedback == []


def test_other_events_are_no_conversion() -> None:
    t = customer()
    assert apply(t, event("product.viewed", {"product_id": "p"}, at=T0)).conversion is None


def test_journey_starts_enter_rules_with_a_holdout_and_global() -> None:
    held = treated = 0
    for n in range(40):
        cid = f"c{n}"
        t = Timeline(ruleset({**NUDGE, "holdout": 0.5}, policy={**LOOSE, "holdout": 0.2}))
        t.state = CustomerState(customer_id=cid)
        out = apply(t, event("product.viewed", {"product_id": "p"}, customer_id=cid, at=T0))
        t.advance(T0 + minutes(1))
        held_out = any(d.outcome == "held_out" for d in t.decisions)
        group = next((d.group for d in t.decisions if d.outcome == "held_out"), None)
        if group == "global":
            # The global control group is `_global`'s control, not the rule's.
            assert out.entered == [("_global", True)]
        else:
            assert out.entered == [("_global", False), ("nudge", held_out)]
        held += held_out
        treated += not held_out
    assert held and treated
    # A transactional rule and a rule without holdout enter nothing.
    t = customer({**NUDGE, "category": "transactional"})
    assert apply(t, event("product.viewed", {"product_id": "p"}, at=T0)).entered == []
    t = customer()
    assert apply(t, event("product.viewed", {"product_id": "p"}, at=T0)).entered == []
