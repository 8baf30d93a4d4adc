from __future__ import annotations

import random
from datetime import timedelta

import pytest

from measure.lift import (
    OrderIndex,
    compare,
    entries,
    global_entries,
    group_of,
    lift,
    newcombe_interval,
    rule_lifts,
    wilson_interval,
)
from schemas.report import Group
from tests.measure.builders import DAY, T0, conversion, decision


def test_wilson_interval_of_a_proportion() -> None:
    # Newcombe (1998), Statistics in Medicine 17:857, table I: 81/263 -> 0.2553 to 0.3662.
    lo, hi = wilson_interval(81, 263)
    assert (round(lo, 4), round(hi, 4)) == (0.2553, 0.3662)
    assert wilson_interval(0, 10)[0] == 0.0
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("k1", "n1", "k2", "n2", "expected"),
    [
        # Newcombe (1998), Statistics in Medicine 17:873, table II, method 10.
        (56, 70, 48, 80, (0.0524, 0.3339)),
        (9, 10, 3, 10, (0.1705, 0.8090)),
        (6, 7, 2, 7, (0.0582, 0.8062)),
        (5, 56, 0, 29, (-0.0381, 0.1926)),
        (0, 10, 0, 20, (-0.1611, 0.2775)),
    ],
)
def test_newcombe_interval_matches_the_published_examples(
    k1: int, n1: int, k2: int, n2: int, expected: tuple[float, float]
) -> None:
    lo, hi = newcombe_interval(k1, n1, k2, n2)
    assert (round(lo, 4), round(hi, 4)) == expected


def test_entry_is_the_first_step_decision_and_cancelled_is_no_entry() -> None:
    found = entries(
        [
            decision("c1", T0 + DAY, "fired"),
            decision("c1", T0, "deferred"),
            decision("c2", T0, "cancelled"),
            decision("c3", T0, "held_out", group="rule:cart_abandonment"),
        ]
    )
    assert [(e.customer_id, e.at, e.held_out) for e in found] == [
        ("c1", T0, False),
        ("c3", T0, True),
    ]
    assert found[1].group == "rule:cart_abandonment"


def test_a_pair_with_any_held_out_decision_is_held_out_from_its_first_decision() -> None:
    # The engine suppresses an expired step before it checks the holdout.
    [entry] = entries(
        [
            decision("c1", T0, "suppressed"),
            decision("c1", T0 + DAY, "held_out", group="global"),
        ]
    )
    assert (entry.at, entry.held_out, entry.group) == (T0, True, "global")


def test_converted_means_an_order_after_entry_and_within_the_window() -> None:
    orders = OrderIndex(
        [
            conversion(T0, 10.0, "at_entry"),  # the same instant: not after the entry
            conversion(T0 + 7 * DAY, 20.0, "at_edge"),  # the window's last instant: in
            conversion(T0 + 7 * DAY + timedelta(seconds=1), 30.0, "late"),
            conversion(T0 + DAY, 40.0, "twice"),
            conversion(T0 + 2 * DAY, 5.0, "twice"),
        ]
    )
    found = entries([decision(c, T0) for c in ("at_entry", "at_edge", "late", "twice", "never")])
    group = group_of(found, orders, 7 * DAY)
    assert group == Group(customers=5, converted=2, revenue=65.0)


def test_compare_by_hand() -> None:
    treatment = Group(customers=4, converted=2, revenue=150.0)
    control = Group(customers=4, converted=1, revenue=20.0)
    result = compare(treatment, control)
    assert result.abs_lift == pytest.approx(0.25)
    assert result.relative_lift == pytest.approx(1.0)
    # (150/4 - 20/4) * 4
    assert result.incremental_revenue == pytest.approx(130.0)
    assert result.ci95 == pytest.approx(newcombe_interval(2, 4, 1, 4))


def test_relative_lift_is_null_when_the_control_never_converts() -> None:
    result = compare(Group(customers=10, converted=3), Group(customers=5, converted=0))
    assert result.abs_lift == pytest.approx(0.3)
    assert result.relative_lift is None


def test_an_empty_group_gives_no_numbers() -> None:
    result = compare(Group(customers=10, converted=3), Group(customers=0, converted=0))
    assert result.abs_lift is None and result.ci95 is None and result.incremental_revenue is None


def test_rule_lift_leaves_out_the_global_control_group_and_reads_each_rules_window() -> None:
    decisions = [
        decision("t1", T0),
        decision("t2", T0),
        decision("k1", T0, "held_out", group="rule:cart_abandonment"),
        decision("g1", T0, "held_out", group="global"),
        decision("w1", T0, rule_id="welcome_series"),
    ]
    orders = OrderIndex([conversion(T0 + 4 * DAY, 10.0, "t1"), conversion(T0 + DAY, 7.0, "k1")])
    found = entries(decisions)
    lifts = rule_lifts(found, orders, ["cart_abandonment"], {"cart_abandonment": 3 * DAY})
    assert set(lifts) == {"cart_abandonment"}
    cart = lifts["cart_abandonment"]
    # t1's order is 4 days after entry, outside the rule's 3-day window.
    assert cart.treatment == Group(customers=2, converted=0, revenue=0.0)
    assert cart.control == Group(customers=1, converted=1, revenue=7.0)


def test_global_entries_take_each_customers_first_marketing_entry() -> None:
    found = entries(
        [
            decision("a", T0 + DAY, rule_id="r1"),
            decision("a", T0, rule_id="r2"),
            decision("b", T0, "held_out", rule_id="r1", group="global"),
        ]
    )
    result = global_entries(found, {"b"})
    assert [(e.customer_id, e.at, e.held_out) for e in result] == [
        ("a", T0, False),
        ("b", T0, True),
    ]


def test_variants_each_against_the_whole_control() -> None:
    found = entries(
        [decision(c, T0) for c in ("a1", "a2", "b1")]
        + [decision("k", T0, "held_out", group="rule:cart_abandonment")]
    )
    orders = OrderIndex([conversion(T0 + DAY, 10.0, "a1")])
    result = lift(found, orders, 7 * DAY, lambda customer: customer[0].upper())
    assert set(result.variants) == {"A", "B"}
    assert result.variants["A"].treatment == Group(customers=2, converted=1, revenue=10.0)
    assert result.variants["A"].abs_lift == pytest.approx(0.5)
    assert result.variants["B"].control == result.control


def test_the_interval_covers_an_injected_effect() -> None:
    # 40 simulated campaigns, 2,000 customers a group: control converts at 10%, the
    # message adds 5 points. A 95% interval should miss the true 0.05 about twice.
    rng = random.Random(13)
    true_lift, covered = 0.05, 0
    for trial in range(40):
        decisions, orders = [], []
        for i in range(4000):
            customer = f"t{trial}-{i}"
            held_out = i % 2 == 1
            decisions.append(
                decision(
                    customer,
                    T0,
                    "held_out" if held_out else "fired",
                    group="rule:cart_abandonment" if held_out else None,
                )
            )
            rate = 0.10 if held_out else 0.10 + true_lift
            if rng.random() < rate:
                orders.append(conversion(T0 + rng.random() * 6 * DAY, 50.0, customer))
        result = lift(entries(decisions), OrderIndex(orders))
        assert result.treatment.customers == result.control.customers == 2000
        assert result.ci95 is not None
        covered += result.ci95[0] <= true_lift <= result.ci95[1]
        if trial == 0:
            assert result.abs_lift is not None
            assert result.abs_lift == pytest.approx(true_lift, abs=0.03)
            assert result.incremental_revenue == pytest.approx(50.0 * 2000 * result.abs_lift)
    assert covered >= 35
