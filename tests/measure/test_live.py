"""The live attribution records: one conversion at a time, as the report does it."""

from __future__ import annotations

from collections import defaultdict
from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from measure.attribution import (
    DEFAULT_LOOKBACK,
    PER_CONVERSION_MODELS,
    TouchIndex,
    attribute,
    attribute_one,
    credit_by_channel,
)
from measure.lift import DEFAULT_WINDOW, Entry
from measure.live import conversion_record, current_touches, holdout_conversions
from measure.touches import Conversion, Touch, with_feedback
from schemas.conversions import LIVE_MODELS, ConversionRecord, HoldoutConversion
from schemas.report import MODELS
from tests.measure.builders import (
    DAY,
    T0,
    conversion,
    conversion_strategy,
    touch,
    touch_strategy,
)
from triggers.engine import DEFAULT_TOUCH_LOOKBACK

HOUR = timedelta(hours=1)


def test_live_models_are_every_model_but_data_driven() -> None:
    assert LIVE_MODELS == PER_CONVERSION_MODELS == tuple(m for m in MODELS if m != "data_driven")


def test_the_engine_keeps_touches_for_the_reports_lookback() -> None:
    assert DEFAULT_TOUCH_LOOKBACK == DEFAULT_LOOKBACK


def test_with_feedback_removes_failed_unless_a_later_delivery_and_sets_flags() -> None:
    t = touch("email", T0 - DAY)
    assert with_feedback(t, []) is t
    assert with_feedback(t, [("message.failed", T0)]) is None
    # A delivery after the failure (a retry that went through) keeps it.
    kept = with_feedback(t, [("message.failed", T0), ("message.delivered", T0 + HOUR)])
    assert kept is not None and kept.delivered and not kept.opened
    # A failure after the delivery wins, whatever order the feedback came in.
    assert with_feedback(t, [("message.failed", T0 + HOUR), ("message.opened", T0)]) is None
    clicked = with_feedback(t, [("message.clicked", T0), ("message.unsubscribed", T0)])
    assert clicked is not None
    assert (clicked.delivered, clicked.opened, clicked.clicked, clicked.unsubscribed) == (
        True, True, True, True,
    )  # fmt: skip
    # An unsubscribe is not a reach: it does not override a later failure's removal.
    assert with_feedback(t, [("message.unsubscribed", T0 + HOUR), ("message.failed", T0)]) is None
    assert current_touches([(t, [("message.failed", T0)]), (t, [])]) == [t]


def test_attribute_one_is_attribute_for_one_conversion() -> None:
    touches = [touch("push", T0 - 8 * DAY), touch("email", T0 - 7 * DAY), touch("sms", T0)]
    conv = conversion(T0)
    # The lookback's start is in, the conversion's instant is out.
    assert attribute_one(conv, touches).touches == (touches[1],)
    assert attribute_one(conv, touches) == attribute([conv], TouchIndex(touches))[0]


def test_record_of_three_touches_by_hand() -> None:
    touches = [touch("push", T0 - 3 * DAY), touch("email", T0 - 2 * DAY), touch("sms", T0 - DAY)]
    conv = conversion(T0, 70.0)
    record = conversion_record(conv, touches, DEFAULT_LOOKBACK, DAY)
    assert record.conversion_id == conv.event_id
    assert record.attributed
    assert set(record.credits) == set(LIVE_MODELS)

    def shares(model: str) -> list[tuple[str, float, float]]:
        return [(c.channel, c.conversions, c.revenue) for c in record.credits[model]]

    def values(model: str) -> list[float]:
        return [v for c in record.credits[model] for v in (c.conversions, c.revenue)]

    assert shares("last_touch") == [("push", 0.0, 0.0), ("email", 0.0, 0.0), ("sms", 1.0, 70.0)]
    assert shares("first_touch") == [("push", 1.0, 70.0), ("email", 0.0, 0.0), ("sms", 0.0, 0.0)]
    assert values("linear") == pytest.approx([1 / 3, 70 / 3] * 3)
    assert values("time_decay") == pytest.approx([1 / 7, 10.0, 2 / 7, 20.0, 4 / 7, 40.0])
    assert values("position_based") == pytest.approx([0.4, 28.0, 0.2, 14.0, 0.4, 28.0])
    # A JSON round trip gives the same record (the topic's contract).
    assert ConversionRecord.model_validate_json(record.model_dump_json()) == record


def test_a_conversion_with_no_touch_in_its_lookback_is_unattributed() -> None:
    record = conversion_record(conversion(T0), [touch("push", T0 - 8 * DAY)])
    assert not record.attributed
    assert record.credits == {model: [] for model in LIVE_MODELS}


def test_holdout_conversions_use_the_reports_window() -> None:
    conv = conversion(T0)
    entries = [
        Entry("c1", "welcome", T0 - DEFAULT_WINDOW, held_out=False),  # the window's end: in
        Entry("c1", "cart", T0, held_out=True),  # the entry's instant: out
        Entry("c1", "browse", T0 - 3 * DAY, held_out=True),
        Entry("c1", "winback", T0 - 3 * DAY, held_out=False),  # its window is 2 days
        Entry("c1", "_global", T0 - 7 * DAY - HOUR, held_out=False),
    ]
    assert holdout_conversions(entries, conv, {"winback": 2 * DAY}) == [
        HoldoutConversion(rule_id="welcome", group="treatment"),
        HoldoutConversion(rule_id="browse", group="control"),
    ]


@settings(max_examples=100, deadline=None)
@given(
    st.lists(touch_strategy, max_size=25),
    st.lists(conversion_strategy, max_size=10),
    st.integers(min_value=1, max_value=24 * 14),
)
def test_records_summed_per_model_and_channel_are_the_reports_attribution(
    touches: list[Touch], conversions: list[Conversion], half_life_hours: int
) -> None:
    half_life = timedelta(hours=half_life_hours)
    attributed = attribute(conversions, TouchIndex(touches), DEFAULT_LOOKBACK)
    totals: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for conv in conversions:
        mine = [t for t in touches if t.customer_id == conv.customer_id]
        record = conversion_record(conv, mine, DEFAULT_LOOKBACK, half_life)
        for model, credits in record.credits.items():
            for c in credits:
                totals[model][c.channel][0] += c.conversions
                totals[model][c.channel][1] += c.revenue
    for model in LIVE_MODELS:
        offline = credit_by_channel(attributed, model, half_life)
        live = {ch: (c, r) for ch, (c, r) in totals[model].items()}
        assert live.keys() == offline.keys(), model
        for channel, (c, r) in offline.items():
            assert live[channel] == pytest.approx((c, r), rel=1e-12, abs=1e-9), (model, channel)
