"""The offline replay: the engine over an event log, in event time."""

from __future__ import annotations

import random
from collections.abc import Iterable
from datetime import datetime, timedelta

import pytest

from schemas.actions import Action
from schemas.events import Event
from tests.factories import (
    CART_RULE,
    T0,
    cart_add,
    consent,
    device,
    event,
    identify,
    minutes,
    order,
    ruleset,
)
from triggers.engine import EnginePolicy, Input, TimerFired, decide
from triggers.replay import InvalidLine, Replayer, ReplayOutput, replay

RULES = ruleset()
POLICY = EnginePolicy()
# Transactional and immediate: fires on the event itself, so its `created_at` is
# the `now` the event was applied with.
RECEIPT_RULE = {
    "id": "receipt",
    "category": "transactional",
    "trigger": {"event": "order.completed", "key": "properties.order_id"},
    "steps": [{"after": "0s", "channels": ["email"], "template": "receipt"}],
}


def reachable(customer: str, at: datetime = T0) -> list[Event]:
    """Identify with an email, and consent to email marketing."""
    return [
        identify(email=f"{customer}@example.com", customer_id=customer, at=at),
        consent("email", customer_id=customer, at=at),
    ]


def run(items: Iterable[Event | InvalidLine], until: datetime | None = None) -> list[ReplayOutput]:
    return list(replay(items, RULES, POLICY, until))


def timer_firings(outputs: list[ReplayOutput]) -> list[tuple[str, datetime]]:
    return [(o.customer_key, o.now) for o in outputs if isinstance(o.input, TimerFired)]


def test_timers_fire_in_time_order_between_events() -> None:
    # c2's cart is added before c1's, so its reminder is due first; both come due
    # before c3's order arrives, and must fire before it is applied, c2 then c1.
    rules = ruleset(CART_RULE, RECEIPT_RULE)
    log = [
        *reachable("c1"),
        *reachable("c2"),
        *reachable("c3"),
        cart_add(customer_id="c2", at=T0 + minutes(1)),
        cart_add(customer_id="c1", at=T0 + minutes(5)),
        event("product.viewed", {"product_id": "p"}, customer_id="c3", at=T0 + minutes(10)),
        order(cart_id=None, customer_id="c3", at=T0 + minutes(40)),
    ]
    outputs = list(replay(log, rules, POLICY))

    assert [(o.customer_key, o.now, type(o.input).__name__) for o in outputs] == [
        ("c2", T0 + minutes(31), "TimerFired"),
        ("c1", T0 + minutes(35), "TimerFired"),
        ("c3", T0 + minutes(40), "OrderCompleted"),
    ]
    fired = [a for o in outputs for a in o.actions]
    assert [(a.customer_id, a.rule_id, a.created_at) for a in fired] == [
        ("c2", "cart_abandonment", T0 + minutes(31)),
        ("c1", "cart_abandonment", T0 + minutes(35)),
        ("c3", "receipt", T0 + minutes(40)),
    ]


def test_ties_between_customers_fire_in_customer_key_order() -> None:
    log = [
        *reachable("b"),
        *reachable("a"),
        cart_add(customer_id="b", at=T0),
        cart_add(customer_id="a", at=T0),
    ]
    outputs = run(log, until=T0 + minutes(30))
    assert timer_firings(outputs) == [("a", T0 + minutes(30)), ("b", T0 + minutes(30))]


def test_a_step_due_before_other_customers_timers_keeps_global_time_order() -> None:
    # c1's second step (at +45m) is due before c2's first (at +50m): firing c1's first
    # step must not let c2 jump ahead of c1's next one.
    two_steps = dict(
        CART_RULE,
        steps=[
            {"after": "30m", "channels": ["email"], "template": "r1"},
            {"after": "45m", "channels": ["email"], "template": "r2"},
        ],
    )
    rules = ruleset(two_steps)
    log = [
        *reachable("c1"),
        *reachable("c2"),
        cart_add(customer_id="c1", at=T0),
        cart_add(customer_id="c2", at=T0 + minutes(20)),
    ]
    outputs = list(replay(log, rules, POLICY, T0 + minutes(60)))
    assert timer_firings(outputs) == [
        ("c1", T0 + minutes(30)),
        ("c1", T0 + minutes(45)),
        ("c2", T0 + minutes(50)),
    ]


def test_until_fires_the_remaining_timers() -> None:
    log = [*reachable("c1"), cart_add(customer_id="c1", at=T0)]

    # By default the replay stops at the last event: nothing was due yet.
    assert run(log) == []

    outputs = run(log, until=T0 + minutes(30))
    assert [a.step for o in outputs for a in o.actions] == [1]

    outputs = run(log, until=T0 + timedelta(days=2))
    assert [(a.step, a.created_at) for o in outputs for a in o.actions] == [
        (1, T0 + minutes(30)),
        (2, T0 + timedelta(hours=24)),
    ]


def test_a_late_event_is_applied_at_the_latest_time_seen() -> None:
    rules = ruleset(RECEIPT_RULE)
    log = [
        *reachable("c1"),
        event("product.viewed", {"product_id": "p"}, customer_id="c2", at=T0 + minutes(10)),
        # Arrives after the event at +10 but happened at +2: it is processed "now".
        order(cart_id=None, customer_id="c1", at=T0 + minutes(2)),
    ]
    replayer = Replayer(rules, POLICY)
    outputs = list(replayer.run(log))

    [late] = [o for o in outputs if o.actions]
    assert late.now == T0 + minutes(10)
    [action] = late.actions
    assert action.created_at == T0 + minutes(10)
    assert action.trigger_occurred_at == T0 + minutes(2)
    assert replayer.clock == T0 + minutes(10)
    assert replayer.stats.late == 1


def test_the_same_log_gives_byte_identical_output() -> None:
    rng = random.Random(3)
    log: list[Event | InvalidLine] = []
    at = T0
    for n in range(300):
        at += timedelta(seconds=rng.randrange(0, 120))
        customer = f"c{rng.randrange(12)}"
        kind = rng.random()
        if kind < 0.1:
            log += reachable(customer, at)
        elif kind < 0.15:
            log.append(device(token=f"t-{customer}", customer_id=customer, at=at))
            log.append(consent("push", customer_id=customer, at=at))
        elif kind < 0.55:
            log.append(cart_add(cart_id=f"{customer}-cart", customer_id=customer, at=at))
        elif kind < 0.65:
            log.append(order(cart_id=f"{customer}-cart", customer_id=customer, at=at))
        elif kind < 0.7:
            log.append(InvalidLine(n, "not an event"))
        else:
            log.append(event("product.viewed", {"product_id": "p"}, customer_id=customer, at=at))

    def serialized() -> bytes:
        return b"".join(
            item.model_dump_json().encode() + b"\n"
            for output in replay(log, RULES, POLICY, at + timedelta(days=2))
            for item in [*output.actions, *output.decisions]
        )

    first = serialized()
    assert first == serialized()
    assert first.count(b'"outcome":"fired"') > 5


def test_cart_abandonment_gives_the_same_action_ids_as_deciding_by_hand() -> None:
    log: list[Event] = [
        identify(at=T0),
        device(at=T0),
        consent("push", at=T0),
        consent("email", at=T0),
        cart_add(at=T0 + minutes(1)),
        cart_add(product_id="p-2", at=T0 + minutes(3)),
    ]
    until = T0 + timedelta(days=2)
    replayed = [a for o in replay(log, RULES, POLICY, until) for a in o.actions]

    # By hand: each event at its own time, then the timers at their due times.
    by_hand: list[Action] = []
    state = None
    inputs: list[tuple[Input, datetime]] = [(e, e.occurred_at) for e in log]
    for item, now in inputs:
        result = decide(state, item, now, RULES, POLICY, "c1")
        state, by_hand = result.state, by_hand + result.actions
    while state is not None and (due := state.next_due()) is not None and due <= until:
        result = decide(state, TimerFired(due), due, RULES, POLICY, "c1")
        state, by_hand = result.state, by_hand + result.actions

    assert [a.action_id for a in replayed] == [a.action_id for a in by_hand]
    assert [(a.step, a.channel) for a in replayed] == [(1, "push"), (2, "email")]
    assert replayed == by_hand


def test_the_counters() -> None:
    log: list[Event | InvalidLine] = [
        *reachable("c1"),
        cart_add(customer_id="c1", at=T0),
        cart_add(cart_id="cart-2", customer_id="c2", at=T0),  # c2 is unreachable
        InvalidLine(7, "bad"),
        cart_add(cart_id="cart-3", customer_id="c3", at=T0),
        order(cart_id="cart-3", customer_id="c3", at=T0 + minutes(5)),
        # The same event id again: a redelivery, ignored by the engine.
        event("product.viewed", {"product_id": "p"}, customer_id="c1", event_id="dup", at=T0),
        event("product.viewed", {"product_id": "p"}, customer_id="c1", event_id="dup", at=T0),
    ]
    replayer = Replayer(RULES, POLICY)
    list(replayer.run(log, T0 + timedelta(hours=2)))
    stats = replayer.stats

    assert stats.events == 8 and stats.invalid == 1 and stats.duplicates == 1
    assert stats.customers == 3
    assert stats.journeys_started == 3
    assert stats.journeys_by_rule == {"cart_abandonment": 3}
    assert stats.actions == {("cart_abandonment", 1, "email"): 1}
    assert stats.actions_per_hour == {"2026-03-02T01:00Z": 1}
    assert stats.by_reason("suppressed") == {"unreachable": 1}
    assert stats.by_reason("cancelled") == {"purchased": 1}
    assert stats.outcomes == {"fired": 1, "suppressed": 1, "cancelled": 1}
    assert stats.timers_fired == 2


def test_journeys_that_start_and_end_in_one_step_are_counted() -> None:
    rules = ruleset(RECEIPT_RULE)
    log = [*reachable("c1"), order(cart_id=None, customer_id="c1", at=T0)]
    replayer = Replayer(rules, POLICY)
    outputs = list(replayer.run(log))
    assert [a.rule_id for o in outputs for a in o.actions] == ["receipt"]
    assert replayer.stats.journeys_started == 1
    assert replayer.schedule.due_at(b"c1") is None


def test_until_must_be_aware() -> None:
    with pytest.raises(ValueError, match="aware"):
        Replayer(RULES, POLICY).finish(datetime(2026, 1, 1))  # noqa: DTZ001 - on purpose


@pytest.mark.parametrize(("lateness", "reminded"), [(timedelta(0), True),
                                                    (timedelta(seconds=1), False)])
def test_lateness_lets_an_event_just_after_a_due_time_come_before_the_step(
    lateness: timedelta, reminded: bool
) -> None:
    # The order occurred half a second after the reminder was due.
    log = [*reachable("c1"), cart_add(), order(at=T0 + minutes(30) + timedelta(seconds=0.5))]
    replayer = Replayer(RULES, POLICY, lateness)
    actions = [a for out in replayer.run(log, until=T0 + minutes(90)) for a in out.actions]
    assert bool(actions) is reminded
