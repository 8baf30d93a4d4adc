"""Per-customer state and how each event changes it (the reducer)."""

from __future__ import annotations

import hashlib
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
# Messages remembered per channel (`CustomerState.messages`): feedback for an older one
# is `UnknownAction`, and engagement counts these. 32 a channel is months of messages
# under the packaged caps (at most 1 a channel a day), and at most 4 x 32 records.
RECENT_MESSAGES = 32

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
    """Lifetime counts per channel: messages sent, and of those, engaged (opened or
    clicked, once a message). `channel: best` ranks by `engagement_rates` instead,
    which weighs recent messages more; these are what is left of messages no longer
    remembered, and what states written before `messages` existed have."""

    __pydantic_config__: ClassVar[ConfigDict] = _NESTED
    sent: int = 0
    engaged: int = 0

    @property
    def rate(self) -> float:
        # Capped: states written before engagement counted once could count both the
        # open and the click of one message.
        return min(1.0, self.engaged / self.sent) if self.sent else 0.0


@dataclass(slots=True, kw_only=True)
class MessageRecord:
    """An action the engine emitted, and what its feedback said so far."""

    __pydantic_config__: ClassVar[ConfigDict] = _NESTED
    channel: str
    # When the engine emitted it (the decision's `now`): engagement weighs by it.
    at: datetime
    # A fingerprint of the contact point it went to (`address_fingerprint`), so a
    # bounce makes that address unreachable, not one the customer gave since.
    to: str | None = None
    # The provider accepted it (`message.sent`, or implied by a delivery or engagement).
    sent: bool = False
    # Opened or clicked: counted once, whichever came first.
    engaged: bool = False
    # Failed or bounced after all: no chance to engage, so not counted.
    undelivered: bool = False


@dataclass(slots=True, kw_only=True)
class TouchRecord:
    """An emitted action as a touch for attribution (`measure.touches`), and the
    feedback that came for it: `measure.touches.with_feedback` says what that feedback
    makes of it (a `message.failed` removes it, unless a later delivery overrides)."""

    __pydantic_config__: ClassVar[ConfigDict] = _NESTED
    action_id: str
    channel: str
    rule_id: str
    # The action's `created_at`.
    at: datetime
    variant: str | None = None
    # (feedback event type, occurred_at), in the order applied.
    feedback: list[tuple[str, datetime]] = field(default_factory=list)

    def copy(self) -> TouchRecord:
        return TouchRecord(
            action_id=self.action_id, channel=self.channel, rule_id=self.rule_id, at=self.at,
            variant=self.variant, feedback=list(self.feedback),
        )  # fmt: skip


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
    # action id -> the message, oldest first, `RECENT_MESSAGES` per channel: what
    # feedback events are checked against (`UnknownAction`) and engagement counts.
    messages: dict[str, MessageRecord] = Field(default_factory=dict)
    # channel -> the fingerprint of the address a hard bounce made unreachable there
    # (email: see also `email_bounced`). A new address has another fingerprint, so it is
    # reachable again without any reset.
    bounced: dict[str, str] = Field(default_factory=dict)
    recent_event_ids: list[str] = Field(default_factory=list)
    recent_decisions: list[Decision] = Field(default_factory=list)
    # Profiles merged into this one (`triggers.identity`), so a merge applied again
    # (a link redelivered) changes nothing.
    merged_profiles: list[str] = Field(default_factory=list)
    # The actions emitted in the last lookback (`EnginePolicy.touch_lookback`), oldest
    # first (ties by action id), with their feedback: the touches a conversion's
    # attribution record credits (`streams.conversions`).
    touches: list[TouchRecord] = Field(default_factory=list)

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
# Feedback that shows the provider accepted the message, whether or not `message.sent`
# arrived first (a provider's callback can overtake the sender's own event).
_SHOWS_SENT = frozenset({"message.sent", "message.delivered", *ENGAGED})
_UNDELIVERED = frozenset({"message.failed", "message.bounced"})
_REVOKES = frozenset({"message.unsubscribed", "message.complained"})


class UnknownAction(ValueError):  # noqa: N818 - the dead-letter reason is its name
    """A feedback event for an action this customer's state has no record of: one
    Omnicue never emitted for them, or one older than the `RECENT_MESSAGES` of its
    channel that the state remembers. The stream shell dead-letters the event."""


def address_fingerprint(address: str) -> str:
    """A short digest of a contact point: enough to tell addresses apart, not to read."""
    return hashlib.sha256(address.encode()).hexdigest()[:16]


def current_fingerprint(state: CustomerState, channel: str) -> str | None:
    """The fingerprint of the address the channel would send to now."""
    if channel == "email":
        address = state.email
    elif channel == "push":
        address = next(reversed(state.push_tokens)) if state.push_tokens else None
    else:
        address = state.phone
    return None if address is None else address_fingerprint(address)


def record_message(
    state: CustomerState, action_id: str, channel: str, at: datetime, address: str | None
) -> None:
    """Remember an emitted action, forgetting the channel's oldest past `RECENT_MESSAGES`
    (their lifetime counts stay in `engagement`)."""
    messages = state.messages
    if action_id in messages:
        return  # the same step fired again (a state rebuilt by replay): one message
    to = None if address is None else address_fingerprint(address)
    messages[action_id] = MessageRecord(channel=channel, at=at, to=to)
    if len(messages) > RECENT_MESSAGES:
        same = [aid for aid, m in messages.items() if m.channel == channel]
        for old in same[: max(0, len(same) - RECENT_MESSAGES)]:
            del messages[old]


def record_touch(
    state: CustomerState,
    action_id: str,
    channel: str,
    rule_id: str,
    at: datetime,
    variant: str | None,
    lookback: timedelta,
) -> None:
    """Remember an emitted action as a touch, forgetting touches older than `lookback`
    before `at` (no conversion applied from now on can credit them)."""
    touches = state.touches
    if any(t.action_id == action_id for t in touches):
        return  # the same step fired again (a state rebuilt by replay): one touch
    touches.append(
        TouchRecord(action_id=action_id, channel=channel, rule_id=rule_id, at=at, variant=variant)
    )
    if len(touches) > 1 and (touches[-2].at, touches[-2].action_id) > (at, action_id):
        touches.sort(key=lambda t: (t.at, t.action_id))
    cutoff = at - lookback
    if touches[0].at < cutoff:
        state.touches = [t for t in touches if t.at >= cutoff]


def check_feedback(state: CustomerState, event: MessageFeedback) -> None:
    """Raise `UnknownAction` unless the state knows the event's action (a redelivered
    event passes: the engine ignores it anyway)."""
    action_id = event.properties.action_id
    if action_id in state.messages or event.event_id in state.recent_event_ids:
        return
    # States written before `messages` existed: their recent fired decisions say which
    # actions were emitted (the newest `RECENT_DECISIONS`).
    for decision in reversed(state.recent_decisions):
        if decision.action_id == action_id and decision.channel is not None:
            state.messages[action_id] = MessageRecord(
                channel=decision.channel, at=decision.decided_at
            )
            return
    raise UnknownAction(
        f"{event.type} for action {action_id}: no such action emitted for customer "
        f"{state.customer_id} (or older than the last {RECENT_MESSAGES} on a channel)"
    )


def _apply_feedback(state: CustomerState, event: MessageFeedback) -> None:
    assert event.type in FEEDBACK_TYPES
    for touch in state.touches:
        if touch.action_id == event.properties.action_id:
            touch.feedback.append((event.type, event.occurred_at))
            break
    message = state.messages.get(event.properties.action_id)
    if message is None:
        # `evolve` checks first (`check_feedback`); only a direct `apply_event` gets here.
        return
    # The channel the action went out on, whatever the callback's envelope says.
    channel = message.channel
    kind = event.type
    if kind in _SHOWS_SENT and not message.sent:
        message.sent = True
        state.engagement.setdefault(channel, Engagement()).sent += 1
    if kind in ENGAGED and not message.engaged:
        message.engaged = True
        state.engagement.setdefault(channel, Engagement()).engaged += 1
    elif kind in _UNDELIVERED:
        message.undelivered = True
        if kind == "message.bounced":
            _bounce(state, channel, message)
    elif kind in _REVOKES and channel in SENDABLE_CHANNELS:
        slot = f"{channel}:marketing"
        decided = state.consented_at.get(slot)
        # A consent given after the unsubscribe (or complaint) happened stands.
        if decided is None or decided <= event.occurred_at:
            state.consents[slot] = False
            state.consented_at[slot] = event.occurred_at


def _bounce(state: CustomerState, channel: str, message: MessageRecord) -> None:
    """A hard bounce: the address the message went to is unreachable on its channel.
    Only that address: one the customer gave since stays reachable."""
    current = current_fingerprint(state, channel)
    if message.to is not None and message.to != current:
        return  # an old address bounced: it is not the one we would send to
    if current is None:
        return
    state.bounced[channel] = current
    if channel == "email":
        state.email_bounced = True


def merge_messages(
    a: dict[str, MessageRecord], b: dict[str, MessageRecord]
) -> dict[str, MessageRecord]:
    """Both profiles' messages (for `triggers.identity.merge_profiles`): the union in
    time order, a record in both once (the one with more feedback), `RECENT_MESSAGES`
    per channel."""
    merged: dict[str, MessageRecord] = {}
    for action_id, message in sorted([*a.items(), *b.items()], key=lambda item: item[1].at):
        mine = merged.get(action_id)
        if mine is None:
            merged[action_id] = MessageRecord(
                channel=message.channel, at=message.at, to=message.to, sent=message.sent,
                engaged=message.engaged, undelivered=message.undelivered,
            )  # fmt: skip
        else:
            mine.sent |= message.sent
            mine.engaged |= message.engaged
            mine.undelivered |= message.undelivered
    kept: dict[str, int] = {}
    for action_id in reversed(list(merged)):
        channel = merged[action_id].channel
        kept[channel] = kept.get(channel, 0) + 1
        if kept[channel] > RECENT_MESSAGES:
            del merged[action_id]
    return merged


@dataclass(frozen=True, slots=True)
class ChannelRate:
    """A channel's engagement as `channel: best` ranks it."""

    engaged: int
    messages: int
    # Engaged messages over sent ones, each weighted by 1/2 per half-life of its age
    # (relative to the customer's newest message): recent behaviour counts most.
    rate: float


def engagement_rates(state: CustomerState, half_life: timedelta) -> dict[str, ChannelRate]:
    """Per channel with feedback: how many of the remembered messages that reached the
    customer were engaged, and the time-weighted rate.

    Pure in event times: a message weighs 2^(-(newest - at) / half_life), with `at`
    its emission time and `newest` the newest remembered message's, never the clock.
    A channel whose messages are all forgotten (or a state from before `messages`)
    falls back to its lifetime counts, unweighted."""
    counted = [m for m in state.messages.values() if m.sent and not m.undelivered]
    rates: dict[str, ChannelRate] = {}
    if counted:
        newest = max(m.at for m in counted)
        seconds = half_life.total_seconds()
        weights: dict[str, list[float]] = {}
        counts: dict[str, list[int]] = {}
        for m in counted:
            weight = 0.5 ** ((newest - m.at).total_seconds() / seconds) if seconds > 0 else 1.0
            w = weights.setdefault(m.channel, [0.0, 0.0])
            c = counts.setdefault(m.channel, [0, 0])
            w[1] += weight
            c[1] += 1
            if m.engaged:
                w[0] += weight
                c[0] += 1
        for channel, (engaged_weight, total_weight) in weights.items():
            engaged, messages = counts[channel]
            rate = engaged_weight / total_weight if total_weight > 0 else 0.0
            rates[channel] = ChannelRate(engaged, messages, rate)
    for channel, lifetime in state.engagement.items():
        if channel not in rates and lifetime.sent:
            rates[channel] = ChannelRate(min(lifetime.engaged, lifetime.sent), lifetime.sent,
                                         lifetime.rate)  # fmt: skip
    return rates


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
