"""`omnicue replay` on generated files: REES46 CSV and contract JSONL."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import orjson
from typer.testing import CliRunner

from omnicue.cli import app
from omnicue.replay import Rees46Reader
from schemas.actions import make_action_id
from tests.factories import T0, event_dict
from triggers.replay import InvalidLine

REES46_HEADER = (
    "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session"
)
# One cart rule, email only, without quiet hours or tight caps: the expectations
# do not move when the packaged rules or the default policy do.
RULES_YAML = """\
version: 1
policy:
  quiet_hours: null
  caps:
    total: {limit: 100, window: 1h}
    per_channel: {limit: 100, window: 1h}
rules:
  - id: cart_abandonment
    category: marketing
    trigger:
      event: cart.item_added
      key: properties.cart_id
    cancel_on:
      - event: order.completed
        when: event.properties.cart_id == journey.key
        reason: purchased
    steps:
      - after: 30m
        channels: [email]
        template: cart_reminder_1
      - after: 24h
        channels: [email]
        template: cart_reminder_2
"""
ABANDONER, BUYER, BROWSER = "512000001", "512000002", "512000003"


def rees46_csv(path: Path) -> Path:
    rows = [
        # line 2..: the abandoner views and adds to the cart, never buys.
        f"2019-10-01 00:00:00 UTC,view,1004856,2053013555631882655,"
        f"electronics.smartphone,samsung,130.76,{ABANDONER},s-aaa",
        f"2019-10-01 00:01:00 UTC,cart,1004856,2053013555631882655,"
        f"electronics.smartphone,samsung,130.76,{ABANDONER},s-aaa",
        # The buyer adds and buys within the session (the cart).
        f"2019-10-01 00:02:00 UTC,view,5100816,2053013553375346967,,xiaomi,29.51,{BUYER},s-bbb",
        f"2019-10-01 00:03:00 UTC,cart,5100816,2053013553375346967,,xiaomi,29.51,{BUYER},s-bbb",
        f"2019-10-01 00:04:00 UTC,view,1801690,2053013554415534427,"
        f"electronics.video.tv,,199.00,{BROWSER},s-ccc",
        f"2019-10-01 00:10:00 UTC,purchase,5100816,2053013553375346967,,xiaomi,29.51,{BUYER},s-bbb",
        f"2019-10-01 00:12:00 UTC,view,1801690,2053013554415534427,"
        f"electronics.video.tv,,199.00,{BROWSER},s-ccc",
    ]
    path.write_text(REES46_HEADER + "\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


def replay(tmp_path: Path, *args: str) -> Any:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES_YAML, encoding="utf-8")
    return CliRunner().invoke(app, ["replay", *args, "--rules", str(rules)])


def lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def test_rees46_abandoned_cart_gets_both_reminders_and_the_purchase_cancels(
    tmp_path: Path,
) -> None:
    source = rees46_csv(tmp_path / "events.csv")
    actions, decisions = tmp_path / "actions.jsonl", tmp_path / "decisions.jsonl"
    result = replay(
        tmp_path,
        str(source),
        "--format",
        "rees46",
        "--out",
        str(actions),
        "--decisions",
        str(decisions),
        "--until",
        "2019-10-03T09:00:00+09:00",
        "--synthetic-contacts",
        "--progress",
    )
    assert result.exit_code == 0, result.output

    written = lines(actions)
    assert [(a["customer_id"], a["step"], a["channel"], a["created_at"]) for a in written] == [
        (ABANDONER, 1, "email", "2019-10-01T00:31:00Z"),
        (ABANDONER, 2, "email", "2019-10-02T00:01:00Z"),
    ]
    # The journey id is the event id of the cart row (line 3 of the file).
    assert [a["action_id"] for a in written] == [
        make_action_id("cart_abandonment", ABANDONER, "rees46-3", step) for step in (1, 2)
    ]
    assert written[0]["recipient"]["email"] == f"{ABANDONER}@rees46.invalid"
    assert written[0]["payload"]["items"] == [
        {"product_id": "1004856", "quantity": 1, "price": 130.76}
    ]
    assert [(d["customer_id"], d["outcome"], d.get("reason")) for d in lines(decisions)] == [
        (BUYER, "cancelled", "purchased"),
        (ABANDONER, "fired", None),
        (ABANDONER, "fired", None),
    ]

    summary = result.stdout
    assert "events read:       13 (incl. 6 synthetic)" in summary
    assert "invalid lines:     0" in summary
    assert "customers:         3" in summary
    assert "journeys started:  2 (cart_abandonment 2)" in summary
    assert "actions:           2" in summary
    assert "  cart_abandonment step 1 email: 1" in summary
    assert "  cart_abandonment step 2 email: 1" in summary
    assert "cancelled:         1 (purchased 1)" in summary
    assert "  2019-10-01T00:00Z: 1" in summary and "  2019-10-02T00:00Z: 1" in summary
    assert "events/s" in summary
    assert "100.0%" in result.stderr


def test_rees46_without_contacts_every_reminder_is_unreachable(tmp_path: Path) -> None:
    source = rees46_csv(tmp_path / "events.csv")
    actions = tmp_path / "actions.jsonl"
    result = replay(
        tmp_path,
        str(source),
        "--format",
        "rees46",
        "--out",
        str(actions),
        "--until",
        "2019-10-03T00:00:00Z",
    )
    assert result.exit_code == 0, result.output
    assert actions.read_bytes() == b""
    assert "events read:       7" in result.stdout
    assert "suppressions:      2\n  unreachable: 2" in result.stdout


def test_rees46_bad_rows_are_reported_and_skipped(tmp_path: Path) -> None:
    source = rees46_csv(tmp_path / "events.csv")
    with source.open("a", encoding="utf-8") as f:
        f.write("2019-10-01 00:13:00 UTC,wishlist,1,2,,,1.00,512000004,s-ddd\n")
        f.write("2019-10-01 00:14:00 UTC,cart,1,2,,,-3,512000004,s-ddd\n")
        f.write("yesterday,view,1,2,,,1.00,512000004,s-ddd\n")
    result = replay(tmp_path, str(source), "--format", "rees46", "--out", str(tmp_path / "a.jsonl"))
    assert result.exit_code == 0, result.output
    err = result.stderr
    assert f"{source}:9: event_type: unknown REES46 event type 'wishlist'" in err
    assert f"{source}:10: properties.price: Input should be greater than or equal to 0" in err
    assert f"{source}:11: event_time" in err
    assert "invalid lines:     3" in result.stdout


def test_rees46_views_of_one_product_row_share_their_validated_properties() -> None:
    view = "2019-10-01 00:00:0{s} UTC,view,1004856,2053013555631882655,,samsung,{price},{user},s-a"
    rows = [
        view.format(s=0, price="130.76", user="512000001"),
        view.format(s=1, price="130.76", user="512000002"),
        view.format(s=2, price="-1", user="512000003"),
    ]
    data = (REES46_HEADER + "\n" + "\n".join(rows) + "\n").encode()
    first, second, bad = Rees46Reader(io.BytesIO(data))
    assert not isinstance(first, InvalidLine) and not isinstance(second, InvalidLine)
    assert second.properties is first.properties
    assert (first.event_id, second.event_id) == ("rees46-2", "rees46-3")
    assert second.customer_id == "512000002"
    # A row that fails is reported with the field's path, as for other event types.
    assert isinstance(bad, InvalidLine)
    assert bad.error.startswith("properties.price: Input should be greater than or equal to 0")


def test_jsonl_invalid_line_is_reported_with_its_number_and_the_replay_goes_on(
    tmp_path: Path,
) -> None:
    source = tmp_path / "events.jsonl"
    good = [
        event_dict("identify", {"traits": {"email": "kim@example.com"}}, event_id="e1", at=T0),
        event_dict(
            "consent.updated",
            {"channel": "email", "category": "marketing", "granted": True},
            event_id="e2",
            at=T0,
        ),
        event_dict(
            "cart.item_added",
            {"cart_id": "k", "product_id": "p", "price": 5.0},
            event_id="e3",
            at=T0,
        ),
    ]
    text = [
        json.dumps(good[0]),
        json.dumps(good[1]),
        '{"type": "cart.item_added"',
        "",
        json.dumps(good[2]),
    ]
    source.write_text("\n".join(text) + "\n", encoding="utf-8")
    actions = tmp_path / "actions.jsonl"
    result = replay(tmp_path, str(source), "--out", str(actions), "--until", "2026-03-02T02:00Z")

    assert result.exit_code == 0, result.output
    assert result.stderr.startswith(f"{source}:3: ")
    assert "invalid lines:     1" in result.stdout
    assert "events read:       3" in result.stdout
    [action] = lines(actions)
    assert action["action_id"] == make_action_id("cart_abandonment", "c1", "e3", 1)


def test_until_needs_an_offset(tmp_path: Path) -> None:
    source = rees46_csv(tmp_path / "events.csv")
    result = replay(
        tmp_path,
        str(source),
        "--format",
        "rees46",
        "--out",
        str(tmp_path / "a.jsonl"),
        "--until",
        "2019-10-03T00:00:00",
    )
    assert result.exit_code == 2
    assert "offset" in result.stderr


def test_a_missing_events_file_is_an_error(tmp_path: Path) -> None:
    result = replay(tmp_path, str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "a.jsonl"))
    assert result.exit_code == 2
    assert "nope.jsonl" in result.stderr


def test_a_csv_file_is_read_as_rees46_by_default(tmp_path: Path) -> None:
    source = rees46_csv(tmp_path / "events.csv")
    result = replay(tmp_path, str(source), "--out", str(tmp_path / "a.jsonl"))
    assert result.exit_code == 0, result.output
    assert "(rees46)" in result.stdout and "invalid lines:     0" in result.stdout


def test_a_csv_without_the_rees46_header_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "other.csv"
    source.write_text("time,kind,user\n2019-10-01 00:00:00 UTC,view,1\n", encoding="utf-8")
    result = replay(tmp_path, str(source), "--out", str(tmp_path / "a.jsonl"))
    assert result.exit_code == 2
    assert "not a REES46 CSV" in result.stderr


def test_the_benchmark_data_is_valid_rees46(tmp_path: Path) -> None:
    from bench.replay import generate
    from omnicue.replay import run_replay
    from omnicue.settings import Settings

    source = tmp_path / "bench.csv"
    generate(source, 3000, seed=1)
    summary = run_replay(
        source, tmp_path / "a.jsonl", None, None, None, "rees46", False, Settings()
    )
    s = summary.stats
    assert s.invalid == 0 and s.events == 3000
    assert s.events_by_type["product.viewed"] > 0.85 * s.events
    assert s.events_by_type["cart.item_added"] > 0 and s.events_by_type["order.completed"] > 0
    assert s.customers > 100 and s.journeys_started > 0
