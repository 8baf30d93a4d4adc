"""The whole path on real processes: producer client -> broker -> worker -> topics."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaProducer

from omnicue.producer import EventProducer
from omnicue.services import ManagedProcess
from omnicue.settings import Settings
from schemas import topics
from tests.e2e.conftest import write_rules
from tests.e2e.harness import ROOT, TopicReader, scrape, settings_env, start_worker
from tests.factories import event_dict

pytestmark = pytest.mark.e2e


def journey(customer: str, *kinds: str) -> list[dict[str, Any]]:
    now = datetime.now(UTC)
    events = {
        "email": event_dict("identify", {"traits": {"email": f"{customer}@example.com"}}),
        "email_consent": event_dict(
            "consent.updated", {"channel": "email", "category": "marketing", "granted": True}
        ),
        "push": event_dict("device.registered", {"push_token": f"tok-{customer}",
                                                 "platform": "android"}, channel="app"),
        "push_consent": event_dict(
            "consent.updated", {"channel": "push", "category": "marketing", "granted": True}
        ),
        "cart": event_dict("cart.item_added", {"cart_id": f"cart-{customer}", "product_id": "p-7",
                                               "quantity": 2, "price": 15_000}),
        "order": event_dict("order.completed", {"order_id": f"o-{customer}",
                                                "cart_id": f"cart-{customer}", "value": 30_000,
                                                "currency": "KRW"}),
    }
    out = []
    for kind in kinds:
        e = dict(events[kind], customer_id=customer, occurred_at=now.isoformat())
        e["event_id"] = f"{customer}-{kind}"
        out.append(e)
    return out


@pytest.fixture(scope="module")
def run(make_settings: Callable[..., Settings], run_dir: Path) -> Iterator[dict[str, Any]]:
    settings = make_settings(rules=write_rules(run_dir, "4s", "8s"), store="memory://")
    worker = start_worker(settings, run_dir / "worker.log")
    bootstrap = settings.bootstrap_servers[0]
    reader = TopicReader(
        bootstrap, [topics.EVENTS_DLQ, topics.DECISIONS, *topics.ACTIONS.values()]
    )
    try:
        raw = KafkaProducer(bootstrap_servers=bootstrap)
        raw.send(topics.EVENTS, key=b"broken", value=b'{"event_id": "x", "type": ')
        no_time = b'{"event_id": "y", "type": "cart.item_added"}'
        raw.send(topics.EVENTS, key=b"c-late", value=no_time)
        raw.flush()
        raw.close()
        published = (
            journey("c-push", "email", "push", "push_consent", "email_consent", "cart")
            + journey("c-mail", "email", "email_consent", "cart")
            + journey("c-buy", "email", "email_consent", "cart", "order")
            + journey("c-none", "cart")
            + journey("c-after", "email", "email_consent", "cart")
        )
        with EventProducer(settings) as producer:
            for e in published:
                producer.send(e)
            producer.flush()

        def done(records: list[Any]) -> bool:
            step2 = [r for r in records if r.topic == topics.ACTIONS["email"]
                     and b'"step":2' in r.value]
            return len(step2) >= 3

        reader.wait_for(done, timeout=60)
        reader.settle(2)
        yield {"reader": reader, "worker": worker, "settings": settings, "events": published,
               "dir": run_dir}
    finally:
        reader.close()
        worker.stop()


def actions_of(run: dict[str, Any], customer: str) -> list[dict[str, Any]]:
    reader: TopicReader = run["reader"]
    return [a for a in reader.of("omnicue.actions.", customer)]


def decisions_of(run: dict[str, Any], customer: str) -> list[dict[str, Any]]:
    return run["reader"].of(topics.DECISIONS, customer)  # type: ignore[no-any-return]


def test_abandoned_cart_with_push_token_and_consent_yields_one_push(run: dict[str, Any]) -> None:
    actions = actions_of(run, "c-push")
    step1 = [a for a in actions if a["step"] == 1]
    assert len(step1) == 1
    push = step1[0]
    assert push["channel"] == "push" and push["template"] == "cart_reminder_1"
    assert push["recipient"]["push_token"] == "tok-c-push"
    assert push["payload"] == {
        "cart_id": "cart-c-push",
        "items": [{"product_id": "p-7", "quantity": 2, "price": 15000.0}],
        "value": 30000.0,
    }
    assert push["trigger_event_id"] == "c-push-cart"
    # Step 2 goes by email, with the coupon, exactly once.
    step2 = [a for a in actions if a["step"] == 2]
    assert [(a["channel"], a["payload"]["coupon"]) for a in step2] == [("email", "CART10")]
    record_topics = {r.topic for r in run["reader"].records if r.key == b"c-push"
                     and r.topic.startswith("omnicue.actions.")}
    assert record_topics == {topics.ACTIONS["push"], topics.ACTIONS["email"]}


def test_without_a_push_token_step_one_goes_by_email(run: dict[str, Any]) -> None:
    step1 = [a for a in actions_of(run, "c-mail") if a["step"] == 1]
    assert [(a["channel"], a["recipient"]["email"]) for a in step1] == [
        ("email", "c-mail@example.com")
    ]


def test_a_purchase_before_the_due_time_yields_no_action(run: dict[str, Any]) -> None:
    assert actions_of(run, "c-buy") == []
    decisions = decisions_of(run, "c-buy")
    assert [(d["outcome"], d["reason"], d["event_id"]) for d in decisions] == [
        ("cancelled", "purchased", "c-buy-order")
    ]


def test_an_unreachable_customer_gets_suppressed_decisions(run: dict[str, Any]) -> None:
    assert actions_of(run, "c-none") == []
    decisions = decisions_of(run, "c-none")
    assert [(d["step"], d["outcome"], d["reason"]) for d in decisions] == [
        (1, "suppressed", "unreachable"), (2, "suppressed", "unreachable")
    ]


def test_invalid_events_go_to_the_dead_letter_topic_and_processing_continues(
    run: dict[str, Any],
) -> None:
    dead = run["reader"].of(topics.EVENTS_DLQ)
    assert sorted(r.key for r in dead) == [b"broken", b"c-late"]
    by_key = {r.key: r for r in dead}
    assert by_key[b"broken"].value == b'{"event_id": "x", "type": ', "original bytes unchanged"
    assert by_key[b"broken"].headers["omnicue.error.class"] == b"json"
    assert by_key[b"c-late"].headers["omnicue.error.class"] == b"schema"
    assert b"occurred_at: Field required" in by_key[b"c-late"].headers["omnicue.error.message"]
    assert by_key[b"c-late"].headers["omnicue.error.stage"] == b"ingest"
    # The worker kept going: later events were processed.
    worker: ManagedProcess = run["worker"]
    assert worker.running
    assert len(actions_of(run, "c-after")) == 2


def test_metrics_count_what_happened(run: dict[str, Any]) -> None:
    m = scrape(run["settings"].web_port)
    assert m["omnicue_events_invalid_total{reason=json}"] == 1
    assert m["omnicue_events_invalid_total{reason=schema}"] == 1
    assert m["omnicue_events_consumed_total{type=cart.item_added}"] == 5
    assert m["omnicue_actions_total{channel=push,rule=cart_abandonment}"] == 1
    assert m["omnicue_decisions_total{outcome=cancelled,reason=purchased}"] == 1
    assert m["omnicue_decisions_total{outcome=suppressed,reason=unreachable}"] == 2
    assert m["omnicue_timer_lateness_seconds_count"] >= 1
    assert m["omnicue_timers_pending"] == 0


def test_replay_of_the_same_event_log_gives_the_same_actions(run: dict[str, Any]) -> None:
    settings: Settings = run["settings"]
    log = run["dir"] / "events.jsonl"
    log.write_text("".join(json.dumps(e) + "\n" for e in run["events"]), encoding="utf-8")
    out = run["dir"] / "replayed-actions.jsonl"
    # Every step of these journeys is due within a minute of the events.
    until = (datetime.now(UTC) + timedelta(minutes=1)).isoformat()
    done = subprocess.run(
        [sys.executable, "-m", "omnicue.cli", "replay", str(log), "--out", str(out),
         "--rules", str(settings.rules), "--until", until],
        env=settings_env(settings), cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr

    def key(a: dict[str, Any]) -> tuple[str, str, int, str]:
        return (a["action_id"], a["rule_id"], a["step"], a["channel"])

    live = sorted(key(a) for a in run["reader"].of("omnicue.actions."))
    replayed = sorted(key(json.loads(line)) for line in out.read_text().splitlines())
    assert live and replayed == live
