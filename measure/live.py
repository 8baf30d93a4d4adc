"""One conversion at a time, for the customer agent's attribution records.

The live shell has one customer's touches (kept in customer state with their
feedback) and one conversion. These functions take them through the report's own
definitions (`with_feedback`, `attribute_one`, `credits`, `OrderIndex.after`), so
the records of a log, summed per model and channel, are the report's attribution
of that log: live equals offline by construction.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta

from measure.attribution import (
    DEFAULT_HALF_LIFE,
    DEFAULT_LOOKBACK,
    PER_CONVERSION_MODELS,
    attribute_one,
    credits,
)
from measure.lift import DEFAULT_WINDOW, Entry, OrderIndex
from measure.touches import Conversion, Touch, with_feedback
from schemas.conversions import LIVE_MODELS, ConversionRecord, HoldoutConversion, TouchCredit

assert LIVE_MODELS == PER_CONVERSION_MODELS

# A touch as the state keeps it: the touch as emitted, and its feedback so far
# (`(type, occurred_at)` pairs).
KeptTouch = tuple[Touch, Sequence[tuple[str, datetime]]]


def current_touches(kept: Iterable[KeptTouch]) -> list[Touch]:
    """The touches that still count after their feedback (`with_feedback`)."""
    return [t for t in (with_feedback(touch, feedback) for touch, feedback in kept) if t]


def holdout_conversions(
    entries: Iterable[Entry],
    conversion: Conversion,
    windows: Mapping[str, timedelta] | None = None,
) -> list[HoldoutConversion]:
    """The entries whose conversion window, `(entry, entry + within]` as in the
    report's lift, holds the conversion (the customer's entries: one per rule)."""
    windows = windows or {}
    orders = OrderIndex([conversion])
    return [
        HoldoutConversion(rule_id=e.rule_id, group="control" if e.held_out else "treatment")
        for e in entries
        if orders.after(e.customer_id, e.at, windows.get(e.rule_id, DEFAULT_WINDOW))
    ]


def conversion_record(
    conversion: Conversion,
    touches: Iterable[Touch],
    lookback: timedelta = DEFAULT_LOOKBACK,
    half_life: timedelta = DEFAULT_HALF_LIFE,
    holdout: Sequence[HoldoutConversion] = (),
) -> ConversionRecord:
    """The attribution record of one conversion, from its customer's touches."""
    item = attribute_one(conversion, touches, lookback)
    by_model = {}
    for model in PER_CONVERSION_MODELS:
        shares = credits(model, item.touches, conversion.at, half_life)
        by_model[model] = [
            TouchCredit(
                action_id=t.action_id,
                rule_id=t.rule_id,
                channel=t.channel,
                at=t.at,
                variant=t.variant,
                conversions=share,
                revenue=share * conversion.value,
            )
            for t, share in zip(item.touches, shares, strict=True)
        ]
    return ConversionRecord(
        conversion_id=conversion.event_id,
        customer_id=conversion.customer_id,
        occurred_at=conversion.at,
        value=conversion.value,
        channel=conversion.channel,
        cart_id=conversion.cart_id,
        lookback_seconds=lookback.total_seconds(),
        half_life_seconds=half_life.total_seconds(),
        attributed=bool(item.touches),
        credits=by_model,
        holdout=list(holdout),
    )
