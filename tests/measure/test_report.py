from __future__ import annotations

import json

import pytest

from measure.report import ReportConfig, build_report
from schemas.report import MODELS
from tests.measure.builders import DAY, T0, conversion, decision, touch


def test_report_has_the_issue_shape_and_totals() -> None:
    touches = [
        touch("push", T0 - 2 * DAY, "c1", action_id="a1"),
        touch("email", T0 - DAY, "c1", action_id="a2"),
        touch("email", T0 - DAY, "c2", action_id="a3"),
    ]
    conversions = [conversion(T0, 30.0, "c1", "store"), conversion(T0, 70.0, "c3")]
    decisions = [
        decision("c1", T0 - 2 * DAY),
        decision("c2", T0 - 2 * DAY),
        decision("c3", T0 - 2 * DAY, "held_out", group="rule:cart_abandonment"),
    ]
    report = build_report(touches, conversions, decisions, config=ReportConfig())
    data = json.loads(report.model_dump_json())
    for key in ("conversions", "attributed_conversions", "revenue", "attributed_revenue",
                "attribution", "lift", "funnel", "paths"):  # fmt: skip
        assert key in data
    assert (data["conversions"], data["attributed_conversions"]) == (2, 1)
    assert (data["revenue"], data["attributed_revenue"]) == (100.0, 30.0)
    assert list(data["attribution"]) == list(MODELS)
    assert data["attribution"]["last_touch"]["email"] == {"conversions": 1.0, "revenue": 30.0}
    # Every model lists the same channels.
    assert {tuple(sorted(by)) for by in data["attribution"].values()} == {("email", "push")}
    cart = data["lift"]["cart_abandonment"]
    assert cart["treatment"]["customers"] == 2 and cart["treatment"]["converted"] == 1
    assert cart["control"] == {"customers": 1, "converted": 1, "revenue": 70.0}
    assert cart["abs_lift"] == pytest.approx(-0.5)
    assert len(cart["ci95"]) == 2
    assert "_global" not in data["lift"]
    assert data["funnel"]["email"]["sent"] == 2 and data["funnel"]["email"]["converted"] == 1
    assert data["paths"] == [{"path": ["push", "email", "order@store"], "conversions": 1}]
    assert [d["day"] for d in data["daily"]] == ["2026-03-08", "2026-03-09", "2026-03-10"]


def test_global_lift_appears_with_a_global_control_group() -> None:
    decisions = [
        decision("c1", T0),
        decision("c2", T0, "held_out", group="global"),
        decision("c3", T0, rule_id="receipt"),
    ]
    report = build_report(
        [], [conversion(T0 + DAY, 10.0, "c2")], decisions,
        config=ReportConfig(transactional_rules=frozenset({"receipt"})),
    )  # fmt: skip
    assert set(report.lift) == {"_global"}
    result = report.lift["_global"]
    assert (result.treatment.customers, result.control.customers) == (1, 1)
    assert (result.treatment.converted, result.control.converted) == (0, 1)
    assert result.relative_lift == pytest.approx(-1.0)
