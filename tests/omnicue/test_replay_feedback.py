"""`omnicue replay` with delivery feedback in its input: a backtest sees what feedback
does to later decisions, and feedback for actions it did not emit is skipped."""

from __future__ import annotations

import json
from pathlib import Path

from schemas.actions import make_action_id
from tests.factories import T0, event_dict, minutes
from tests.omnicue.test_replay_cli import lines, replay


def test_a_bounce_in_the_log_makes_later_reminders_unreachable(tmp_path: Path) -> None:
    first = make_action_id("cart_abandonment", "c1", "e3", 1)
    log = [
        event_dict("identify", {"traits": {"email": "kim@example.com"}}, event_id="e1", at=T0),
        event_dict("consent.updated", {"channel": "email", "category": "marketing",
                                       "granted": True}, event_id="e2", at=T0),
        event_dict("cart.item_added", {"cart_id": "k1", "product_id": "p", "price": 5.0},
                   event_id="e3", at=T0),
        # The reminder goes out at 30 min; its feedback comes back.
        event_dict("message.sent", {"action_id": first}, channel="email",
                   event_id=f"fb-sent-{first}", at=T0 + minutes(31)),
        event_dict("message.bounced", {"action_id": first, "reason": "550 5.1.1"},
                   channel="email", event_id=f"fb-bounced-{first}", at=T0 + minutes(32)),
        # Feedback about an action this replay never emitted: skipped, not fatal.
        event_dict("message.opened", {"action_id": "act_from_production"}, channel="email",
                   event_id="fb-opened-x", at=T0 + minutes(33)),
        event_dict("cart.item_added", {"cart_id": "k2", "product_id": "p", "price": 5.0},
                   event_id="e4", at=T0 + minutes(40)),
    ]
    source = tmp_path / "events.jsonl"
    source.write_text("".join(json.dumps(e) + "\n" for e in log), encoding="utf-8")
    actions, decisions = tmp_path / "actions.jsonl", tmp_path / "decisions.jsonl"
    result = replay(tmp_path, str(source), "--out", str(actions), "--decisions",
                    str(decisions), "--until", "2026-03-02T02:30Z")

    assert result.exit_code == 0, result.output
    assert "events read:       7" in result.stdout
    assert "invalid lines:     0" in result.stdout
    assert "unknown actions:   1 feedback events skipped" in result.stdout
    assert [a["action_id"] for a in lines(actions)] == [first]
    second = [d for d in lines(decisions) if d["journey_key"] == "k2"]
    assert [(d["outcome"], d.get("reason")) for d in second] == [("suppressed", "unreachable")]
