"""Touches and conversions, the two inputs of every measure, and identity resolution."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime

from schemas.actions import Action
from schemas.decisions import Decision
from schemas.events import Alias, Event, MessageFeedback, OrderCompleted, customer_key


@dataclass(frozen=True, slots=True)
class Touch:
    """An emitted action that was not reported failed, with its feedback for the funnel."""

    action_id: str
    customer_id: str
    channel: str
    rule_id: str
    at: datetime
    variant: str | None = None
    delivered: bool = False
    opened: bool = False
    clicked: bool = False
    unsubscribed: bool = False

    @property
    def order_key(self) -> tuple[datetime, str]:
        # Touches at the same instant are ordered by action id: arbitrary, but the same
        # whatever order the files (or a live stream) delivered them in.
        return (self.at, self.action_id)


@dataclass(frozen=True, slots=True)
class Conversion:
    """An `order.completed`: on any channel, at `occurred_at`, for the resolved customer."""

    event_id: str
    customer_id: str
    at: datetime
    value: float
    channel: str
    cart_id: str | None = None


def identity_links(events: Iterable[Event]) -> dict[str, str]:
    """Customer keys that are another customer: alias `previous_id`s, and anonymous ids
    seen on an event together with a customer id, each to that customer id."""
    links: dict[str, str] = {}
    for event in events:
        if isinstance(event, Alias) and event.customer_id is not None:
            previous = event.properties.previous_id
            if previous != event.customer_id:
                links[previous] = event.customer_id
                # An anonymous previous id is keyed `anon:<id>` before it is linked.
                links[f"anon:{previous}"] = event.customer_id
        elif event.customer_id is not None and event.anonymous_id is not None:
            links[f"anon:{event.anonymous_id}"] = event.customer_id
    return links


# Identity decisions (`triggers.identity`) that fold `profile` into `customer_id`.
MERGE_REASONS = frozenset({"identity_merged", "anonymous_idle"})


def decision_links(decisions: Iterable[Decision]) -> dict[str, str]:
    """The engine's own merges, from its identity decisions: the retired profile to
    the one it went into. Put them over `identity_links`: they are what happened."""
    return {
        d.profile: d.customer_id
        for d in decisions
        if d.outcome == "identity"
        and d.reason in MERGE_REASONS
        and d.profile is not None
        and d.profile != d.customer_id
    }


def resolve(links: Mapping[str, str], key: str) -> str:
    """The customer `key` is now, following links (a merged customer may merge again)."""
    seen = {key}
    while key in links:
        key = links[key]
        if key in seen:  # a cycle (a then b then a again): stop where it closes
            break
        seen.add(key)
    return key


_STAGES = {
    "message.delivered": ("delivered",),
    # A provider does not report every stage (SMS has no opens, an email client may
    # block the open pixel): a later stage implies the earlier ones.
    "message.opened": ("delivered", "opened"),
    "message.clicked": ("delivered", "opened", "clicked"),
    "message.unsubscribed": ("unsubscribed",),
}


def with_feedback(touch: Touch, feedback: Iterable[tuple[str, datetime]]) -> Touch | None:
    """The touch after its feedback (`(type, occurred_at)` pairs, in any order): None
    when a `message.failed` came that no later `delivered`, `opened` or `clicked`
    overrides (a retry that went through); else with the funnel flags those set.

    The one definition of what feedback does to a touch: `touches_from` (offline) and
    the customer agent (live, over the feedback kept in customer state) both use it.
    """
    failed_at: datetime | None = None
    reached_at: datetime | None = None
    delivered, opened, clicked, unsubscribed = (
        touch.delivered,
        touch.opened,
        touch.clicked,
        touch.unsubscribed,
    )
    for kind, at in feedback:
        if kind == "message.failed":
            failed_at = at if failed_at is None else max(at, failed_at)
            continue
        stages = _STAGES.get(kind, ())
        if stages:
            if stages != ("unsubscribed",):
                reached_at = at if reached_at is None else max(at, reached_at)
            delivered = delivered or "delivered" in stages
            opened = opened or "opened" in stages
            clicked = clicked or "clicked" in stages
            unsubscribed = unsubscribed or "unsubscribed" in stages
    if failed_at is not None and (reached_at is None or reached_at < failed_at):
        return None
    if (delivered, opened, clicked, unsubscribed) == (
        touch.delivered,
        touch.opened,
        touch.clicked,
        touch.unsubscribed,
    ):
        return touch
    return replace(
        touch, delivered=delivered, opened=opened, clicked=clicked, unsubscribed=unsubscribed
    )


def touches_from(
    actions: Iterable[Action],
    feedback: Iterable[MessageFeedback],
    links: Mapping[str, str] | None = None,
) -> list[Touch]:
    """Every action as a touch at `created_at`, after its feedback (`with_feedback`):
    less those with a `message.failed` that no later `delivered`, `opened` or
    `clicked` overrides.

    Actions repeated with the same id (a redelivery) are one touch. Feedback for an
    action not in `actions` is ignored.
    """
    links = links or {}
    touches: dict[str, Touch] = {}
    for action in actions:
        if action.action_id not in touches:
            touches[action.action_id] = Touch(
                action_id=action.action_id,
                customer_id=resolve(links, action.customer_id),
                channel=action.channel,
                rule_id=action.rule_id,
                at=action.created_at,
                variant=action.variant,
            )
    by_action: dict[str, list[tuple[str, datetime]]] = {}
    for message in feedback:
        action_id = message.properties.action_id
        if action_id in touches:
            by_action.setdefault(action_id, []).append((message.type, message.occurred_at))
    kept = (with_feedback(t, by_action.get(t.action_id, ())) for t in touches.values())
    return sorted((t for t in kept if t is not None), key=lambda t: t.order_key)


def conversions_from(
    orders: Iterable[OrderCompleted], links: Mapping[str, str] | None = None
) -> list[Conversion]:
    """Orders as conversions, in time order; an event id seen again is a redelivery."""
    links = links or {}
    seen: set[str] = set()
    conversions = []
    for order in orders:
        if order.event_id in seen:
            continue
        seen.add(order.event_id)
        conversions.append(
            Conversion(
                event_id=order.event_id,
                customer_id=resolve(links, customer_key(order)),
                at=order.occurred_at,
                value=order.properties.value,
                channel=order.channel,
                cart_id=order.properties.cart_id,
            )
        )
    conversions.sort(key=lambda c: (c.at, c.event_id))
    return conversions
