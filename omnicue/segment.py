"""Segment Tracking API messages as Omnicue contract events: a pure mapping.

`map_message` turns one Segment message (a `track`, `identify`, `alias`, `page` or
`screen` dict, as Segment's libraries send them) into the contract events it stands
for, or raises `MappingError` with a message naming the field. The events are dicts,
still to be validated by the contract (`omnicue.producer.validate_event`): this module
decides names and defaults, the contract decides what is valid. README, "HTTP ingest
(Segment-compatible)", has the table.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, get_args

from schemas.events import EVENT_TYPES, Channel

CHANNELS: frozenset[str] = frozenset(get_args(Channel))
# What Segment's own libraries put in a message's `channel`: not a marketing channel,
# so the write key's channel applies.
SEGMENT_CHANNELS = frozenset({"server", "browser", "mobile", "client"})

# Segment e-commerce spec v2 names -> contract types.
ECOMMERCE_EVENTS: dict[str, str] = {
    "Product Viewed": "product.viewed",
    "Product Added": "cart.item_added",
    "Product Removed": "cart.item_removed",
    "Checkout Started": "checkout.started",
    "Order Completed": "order.completed",
    "Order Refunded": "order.refunded",
}
# A `track` named like a contract type is that type; `custom` needs a name of its own.
CONTRACT_TRACK_TYPES = frozenset(EVENT_TYPES) - {"custom"}
# Segment's mobile libraries attach the push token to every message; a registration
# from these (and from `identify`) keeps it current without doubling the traffic.
DEVICE_EVENTS = frozenset({"Application Installed", "Application Opened", "Application Updated"})
PAGE_EVENT = "Page Viewed"
SCREEN_EVENT = "Screen Viewed"
MESSAGE_TYPES = frozenset({"track", "identify", "alias", "page", "screen"})


class MappingError(ValueError):
    """The message cannot stand for a contract event; says which field and why."""


def map_message(
    message: Mapping[str, Any], channel: Channel, received_at: datetime
) -> list[dict[str, Any]]:
    """The contract events (dicts, not yet validated) a Segment message stands for.

    `channel` is the write key's, used unless the message names an Omnicue channel;
    `received_at` stands in for a missing `timestamp`.
    """
    kind = message.get("type")
    if kind not in MESSAGE_TYPES:
        supported = ", ".join(sorted(MESSAGE_TYPES))
        raise MappingError(f"type: {kind!r} is not supported (expected one of {supported})")
    envelope = _envelope(message, channel, received_at)
    context = _mapping(message.get("context"), "context")
    if kind == "identify":
        events = [_identify(message, context, envelope)]
    elif kind == "alias":
        events = [_alias(message, envelope)]
    elif kind == "track":
        events = [_track(message, envelope)]
    else:
        events = [_page_or_screen(message, envelope, kind)]
    if kind == "identify" or (kind == "track" and message.get("event") in DEVICE_EVENTS):
        registration = _device_registration(context, envelope)
        if registration is not None:
            events.append(registration)
    return events


def _envelope(
    message: Mapping[str, Any], channel: Channel, received_at: datetime
) -> dict[str, Any]:
    message_id = message.get("messageId")
    if not isinstance(message_id, str) or not message_id:
        # It is the event id, which is what makes a client's retry a duplicate.
        raise MappingError("messageId: required, a non-empty string (it becomes event_id)")
    named = message.get("channel")
    if isinstance(named, str) and named in CHANNELS:
        chosen: str = named
    elif named is None or named in SEGMENT_CHANNELS:
        chosen = channel
    else:
        raise MappingError(
            f"channel: {named!r} is neither an Omnicue channel ({', '.join(sorted(CHANNELS))}) "
            f"nor one of Segment's ({', '.join(sorted(SEGMENT_CHANNELS))})"
        )
    timestamp = message.get("timestamp")
    if timestamp is None:
        timestamp = message.get("originalTimestamp")
    envelope: dict[str, Any] = {
        "event_id": message_id,
        "occurred_at": received_at.isoformat() if timestamp is None else timestamp,
        "channel": chosen,
    }
    for segment_field, field in (("userId", "customer_id"), ("anonymousId", "anonymous_id")):
        value = message.get(segment_field)
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # Segment accepts numeric ids and treats them as strings
        if value is not None and value != "":
            envelope[field] = value
    return envelope


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    # dict, not the Mapping ABC: JSON objects are dicts, and an ABC check costs more.
    if type(value) is not dict:
        raise MappingError(f"{where}: must be an object")
    return value


def _identify(
    message: Mapping[str, Any], context: Mapping[str, Any], envelope: dict[str, Any]
) -> dict[str, Any]:
    traits = dict(_mapping(message.get("traits"), "traits"))
    # Explicit traits win over what the library read from the device.
    for key in ("timezone", "locale"):
        if key not in traits and isinstance(context.get(key), str):
            traits[key] = context[key]
    return {**envelope, "type": "identify", "properties": {"traits": traits}}


def _alias(message: Mapping[str, Any], envelope: dict[str, Any]) -> dict[str, Any]:
    previous = message.get("previousId")
    if not isinstance(previous, str) or not previous:
        raise MappingError("previousId: required for alias, a non-empty string")
    if "customer_id" not in envelope:
        raise MappingError("userId: required for alias (the id previousId now belongs to)")
    return {**envelope, "type": "alias", "properties": {"previous_id": previous}}


def _track(message: Mapping[str, Any], envelope: dict[str, Any]) -> dict[str, Any]:
    name = message.get("event")
    if not isinstance(name, str) or not name:
        raise MappingError("event: required for track, a non-empty string")
    properties = dict(_mapping(message.get("properties"), "properties"))
    event_type = ECOMMERCE_EVENTS.get(name)
    if event_type is not None:
        return {**envelope, "type": event_type, "properties": _ecommerce(event_type, properties)}
    if name in CONTRACT_TRACK_TYPES:
        return {**envelope, "type": name, "properties": properties}
    return {**envelope, "type": "custom", "properties": {**properties, "event": name}}


def _ecommerce(event_type: str, properties: dict[str, Any]) -> dict[str, Any]:
    if event_type == "order.completed":
        if "value" not in properties:
            # `total` is what the customer paid (after discounts, with shipping and tax);
            # `revenue` excludes shipping and tax: the better of the two comes first.
            for source in ("total", "revenue"):
                if source in properties:
                    properties["value"] = properties[source]
                    break
            else:
                raise MappingError(
                    "properties.value: Order Completed needs value, total or revenue"
                )
        if "items" not in properties and "products" in properties:
            properties["items"] = properties.pop("products")
    if event_type == "order.completed" and "currency" not in properties:
        raise MappingError(
            "properties.currency: Order Completed needs an ISO 4217 code such as KRW "
            "(optional in Segment's spec, required by the contract: no currency is assumed)"
        )
    currency = properties.get("currency")
    if isinstance(currency, str):
        properties["currency"] = currency.upper()  # Segment's examples use "usd" too
    return properties


def _page_or_screen(
    message: Mapping[str, Any], envelope: dict[str, Any], kind: str
) -> dict[str, Any]:
    properties = dict(_mapping(message.get("properties"), "properties"))
    for key in ("name", "category"):
        value = message.get(key)
        if value is not None:
            properties.setdefault(key, value)
    event = PAGE_EVENT if kind == "page" else SCREEN_EVENT
    return {**envelope, "type": "custom", "properties": {**properties, "event": event}}


def _device_registration(
    context: Mapping[str, Any], envelope: dict[str, Any]
) -> dict[str, Any] | None:
    device = _mapping(context.get("device"), "context.device")
    token = device.get("token")
    if not token:
        return None
    platform = _platform(device, _mapping(context.get("os"), "context.os"))
    if platform is None:
        raise MappingError(
            "context.device.token: a push token needs its platform: context.device.type "
            "or context.os.name ios or android"
        )
    return {
        **envelope,
        # Its own id, derived: a retried message derives the same one.
        "event_id": f"{envelope['event_id']}:device",
        "type": "device.registered",
        "properties": {"push_token": token, "platform": platform},
    }


def _platform(device: Mapping[str, Any], os: Mapping[str, Any]) -> str | None:
    for value in (device.get("type"), os.get("name")):
        if isinstance(value, str):
            name = value.lower()
            if name in ("ios", "ipados", "android"):
                return "ios" if name == "ipados" else name
    return None


# Contract type -> the Segment e-commerce name that maps to it.
SEGMENT_NAMES: dict[str, str] = {value: key for key, value in ECOMMERCE_EVENTS.items()}


def to_segment(event: Mapping[str, Any]) -> dict[str, Any]:
    """A contract event (dict) as the Segment message that `map_message` maps back to
    it: what a Segment client would send for it (the simulator sends its web and app
    traffic this way). The event's channel rides in the message's `channel`."""
    message: dict[str, Any] = {
        "messageId": event["event_id"],
        "timestamp": event["occurred_at"],
        "channel": event["channel"],
    }
    if event.get("customer_id") is not None:
        message["userId"] = event["customer_id"]
    if event.get("anonymous_id") is not None:
        message["anonymousId"] = event["anonymous_id"]
    properties = dict(event.get("properties") or {})
    kind = event["type"]
    if kind == "identify":
        message |= {"type": "identify", "traits": properties.get("traits", {})}
    elif kind == "alias":
        message |= {"type": "alias", "previousId": properties["previous_id"]}
    elif kind == "custom":
        name = properties.pop("event")
        message |= {"type": "track", "event": name, "properties": properties}
    else:
        name = SEGMENT_NAMES.get(kind, kind)
        message |= {"type": "track", "event": name, "properties": properties}
    return message
