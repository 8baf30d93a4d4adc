"""`omnicue replay --format segment`: Segment messages through the ingest's mapping."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from omnicue.replay import read_segment
from schemas.actions import make_action_id
from tests.omnicue.test_replay_cli import lines, replay
from triggers.replay import InvalidLine


def segment(kind: str, message_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "type": kind,
        "messageId": message_id,
        "timestamp": "2026-03-02T00:00:00Z",
        "userId": "c1",
        "context": {"library": {"name": "analytics.js", "version": "5.0.0"}},
        **fields,
    }


def test_a_segment_log_replays_through_the_ingest_mapping(tmp_path: Path) -> None:
    source = tmp_path / "segment.jsonl"
    messages = [
        segment("identify", "m1", traits={"email": "kim@example.com"}),
        segment(
            "track",
            "m2",
            event="consent.updated",
            properties={"channel": "email", "category": "marketing", "granted": True},
        ),
        # No currency: rejected with the field named, the replay goes on.
        segment("track", "m3", event="Order Completed", properties={"order_id": "o", "total": 1}),
        {
            **segment(
                "track",
                "m4",
                event="Product Added",
                properties={"cart_id": "k", "product_id": "p", "price": 5.0},
            ),
            "timestamp": None,
        },
    ]
    del messages[3]["timestamp"]
    messages[3]["receivedAt"] = "2026-03-02T00:01:00Z"
    source.write_text("\n".join(json.dumps(m) for m in messages) + "\n", encoding="utf-8")
    actions = tmp_path / "actions.jsonl"
    result = replay(
        tmp_path, str(source), "--format", "segment", "--out", str(actions),
        "--until", "2026-03-02T02:00Z",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stderr.startswith(f"{source}:3: properties.currency")
    assert "invalid lines:     1" in result.stdout
    [action] = lines(actions)
    assert action["action_id"] == make_action_id("cart_abandonment", "c1", "m4", 1)
    assert action["channel"] == "email"


def test_the_channel_option_and_lines_without_a_time() -> None:
    raw = io.BytesIO(
        b'{"type": "track", "messageId": "m1", "userId": "c1", "event": "Video Played",'
        b' "timestamp": "2026-03-02T00:00:00Z"}\n'
        b'{"type": "track", "messageId": "m2", "userId": "c1", "event": "Video Played"}\n'
        b"[1]\n"
    )
    first, no_time, not_object = list(read_segment(raw, "app"))
    assert not isinstance(first, InvalidLine)
    assert (first.type, first.channel, first.event_id) == ("custom", "app", "m1")
    assert isinstance(no_time, InvalidLine) and "timestamp" in no_time.error
    assert isinstance(not_object, InvalidLine) and not_object.line == 3


def test_a_bad_channel_is_a_usage_error(tmp_path: Path) -> None:
    source = tmp_path / "segment.jsonl"
    source.write_text("", encoding="utf-8")
    result = replay(
        tmp_path, str(source), "--format", "segment", "--channel", "mail",
        "--out", str(tmp_path / "a.jsonl"),
    )  # fmt: skip
    assert result.exit_code == 2
    assert "--channel must be one of" in result.stderr
