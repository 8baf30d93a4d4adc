from __future__ import annotations

from datetime import timedelta

from measure.carts import CartOutcome, cart_kpis, cart_outcomes
from measure.touches import conversions_from
from schemas.events import CartItemAdded, CartItemRemoved, OrderCompleted
from tests.factories import cart_add, cart_remove, order
from tests.measure.builders import T0, decision

DELAY = timedelta(minutes=30)


def changes(*events: object) -> list[CartItemAdded | CartItemRemoved]:
    return [e for e in events if isinstance(e, CartItemAdded | CartItemRemoved)]


def orders(*events: object) -> list[OrderCompleted]:
    return [e for e in events if isinstance(e, OrderCompleted)]


def test_abandoned_recovered_ordered_in_time_and_emptied_carts() -> None:
    minute = timedelta(minutes=1)
    log = [
        # Ordered 20 minutes after the last add: not abandoned.
        cart_add("k1", customer_id="c1", at=T0),
        cart_add("k1", "p-2", customer_id="c1", at=T0 + 15 * minute),
        order("k1", customer_id="c1", at=T0 + 35 * minute),
        # No order: abandoned.
        cart_add("k2", customer_id="c2", at=T0),
        # Ordered the next day: abandoned, then recovered.
        cart_add("k3", customer_id="c3", at=T0),
        order("k3", customer_id="c3", at=T0 + timedelta(days=1)),
        # Emptied before the deadline: not a cart with items.
        cart_add("k4", customer_id="c4", at=T0),
        cart_remove("k4", customer_id="c4", at=T0 + minute),
        # Ordered exactly at the deadline: in time.
        cart_add("k5", customer_id="c5", at=T0),
        order("k5", customer_id="c5", at=T0 + DELAY),
    ]
    outcomes = cart_outcomes(changes(*log), conversions_from(orders(*log)), DELAY)
    assert outcomes == [
        CartOutcome("c1", "k1", abandoned=False, recovered=False),
        CartOutcome("c2", "k2", abandoned=True, recovered=False),
        CartOutcome("c3", "k3", abandoned=True, recovered=True),
        CartOutcome("c5", "k5", abandoned=False, recovered=False),
    ]


def test_kpis_split_by_reminded_and_held_out() -> None:
    outcomes = [
        CartOutcome("c1", "k1", abandoned=True, recovered=True),
        CartOutcome("c2", "k2", abandoned=True, recovered=False),
        CartOutcome("c3", "k3", abandoned=True, recovered=False),
        CartOutcome("c4", "k4", abandoned=False, recovered=False),
    ]
    decisions = [
        decision("c1", journey_key="k1"),
        decision("c2", journey_key="k2"),
        decision("c3", outcome="held_out", journey_key="k3", group="rule:cart_abandonment"),
        decision("c4", journey_key="k4", rule_id="other"),
    ]
    kpis = cart_kpis(outcomes, decisions, "cart_abandonment", DELAY)
    assert (kpis.all.carts, kpis.all.abandoned, kpis.all.recovered) == (4, 3, 1)
    assert kpis.all.abandonment_rate == 0.75
    assert (kpis.reminded.carts, kpis.reminded.recovery_rate) == (2, 0.5)
    assert (kpis.held_out.carts, kpis.held_out.recovery_rate) == (1, 0.0)
    assert kpis.delay_seconds == 1800
