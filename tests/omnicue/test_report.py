"""`omnicue report` and `omnicue replay --report` on small files and generated data."""

from __future__ import annotations

import json
import random
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from typer.testing import CliRunner

from omnicue.cli import app
from omnicue.report import render_html
from omnicue.simulator import JourneyPlanner
from schemas.report import MODELS, Report
from tests.factories import T0, event_dict

# The keys of the shape, at every level the report has.
TOP_KEYS = {"conversions", "attributed_conversions", "revenue", "attributed_revenue",
            "attribution", "lift", "funnel", "paths"}  # fmt: skip
LIFT_KEYS = {"treatment", "control", "abs_lift", "ci95", "relative_lift", "incremental_revenue"}
FUNNEL_KEYS = {"sent", "delivered", "opened", "clicked", "converted"}

RULES_YAML = """\
version: 1
policy:
  quiet_hours: null
  caps:
    total: {limit: 100, window: 1h}
    per_channel: {limit: 100, window: 1h}
  holdout: 0.1
  costs: {email: 0.5, push: 0, sms: 20}
rules:
  - id: cart_abandonment
    category: marketing
    holdout: 0.3
    conversion: {within: 5d}
    variants:
      a: {weight: 1}
      b: {weight: 1, template: cart_reminder_b}
    trigger:
      event: cart.item_added
      key: properties.cart_id
    cancel_on:
      - event: order.completed
        when: event.properties.cart_id == journey.key
        reason: purchased
    steps:
      - after: 30m
        channels: [push, email]
        template: cart_reminder_1
      - after: 24h
        channels: [email]
        template: cart_reminder_2
  - id: order_confirmation
    category: transactional
    trigger: {event: order.completed}
    steps:
      - after: 0s
        channels: [email]
        template: receipt
"""


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(row) + b"\n" for row in rows))
    return path


def generated_events(path: Path, journeys: int = 400, seed: int = 13) -> Path:
    """Simulator visits spread over two weeks, in time order as a log would be."""
    rng = random.Random(seed)
    planner = JourneyPlanner(rng, customers=150)
    events: list[dict[str, Any]] = []
    for index in range(journeys):
        events.extend(planner.next_journey(T0 + timedelta(minutes=50 * index)))
    events.sort(key=lambda e: e["occurred_at"])
    return write_jsonl(path, events)


def test_replay_then_report_on_generated_data(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES_YAML, encoding="utf-8")
    events = generated_events(tmp_path / "events.jsonl")
    out = tmp_path / "report"
    result = CliRunner().invoke(
        app,
        ["replay", str(events), "--out", str(tmp_path / "actions.jsonl"),
         "--rules", str(rules), "--report", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "report written to" in result.output
    assert (out / "decisions.jsonl").stat().st_size > 0
    data = json.loads((out / "report.json").read_text(encoding="utf-8"))
    Report.model_validate(data)
    assert TOP_KEYS <= set(data)
    assert list(data["attribution"]) == list(MODELS)
    assert data["conversions"] > data["attributed_conversions"] > 0
    for by_channel in data["attribution"].values():
        total = sum(credit["conversions"] for credit in by_channel.values())
        assert total == pytest.approx(data["attributed_conversions"])
    assert set(data["lift"]) == {"cart_abandonment", "_global"}
    for lift in data["lift"].values():
        assert LIFT_KEYS <= set(lift)
        assert lift["treatment"]["customers"] > 0 and lift["control"]["customers"] > 0
        lo, hi = lift["ci95"]
        assert lo <= lift["abs_lift"] <= hi
    # Variants: the engine's own pick for every treated customer, each against the control.
    cart = data["lift"]["cart_abandonment"]
    assert set(cart["variants"]) == {"a", "b"}
    variants = cart["variants"].values()
    assert sum(v["treatment"]["customers"] for v in variants) == cart["treatment"]["customers"]
    assert all(v["control"] == cart["control"] for v in variants)
    sent = [orjson.loads(line) for line in (tmp_path / "actions.jsonl").read_bytes().splitlines()]
    assert {a["variant"] for a in sent if a["rule_id"] == "cart_abandonment"} == {"a", "b"}
    assert {"push", "email"} <= set(data["funnel"])
    for funnel in data["funnel"].values():
        assert FUNNEL_KEYS <= set(funnel)
    assert data["funnel"]["email"]["cost"] == pytest.approx(0.5 * data["funnel"]["email"]["sent"])
    assert data["paths"] and data["paths"][0]["path"][-1].startswith("order@")
    assert data["carts"]["rule_id"] == "cart_abandonment"
    page = (out / "report.html").read_text(encoding="utf-8")
    for chart in ("funnel", "attribution", "lift", "over-time", "paths"):
        assert f'id="chart-{chart}"' in page
    # Offline: plotly.js is inlined once, and no script is fetched.
    assert re.search(r"<script\b[^>]*\bsrc=", page) is None
    assert page.count("plotly.js v") >= 1


def small_log(tmp_path: Path) -> tuple[Path, Path, Path]:
    """One customer messaged by push then email, who orders in the store; a failed sms."""
    hour = timedelta(hours=1)
    events = write_jsonl(
        tmp_path / "events.jsonl",
        [
            event_dict("message.clicked", {"action_id": "a2"}, at=T0 + 2 * hour, channel="email"),
            event_dict("message.failed", {"action_id": "a3"}, at=T0 + 2 * hour, channel="sms"),
            event_dict(
                "order.completed",
                {"order_id": "o1", "value": 90.0, "currency": "KRW"},
                at=T0 + 3 * hour,
                channel="store",
            ),
        ],
    )

    def action(action_id: str, channel: str, at: Any) -> dict[str, Any]:
        return {
            "action_id": action_id, "rule_id": "cart_abandonment", "rule_version": "v",
            "step": 1, "customer_id": "c1", "journey_key": "k", "channel": channel,
            "category": "marketing", "template": "t", "recipient": {},
            "created_at": at.isoformat(), "due_at": at.isoformat(),
            "expires_at": (at + timedelta(days=1)).isoformat(), "trigger_event_id": "e",
            "trigger_occurred_at": at.isoformat(),
        }  # fmt: skip

    actions = write_jsonl(
        tmp_path / "actions.jsonl",
        [action("a1", "push", T0), action("a2", "email", T0 + hour), action("a3", "sms", T0)],
    )
    decisions = write_jsonl(
        tmp_path / "decisions.jsonl",
        [{"customer_id": "c1", "rule_id": "cart_abandonment", "rule_version": "v",
          "journey_key": "k", "step": 1, "outcome": "fired", "decided_at": T0.isoformat()}],
    )  # fmt: skip
    return events, actions, decisions


def test_report_on_a_small_log_by_hand(tmp_path: Path) -> None:
    events, actions, decisions = small_log(tmp_path)
    target = tmp_path / "report.json"
    result = CliRunner().invoke(
        app,
        ["report", "--events", str(events), "--actions", str(actions),
         "--decisions", str(decisions), "--json", str(target), "--half-life", "2h"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(target.read_text(encoding="utf-8"))
    assert (data["conversions"], data["attributed_conversions"]) == (1, 1)
    assert data["attribution"]["last_touch"] == {
        "email": {"conversions": 1.0, "revenue": 90.0},
        "push": {"conversions": 0.0, "revenue": 0.0},
    }
    # Ages 3h and 2h with a 2h half-life: weights 2^-1.5 and 2^-1, i.e. 1 : sqrt(2).
    email = data["attribution"]["time_decay"]["email"]["conversions"]
    assert email == pytest.approx(2**0.5 / (1 + 2**0.5))
    assert data["funnel"]["email"] | {} == data["funnel"]["email"]
    assert {k: data["funnel"]["email"][k] for k in FUNNEL_KEYS} == {
        "sent": 1, "delivered": 1, "opened": 1, "clicked": 1, "converted": 1,
    }  # fmt: skip
    assert "sms" not in data["funnel"]  # the failed message is no touch
    assert data["paths"] == [{"path": ["push", "email", "order@store"], "conversions": 1}]
    # The packaged rules have no holdout: no lift.
    assert data["lift"] == {}


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [("--lookback", "a week", "invalid duration"), ("--half-life", "0s", "must be positive")],
)
def test_bad_durations_exit_2(tmp_path: Path, option: str, value: str, message: str) -> None:
    events, actions, decisions = small_log(tmp_path)
    result = CliRunner().invoke(
        app,
        ["report", "--events", str(events), "--actions", str(actions),
         "--decisions", str(decisions), "--json", str(tmp_path / "r.json"), option, value],
    )  # fmt: skip
    assert result.exit_code == 2
    assert message in result.output


def test_a_missing_file_exits_2(tmp_path: Path) -> None:
    events, actions, _ = small_log(tmp_path)
    result = CliRunner().invoke(
        app,
        ["report", "--events", str(events), "--actions", str(actions),
         "--decisions", str(tmp_path / "missing.jsonl"), "--json", str(tmp_path / "r.json")],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "missing.jsonl" in result.output


def test_html_embeds_the_numbers_safely() -> None:
    report = Report(
        conversions=0, attributed_conversions=0, revenue=0.0, attributed_revenue=0.0,
        attribution={m: {} for m in MODELS}, lift={}, funnel={}, paths=[],
    )  # fmt: skip
    page = render_html(report, "</script><b>x</b>")
    assert "<b>x</b>" not in page
    assert page.count('id="chart-') == 5


def test_the_report_defaults_to_the_workers_attribution_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The live records use OMNICUE_ATTRIBUTION_*; so does the report, by default."""
    events, actions, decisions = small_log(tmp_path)
    monkeypatch.setenv("OMNICUE_ATTRIBUTION_LOOKBACK_DAYS", "0.1")
    monkeypatch.setenv("OMNICUE_ATTRIBUTION_HALF_LIFE_DAYS", "0.5")
    target = tmp_path / "report.json"
    result = CliRunner().invoke(
        app,
        ["report", "--events", str(events), "--actions", str(actions),
         "--decisions", str(decisions), "--json", str(target)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(target.read_text(encoding="utf-8"))
    assert data["settings"]["lookback_seconds"] == 0.1 * 86_400
    # 2.4 h of lookback: the touches 3 h and 2 h before the order, only the later counts.
    assert data["attribution"]["first_touch"]["email"]["conversions"] == 1.0
    from omnicue.settings import Settings

    policy = Settings().engine_policy()
    assert policy.touch_lookback.total_seconds() == 0.1 * 86_400
