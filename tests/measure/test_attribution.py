from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from measure.attribution import (
    CONVERSION,
    NULL,
    START,
    TouchIndex,
    all_models,
    attribute,
    conversion_probability,
    credit_by_channel,
    credits,
    data_driven,
    position_based,
    removal_effects,
    time_decay,
    transition_counts,
)
from measure.touches import Conversion, Touch
from schemas.report import MODELS
from tests.measure.builders import (
    DAY,
    T0,
    conversion,
    conversion_strategy,
    touch,
    touch_strategy,
)

WEEK = timedelta(days=7)


def by_model(
    touches: list[Touch], conv: Conversion, half_life: timedelta = DAY
) -> dict[str, dict[str, tuple[float, float]]]:
    index = TouchIndex(touches)
    return all_models(attribute([conv], index, WEEK), index, WEEK, half_life)


def approx(credit: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    return {k: pytest.approx(v) for k, v in credit.items()}  # type: ignore[misc]


def test_every_model_on_three_touches_by_hand() -> None:
    # push 3 days before, email 2 days, sms 1 day; the order is worth 70.
    touches = [touch("push", T0 - 3 * DAY), touch("email", T0 - 2 * DAY), touch("sms", T0 - DAY)]
    models = by_model(touches, conversion(T0, 70.0))
    # A channel with touches but no credit is listed with 0 (so models line up).
    assert models["last_touch"] == {"push": (0.0, 0.0), "email": (0.0, 0.0), "sms": (1.0, 70.0)}
    assert models["first_touch"] == {"push": (1.0, 70.0), "email": (0.0, 0.0), "sms": (0.0, 0.0)}
    third = 1 / 3
    assert models["linear"] == approx(
        {"push": (third, 70 * third), "email": (third, 70 * third), "sms": (third, 70 * third)}
    )
    # Half-life 1 day: weights 1/8, 1/4, 1/2 of a total 7/8 -> 1/7, 2/7, 4/7.
    assert models["time_decay"] == approx(
        {"push": (1 / 7, 10.0), "email": (2 / 7, 20.0), "sms": (4 / 7, 40.0)}
    )
    assert models["position_based"] == approx(
        {"push": (0.4, 28.0), "email": (0.2, 14.0), "sms": (0.4, 28.0)}
    )


def test_last_and_first_touch_sum_repeated_channels() -> None:
    touches = [touch("email", T0 - 3 * DAY), touch("push", T0 - 2 * DAY), touch("email", T0 - DAY)]
    models = by_model(touches, conversion(T0, 10.0))
    assert models["last_touch"] == {"email": (1.0, 10.0), "push": (0.0, 0.0)}
    assert models["linear"] == approx({"email": (2 / 3, 20 / 3), "push": (1 / 3, 10 / 3)})


def test_position_based_shares() -> None:
    assert position_based(1) == [1.0]
    assert position_based(2) == [0.5, 0.5]
    assert position_based(3) == pytest.approx([0.4, 0.2, 0.4])
    assert position_based(4) == pytest.approx([0.4, 0.1, 0.1, 0.4])
    assert position_based(6) == pytest.approx([0.4, 0.05, 0.05, 0.05, 0.05, 0.4])


def test_time_decay_halves_weight_per_half_life() -> None:
    assert time_decay([2 * WEEK, WEEK, timedelta(0)], WEEK) == pytest.approx([1 / 7, 2 / 7, 4 / 7])
    # The default half-life is 7 days.
    assert time_decay([WEEK, timedelta(0)]) == pytest.approx([1 / 3, 2 / 3])


def test_touches_at_the_same_instant_are_ordered_by_action_id() -> None:
    # Two rules fired in the same engine step: the same created_at.
    at = T0 - DAY
    touches = [touch("sms", at, action_id="act-b"), touch("email", at, action_id="act-a")]
    models = by_model(touches, conversion(T0, 10.0))
    assert models["first_touch"] == {"email": (1.0, 10.0), "sms": (0.0, 0.0)}
    assert models["last_touch"] == {"email": (0.0, 0.0), "sms": (1.0, 10.0)}
    # Equal ages: equal time-decay weights, whatever the order.
    assert models["time_decay"] == approx({"email": (0.5, 5.0), "sms": (0.5, 5.0)})
    assert models["position_based"] == approx({"email": (0.5, 5.0), "sms": (0.5, 5.0)})


def test_lookback_is_closed_at_its_start_and_open_at_the_conversion() -> None:
    edge = touch("push", T0 - WEEK)  # exactly at the lookback edge: in
    before = touch("email", T0 - WEEK - timedelta(microseconds=1))  # just before: out
    same_time = touch("sms", T0)  # at the conversion itself: out
    other = touch("kakao", T0 - DAY, customer_id="c2")  # another customer: out
    index = TouchIndex([before, edge, same_time, other])
    [item] = attribute([conversion(T0)], index, WEEK)
    assert item.touches == (edge,)


def test_a_conversion_with_no_touch_is_unattributed_and_gets_no_credit() -> None:
    index = TouchIndex([touch("push", T0 - DAY, customer_id="c2")])
    attributed = attribute([conversion(T0, 50.0, customer_id="c1")], index, WEEK)
    assert attributed[0].touches == ()
    for model in MODELS:
        assert all_models(attributed, index, WEEK)[model] == {}
    assert credits("linear", (), T0, WEEK) == []


# ------------------------------------------------------------------ data-driven


def hand_worked() -> tuple[list[Touch], list[Conversion]]:
    """Paths: email -> push -> conversion (30), email -> null, push -> conversion (60)."""
    touches = [
        touch("email", T0 - 2 * DAY, customer_id="c1"),
        touch("push", T0 - DAY, customer_id="c1"),
        touch("email", T0 - DAY, customer_id="c2"),
        touch("push", T0 - timedelta(hours=1), customer_id="c3"),
    ]
    return touches, [conversion(T0, 30.0, "c1"), conversion(T0, 60.0, "c3")]


def test_transition_counts_of_the_hand_worked_example() -> None:
    counts = transition_counts([["email", "push"], ["push"]], [["email"]])
    assert counts == {
        START: {"email": 2, "push": 1},
        "email": {"push": 1, NULL: 1},
        "push": {CONVERSION: 2},
    }


def test_data_driven_removal_effects_by_hand() -> None:
    # P(start->email) = 2/3, P(start->push) = 1/3, P(email->push) = P(email->null) = 1/2,
    # P(push->conversion) = 1. So P(conversion) = 2/3 * 1/2 + 1/3 = 2/3.
    counts = transition_counts([["email", "push"], ["push"]], [["email"]])
    assert conversion_probability(counts) == pytest.approx(2 / 3)
    # Without email: only start -> push converts, 1/3; without push nothing does.
    assert conversion_probability(counts, "email") == pytest.approx(1 / 3)
    assert conversion_probability(counts, "push") == pytest.approx(0.0)
    assert removal_effects(counts) == {"email": pytest.approx(0.5), "push": pytest.approx(1.0)}


def test_data_driven_normalises_removal_effects_over_attributed_conversions() -> None:
    touches, conversions = hand_worked()
    index = TouchIndex(touches)
    result = data_driven(attribute(conversions, index, WEEK), index, WEEK)
    # Shares 0.5 / 1.5 = 1/3 and 1 / 1.5 = 2/3 of 2 conversions and 90 of revenue.
    assert result == approx({"email": (2 / 3, 30.0), "push": (4 / 3, 60.0)})


def test_data_driven_with_a_loop_between_channels() -> None:
    # email -> push -> email -> conversion: a cycle the linear solve must handle.
    counts = transition_counts([["email", "push", "email"]], [["push"]])
    # start->email 1/2, start->push 1/2; email->push 1/2, email->conv 1/2; push->email 1/2,
    # push->null 1/2. x_e = 1/2 + x_p/2, x_p = x_e/2 -> x_e = 2/3, x_p = 1/3; p = 1/2.
    assert conversion_probability(counts) == pytest.approx(0.5)
    assert conversion_probability(counts, "push") == pytest.approx(0.25)


# --------------------------------------------------------------------- property

@settings(max_examples=150, deadline=None)
@given(
    st.lists(touch_strategy, max_size=25),
    st.lists(conversion_strategy, max_size=10),
    st.integers(min_value=1, max_value=24 * 14),
)
def test_credits_of_every_model_sum_to_the_attributed_conversions_and_revenue(
    touches: list[Touch], conversions: list[Conversion], half_life_hours: int
) -> None:
    index = TouchIndex(touches)
    attributed = attribute(conversions, index, WEEK)
    with_touches = [a for a in attributed if a.touches]
    revenue = sum(a.conversion.value for a in with_touches)
    models = all_models(attributed, index, WEEK, timedelta(hours=half_life_hours))
    assert set(models) == set(MODELS)
    for model, by_channel in models.items():
        total = sum(c for c, _ in by_channel.values())
        total_revenue = sum(r for _, r in by_channel.values())
        assert total == pytest.approx(len(with_touches), abs=1e-9), model
        assert total_revenue == pytest.approx(revenue, rel=1e-9, abs=1e-6), model
        assert all(c >= -1e-12 for c, _ in by_channel.values()), model


def test_credit_by_channel_for_one_model() -> None:
    touches = [touch("push", T0 - DAY), touch("email", T0 - 2 * DAY, customer_id="c2")]
    index = TouchIndex(touches)
    attributed = attribute(
        [conversion(T0, 10.0, "c1"), conversion(T0, 5.0, "c2"), conversion(T0, 1.0, "c3")],
        index,
        WEEK,
    )
    assert credit_by_channel(attributed, "last_touch") == {
        "push": (1.0, 10.0),
        "email": (1.0, 5.0),
    }
