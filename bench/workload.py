"""The benchmark's events and rules: realistic, contract-valid, deterministic per seed.

Every customer is identified (with an email) before any of its trigger events, so
with the bench rule every trigger event yields exactly one email action.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from schemas.events import event_adapter

TRIGGER_TYPES = ("product.viewed", "cart.item_added")
RULE_ID = "bench_immediate"

# Transactional: it needs reachability only, no consent events. One step at 0s
# completes the journey at once, so the next trigger event starts a new one.
RULES_YAML = f"""\
version: 1
rules:
  - id: {RULE_ID}
    description: Benchmark rule, one immediate email per trigger event.
    category: transactional
    trigger:
      event: [{", ".join(TRIGGER_TYPES)}]
    steps:
      - after: 0s
        channels: [email]
        template: bench_immediate
"""

_CATEGORIES = ("shoes", "outerwear", "beauty", "kitchen", "books", "toys")
_CHANNELS = ("web", "app")


@dataclass(frozen=True)
class Event:
    key: bytes
    value: bytes
    event_id: str
    triggers: bool


def customer_id(index: int) -> str:
    return f"cust-{index:06d}"


def _envelope(rng: random.Random, customer: str, occurred_at: datetime) -> dict[str, Any]:
    return {
        # From the seeded rng, not uuid4: a rerun with the same seed sends the same ids.
        "event_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "occurred_at": occurred_at.isoformat(),
        "channel": rng.choice(_CHANNELS),
        "customer_id": customer,
    }


def identify(rng: random.Random, index: int, occurred_at: datetime) -> dict[str, Any]:
    customer = customer_id(index)
    return {
        **_envelope(rng, customer, occurred_at),
        "type": "identify",
        "properties": {
            "traits": {
                "email": f"{customer}@example.com",
                "timezone": "Asia/Seoul",
                "locale": "ko-KR",
                "tier": rng.choice(("bronze", "silver", "gold")),
            }
        },
    }


def trigger(rng: random.Random, index: int, occurred_at: datetime) -> dict[str, Any]:
    customer = customer_id(index)
    product = f"sku-{rng.randrange(5000):05d}"
    price = round(rng.uniform(3, 300), 2)
    # Browsing dominates real traffic; a third of the events are cart adds.
    if rng.random() < 0.67:
        return {
            **_envelope(rng, customer, occurred_at),
            "type": "product.viewed",
            "properties": {
                "product_id": product,
                "price": price,
                "category": rng.choice(_CATEGORIES),
            },
        }
    return {
        **_envelope(rng, customer, occurred_at),
        "type": "cart.item_added",
        "properties": {
            # A few carts per customer, so cart state grows as it would in production.
            "cart_id": f"cart-{customer}-{rng.randrange(3)}",
            "product_id": product,
            "quantity": rng.randint(1, 3),
            "price": price,
        },
    }


def encode(data: dict[str, Any], *, validate: bool = True) -> Event:
    raw = orjson.dumps(data)
    if validate:
        # A bench of events the pipeline rejects would measure the dead-letter path.
        event_adapter.validate_json(raw)
    return Event(
        key=data["customer_id"].encode(),
        value=raw,
        event_id=data["event_id"],
        triggers=data["type"] in TRIGGER_TYPES,
    )


def generate(events: int, customers: int, seed: int = 7) -> list[Event]:
    """`customers` identify events first, then `events` trigger events over them."""
    rng = random.Random(seed)
    now = datetime.now(UTC)
    out = [encode(identify(rng, i, now)) for i in range(customers)]
    out += [encode(trigger(rng, rng.randrange(customers), now)) for _ in range(events)]
    return out
