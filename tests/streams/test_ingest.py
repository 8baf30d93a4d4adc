"""Stage 1: raw events validated, keyed by customer, bad ones dead-lettered."""

from __future__ import annotations

import asyncio

import orjson

from schemas import topics
from tests.factories import T0, event_dict
from tests.streams.conftest import Shell


async def test_events_are_repartitioned_by_customer_and_bad_ones_kept_with_the_reason(
    shell: Shell,
) -> None:
    known = orjson.dumps(event_dict("product.viewed", {"product_id": "p"}, at=T0))
    anonymous = orjson.dumps(
        event_dict(
            "product.viewed", {"product_id": "p"}, at=T0, customer_id=None, anonymous_id="dev-9"
        )
    )
    not_json = b"{oops"
    no_properties = orjson.dumps({**event_dict("cart.item_added", at=T0), "properties": {}})

    agent = shell.pipeline.app.agents["omnicue.ingest"]
    async with agent.test_context() as ingest:
        for value in (known, not_json, anonymous, no_properties):
            await ingest.put(value, key=b"producer-key")
        await asyncio.sleep(0.2)

    assert shell.keys(topics.CUSTOMER_INPUTS) == [b"c1", b"anon:dev-9"]
    forwarded = shell.on(topics.CUSTOMER_INPUTS)
    assert [e["type"] for e in forwarded] == ["product.viewed", "product.viewed"]

    dead = [
        (value, dict(headers or []))
        for name, _, value, _, headers in shell.sender.records
        if name == topics.EVENTS_DLQ
    ]
    assert [value for value, _ in dead] == [not_json, no_properties], "original bytes, unchanged"
    assert [h["omnicue.error.class"] for _, h in dead] == [b"json", b"schema"]
    assert all(h["omnicue.error.stage"] == b"ingest" for _, h in dead)
    assert b"cart_id" in dead[1][1]["omnicue.error.message"]
    assert shell.keys(topics.EVENTS_DLQ) == [b"producer-key", b"producer-key"]
