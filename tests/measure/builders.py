"""Touches, conversions and decisions for the measurement tests."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

from hypothesis import strategies as st

from measure.touches import Conversion, Touch
from schemas.decisions import Decision

T0 = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)
_ids = itertools.count(1)


def touch(
    channel: str,
    at: datetime,
    customer_id: str = "c1",
    rule_id: str = "cart_abandonment",
    action_id: str | None = None,
    *,
    delivered: bool = False,
    opened: bool = False,
    clicked: bool = False,
    unsubscribed: bool = False,
) -> Touch:
    return Touch(
        action_id=action_id or f"act-{next(_ids):04d}",
        customer_id=customer_id,
        channel=channel,
        rule_id=rule_id,
        at=at,
        delivered=delivered,
        opened=opened,
        clicked=clicked,
        unsubscribed=unsubscribed,
    )


def conversion(
    at: datetime = T0,
    value: float = 100.0,
    customer_id: str = "c1",
    channel: str = "web",
    cart_id: str | None = None,
) -> Conversion:
    return Conversion(
        event_id=f"ev-{next(_ids)}",
        customer_id=customer_id,
        at=at,
        value=value,
        channel=channel,
        cart_id=cart_id,
    )


def decision(
    customer_id: str,
    at: datetime = T0,
    outcome: str = "fired",
    rule_id: str = "cart_abandonment",
    group: str | None = None,
    journey_key: str = "_",
    step: int = 1,
) -> Decision:
    return Decision.model_validate(
        {
            "customer_id": customer_id,
            "rule_id": rule_id,
            "rule_version": "v1",
            "journey_key": journey_key,
            "step": step,
            "outcome": outcome,
            "decided_at": at,
            "group": group,
        }
    )


# For the property tests: touches and conversions of a few customers around T0.
CHANNELS = ("push", "email", "sms", "kakao")
touch_strategy = st.builds(
    lambda channel, hours, customer: touch(channel, T0 - timedelta(hours=hours), customer),
    st.sampled_from(CHANNELS),
    st.integers(min_value=-48, max_value=24 * 12),
    st.sampled_from(("c1", "c2", "c3")),
)
conversion_strategy = st.builds(
    lambda hours, value, customer: conversion(T0 - timedelta(hours=hours), value, customer),
    st.integers(min_value=0, max_value=24 * 10),
    st.floats(min_value=0, max_value=1e6, allow_nan=False),
    st.sampled_from(("c1", "c2", "c3", "c4")),
)
