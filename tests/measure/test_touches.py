from __future__ import annotations

from datetime import timedelta
from typing import Any

from measure.touches import (
    conversions_from,
    decision_links,
    identity_links,
    resolve,
    touches_from,
)
from schemas.actions import Action, Recipient
from schemas.decisions import Decision
from schemas.events import MessageFeedback, OrderCompleted
from tests.factories import event, order
from tests.measure.builders import T0


def action(action_id: str, customer_id: str = "c1", channel: str = "push", **kw: Any) -> Action:
    at = kw.pop("at", T0)
    return Action(
        action_id=action_id,
        rule_id=kw.pop("rule_id", "cart_abandonment"),
        rule_version="v1",
        step=1,
        customer_id=customer_id,
        journey_key="cart-1",
        channel=channel,
        category="marketing",
        template="t",
        recipient=Recipient(),
        created_at=at,
        due_at=at,
        expires_at=at + timedelta(days=1),
        trigger_event_id="e",
        trigger_occurred_at=at,
        **kw,
    )


def feedback(type_: str, action_id: str, minutes: int = 0) -> MessageFeedback:
    found = event(type_, {"action_id": action_id}, at=T0 + timedelta(minutes=minutes))
    assert isinstance(found, MessageFeedback)
    return found


def test_every_action_is_a_touch_at_created_at_and_failed_removes_it() -> None:
    touches = touches_from(
        [action("a1", at=T0 + timedelta(hours=1)), action("a2"), action("a3"), action("a1")],
        [feedback("message.failed", "a3"), feedback("message.failed", "unknown")],
    )
    assert [(t.action_id, t.at) for t in touches] == [("a2", T0), ("a1", T0 + timedelta(hours=1))]


def test_a_later_delivery_overrides_a_failure_and_a_later_failure_wins() -> None:
    touches = touches_from(
        [action("retried"), action("failed_after"), action("same_time")],
        [
            feedback("message.failed", "retried", minutes=1),
            feedback("message.delivered", "retried", minutes=5),
            feedback("message.delivered", "failed_after", minutes=1),
            feedback("message.failed", "failed_after", minutes=5),
            feedback("message.failed", "same_time", minutes=1),
            feedback("message.opened", "same_time", minutes=1),
        ],
    )
    assert sorted(t.action_id for t in touches) == ["retried", "same_time"]
    assert all(t.delivered for t in touches)


def test_feedback_sets_funnel_flags_and_a_later_stage_implies_the_earlier() -> None:
    [clicked, delivered, unsubscribed] = touches_from(
        [action("a1"), action("a2"), action("a3")],
        [
            feedback("message.clicked", "a1"),
            feedback("message.delivered", "a2"),
            feedback("message.unsubscribed", "a3"),
        ],
    )
    assert (clicked.delivered, clicked.opened, clicked.clicked) == (True, True, True)
    assert (delivered.delivered, delivered.opened) == (True, False)
    assert unsubscribed.unsubscribed and not unsubscribed.delivered


def test_orders_are_conversions_of_the_resolved_customer() -> None:
    alias = event("alias", {"previous_id": "anon-9"}, customer_id="c1")
    merge = event("alias", {"previous_id": "c1"}, customer_id="c7")
    anonymous = order(value=12.5, customer_id=None, anonymous_id="anon-9", channel="store")
    links = identity_links([alias, merge])
    assert resolve(links, "anon:anon-9") == "c7"
    assert isinstance(anonymous, OrderCompleted)
    [conversion] = conversions_from([anonymous, anonymous], links)
    assert (conversion.customer_id, conversion.value, conversion.channel) == ("c7", 12.5, "store")


def test_the_engines_merge_decisions_are_links() -> None:
    merged = Decision(
        customer_id="c1", rule_id="identity", rule_version="", journey_key="anonymous_id",
        step=0, outcome="identity", reason="identity_merged", decided_at=T0, profile="anon:d1",
    )  # fmt: skip
    shared = merged.model_copy(update={"reason": "shared_device", "profile": "anon:d2"})
    assert decision_links([merged, shared]) == {"anon:d1": "c1"}


def test_resolve_stops_on_a_cycle() -> None:
    assert resolve({"a": "b", "b": "a"}, "a") in {"a", "b"}
    assert resolve({}, "x") == "x"
