"""Per-customer state and how each event changes it (the reducer)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from schemas.decisions import Decision
from schemas.events import (
    FEEDBACK_TYPES,
    CartItemAdded,
    CartItemRemoved,
    ConsentUpdated,
    DeviceRegistered,
    DeviceUnregistered,
    Event,
    Identify,
    MessageFeedback,
    OrderCompleted,
)

# Recent event ids per customer: at-least-once delivery redelivers events after a
# crash, and applying one twice would double cart quantities or revenue.
RECENT_EVENT_IDS = 32
# Decisions kept per customer to answer "why (not)?" without another store.
RECENT_DECISIONS = 20
SENDABLE_CHANNELS = frozenset({"push", "email", "sms", "kakao"})
# A cart untouched this long is gone: store platforms expire carts too (Magento's
# default quote lifetime is 30 days).
CART_RETENTION = timedelta(days=30)

# The state's nested parts are plain dataclasses, not pydantic models: the engine
# changes them on nearly every event, and a model's validated attribute assignment
# costs far more than a slot write. Pydantic still validates and serializes them as
# fields of `CustomerState` (with `_NESTED` as their config), so the stored JSON and
# its checks are the same as for models.
_NESTED = ConfigDict(extra="forbid")


@dataclass(slots=True, kw_only=True)
class CartLine:
    __pydantic_config__: ClassVar[ConfigDict] = _NESTED
    quantity: int
    price: float


@dataclass(slots=True, kw_only=True)
class Cart:
    __pydantic_config__: ClassVar[ConfigDict] = _NESTED
    lines: dict[str, CartLine] = field(default_factory=dict)
    updated_at: datetime

    @property
    def item_count(self) -> int:
        return sum(line.quantity for line in self.lines.values())

    @property
    def value(self) -> float:
        return round(sum(line.quantity * line.price for line in self.lines.values()), 2)

    def as_payload(self, cart_id: str) -> dict[str, Any]:
        return {
            "cart_id": cart_id,
            "items": [
                {"product_id": pid, "quantity": line.quantity, "price": line.price}
                for pid, line in self.lines.items()
            ],
            "value": self.value,
        }


@dataclass(slots=True, kw_only=True)
class SentRecord:
    """A marketing action sent, for frequency caps."""

    __pydantic_config__: ClassVar[ConfigDict] = _NESTED
    at: datetime
    channel: str
    rule_id: str


@dataclass(slots=True, kw_only=True)
class Engagement:
    __pydantic_config__: ClassVar[ConfigDict] = _NESTED
    sent: int = 0
    engaged: int = 0

    @property
    def rate(self) -> float:
        return self.engaged / self.sent if self.sent else 0.0


@dataclass(slots=True, kw_only=True)
class Journey:
    """One running instance of a rule for a customer (and key, e.g. one cart)."""

    __pydantic_config__: ClassVar[ConfigDict] = _NESTED
    rule_id: str
    rule_version: str
    key: str
    # The id of the event that started this instance: part of every action id.
    journey_id: str
    # Step delays count from here: the last (re)start of the journey.
    started_at: datetime
    next_step: int = 1
    # When the pending step is next evaluated: its due time, or later when deferred.
    due_at: datetime
    # The pending step's own due time (`started_at` + its `after`); expiry counts from it.
    step_due_at: datetime
    variant: str | None = None
    trigger_event_id: str
    trigger_occurred_at: datetime
    # Evaluations of the pending step that raised (a bug or data no rule expected):
    # each one retries later, never in a loop, until the step expires.
    failures: int = 0
    # The profile this journey started under, when it was merged in from another one
    # (an anonymous visitor who then identified): its action ids keep that profile.
    origin: str | None = None


class CustomerState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    customer_id: str
    email: str | None = None
    email_bounced: bool = False
    phone: str | None = None
    timezone: str | None = None
    locale: str | None = None
    traits: dict[str, Any] = Field(default_factory=dict)
    push_tokens: dict[str, str] = Field(default_factory=dict)
    # "<channel>:<category>" -> granted
    consents: dict[str, bool] = Field(default_factory=dict)
    # "<channel>:<category>" -> when that consent was given or revoked: when two
    # profiles merge, the more recent decision wins.
    consented_at: dict[str, datetime] = Field(default_factory=dict)
    carts: dict[str, Cart] = Field(default_factory=dict)
    last_activity: dict[str, datetime] = Field(default_factory=dict)
    order_count: int = 0
    revenue: float = 0.0
    journeys: dict[str, Journey] = Field(default_factory=dict)
    # rule version -> its definition (canonical JSON), for every version a journey
    # runs on: the journey keeps the steps it started with, whatever rules the worker
    # that evaluates it has loaded (after a restart, a rebalance or a deployment).
    rule_versions: dict[str, str] = Field(default_factory=dict)
    # rule id -> when its last journey started (reentry); slots of `once` rules started.
    last_started: dict[str, datetime] = Field(default_factory=dict)
    once_started: list[str] = Field(default_factory=list)
    # Repeat triggers (rule|key -> recent occurrences), e.g. product views.
    occurrences: dict[str, list[datetime]] = Field(default_factory=dict)
    sent_log: list[SentRecord] = Field(default_factory=list)
    engagement: dict[str, Engagement] = Field(default_factory=dict)
    recent_event_ids: list[str] = Field(default_factory=list)
    recent_decisions: list[Decision] = Field(default_factory=list)
    # Profiles merged into this one (`triggers.identity`), so a merge applied again
    # (a link redelivered) changes nothing.
    merged_profiles: list[str] = Field(default_factory=list)

    def next_due(self) -> datetime | None:
        """When this customer next needs the timer (None: no pending step)."""
        journeys = self.journeys
        if not journeys:
            return None
        return min([j.due_at for j in journeys.values()])


def journey_slot(rule_id: str, key: str) -> str:
    return f"{rule_id}|{key}"


def split_slot(slot: str) -> tuple[str, str]:
    """A `journey_slot`'s rule id and key (rule ids have no "|")."""
    rule_id, _, key = slot.partition("|")
    return rule_id, key


def apply_event(state: CustomerState, event: Event) -> None:
    """Fold one event into the state (in place: the caller owns a private copy)."""
    previous = state.last_activity.get(event.channel)
    if previous is None or event.occurred_at > previous:
        state.last_activity[event.channel] = event.occurred_at
    reducer = _REDUCERS.get(type(event))
    if reducer is not None:
        reducer(state, event)


def _identify(state: CustomerState, event: Identify) -> None:
    traits = event.properties.traits
    if traits.email is not None and traits.email != state.email:
        state.email = traits.email
        state.email_bounced = False
    if traits.phone is not None:
        state.phone = traits.phone
    if traits.timezone is not None:
        state.timezone = traits.timezone
    if traits.locale is not None:
        state.locale = traits.locale
    if traits.model_extra:
        state.traits.update(traits.model_extra)


def _consent(state: CustomerState, event: ConsentUpdated) -> None:
    consent = event.properties
    slot = f"{consent.channel}:{consent.category}"
    state.consents[slot] = consent.granted
    state.consented_at[slot] = event.occurred_at


def _device_registered(state: CustomerState, event: DeviceRegistered) -> None:
    state.push_tokens[event.properties.push_token] = event.properties.platform


def _device_unregistered(state: CustomerState, event: DeviceUnregistered) -> None:
    state.push_tokens.pop(event.properties.push_token, None)


def _cart_item_added(state: CustomerState, event: CartItemAdded) -> None:
    added = event.properties
    cart = state.carts.get(added.cart_id)
    if cart is None:
        # Old carts are looked at when a new one starts: a customer keeps the carts
        # of the last `CART_RETENTION`, not of their whole history.
        _forget_idle_carts(state, event.occurred_at)
        cart = Cart(updated_at=event.occurred_at)
    line = cart.lines.get(added.product_id)
    quantity = added.quantity + (line.quantity if line else 0)
    cart.lines[added.product_id] = CartLine(quantity=quantity, price=added.price)
    cart.updated_at = event.occurred_at
    state.carts[added.cart_id] = cart


def _forget_idle_carts(state: CustomerState, now: datetime) -> None:
    """Drop carts untouched for `CART_RETENTION`, unless a journey is keyed by one
    (its actions carry the cart's lines)."""
    cutoff = now - CART_RETENTION
    idle = [cart_id for cart_id, cart in state.carts.items() if cart.updated_at <= cutoff]
    if idle:
        in_journeys = {journey.key for journey in state.journeys.values()}
        for cart_id in idle:
            if cart_id not in in_journeys:
                del state.carts[cart_id]


def _cart_item_removed(state: CustomerState, event: CartItemRemoved) -> None:
    removed = event.properties
    existing = state.carts.get(removed.cart_id)
    if existing is not None and removed.product_id in existing.lines:
        remaining = existing.lines[removed.product_id].quantity - removed.quantity
        if remaining > 0:
            existing.lines[removed.product_id].quantity = remaining
        else:
            del existing.lines[removed.product_id]
        existing.updated_at = event.occurred_at
        if not existing.lines:
            # An emptied cart is gone: rules test `journey.key in customer.carts`.
            del state.carts[removed.cart_id]


def _order_completed(state: CustomerState, event: OrderCompleted) -> None:
    state.order_count += 1
    state.revenue = round(state.revenue + event.properties.value, 2)
    if event.properties.cart_id is not None:
        state.carts.pop(event.properties.cart_id, None)


ENGAGED = frozenset({"message.opened", "message.clicked"})


def _apply_feedback(state: CustomerState, event: MessageFeedback) -> None:
    assert event.type in FEEDBACK_TYPES
    if event.channel in SENDABLE_CHANNELS:
        if event.type == "message.sent":
            state.engagement.setdefault(event.channel, Engagement()).sent += 1
        elif event.type in ENGAGED:
            state.engagement.setdefault(event.channel, Engagement()).engaged += 1
    if event.type == "message.bounced" and event.channel == "email":
        state.email_bounced = True
    elif event.type == "message.unsubscribed" and event.channel in SENDABLE_CHANNELS:
        state.consents[f"{event.channel}:marketing"] = False
        state.consented_at[f"{event.channel}:marketing"] = event.occurred_at


# Event class -> how it changes the state; the other types only count as activity.
_REDUCERS: dict[type, Callable[[CustomerState, Any], None]] = {
    Identify: _identify,
    ConsentUpdated: _consent,
    DeviceRegistered: _device_registered,
    DeviceUnregistered: _device_unregistered,
    CartItemAdded: _cart_item_added,
    CartItemRemoved: _cart_item_removed,
    OrderCompleted: _order_completed,
    MessageFeedback: _apply_feedback,
}


def remember_event(state: CustomerState, event_id: str) -> bool:
    """Record the event id; False when it was already applied (a redelivery)."""
    recent = state.recent_event_ids
    if event_id in recent:
        return False
    recent.append(event_id)
    if len(recent) > RECENT_EVENT_IDS:
        del recent[: len(recent) - RECENT_EVENT_IDS]
    return True
