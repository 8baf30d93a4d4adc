"""Stage 2: per-customer batches over the state table, with timers as inputs."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import orjson

from schemas import topics
from streams.inputs import encode_timer
from tests.factories import T0, event_dict
from tests.streams.conftest import Shell
from triggers.state import CustomerState

C1 = b"c1"


def raw(type_: str, properties: dict[str, object], event_id: str, customer: str = "c1") -> bytes:
    return orjson.dumps(
        event_dict(type_, properties, customer_id=customer, at=T0, event_id=event_id)
    )


def state_of(shell: Shell, key: bytes = C1) -> CustomerState:
    stored = shell.pipeline.customers.get(key)
    assert stored is not None
    return CustomerState.model_validate_json(stored)


async def settle() -> None:
    # Inputs are processed in batches that close after `batch_within` (10 ms here).
    await asyncio.sleep(0.2)


CART_START = [
    raw("identify", {"traits": {"email": "kim@example.com"}}, "e1"),
    raw("consent.updated", {"channel": "email", "category": "marketing", "granted": True}, "e2"),
    raw("cart.item_added", {"cart_id": "K", "product_id": "p", "price": 5.0}, "e3"),
]


async def test_an_abandoned_cart_is_stored_scheduled_and_fired_by_its_timer(shell: Shell) -> None:
    agent = shell.pipeline.app.agents["omnicue.customers"]
    async with agent.test_context() as customers:
        for value in CART_START:
            await customers.put(value, key=C1)
        await settle()
        journey = state_of(shell).journeys["cart_abandonment|K"]
        assert shell.pipeline.schedule.due_at(C1) == journey.due_at == T0 + timedelta(minutes=30)
        assert shell.on(topics.ACTIONS["email"]) == []

        shell.now[0] = T0 + timedelta(minutes=30, seconds=1)
        await customers.put(encode_timer(journey.due_at), key=C1)
        await settle()

    [action] = shell.on(topics.ACTIONS["email"])
    assert (action["rule_id"], action["step"], action["channel"]) == (
        "cart_abandonment",
        1,
        "email",
    )
    assert action["payload"]["cart_id"] == "K"
    assert shell.keys(topics.ACTIONS["email"]) == [C1]
    assert [(d["outcome"], d.get("channel")) for d in shell.on(topics.DECISIONS)] == [
        ("fired", "email")
    ]
    # The journey moved on to step 2, and the schedule follows the stored state.
    assert state_of(shell).journeys["cart_abandonment|K"].next_step == 2
    assert shell.pipeline.schedule.due_at(C1) == T0 + timedelta(hours=24)


async def test_a_redelivered_event_is_not_applied_twice(shell: Shell) -> None:
    agent = shell.pipeline.app.agents["omnicue.customers"]
    async with agent.test_context() as customers:
        for value in [*CART_START, CART_START[-1]]:
            await customers.put(value, key=C1)
        await settle()
    assert state_of(shell).carts["K"].lines["p"].quantity == 1


async def test_customers_in_one_batch_each_get_their_own_state(shell: Shell) -> None:
    agent = shell.pipeline.app.agents["omnicue.customers"]
    async with agent.test_context() as customers:
        for n in range(3):
            for customer in ("a", "b"):
                value = raw(
                    "cart.item_added",
                    {"cart_id": f"K{n}", "product_id": "p", "price": 1.0},
                    f"{customer}-{n}",
                    customer=customer,
                )
                await customers.put(value, key=customer.encode())
        await settle()
    for customer in (b"a", b"b"):
        assert sorted(state_of(shell, customer).carts) == ["K0", "K1", "K2"]


async def test_an_input_the_engine_cannot_read_goes_to_the_dead_letters(shell: Shell) -> None:
    agent = shell.pipeline.app.agents["omnicue.customers"]
    async with agent.test_context() as customers:
        await customers.put(b'{"not": "an event"}', key=C1)
        await customers.put(CART_START[0], key=C1)
        await settle()
    [letter] = shell.headers(topics.EVENTS_DLQ)
    assert letter["omnicue.error.stage"] == b"decide"
    assert shell.keys(topics.EVENTS_DLQ) == [C1]
    # The next input of the same customer was still processed.
    assert state_of(shell).email == "kim@example.com"


async def test_feedback_for_an_action_never_emitted_is_dead_lettered_as_unknown_action(
    shell: Shell,
) -> None:
    agent = shell.pipeline.app.agents["omnicue.customers"]
    async with agent.test_context() as customers:
        await customers.put(CART_START[0], key=C1)
        await customers.put(raw("message.opened", {"action_id": "act_never"}, "f1"), key=C1)
        await settle()
    [letter] = shell.headers(topics.EVENTS_DLQ)
    assert (letter["omnicue.error.stage"], letter["omnicue.error.class"]) == (
        b"decide", b"unknown_action"
    )
    assert state_of(shell).email == "kim@example.com"


async def test_a_link_parks_the_customer_until_its_anonymous_profile_comes_back(
    shell: Shell,
) -> None:
    """Through the stage: the identify asks `anon:a-1`, which sends its cart back; the
    order parked behind the identify then cancels that cart's journey."""
    anon = orjson.dumps(event_dict("cart.item_added", {"cart_id": "K", "product_id": "p",
                                                        "price": 5.0}, customer_id=None,
                                   anonymous_id="a-1", at=T0, event_id="a1"))
    link = orjson.dumps(event_dict("identify", {}, customer_id="c1", anonymous_id="a-1",
                                   at=T0, event_id="l1"))
    buy = raw("order.completed", {"order_id": "o", "cart_id": "K", "value": 5.0,
                                  "currency": "KRW"}, "o1")
    agent = shell.pipeline.app.agents["omnicue.customers"]
    async with agent.test_context() as customers:
        await customers.put(anon, key=b"anon:a-1")
        await customers.put(link, key=C1)
        await customers.put(buy, key=C1)
        await settle()
        entry = shell.pipeline.identities.get(C1)
        assert entry is not None and b'"pending"' in entry  # parked, waiting
        # What the stage sent to the device's key comes back in, as the topic would.
        for key, value in shell.sent(topics.CUSTOMER_INPUTS):
            await customers.put(value, key=key)
        await settle()
        for key, value in shell.sent(topics.CUSTOMER_INPUTS)[1:]:
            await customers.put(value, key=key)
        await settle()
    assert shell.pipeline.customers.get(b"anon:a-1") is None
    state = state_of(shell)
    assert state.merged_profiles == ["anon:a-1"] and state.order_count == 1
    # One customer held: the anonymous profile merged away; the identity entries (the
    # device's link, the customer's ids) are no customers.
    registry = shell.pipeline.metrics.registry
    assert registry.get_sample_value("omnicue_customers_in_state") == 1
    decided = [orjson.loads(v) for k, v in shell.sent(topics.DECISIONS) if k == C1]
    assert [(d["outcome"], d.get("reason")) for d in decided] == [
        ("identity", "identity_merged"), ("cancelled", "purchased")
    ]
