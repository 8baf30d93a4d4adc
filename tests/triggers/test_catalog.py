"""One scenario per packaged rule, on the packaged rules file and its default policy."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from omnicue.rules import load_rules
from tests.factories import (
    cart_add,
    consent,
    device,
    event,
    identify,
    minutes,
    order,
)
from tests.triggers.timeline import Timeline
from triggers.state import MessageRecord

RULES = load_rules(None)
# 10:00 in Seoul, the default timezone: outside quiet hours.
MORNING = datetime(2026, 3, 2, 1, 0, tzinfo=UTC)


def customer(at: datetime = MORNING, push: bool = True, phone: bool = False) -> Timeline:
    t = Timeline(RULES)
    t.send(identify(phone="+82 10 1234 5678" if phone else None, at=at))
    t.send(consent("email", at=at))
    if push:
        t.send(device(at=at))
        t.send(consent("push", at=at))
    if phone:
        t.send(consent("kakao", at=at))
        t.send(consent("sms", at=at))
    return t


def view(product: str, at: datetime) -> object:
    return event("product.viewed", {"product_id": product, "price": 9.5}, at=at)


def test_cart_abandonment_push_then_email_with_coupon() -> None:
    t = customer()
    t.send(cart_add(at=MORNING))
    t.advance(MORNING + timedelta(days=2))
    actions, _ = t.of("cart_abandonment")
    assert [(a.step, a.channel, a.template) for a in actions] == [
        (1, "push", "cart_reminder_1"), (2, "email", "cart_reminder_2")
    ]
    assert actions[1].payload["coupon"] == "CART10"


def test_cart_reminder_falls_back_to_email_when_the_push_token_is_unregistered() -> None:
    t = customer()
    t.send(event("device.unregistered", {"push_token": "tok-1"}, channel="app", at=MORNING))
    t.send(cart_add(at=MORNING + minutes(1)))
    t.advance(MORNING + minutes(40))
    actions, _ = t.of("cart_abandonment")
    assert [(a.step, a.channel) for a in actions] == [(1, "email")]


def test_an_order_for_another_cart_does_not_cancel_this_carts_journey() -> None:
    t = customer()
    t.send(cart_add("A", at=MORNING))
    t.send(cart_add("B", "p-9", at=MORNING + minutes(1)))
    t.send(order("B", at=MORNING + minutes(5)))
    t.advance(MORNING + minutes(40))
    actions, decisions = t.of("cart_abandonment")
    assert [a.journey_key for a in actions] == ["A"]
    cancelled = [(d.journey_key, d.reason) for d in decisions if d.outcome == "cancelled"]
    assert cancelled == [("B", "purchased")]


def test_browse_abandonment_after_three_views_of_one_product() -> None:
    t = customer()
    for i in range(3):
        t.send(view("p-1", MORNING + minutes(i * 10)))
    t.send(view("p-2", MORNING + minutes(25)))
    t.advance(MORNING + timedelta(hours=3))
    actions, _ = t.of("browse_abandonment")
    [action] = actions
    assert action.journey_key == "p-1" and action.template == "browse_recommendation"
    # An hour after the last view of that product.
    assert action.due_at == MORNING + minutes(20 + 60)


def test_browse_abandonment_is_not_sent_after_a_cart_add_of_that_product() -> None:
    t = customer()
    for i in range(3):
        t.send(view("p-1", MORNING + minutes(i)))
    t.send(cart_add(product_id="p-1", at=MORNING + minutes(5)))
    t.advance(MORNING + timedelta(hours=3))
    actions, decisions = t.of("browse_abandonment")
    assert actions == [] and decisions[0].reason == "added_to_cart"


def test_views_spread_over_more_than_a_day_do_not_count() -> None:
    t = customer()
    for i in range(3):
        t.send(view("p-1", MORNING + timedelta(hours=13 * i)))
    t.advance(MORNING + timedelta(days=3))
    assert t.of("browse_abandonment") == ([], [])


def test_a_long_browsing_history_keeps_only_the_view_counts_that_can_still_count() -> None:
    t = customer()
    # A product a day for 60 days: without forgetting, one count per product ever seen.
    for day in range(60):
        t.send(view(f"p-{day}", MORNING + timedelta(days=day)))
    last = MORNING + timedelta(days=59)
    # Each view finds the previous day's count a day old, outside the 24h window.
    assert list(t.state.occurrences) == ["browse_abandonment|p-59"]
    # Counting still works after the sweeps, for a product seen long ago too.
    for i in range(3):
        t.send(view("p-0", last + minutes(i)))
    t.advance(last + timedelta(hours=3))
    actions, _ = t.of("browse_abandonment")
    assert [a.journey_key for a in actions] == ["p-0"]


def test_welcome_series_once_with_a_promotion_unless_they_ordered() -> None:
    t = customer(push=False)
    t.send(identify(at=MORNING + minutes(5)))  # a second identify does not restart it
    t.advance(MORNING + timedelta(days=8))
    actions, _ = t.of("welcome_series")
    assert [(a.step, a.template, a.created_at - MORNING) for a in actions] == [
        (1, "welcome", timedelta(hours=1)),
        (2, "welcome_promotion", timedelta(days=7)),
    ]
    t.send(identify(at=MORNING + timedelta(days=30)))
    t.advance(MORNING + timedelta(days=40))
    assert len(t.of("welcome_series")[0]) == 2, "once per customer"

    buyer = customer(push=False)
    buyer.send(order(None, at=MORNING + timedelta(days=2)))
    buyer.advance(MORNING + timedelta(days=8))
    actions, decisions = buyer.of("welcome_series")
    assert [a.step for a in actions] == [1]
    assert [(d.step, d.reason) for d in decisions if d.outcome == "suppressed"] == [
        (2, "condition_false")
    ]


def test_review_request_three_days_after_an_order_unless_refunded() -> None:
    t = customer(phone=True)
    first = order(None, at=MORNING)
    t.send(first)
    refunded = order(None, at=MORNING + minutes(1))
    t.send(refunded)
    order_id = refunded.properties.order_id  # type: ignore[union-attr]
    t.send(event("order.refunded", {"order_id": order_id}, at=MORNING + timedelta(days=1)))
    t.advance(MORNING + timedelta(days=4))
    actions, decisions = t.of("review_request")
    assert [(a.journey_key, a.channel) for a in actions] == [
        (first.properties.order_id, "email")  # type: ignore[union-attr]
    ]
    assert [d.reason for d in decisions if d.outcome == "cancelled"] == ["refunded"]


def test_win_back_after_30_days_of_silence_on_the_most_engaging_channel() -> None:
    t = customer(phone=True)
    # The customer opens kakao messages, not emails (messages the engine had emitted).
    t.state.messages["a1"] = MessageRecord(channel="kakao", at=MORNING)
    t.state.messages["a2"] = MessageRecord(channel="email", at=MORNING)
    t.send(event("message.sent", {"action_id": "a1"}, channel="kakao", at=MORNING))
    t.send(event("message.opened", {"action_id": "a1"}, channel="kakao", at=MORNING))
    t.send(event("message.sent", {"action_id": "a2"}, channel="email", at=MORNING))
    t.send(view("p-1", MORNING + timedelta(days=10)))  # activity restarts the clock
    t.advance(MORNING + timedelta(days=39))
    assert t.of("win_back")[0] == []
    t.advance(MORNING + timedelta(days=41))
    [action] = t.of("win_back")[0]
    assert action.channel == "kakao"
    assert action.due_at == MORNING + timedelta(days=40)


def test_offline_to_online_coupon_when_no_order_follows_a_store_visit() -> None:
    t = customer(phone=True)
    t.send(event("store.visited", {"store_id": "gangnam"}, channel="store", at=MORNING))
    t.advance(MORNING + timedelta(days=4))
    [action] = t.of("offline_to_online")[0]
    assert (action.channel, action.payload) == ("kakao", {"coupon": "SHOPONLINE10"})

    buyer = customer(phone=True)
    buyer.send(event("store.visited", {"store_id": "gangnam"}, channel="store", at=MORNING))
    buyer.send(order(None, at=MORNING + timedelta(days=1)))
    buyer.advance(MORNING + timedelta(days=4))
    actions, decisions = buyer.of("offline_to_online")
    assert actions == [] and [d.reason for d in decisions] == ["purchased"]


def test_order_confirmation_is_transactional_at_once_even_at_night() -> None:
    night = datetime(2026, 3, 2, 15, 0, tzinfo=UTC)  # midnight in Seoul
    t = Timeline(RULES)
    t.send(identify(at=night))  # no consent at all: transactional needs none
    t.send(order(None, at=night))
    [action] = t.of("order_confirmation")[0]
    assert (action.category, action.channel, action.created_at) == ("transactional", "email",
                                                                     night)
    blocked = Timeline(RULES)
    blocked.send(identify(at=night))
    blocked.send(consent("email", granted=False, category="transactional", at=night))
    blocked.send(order(None, at=night))
    assert blocked.of("order_confirmation")[0] == []
