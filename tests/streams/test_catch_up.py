"""A worker that is behind applies its backlog before it fires what the backlog
may cancel, and one failing input leaves the customer's state as it was."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import orjson
import pytest

from schemas import topics
from streams.inputs import encode_timer
from streams.progress import Progress
from tests.factories import T0, event_dict
from tests.streams.conftest import Shell
from tests.streams.test_customers import settle, state_of
from triggers import state as state_module

STEP = timedelta(minutes=30)  # the cart rule's first step


def raw(type_: str, properties: dict[str, Any], customer: str, at: datetime,
        event_id: str) -> bytes:
    return orjson.dumps(
        event_dict(type_, properties, customer_id=customer, at=at, event_id=event_id)
    )


def cart_journey(customer: str, at: datetime = T0) -> list[bytes]:
    return [
        raw("identify", {"traits": {"email": f"{customer}@example.com"}}, customer, at,
            f"{customer}-1"),
        raw("consent.updated", {"channel": "email", "category": "marketing", "granted": True},
            customer, at, f"{customer}-2"),
        raw("cart.item_added", {"cart_id": "K", "product_id": "p", "price": 5.0}, customer, at,
            f"{customer}-3"),
    ]


def order(customer: str, at: datetime) -> bytes:
    return raw("order.completed", {"order_id": f"o-{customer}", "value": 5.0, "currency": "KRW",
                                   "cart_id": "K"}, customer, at, f"{customer}-order")


class Backlog:
    """Progress as the consumer reports it: `behind` until told otherwise."""

    def __init__(self) -> None:
        self.behind = True

    def progress(self) -> Progress:
        return Progress(
            events_topic=topics.EVENTS,
            inputs_topic=topics.CUSTOMER_INPUTS,
            lateness=timedelta(0),
            highwater=lambda tp: 10**9 if self.behind else 0,
            assignment=lambda: (),
            committed=lambda tp: None,
        )


def emails(shell: Shell) -> list[tuple[str, int]]:
    return [(a["customer_id"], a["step"]) for a in shell.on(topics.ACTIONS["email"])]


async def test_behind_a_backlog_an_order_cancels_the_reminder_it_comes_after(
    shell: Shell,
) -> None:
    backlog = Backlog()
    shell.pipeline.progress = backlog.progress()
    # The worker was down: it starts well past the step's due time.
    shell.now[0] = T0 + STEP + timedelta(minutes=20)
    agent = shell.pipeline.app.agents["omnicue.customers"]
    async with agent.test_context() as customers:
        for customer in ("bought", "left"):
            for value in cart_journey(customer):
                await customers.put(value, key=customer.encode())
        await customers.put(order("bought", T0 + timedelta(milliseconds=1)), key=b"bought")
        await settle()
        assert emails(shell) == [], "nothing fires while the backlog may still cancel it"
        assert "cart_abandonment|K" in state_of(shell, b"left").journeys

        # Caught up: the held step of the customer who did not order fires.
        backlog.behind = False
        await customers.put(encode_timer(T0 + STEP), key=b"left")
        await settle()
    assert emails(shell) == [("left", 1)]
    decisions = [(d["customer_id"], d["outcome"], d.get("reason"))
                 for d in shell.on(topics.DECISIONS)]
    assert ("bought", "cancelled", "purchased") in decisions
    assert not [d for d in decisions if d[0] == "bought" and d[1] == "fired"]


async def test_behind_a_backlog_steps_fire_in_event_time_order_with_its_events(
    shell: Shell,
) -> None:
    """As in replay: a step due before an event of the backlog fires before it."""
    shell.pipeline.progress = Backlog().progress()
    shell.now[0] = T0 + timedelta(hours=2)
    agent = shell.pipeline.app.agents["omnicue.customers"]
    async with agent.test_context() as customers:
        for value in cart_journey("c"):
            await customers.put(value, key=b"c")
        # 40 minutes in, the customer browses: the reminder was due 10 minutes before.
        await customers.put(
            raw("product.viewed", {"product_id": "p"}, "c", T0 + timedelta(minutes=40), "c-4"),
            key=b"c",
        )
        await customers.put(order("c", T0 + timedelta(minutes=41)), key=b"c")
        await settle()
    assert emails(shell) == [("c", 1)]


async def test_an_input_that_raises_leaves_the_state_as_it_was(
    shell: Shell, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = shell.pipeline.app.agents["omnicue.customers"]
    real = state_module._REDUCERS[state_module.CartItemAdded]

    def half_applied_then_raises(state: Any, event: Any) -> None:
        state.traits["touched"] = True
        raise RuntimeError("reducer bug")

    async with agent.test_context() as customers:
        for value in cart_journey("c")[:2]:
            await customers.put(value, key=b"c")
        await settle()
        before = state_of(shell, b"c")
        monkeypatch.setitem(state_module._REDUCERS, state_module.CartItemAdded,
                            half_applied_then_raises)
        failing = cart_journey("c")[2]
        await customers.put(failing, key=b"c")
        await settle()
        assert state_of(shell, b"c") == before, "event id and half-applied change undone"
        [letter] = shell.headers(topics.EVENTS_DLQ)
        assert letter["omnicue.error.class"] == b"RuntimeError"

        # Fixed, the dead letter is replayed: it is applied, not dropped as a duplicate.
        monkeypatch.setitem(state_module._REDUCERS, state_module.CartItemAdded, real)
        await customers.put(failing, key=b"c")
        await settle()
    assert "K" in state_of(shell, b"c").carts
    assert "touched" not in state_of(shell, b"c").traits


async def test_latency_counts_from_the_deferred_due_time_and_deferral_is_measured_apart(
    shell: Shell,
) -> None:
    """A step deferred by quiet hours is not slow: before, its 10.5 h of quiet hours
    counted as event-to-action latency and could trip the latency alert."""
    from tests.factories import CART_RULE, ruleset

    shell.pipeline.rules = ruleset(
        CART_RULE, policy={"quiet_hours": "21:00-08:00", "caps": {"per_channel": {"limit": 9}}}
    )
    evening = datetime(2026, 3, 2, 12, 0, tzinfo=T0.tzinfo)  # 21:00 in Seoul
    morning = datetime(2026, 3, 2, 23, 0, tzinfo=T0.tzinfo)  # 08:00 in Seoul
    agent = shell.pipeline.app.agents["omnicue.customers"]
    async with agent.test_context() as customers:
        shell.now[0] = evening
        for value in cart_journey("night", at=evening):
            await customers.put(value, key=b"night", timestamp=evening.timestamp())
        await settle()
        shell.now[0] = evening + STEP
        await customers.put(encode_timer(evening + STEP), key=b"night",
                            timestamp=shell.now[0].timestamp())
        await settle()
        shell.now[0] = morning
        await customers.put(encode_timer(morning), key=b"night", timestamp=morning.timestamp())
        await settle()
    assert emails(shell) == [("night", 1)]
    metrics = shell.pipeline.metrics
    latency = metrics.registry.get_sample_value("omnicue_event_to_action_latency_seconds_sum")
    deferral = metrics.registry.get_sample_value("omnicue_action_deferral_seconds_sum")
    assert latency == 0.0
    assert deferral == (morning - (evening + STEP)).total_seconds()


async def test_a_timer_input_that_raises_is_retried_later_not_at_every_tick(
    shell: Shell, monkeypatch: pytest.MonkeyPatch
) -> None:
    from streams.customers import TIMER_FAILURE_RETRY
    from triggers import linking as stage
    from triggers.engine import TimerFired

    real = stage.evolve

    def timers_broken(state: Any, item: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(item, TimerFired):
            raise RuntimeError("timer bug")
        return real(state, item, *args, **kwargs)

    agent = shell.pipeline.app.agents["omnicue.customers"]
    async with agent.test_context() as customers:
        for value in cart_journey("c"):
            await customers.put(value, key=b"c")
        await settle()
        monkeypatch.setattr(stage, "evolve", timers_broken)
        shell.now[0] = T0 + STEP
        await customers.put(encode_timer(T0 + STEP), key=b"c")
        await settle()
    # Dead-lettered, the journey still pending in state, the timer a minute away.
    [letter] = shell.headers(topics.EVENTS_DLQ)
    assert letter["omnicue.error.class"] == b"RuntimeError"
    assert state_of(shell, b"c").journeys["cart_abandonment|K"].next_step == 1
    assert shell.pipeline.schedule.due_at(b"c") == shell.now[0] + TIMER_FAILURE_RETRY
    assert shell.pipeline.metrics.registry.get_sample_value("omnicue_timer_errors_total") == 1


async def test_a_timer_input_fires_its_step_on_a_partition_that_is_behind_without_new_events(
    shell: Shell,
) -> None:
    """The timer task sends a timer only once its partition's horizon has passed the
    due time, but a timer input moves no watermark. On a partition whose events stopped
    before the due time and that is never caught up (the timer task's own inputs keep
    it behind, under load), the input must still evaluate the step it was sent for;
    before, it evaluated nothing and the customer, still due, was sent again at every
    tick."""
    shell.pipeline.progress = Backlog().progress()  # behind, for good
    agent = shell.pipeline.app.agents["omnicue.customers"]
    async with agent.test_context() as customers:
        for value in cart_journey("quiet"):
            await customers.put(value, key=b"quiet")
        await settle()
        shell.now[0] = T0 + STEP + timedelta(milliseconds=200)
        await customers.put(encode_timer(T0 + STEP), key=b"quiet")
        await settle()
    assert emails(shell) == [("quiet", 1)]
    # The journey moved on: the schedule holds its next step, not a due time in the past.
    assert state_of(shell, b"quiet").journeys["cart_abandonment|K"].next_step == 2
    due = shell.pipeline.schedule.due_at(b"quiet")
    assert due is None or due > shell.now[0]
