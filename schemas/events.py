"""The inbound event contract.

An event is a JSON object with a fixed envelope; `properties` is typed per `type`
through a discriminated union, so a producer gets a precise error for a bad field.
Unknown envelope fields are rejected; unknown *property* fields are kept, because
producers legitimately attach their own attributes (rules may read them).
"""

from __future__ import annotations

from datetime import UTC
from operator import methodcaller
from typing import Annotated, Any, Literal, TypeAlias, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    field_validator,
    model_validator,
)

Channel = Literal[
    "web", "app", "email", "push", "sms", "kakao", "store", "pos", "callcenter", "ads", "social"
]
# Channels Omnicue can send on.
ActionChannel = Literal["push", "email", "sms", "kakao"]
Category = Literal["marketing", "transactional"]

NonEmpty = Annotated[str, Field(min_length=1, max_length=256)]
Money = Annotated[float, Field(ge=0, allow_inf_nan=False)]
# Any offset in, UTC inside. A C-level callable, not a Python function: this runs for
# every event, and a Python validator cost about 0.5 us of a 2.5 us validation.
UtcDatetime = Annotated[AwareDatetime, AfterValidator(methodcaller("astimezone", UTC))]


class Properties(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class Traits(Properties):
    email: str | None = Field(None, max_length=320, pattern=r"^[^@\s]+@[^@\s]+$")
    phone: str | None = Field(None, max_length=32, pattern=r"^\+?[0-9][0-9 \-]{3,30}$")
    timezone: str | None = None
    locale: str | None = Field(None, max_length=35)

    @field_validator("timezone")
    @classmethod
    def _iana_timezone(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown IANA timezone {value!r}") from exc
        return value


class IdentifyProperties(Properties):
    traits: Traits = Traits()


class AliasProperties(Properties):
    # The id this person was known by before: an anonymous id, or another customer id
    # (the only way two known customers merge).
    previous_id: NonEmpty


class ConsentProperties(Properties):
    channel: ActionChannel
    category: Category
    granted: bool


class DeviceRegisteredProperties(Properties):
    push_token: NonEmpty
    platform: Literal["ios", "android", "web"]


class DeviceUnregisteredProperties(Properties):
    push_token: NonEmpty


class ProductViewedProperties(Properties):
    product_id: NonEmpty
    price: Money | None = None
    category: str | None = None


class CartItemAddedProperties(Properties):
    cart_id: NonEmpty
    product_id: NonEmpty
    quantity: int = Field(1, ge=1)
    price: Money


class CartItemRemovedProperties(Properties):
    cart_id: NonEmpty
    product_id: NonEmpty
    quantity: int = Field(1, ge=1)


class CheckoutStartedProperties(Properties):
    cart_id: NonEmpty


class OrderItem(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)
    product_id: NonEmpty
    quantity: int = Field(1, ge=1)
    price: Money


class OrderCompletedProperties(Properties):
    order_id: NonEmpty
    cart_id: NonEmpty | None = None
    value: Money
    currency: str = Field(pattern=r"^[A-Z]{3}$")
    items: list[OrderItem] = []


class OrderRefundedProperties(Properties):
    order_id: NonEmpty


class StoreVisitedProperties(Properties):
    store_id: NonEmpty


class CustomProperties(Properties):
    # The producer's own event name (a Segment `track` name such as "Video Played"):
    # rules trigger on `custom` with `when: event.properties.event == "Video Played"`.
    # Not `name`: Segment events carry their own `name` property (a product's, a page's).
    event: NonEmpty


class MessageFeedbackProperties(Properties):
    """What became of an action Omnicue emitted: `message.sent` (the provider accepted
    it), `.delivered`, `.opened`, `.clicked`, `.bounced` (a hard bounce: the address is
    unreachable), `.complained` (a spam report), `.unsubscribed`, `.failed` (anything
    else that stopped it, a soft bounce included)."""

    action_id: NonEmpty
    reason: str | None = None


class _Envelope(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    event_id: NonEmpty
    occurred_at: UtcDatetime
    channel: Channel
    customer_id: NonEmpty | None = None
    anonymous_id: NonEmpty | None = None

    @model_validator(mode="after")
    def _needs_an_id(self) -> _Envelope:
        if self.customer_id is None and self.anonymous_id is None:
            raise ValueError("customer_id or anonymous_id is required")
        return self


class Identify(_Envelope):
    type: Literal["identify"]
    properties: IdentifyProperties = IdentifyProperties()


class Alias(_Envelope):
    """`properties.previous_id` and the event's `customer_id` are one person."""

    type: Literal["alias"]
    properties: AliasProperties

    @model_validator(mode="after")
    def _needs_the_customer(self) -> Alias:
        if self.customer_id is None:
            raise ValueError("an alias needs the customer_id it links previous_id to")
        return self


class ConsentUpdated(_Envelope):
    type: Literal["consent.updated"]
    properties: ConsentProperties


class DeviceRegistered(_Envelope):
    type: Literal["device.registered"]
    properties: DeviceRegisteredProperties


class DeviceUnregistered(_Envelope):
    type: Literal["device.unregistered"]
    properties: DeviceUnregisteredProperties


class ProductViewed(_Envelope):
    type: Literal["product.viewed"]
    properties: ProductViewedProperties


class CartItemAdded(_Envelope):
    type: Literal["cart.item_added"]
    properties: CartItemAddedProperties


class CartItemRemoved(_Envelope):
    type: Literal["cart.item_removed"]
    properties: CartItemRemovedProperties


class CheckoutStarted(_Envelope):
    type: Literal["checkout.started"]
    properties: CheckoutStartedProperties


class OrderCompleted(_Envelope):
    type: Literal["order.completed"]
    properties: OrderCompletedProperties


class OrderRefunded(_Envelope):
    type: Literal["order.refunded"]
    properties: OrderRefundedProperties


class StoreVisited(_Envelope):
    type: Literal["store.visited"]
    properties: StoreVisitedProperties


class Custom(_Envelope):
    """An event outside the contract's types, named by the producer."""

    type: Literal["custom"]
    properties: CustomProperties


FeedbackType = Literal[
    "message.sent",
    "message.delivered",
    "message.opened",
    "message.clicked",
    "message.bounced",
    "message.complained",
    "message.unsubscribed",
    "message.failed",
]
FEEDBACK_TYPES: tuple[str, ...] = get_args(FeedbackType)


class MessageFeedback(_Envelope):
    type: FeedbackType
    properties: MessageFeedbackProperties


Event: TypeAlias = Annotated[
    Identify
    | Alias
    | ConsentUpdated
    | DeviceRegistered
    | DeviceUnregistered
    | ProductViewed
    | CartItemAdded
    | CartItemRemoved
    | CheckoutStarted
    | OrderCompleted
    | OrderRefunded
    | StoreVisited
    | Custom
    | MessageFeedback,
    Field(discriminator="type"),
]

EVENT_TYPES: tuple[str, ...] = (
    "identify",
    "alias",
    "consent.updated",
    "device.registered",
    "device.unregistered",
    "product.viewed",
    "cart.item_added",
    "cart.item_removed",
    "checkout.started",
    "order.completed",
    "order.refunded",
    "store.visited",
    "custom",
    *FEEDBACK_TYPES,
)

event_adapter: TypeAdapter[Event] = TypeAdapter(Event)


def parse_event(raw: bytes | str) -> Event:
    """Validate one JSON event; raises `pydantic.ValidationError` with every problem."""
    return event_adapter.validate_json(raw)


def event_from_dict(data: dict[str, Any]) -> Event:
    return event_adapter.validate_python(data)


def event_to_json(event: Event) -> bytes:
    return event_adapter.dump_json(event, exclude_none=True)


def customer_key(event: Event) -> str:
    """The key an event is partitioned and stored under, before identity stitching."""
    if event.customer_id is not None:
        return event.customer_id
    return f"anon:{event.anonymous_id}"


def describe_validation_error(exc: Exception, limit: int = 5) -> str:
    """One readable line per problem (`field.path: message`) for DLQ headers and CLIs."""
    errors = getattr(exc, "errors", None)
    if errors is None:
        return str(exc)
    parts = []
    for error in errors()[:limit]:
        # The first location element of a union error is the tag (the event type): keep it,
        # it tells the producer which schema the event was checked against.
        loc = ".".join(str(p) for p in error["loc"]) or "(event)"
        parts.append(f"{loc}: {error['msg']}")
    more = len(errors()) - limit
    if more > 0:
        parts.append(f"... and {more} more")
    return "; ".join(parts)
