"""The Segment -> contract mapping, on in-memory messages."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from omnicue.producer import InvalidEvent, validate_event
from omnicue.segment import MappingError, map_message
from schemas.events import Custom, OrderCompleted
from schemas.rules import RulesFile
from triggers.engine import EnginePolicy, decide
from triggers.ruleset import compile_rules

RECEIVED = datetime(2026, 12, 4, 1, 0, tzinfo=UTC)


def message(kind: str = "track", **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "type": kind,
        "messageId": "m-1",
        "timestamp": "2026-12-04T00:59:00+09:00",
        "userId": "c-1",
        "context": {"library": {"name": "analytics-python", "version": "2.4.0"}},
        "integrations": {},
    }
    base.update(fields)
    return base


def mapped(msg: dict[str, Any], channel: Any = "web") -> list[dict[str, Any]]:
    return map_message(msg, channel, RECEIVED)


def test_envelope_message_id_timestamp_ids_and_key_channel() -> None:
    [event] = mapped(message(event="Video Played", anonymousId="a-1"))
    assert event["event_id"] == "m-1"
    assert event["occurred_at"] == "2026-12-04T00:59:00+09:00"
    assert event["channel"] == "web"
    assert (event["customer_id"], event["anonymous_id"]) == ("c-1", "a-1")
    valid = validate_event(event)
    assert valid.occurred_at == datetime(2026, 12, 3, 15, 59, tzinfo=UTC)


def test_channel_named_by_the_message_wins_segment_channels_do_not() -> None:
    assert mapped(message(event="X", channel="store"))[0]["channel"] == "store"
    assert mapped(message(event="X", channel="server"), "app")[0]["channel"] == "app"
    with pytest.raises(MappingError, match="channel: 'emial'"):
        mapped(message(event="X", channel="emial"))


def test_missing_timestamp_is_the_time_received_missing_message_id_is_an_error() -> None:
    msg = message(event="X")
    del msg["timestamp"]
    assert mapped(msg)[0]["occurred_at"] == RECEIVED.isoformat()
    del msg["messageId"]
    with pytest.raises(MappingError, match="messageId"):
        mapped(msg)


def test_numeric_user_id_is_a_string_and_no_id_is_a_contract_error() -> None:
    assert mapped(message(event="X", userId=42))[0]["customer_id"] == "42"
    msg = message(event="X")
    del msg["userId"]
    with pytest.raises(InvalidEvent, match="customer_id or anonymous_id"):
        validate_event(mapped(msg)[0])


@pytest.mark.parametrize(
    ("name", "properties", "event_type"),
    [
        ("Product Viewed", {"product_id": "p1", "price": 9.5}, "product.viewed"),
        ("Product Added", {"cart_id": "k1", "product_id": "p1", "price": 9.5}, "cart.item_added"),
        ("Product Removed", {"cart_id": "k1", "product_id": "p1"}, "cart.item_removed"),
        ("Checkout Started", {"cart_id": "k1"}, "checkout.started"),
        ("Order Refunded", {"order_id": "o1"}, "order.refunded"),
        (
            "consent.updated",
            {"channel": "email", "category": "marketing", "granted": True},
            "consent.updated",
        ),
    ],
)
def test_ecommerce_and_contract_names(
    name: str, properties: dict[str, Any], event_type: str
) -> None:
    [event] = mapped(message(event=name, properties={**properties, "sku": "S-1"}))
    valid = validate_event(event)
    assert valid.type == event_type
    assert valid.properties.model_extra == {"sku": "S-1"}


def test_order_completed_cart_id_total_products_and_currency() -> None:
    props = {
        "order_id": "o1",
        "cart_id": "k1",
        "total": 27.5,
        "revenue": 25.0,
        "currency": "krw",
        "products": [{"product_id": "p1", "price": 25.0, "quantity": 1, "name": "Mug"}],
    }
    valid = validate_event(mapped(message(event="Order Completed", properties=props))[0])
    assert isinstance(valid, OrderCompleted)
    assert valid.properties.cart_id == "k1"
    assert valid.properties.value == 27.5  # total before revenue
    assert valid.properties.currency == "KRW"
    assert valid.properties.items[0].product_id == "p1"
    del props["total"]
    valid = validate_event(mapped(message(event="Order Completed", properties=props))[0])
    assert isinstance(valid, OrderCompleted)
    assert valid.properties.value == 25.0


def test_order_completed_without_value_or_currency_is_rejected_clearly() -> None:
    with pytest.raises(MappingError, match="value, total or revenue"):
        mapped(message(event="Order Completed", properties={"order_id": "o1", "currency": "KRW"}))
    with pytest.raises(MappingError, match="currency: Order Completed needs"):
        mapped(message(event="Order Completed", properties={"order_id": "o1", "total": 1}))


def test_product_added_without_cart_id_is_a_contract_error_naming_the_field() -> None:
    event = mapped(message(event="Product Added", properties={"product_id": "p1", "price": 1}))[0]
    with pytest.raises(InvalidEvent, match=r"cart\.item_added\.properties\.cart_id"):
        validate_event(event)


def test_any_other_track_is_custom_with_its_name_and_properties() -> None:
    [event] = mapped(message(event="Video Played", properties={"name": "Intro", "position": 3}))
    valid = validate_event(event)
    assert isinstance(valid, Custom)
    assert valid.properties.event == "Video Played"
    assert valid.properties.model_extra == {"name": "Intro", "position": 3}
    # `custom` itself is no contract name to pick: it needs a name of its own.
    assert validate_event(mapped(message(event="custom"))[0]).properties.event == "custom"


def test_identify_traits_with_context_timezone_and_locale() -> None:
    msg = message(
        "identify",
        traits={"email": "a@example.com", "plan": "pro", "locale": "ko-KR"},
        context={"timezone": "Asia/Seoul", "locale": "en-US"},
    )
    [event] = mapped(msg)
    traits = validate_event(event).properties.traits  # type: ignore[union-attr]
    assert (traits.email, traits.timezone, traits.locale) == (
        "a@example.com",
        "Asia/Seoul",
        "ko-KR",
    )
    assert traits.model_extra == {"plan": "pro"}


def test_device_token_is_a_registration_with_a_derived_id() -> None:
    context = {"device": {"token": "tok-1", "type": "ios"}}
    identify, registration = mapped(message("identify", context=context), "app")
    assert identify["type"] == "identify"
    valid = validate_event(registration)
    assert valid.type == "device.registered"
    assert valid.event_id == "m-1:device"
    assert valid.properties.push_token == "tok-1"
    assert valid.properties.platform == "ios"
    opened = message(
        event="Application Opened", context={"device": {"token": "t"}, "os": {"name": "Android"}}
    )
    assert [e["type"] for e in mapped(opened)] == ["custom", "device.registered"]
    # Other tracks carry the token too: no registration for each of them.
    assert len(mapped(message(event="Video Played", context=context))) == 1
    with pytest.raises(MappingError, match="platform"):
        mapped(message("identify", context={"device": {"token": "t"}}))


def test_alias_page_and_screen() -> None:
    [alias] = mapped(message("alias", previousId="anon-7"))
    assert validate_event(alias).properties.previous_id == "anon-7"  # type: ignore[union-attr]
    with pytest.raises(MappingError, match="previousId"):
        mapped(message("alias"))
    [page] = mapped(message("page", name="Pricing", properties={"path": "/pricing"}))
    valid = validate_event(page)
    assert valid.properties.event == "Page Viewed"  # type: ignore[union-attr]
    assert valid.properties.model_extra == {"path": "/pricing", "name": "Pricing"}
    [screen] = mapped(message("screen", name="Home"), "app")
    assert screen["properties"] == {"name": "Home", "event": "Screen Viewed"}


def test_unsupported_type_and_bad_shapes() -> None:
    with pytest.raises(MappingError, match="'group' is not supported"):
        mapped(message("group", groupId="g"))
    with pytest.raises(MappingError, match="properties: must be an object"):
        mapped(message(event="X", properties=[1]))
    with pytest.raises(MappingError, match="event: required"):
        mapped(message())


def test_rules_trigger_on_a_custom_event_by_name() -> None:
    rules = compile_rules(
        RulesFile.model_validate(
            {
                "version": 1,
                "policy": {"quiet_hours": None},
                "rules": [
                    {
                        "id": "video_nudge",
                        "category": "transactional",
                        "trigger": {
                            "event": "custom",
                            "when": 'event.properties.event == "Video Played"',
                        },
                        "steps": [{"after": "0s", "channels": ["email"], "template": "t"}],
                    }
                ],
            }
        )
    )
    other = validate_event(mapped(message(event="Video Paused", messageId="m-0"))[0])
    played = validate_event(mapped(message(event="Video Played"))[0])
    assert not decide(None, other, RECEIVED, rules, EnginePolicy(), "c-1").decisions
    decisions = decide(None, played, RECEIVED, rules, EnginePolicy(), "c-1").decisions
    assert decisions and decisions[0].rule_id == "video_nudge"


def test_to_segment_round_trips_every_simulated_event() -> None:
    import random

    from omnicue.segment import to_segment
    from omnicue.simulator import JourneyPlanner
    from schemas.events import event_adapter

    planner = JourneyPlanner(random.Random(3), 50)
    seen = set()
    for _ in range(200):
        for event in planner.next_journey(RECEIVED):
            [back] = mapped(to_segment(event), "store")
            assert event_adapter.validate_python(back) == event_adapter.validate_python(event)
            seen.add(event["type"])
    assert {"identify", "consent.updated", "device.registered", "cart.item_added"} <= seen
    custom = {
        "event_id": "e",
        "type": "custom",
        "occurred_at": "2026-12-04T00:00:00Z",
        "channel": "web",
        "anonymous_id": "a",
        "properties": {"event": "X", "n": 1},
    }
    alias = {**custom, "type": "alias", "customer_id": "c", "properties": {"previous_id": "a"}}
    for event in (custom, alias):
        assert mapped(to_segment(event)) == [event]
