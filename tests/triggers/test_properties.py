"""Properties of the engine over random event sequences and clocks (hypothesis)."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any
from unittest.mock import patch

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from omnicue.rules import load_rules
from schemas.events import Event
from schemas.rules import QuietHours
from tests.factories import CART_RULE, cart_add, cart_remove, consent, device, event
from tests.factories import ruleset as make_rules
from tests.triggers.timeline import Timeline
from triggers.engine import EnginePolicy, new_state
from triggers.guards import in_holdout, quiet_until

START = datetime(2026, 3, 1, 0, 0, tzinfo=UTC)
CATALOG = load_rules(None)
CHANNELS = ("push", "email", "sms", "kakao")


def make_event(kind: str, choice: int, at: datetime, tz: str) -> Event:
    cart = "AB"[choice % 2]
    channel = CHANNELS[choice % 4]
    if kind == "identify":
        traits: dict[str, Any] = {"email": "p@example.com", "timezone": tz}
        if choice % 3 == 0:
            traits["phone"] = "+82 10 5555 0000"
        return event("identify", {"traits": traits}, at=at)
    if kind == "consent":
        return consent(channel, granted=choice % 3 != 0, at=at)
    if kind == "device":
        return device(f"tok-{choice % 2}", at=at)
    if kind == "undevice":
        return event("device.unregistered", {"push_token": f"tok-{choice % 2}"}, at=at)
    if kind == "add":
        return cart_add(cart, f"p-{choice % 3}", at=at)
    if kind == "remove":
        return cart_remove(cart, f"p-{choice % 3}", at=at)
    if kind == "order":
        props: dict[str, Any] = {"order_id": f"o-{at.timestamp():.0f}-{choice}", "value": 10.0,
                                 "currency": "KRW"}
        if choice % 3:
            props["cart_id"] = cart
        return event("order.completed", props, at=at)
    if kind == "view":
        return event("product.viewed", {"product_id": f"p-{choice % 3}"}, at=at)
    if kind == "visit":
        return event("store.visited", {"store_id": "s1"}, channel="store", at=at)
    return event("message.opened", {"action_id": "a"}, channel=channel, at=at)


KINDS = ["identify", "consent", "device", "undevice", "add", "remove", "order", "view", "visit",
         "opened"]
steps = st.lists(
    st.tuples(
        st.sampled_from(KINDS),
        st.integers(0, 11),
        # Gaps from seconds to days: clocks that jump over quiet hours and cap windows.
        st.integers(0, 3 * 24 * 3600),
    ),
    min_size=1,
    max_size=40,
)
timezones = st.sampled_from(["Asia/Seoul", "America/New_York", "Europe/Berlin", "UTC"])
customers = st.sampled_from([f"cust-{i}" for i in range(50)])


def drive(
    sequence: list[tuple[str, int, int]], tz: str, customer: str, rules: Any = CATALOG
) -> Timeline:
    t = Timeline(rules, EnginePolicy(), state=new_state(customer))
    at = START
    for index, (kind, choice, gap) in enumerate(sequence):
        at += timedelta(seconds=gap)
        e = make_event(kind, choice, at, tz)
        if kind == "opened":
            # Feedback is for an action the engine emitted (else it is UnknownAction).
            if not t.actions:
                continue
            sent = t.actions[choice % len(t.actions)]
            e = event("message.opened", {"action_id": sent.action_id}, channel=sent.channel,
                      at=at)
        t.send(e.model_copy(update={"customer_id": customer, "event_id": f"e{index}"}))
        for action in t.actions:
            if action.category == "marketing" and action.created_at == at:
                # Consent is checked against the state at the moment of the decision.
                assert t.state.consents.get(f"{action.channel}:marketing") is True
    t.advance(at + timedelta(days=45))
    return t


common = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@common
@given(steps, timezones, customers)
def test_never_two_actions_for_the_same_journey_step(
    sequence: list[tuple[str, int, int]], tz: str, customer: str
) -> None:
    t = drive(sequence, tz, customer)
    ids = [a.action_id for a in t.actions]
    assert len(ids) == len(set(ids))
    # One action per (rule, journey instance, step): the id is derived from exactly these.
    per_step = Counter((a.rule_id, a.journey_key, a.step, a.action_id) for a in t.actions)
    assert max(per_step.values(), default=0) <= 1


@common
@given(steps, timezones, customers)
def test_once_rules_fire_each_step_at_most_once_per_key(
    sequence: list[tuple[str, int, int]], tz: str, customer: str
) -> None:
    once_cart = {**CART_RULE, "once": True}
    t = drive(sequence, tz, customer, make_rules(once_cart, policy={}))
    keys = Counter((a.rule_id, a.journey_key, a.step) for a in t.actions)
    assert max(keys.values(), default=0) <= 1


@common
@given(steps, timezones, customers)
def test_no_marketing_in_quiet_hours_and_caps_hold(
    sequence: list[tuple[str, int, int]], tz: str, customer: str
) -> None:
    t = drive(sequence, tz, customer)
    window = CATALOG.policy.quiet_hours
    assert isinstance(window, QuietHours)
    marketing = sorted(
        (a for a in t.actions if a.category == "marketing"), key=lambda a: a.created_at
    )
    # The customer's timezone applies from their first identify; before it, the default.
    at, identified = START, None
    for kind, _, gap in sequence:
        at += timedelta(seconds=gap)
        if kind == "identify" and identified is None:
            identified = at
    for a in marketing:
        local = tz if identified is not None and identified <= a.created_at else "Asia/Seoul"
        assert quiet_until(window, a.created_at, local) is None, a
        recent = [b for b in marketing if a.created_at - timedelta(hours=24) < b.created_at
                  <= a.created_at]
        assert len(recent) <= 3
        assert Counter(b.channel for b in recent)[a.channel] <= 1


@common
@given(steps, timezones)
def test_holdout_customers_never_receive_the_rule(
    sequence: list[tuple[str, int, int]], tz: str
) -> None:
    held = [c for c in (f"h-{i}" for i in range(200)) if in_holdout(0.3, "cart_abandonment", c)]
    rules = make_rules({**CART_RULE, "holdout": 0.3})
    for customer in held[:3]:
        t = drive(sequence, tz, customer, rules)
        assert t.actions == []


@common
@given(steps, timezones, customers)
def test_the_same_input_gives_byte_identical_output(
    sequence: list[tuple[str, int, int]], tz: str, customer: str
) -> None:
    def output(t: Timeline) -> bytes:
        lines = [a.model_dump_json() for a in t.actions] + [
            d.model_dump_json() for d in t.decisions
        ]
        return "\n".join(lines).encode()

    assert output(drive(sequence, tz, customer)) == output(drive(sequence, tz, customer))


browsing = st.lists(
    st.tuples(
        st.sampled_from(["view"] * 6 + ["add", "identify", "consent", "device"]),
        # Twelve products, so that many view counts are started and left to go stale.
        st.integers(0, 11),
        # From a minute to a day and a half: views inside and outside the 24h window.
        st.integers(60, 36 * 3600),
    ),
    min_size=1,
    max_size=80,
)


@common
@given(browsing, customers)
def test_forgetting_stale_view_counts_never_changes_a_decision(
    sequence: list[tuple[str, int, int]], customer: str
) -> None:
    def drive_views(forget: bool) -> Timeline:
        t = Timeline(CATALOG, EnginePolicy(), state=new_state(customer))
        at = START
        for index, (kind, choice, gap) in enumerate(sequence):
            at += timedelta(seconds=gap)
            if kind == "view":
                e = event("product.viewed", {"product_id": f"p-{choice}"}, at=at)
            elif kind == "add":
                e = cart_add("A", f"p-{choice}", at=at)
            else:
                e = make_event(kind, choice, at, "UTC")
            update = {"customer_id": customer, "event_id": f"e{index}"}
            if forget:
                t.send(e.model_copy(update=update))
            else:
                with patch("triggers.engine._forget_stale_counts", lambda *_: None):
                    t.send(e.model_copy(update=update))
        t.advance(at + timedelta(days=8))
        return t

    forgetting, keeping = drive_views(forget=True), drive_views(forget=False)
    assert forgetting.actions == keeping.actions
    assert forgetting.decisions == keeping.decisions
    kept = keeping.state.occurrences
    assert all(kept.get(slot) == seen for slot, seen in forgetting.state.occurrences.items())
