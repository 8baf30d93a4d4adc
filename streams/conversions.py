"""Attribution records of conversions (`omnicue.conversions`) and campaign counters.

The engine says which input was a conversion and hands over the customer's touches
and holdout entries (`triggers.engine.Converted`); `measure.live` computes the record
with the report's own functions; this module only translates between the two and
counts the record into the worker's metrics.
"""

from __future__ import annotations

from datetime import timedelta

from measure.attribution import DEFAULT_HALF_LIFE
from measure.lift import Entry
from measure.live import conversion_record, current_touches, holdout_conversions
from measure.touches import Conversion, Touch
from omnicue.metrics import WorkerMetrics
from schemas.conversions import ConversionRecord
from triggers.engine import Converted, EnginePolicy


def record_of(
    converted: Converted, policy: EnginePolicy, half_life: timedelta = DEFAULT_HALF_LIFE
) -> ConversionRecord:
    """The attribution record of one conversion (deterministic: the same input gives
    the same record, so a redelivered order re-sends the same one)."""
    order, customer = converted.event, converted.customer_id
    conversion = Conversion(
        event_id=order.event_id,
        customer_id=customer,
        at=order.occurred_at,
        value=order.properties.value,
        channel=order.channel,
        cart_id=order.properties.cart_id,
    )
    kept = [
        (
            Touch(action_id=t.action_id, customer_id=customer, channel=t.channel,
                  rule_id=t.rule_id, at=t.at, variant=t.variant),
            t.feedback,
        )
        for t in converted.touches
    ]  # fmt: skip
    entries = [Entry(customer, e.rule_id, e.at, e.held_out) for e in converted.entries]
    windows = {e.rule_id: e.within for e in converted.entries if e.within is not None}
    return conversion_record(
        conversion,
        current_touches(kept),
        policy.touch_lookback,
        half_life,
        holdout_conversions(entries, conversion, windows),
    )


def count(metrics: WorkerMetrics, record: ConversionRecord) -> None:
    metrics.orders.labels(attributed="true" if record.attributed else "false").inc()
    for model, credits in record.credits.items():
        for credit in credits:
            labels = {"rule": credit.rule_id, "channel": credit.channel, "model": model}
            metrics.conversions.labels(**labels).inc(credit.conversions)
            metrics.attributed_revenue.labels(**labels).inc(credit.revenue)
    for converted in record.holdout:
        metrics.holdout_conversions.labels(rule=converted.rule_id, group=converted.group).inc()
