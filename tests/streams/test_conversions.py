"""Stage 2's attribution records (`omnicue.conversions`) and campaign counters."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import orjson
import pytest

from omnicue.settings import Settings
from schemas import topics
from schemas.conversions import LIVE_MODELS, ConversionRecord
from streams.app import create_app
from streams.inputs import encode_timer
from tests.factories import CART_RULE, NO_GUARDS, T0, event_dict, ruleset
from tests.streams.conftest import CapturingSender, Shell, caught_up_progress

C1 = b"c1"


def raw(type_: str, properties: dict[str, object], event_id: str, minute: float = 0) -> bytes:
    at = T0 + timedelta(minutes=minute)
    return orjson.dumps(event_dict(type_, properties, customer_id="c1", at=at, event_id=event_id))


@pytest.fixture
async def held_shell(tmp_path: Path) -> AsyncIterator[Shell]:
    """The cart rule with a holdout that c1 is not in (treatment)."""
    settings = Settings(store="memory://", data_dir=tmp_path / "data", batch_within=0.01)
    clock = [T0]
    rules = ruleset({**CART_RULE, "holdout": 0.01}, policy={**NO_GUARDS, "holdout": 0.01})
    pipeline = create_app(settings, rules, clock=lambda: clock[0])
    pipeline.progress = caught_up_progress()
    sender = CapturingSender(settings)
    pipeline.sender = sender
    pipeline.app.finalize()
    yield Shell(pipeline, sender, clock)


def sample(shell: Shell, name: str, labels: dict[str, str]) -> float:
    value = shell.pipeline.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_an_order_after_a_reminder_sends_its_attribution_record(held_shell: Shell) -> None:
    shell = held_shell
    agent = shell.pipeline.app.agents["omnicue.customers"]
    async with agent.test_context() as customers:
        for value in (
            raw("identify", {"traits": {"email": "kim@example.com"}}, "e1"),
            raw("consent.updated", {"channel": "email", "category": "marketing",
                                    "granted": True}, "e2"),
            raw("cart.item_added", {"cart_id": "K", "product_id": "p", "price": 5.0}, "e3"),
        ):  # fmt: skip
            await customers.put(value, key=C1)
        await asyncio.sleep(0.2)
        shell.now[0] = T0 + timedelta(minutes=31)
        await customers.put(encode_timer(T0 + timedelta(minutes=30)), key=C1)
        await asyncio.sleep(0.2)
        order = raw("order.completed", {"order_id": "o1", "value": 40.0, "currency": "KRW",
                                        "cart_id": "K"}, "e4", minute=40)  # fmt: skip
        shell.now[0] = T0 + timedelta(minutes=41)
        await customers.put(order, key=C1)
        # Redelivered (as after a crash): not applied again, no second record.
        await customers.put(order, key=C1)
        await asyncio.sleep(0.2)

    [action] = shell.on(topics.ACTIONS["email"])
    [value] = shell.on(topics.CONVERSIONS)
    assert shell.keys(topics.CONVERSIONS) == [C1]
    record = ConversionRecord.model_validate(value)
    assert (record.conversion_id, record.customer_id, record.value) == ("e4", "c1", 40.0)
    assert record.attributed
    for model in LIVE_MODELS:
        [credit] = record.credits[model]
        assert (credit.action_id, credit.conversions, credit.revenue) == (
            action["action_id"], 1.0, 40.0,
        )  # fmt: skip
    # Entered the cart rule (and `_global`) at the cart add; converted within 7 days.
    assert {(h.rule_id, h.group) for h in record.holdout} == {
        ("cart_abandonment", "treatment"), ("_global", "treatment"),
    }  # fmt: skip
    for model in LIVE_MODELS:
        labels = {"rule": "cart_abandonment", "channel": "email", "model": model}
        assert sample(shell, "omnicue_conversions_total", labels) == 1.0
        assert sample(shell, "omnicue_attributed_revenue_total", labels) == 40.0
    assert sample(shell, "omnicue_orders_total", {"attributed": "true"}) == 1.0
    for rule in ("cart_abandonment", "_global"):
        labels = {"rule": rule, "group": "treatment"}
        assert sample(shell, "omnicue_holdout_entries_total", labels) == 1.0
        assert sample(shell, "omnicue_holdout_conversions_total", labels) == 1.0
    exposed = shell.pipeline.metrics.exposition().decode()
    assert "omnicue_holdout_entries_total{" in exposed


async def test_an_order_without_touches_is_an_unattributed_record(shell: Shell) -> None:
    agent = shell.pipeline.app.agents["omnicue.customers"]
    async with agent.test_context() as customers:
        await customers.put(
            raw("order.completed", {"order_id": "o1", "value": 9.0, "currency": "KRW"}, "e1"),
            key=C1,
        )
        await asyncio.sleep(0.2)
    [value] = shell.on(topics.CONVERSIONS)
    record = ConversionRecord.model_validate(value)
    assert not record.attributed and record.holdout == []
    assert record.credits == {model: [] for model in LIVE_MODELS}
    assert sample(shell, "omnicue_orders_total", {"attributed": "false"}) == 1.0
