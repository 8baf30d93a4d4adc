"""A customer's profile as people read it: the body of GET /customers/{id}.

Everything the worker knows about one customer, per channel, with the contact
points masked: the profile is for support staff and SREs reading a screen, and a
push token, email or phone number is not theirs to copy.
"""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter

from schemas.actions import mask_email, mask_phone, mask_secret
from schemas.events import ActionChannel
from triggers.channels import recipient
from triggers.state import SENDABLE_CHANNELS, CustomerState, Engagement, Journey

_journey_adapter = TypeAdapter(Journey)
_engagement_adapter = TypeAdapter(Engagement)


def customer_profile(state: CustomerState) -> dict[str, Any]:
    """The customer's profile, as JSON-ready data (no clock: the state alone)."""
    channels: dict[str, Any] = {}
    for channel in sorted(SENDABLE_CHANNELS):
        consents = {
            key.partition(":")[2]: granted
            for key, granted in sorted(state.consents.items())
            if key.partition(":")[0] == channel
        }
        engagement = state.engagement.get(channel)
        channels[channel] = {
            "reachable": recipient(state, cast_channel(channel)) is not None,
            "consents": consents,
            "engagement": (
                _engagement_adapter.dump_python(engagement, mode="json")
                if engagement is not None
                else None
            ),
        }
    channels["email"]["bounced"] = state.email_bounced
    channels["push"]["devices"] = len(state.push_tokens)
    return {
        "customer_id": state.customer_id,
        "identifiers": {
            "customer_id": state.customer_id,
            "email": mask_email(state.email) if state.email else None,
            "phone": mask_phone(state.phone) if state.phone else None,
            "push_tokens": [mask_secret(token) for token in state.push_tokens],
            # Profiles merged into this one: linked anonymous ids, aliased customers.
            "merged_profiles": list(state.merged_profiles),
        },
        "timezone": state.timezone,
        "locale": state.locale,
        "traits": state.traits,
        "channels": channels,
        "carts": {
            cart_id: {**cart.as_payload(cart_id), "updated_at": cart.updated_at.isoformat()}
            for cart_id, cart in sorted(state.carts.items())
        },
        "orders": {"count": state.order_count, "revenue": state.revenue},
        "last_activity": {
            channel: at.isoformat() for channel, at in sorted(state.last_activity.items())
        },
        "journeys": [
            _journey_adapter.dump_python(journey, mode="json")
            for _, journey in sorted(state.journeys.items())
        ],
        "recent_decisions": [
            d.model_dump(mode="json", exclude_none=True) for d in reversed(state.recent_decisions)
        ],
        "recent_event_ids": list(state.recent_event_ids),
    }


def cast_channel(channel: str) -> ActionChannel:
    if channel not in SENDABLE_CHANNELS:
        raise ValueError(f"not a channel Omnicue sends on: {channel!r}")
    return channel  # type: ignore[return-value]
