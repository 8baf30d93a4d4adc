"""Builders of contract-valid events and rules for tests."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

from schemas.events import Event, event_from_dict
from schemas.rules import rules_from_data
from triggers.ruleset import RuleSet, compile_rules

T0 = datetime(2026, 3, 2, 1, 0, tzinfo=UTC)
_ids = itertools.count(1)


def event_dict(
    type_: str,
    properties: dict[str, Any] | None = None,
    *,
    customer_id: str | None = "c1",
    at: datetime | None = None,
    channel: str = "web",
    event_id: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "event_id": event_id or f"ev-{next(_ids)}",
        "type": type_,
        "occurred_at": (at or T0).isoformat(),
        "channel": channel,
        "properties": properties or {},
    }
    if customer_id is not None:
        data["customer_id"] = customer_id
    data.update(extra)
    return data


def event(type_: str, properties: dict[str, Any] | None = None, **kw: Any) -> Event:
    return event_from_dict(event_dict(type_, properties, **kw))


def identify(email: str | None = "kim@example.com", phone: str | None = None, **kw: Any) -> Event:
    traits = {k: v for k, v in {"email": email, "phone": phone}.items() if v is not None}
    return event("identify", {"traits": traits}, **kw)


def consent(channel: str, granted: bool = True, category: str = "marketing", **kw: Any) -> Event:
    return event(
        "consent.updated", {"channel": channel, "category": category, "granted": granted}, **kw
    )


def device(token: str = "tok-1", **kw: Any) -> Event:
    return event("device.registered", {"push_token": token, "platform": "ios"}, channel="app", **kw)


def cart_add(cart_id: str = "cart-1", product_id: str = "p-1", price: float = 10_000.0,
             quantity: int = 1, **kw: Any) -> Event:
    props = {"cart_id": cart_id, "product_id": product_id, "price": price, "quantity": quantity}
    return event("cart.item_added", props, **kw)


def cart_remove(cart_id: str = "cart-1", product_id: str = "p-1", quantity: int = 1,
                **kw: Any) -> Event:
    props = {"cart_id": cart_id, "product_id": product_id, "quantity": quantity}
    return event("cart.item_removed", props, **kw)


def order(cart_id: str | None = "cart-1", value: float = 10_000.0, **kw: Any) -> Event:
    props: dict[str, Any] = {"order_id": f"o-{next(_ids)}", "value": value, "currency": "KRW"}
    if cart_id is not None:
        props["cart_id"] = cart_id
    return event("order.completed", props, **kw)


CART_RULE: dict[str, Any] = {
    "id": "cart_abandonment",
    "category": "marketing",
    "trigger": {"event": "cart.item_added", "key": "properties.cart_id"},
    "cancel_on": [
        {"event": "order.completed", "when": "event.properties.cart_id == journey.key",
         "reason": "purchased"},
        {"event": "cart.item_removed",
         "when": "event.properties.cart_id == journey.key && !(journey.key in customer.carts)",
         "reason": "cart_emptied"},
    ],
    "steps": [
        {"after": "30m", "channels": ["push", "email"], "template": "cart_reminder_1"},
        {"after": "24h", "channels": ["email"], "template": "cart_reminder_2",
         "payload": {"coupon": "CART10"}},
    ],
}


# No quiet hours and loose caps: for tests about something else than the guards.
NO_GUARDS: dict[str, Any] = {"quiet_hours": None, "caps": {"per_channel": {"limit": 10}}}


def ruleset(*rules: dict[str, Any], policy: dict[str, Any] | None = None) -> RuleSet:
    data = {
        "version": 1,
        "policy": NO_GUARDS if policy is None else policy,
        "rules": list(rules) or [CART_RULE],
    }
    return compile_rules(rules_from_data(data))


def minutes(n: float) -> timedelta:
    return timedelta(minutes=n)
