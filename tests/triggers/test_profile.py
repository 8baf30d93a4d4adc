"""The profile view: every part of the state, per channel, contact points masked."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from schemas.events import Event, event_from_dict
from tests.factories import event_dict
from triggers.profile import customer_profile, mask_email, mask_phone, mask_secret
from triggers.state import CustomerState, apply_event

AT = datetime(2026, 3, 2, 10, 15, tzinfo=UTC)


def test_contact_points_are_masked() -> None:
    assert mask_email("lee@example.com") == "l**@example.com"
    assert mask_email("a@b.kr") == "a**@b.kr"
    assert mask_phone("+821012345678") == "*********5678"
    assert mask_phone("123") == "****123"
    assert mask_secret("fcm-token-abcdef") == "fcm-…"


def event(type_: str, properties: dict[str, Any]) -> Event:
    return event_from_dict(event_dict(type_, properties, customer_id="c-9", at=AT))


def test_the_profile_shows_identifiers_channels_carts_orders_and_activity() -> None:
    state = CustomerState(customer_id="c-9")
    for e in [
        event("identify", {"traits": {"email": "lee@example.com", "phone": "+821012345678",
                                      "timezone": "Asia/Seoul", "tier": "gold"}}),
        event("consent.updated", {"channel": "email", "category": "marketing",
                                  "granted": True}),
        event("device.registered", {"push_token": "fcm-token-abcdef", "platform": "ios"}),
        event("cart.item_added", {"cart_id": "K", "product_id": "p-1", "quantity": 2,
                                  "price": 9_900}),
        event("order.completed", {"order_id": "O-1", "value": 5_000, "currency": "KRW"}),
    ]:  # fmt: skip
        apply_event(state, e)

    profile = customer_profile(state)

    assert profile["identifiers"] == {
        "customer_id": "c-9",
        "email": "l**@example.com",
        "phone": "*********5678",
        "push_tokens": ["fcm-…"],
        "merged_profiles": [],
    }
    assert profile["traits"] == {"tier": "gold"} and profile["timezone"] == "Asia/Seoul"
    assert profile["channels"]["email"] == {
        "reachable": True, "consents": {"marketing": True}, "engagement": None, "bounced": False,
    }  # fmt: skip
    assert profile["channels"]["push"]["reachable"] and profile["channels"]["push"]["devices"] == 1
    assert not profile["channels"]["kakao"]["consents"]
    assert profile["carts"]["K"]["items"] == [
        {"product_id": "p-1", "quantity": 2, "price": 9900.0}
    ]
    assert profile["orders"] == {"count": 1, "revenue": 5000.0}
    assert profile["last_activity"] == {"web": AT.isoformat()}
    # Nothing raw leaks: no contact point appears anywhere in the profile.
    text = repr(profile)
    assert "lee@example.com" not in text and "12345678" not in text and "abcdef" not in text
