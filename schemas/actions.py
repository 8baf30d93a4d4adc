"""The outbound action contract consumed by channel senders.

`action_id` is deterministic (rule, customer, journey instance, step), so a
replayed or re-fired decision yields the same id and senders can deduplicate.
"""

from __future__ import annotations

import hashlib
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from schemas.events import ActionChannel, Category


# Contact points as logs and screens show them (the console sender, the profile view).
def mask_email(email: str) -> str:
    """`lee@example.com` -> `l**@example.com`: enough to recognise, not to write to."""
    local, at, domain = email.partition("@")
    if not at:
        return mask_secret(email)
    return f"{local[:1]}{'*' * max(len(local) - 1, 2)}@{domain}"


def mask_phone(phone: str) -> str:
    """`+821012345678` -> `*********5678`: the last four digits, as receipts print."""
    return "*" * max(len(phone) - 4, 4) + phone[-4:]


def mask_secret(value: str) -> str:
    """A device token or anything else opaque: its first four characters only."""
    return value[:4] + "…" if len(value) > 4 else "…"


class Recipient(BaseModel):
    """The contact point the action is for, on its channel."""

    model_config = ConfigDict(frozen=True)
    email: str | None = None
    phone: str | None = None
    push_token: str | None = None


class Action(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    action_id: str
    rule_id: str
    rule_version: str
    step: int = Field(ge=1)
    customer_id: str
    journey_key: str
    channel: ActionChannel
    category: Category
    template: str
    variant: str | None = None
    recipient: Recipient
    payload: dict[str, Any] = {}
    created_at: AwareDatetime
    due_at: AwareDatetime
    expires_at: AwareDatetime
    trigger_event_id: str
    trigger_occurred_at: AwareDatetime
    # The customer's, when known: senders choose the message's language by them, and
    # Korean advertising rules apply by them (senders/render.py, senders/advertising.py).
    locale: str | None = None
    timezone: str | None = None


def make_action_id(rule_id: str, customer_id: str, journey_id: str, step: int) -> str:
    """A stable id: the same rule, customer, journey instance and step give the same id."""
    digest = hashlib.sha256(f"{rule_id}\x1f{customer_id}\x1f{journey_id}\x1f{step}".encode())
    return f"act_{digest.hexdigest()[:32]}"
