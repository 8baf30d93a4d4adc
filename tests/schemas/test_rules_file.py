from __future__ import annotations

from datetime import timedelta

import pytest

from omnicue.rules import load_rules, packaged_rules_path, parse_rules_text
from schemas.rules import RulesError, parse_duration
from tests.factories import CART_RULE, ruleset


def test_durations() -> None:
    assert parse_duration("30s") == timedelta(seconds=30)
    assert parse_duration("30m") == timedelta(minutes=30)
    assert parse_duration("24h") == timedelta(hours=24)
    assert parse_duration("7d") == timedelta(days=7)
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration("soon")


def test_errors_name_the_rule_and_the_field() -> None:
    text = """
version: 1
rules:
  - id: cart_abandonment
    category: marketing
    trigger: {event: cart.item_added}
    steps:
      - {after: 30x, channels: [push], template: t}
      - {after: 1h, channels: [pigeon], template: t}
"""
    with pytest.raises(RulesError) as info:
        parse_rules_text(text, "rules.yaml")
    message = str(info.value)
    assert "rule 'cart_abandonment' (rules[0]) field steps.0.after" in message
    assert "field steps.1.channels.0" in message


def test_unknown_event_types_and_fields_are_rejected() -> None:
    with pytest.raises(RulesError, match="unknown event type 'cart.added'"):
        ruleset({**CART_RULE, "trigger": {"event": "cart.added"}})
    with pytest.raises(RulesError, match="Extra inputs"):
        ruleset({**CART_RULE, "colour": "red"})


def test_bad_cel_fails_the_load_with_the_rule_id() -> None:
    bad = {**CART_RULE, "cancel_on": [{"event": "order.completed", "when": "event.x =="}]}
    with pytest.raises(RulesError, match="rule 'cart_abandonment' field cancel_on.0.when"):
        ruleset(bad)
    unknown = {**CART_RULE, "trigger": {"event": "cart.item_added", "when": "shopper.vip"}}
    with pytest.raises(RulesError, match="unknown variable"):
        ruleset(unknown)


def test_packaged_rules_load() -> None:
    assert [r.id for r in load_rules(packaged_rules_path("demo")).rules] == ["cart_abandonment"]
    assert [r.id for r in load_rules(packaged_rules_path("default")).rules] == [
        "cart_abandonment",
        "browse_abandonment",
        "welcome_series",
        "review_request",
        "win_back",
        "offline_to_online",
        "order_confirmation",
    ]
    default = load_rules(None).by_id["cart_abandonment"].rule
    assert [s.after for s in default.steps] == [timedelta(minutes=30), timedelta(hours=24)]
    assert default.steps[1].payload == {"coupon": "CART10"}


def test_rule_version_changes_with_the_rule() -> None:
    a = ruleset(CART_RULE).rules[0].version
    b = ruleset({**CART_RULE, "description": "edited"}).rules[0].version
    assert a != b and a == ruleset(CART_RULE).rules[0].version
