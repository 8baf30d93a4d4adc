"""Reachability, consent and channel choice."""

from __future__ import annotations

from typing import Literal

from schemas.actions import Recipient
from schemas.events import ActionChannel, Category
from triggers.state import CustomerState, address_fingerprint

ConsentPolicy = Literal["opt_in", "opt_out"]


def recipient(state: CustomerState, channel: ActionChannel) -> Recipient | None:
    """The contact point for a channel, or None when the customer is unreachable there
    (no address, or the address a hard bounce marked, `CustomerState.bounced`)."""
    bounced = state.bounced.get(channel) if state.bounced else None
    if channel == "push":
        if not state.push_tokens:
            return None
        # The most recently registered device: dicts keep insertion order.
        token = next(reversed(state.push_tokens))
        if bounced is not None and address_fingerprint(token) == bounced:
            return None
        return Recipient(push_token=token)
    if channel == "email":
        if state.email is None or state.email_bounced:
            return None
        if bounced is not None and address_fingerprint(state.email) == bounced:
            return None
        return Recipient(email=state.email)
    if state.phone is None:
        return None
    if bounced is not None and address_fingerprint(state.phone) == bounced:
        return None
    return Recipient(phone=state.phone)


def consented(
    state: CustomerState, channel: ActionChannel, category: Category, policy: ConsentPolicy
) -> bool:
    granted = state.consents.get(f"{channel}:{category}")
    if category == "transactional":
        # Service messages need no opt-in; only an explicit revocation blocks them.
        return granted is not False
    if policy == "opt_in":
        return granted is True
    return granted is not False


def candidates(
    state: CustomerState,
    channels: list[ActionChannel],
    category: Category,
    policy: ConsentPolicy,
) -> list[tuple[ActionChannel, Recipient]] | str:
    """Reachable, consented channels in preference order, else the reason there are none."""
    found: list[tuple[ActionChannel, Recipient]] = []
    reachable_somewhere = False
    for channel in channels:
        to = recipient(state, channel)
        if to is None:
            continue
        reachable_somewhere = True
        if consented(state, channel, category, policy):
            found.append((channel, to))
    if found:
        return found
    return "no_consent" if reachable_somewhere else "unreachable"
