from __future__ import annotations

from datetime import UTC

import pytest
from pydantic import ValidationError

from schemas.events import (
    EVENT_TYPES,
    customer_key,
    describe_validation_error,
    event_from_dict,
    parse_event,
)
from tests.factories import event_dict


def test_occurred_at_needs_an_offset_and_is_normalised_to_utc() -> None:
    e = event_from_dict(event_dict("store.visited", {"store_id": "s1"},
                                   occurred_at="2026-03-02T10:00:00+09:00"))
    assert e.occurred_at.tzinfo == UTC and e.occurred_at.hour == 1
    with pytest.raises(ValidationError, match="timezone"):
        event_from_dict(event_dict("store.visited", {"store_id": "s1"},
                                   occurred_at="2026-03-02T10:00:00"))


def test_unknown_envelope_fields_are_rejected_but_extra_properties_are_kept() -> None:
    with pytest.raises(ValidationError, match="Extra inputs"):
        event_from_dict(event_dict("store.visited", {"store_id": "s1"}, shop="x"))
    e = event_from_dict(event_dict("store.visited", {"store_id": "s1", "floor": 3}))
    assert e.properties.model_extra == {"floor": 3}


def test_an_id_is_required_and_anonymous_ids_get_their_own_key() -> None:
    with pytest.raises(ValidationError, match="customer_id or anonymous_id"):
        event_from_dict(event_dict("store.visited", {"store_id": "s1"}, customer_id=None))
    e = event_from_dict(
        event_dict("store.visited", {"store_id": "s1"}, customer_id=None, anonymous_id="d-9")
    )
    assert customer_key(e) == "anon:d-9"


def test_properties_are_typed_per_event_type() -> None:
    with pytest.raises(ValidationError) as info:
        event_from_dict(event_dict("cart.item_added", {"cart_id": "c", "price": -1}))
    text = describe_validation_error(info.value)
    assert "properties.product_id: Field required" in text
    assert "properties.price" in text


def test_unknown_type_and_bad_json_are_clear_errors() -> None:
    with pytest.raises(ValidationError) as info:
        event_from_dict(event_dict("cart.exploded"))
    assert "does not match any of the expected tags" in describe_validation_error(info.value)
    with pytest.raises(ValidationError) as info:
        parse_event(b"{oops")
    assert "Invalid JSON" in describe_validation_error(info.value)


def test_timezone_traits_must_be_iana_names() -> None:
    with pytest.raises(ValidationError, match="IANA"):
        event_from_dict(event_dict("identify", {"traits": {"timezone": "Mars/Olympus"}}))


def test_catalog_covers_the_feedback_events() -> None:
    for kind in ("sent", "delivered", "opened", "clicked", "bounced", "unsubscribed", "failed"):
        assert f"message.{kind}" in EVENT_TYPES
        event_from_dict(event_dict(f"message.{kind}", {"action_id": "act_1"}, channel="email"))
