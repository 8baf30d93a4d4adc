"""The whole path on real processes: producer client -> broker -> worker -> topics."""

from __future__ import annotations

import json
import subprocess
import sys
import time
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
from schemas.actions import make_action_id
from tests.e2e.conftest import write_rules
from tests.e2e.harness import (
    ROOT,
    TopicReader,
    profile_view,
    scrape,
    settings_env,
    start_worker,
)
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


def anonymous_then_known(anonymous_id: str, customer: str, buys: bool) -> tuple[
    list[dict[str, Any]], list[dict[str, Any]]
]:
    """Issue 11's defect: an anonymous visitor registers a device, consents and adds a
    cart; then (the second list) identifies as `customer`, and, if `buys`, orders it."""
    now = datetime.now(UTC).isoformat()
    cart = f"cart-{customer}"
    anon: dict[str, Any] = {"customer_id": None, "anonymous_id": anonymous_id, "occurred_at": now}
    before = [
        event_dict("device.registered", {"push_token": f"tok-{anonymous_id}",
                                         "platform": "ios"}, channel="app", **anon),
        event_dict("consent.updated", {"channel": "push", "category": "marketing",
                                       "granted": True}, channel="app", **anon),
        event_dict("consent.updated", {"channel": "email", "category": "marketing",
                                       "granted": True}, channel="app", **anon),
        event_dict("cart.item_added", {"cart_id": cart, "product_id": "p-7", "quantity": 1,
                                       "price": 9_000}, channel="app", **anon),
    ]
    after = [event_dict("identify", {"traits": {"email": f"{customer}@example.com"}},
                        customer_id=customer, anonymous_id=anonymous_id, occurred_at=now)]
    if buys:
        after.append(event_dict("order.completed", {"order_id": f"o-{customer}", "cart_id": cart,
                                                    "value": 9_000, "currency": "KRW"},
                                customer_id=customer, occurred_at=now))
    else:
        # After the link: an event with only the anonymous id, forwarded to the customer.
        after.append(event_dict("product.viewed", {"product_id": "p-8"}, channel="app", **anon))
    for n, e in enumerate(before + after):
        e["event_id"] = f"{anonymous_id}-{n}"
    return before, after


def wait_for_profile(port: int, profile: str, ready: Callable[[dict[str, Any]], bool]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        body = profile_view(port, profile)
        if body is not None and ready(body):
            return
        time.sleep(0.1)
    raise AssertionError(f"profile {profile} never got ready: {profile_view(port, profile)}")


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
        # Anonymous visitors who sign in, once the worker is warm: their carts must be in
        # the anonymous profiles before the links, well within the 4 s to step 1.
        bought, merged = (anonymous_then_known("a-vis", "c-vis", buys=True),
                          anonymous_then_known("a-two", "c-two", buys=False))
        with EventProducer(settings) as producer:
            for e in bought[0] + merged[0]:
                producer.send(e)
            producer.flush()
            for anonymous_id in ("a-vis", "a-two"):
                wait_for_profile(settings.web_port, f"anon:{anonymous_id}",
                                 lambda body: bool(body["carts"]))
            for e in bought[1] + merged[1]:
                producer.send(e)
            producer.flush()
        published += bought[0] + merged[0] + bought[1] + merged[1]

        def merged_done(records: list[Any]) -> bool:
            return any(r.topic == topics.ACTIONS["email"] and r.key == b"c-two"
                       and b'"step":2' in r.value for r in records)

        reader.wait_for(merged_done, timeout=60)
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


def test_a_cart_bought_after_signing_in_gets_no_reminder_to_anyone(run: dict[str, Any]) -> None:
    """Issue 11's defect, through the live pipeline: before identity resolution the
    order went to c-vis and a cart reminder to `anon:a-vis` for the bought cart."""
    assert actions_of(run, "c-vis") == [] and actions_of(run, "anon:a-vis") == []
    decisions = decisions_of(run, "c-vis")
    assert [(d["outcome"], d["reason"]) for d in decisions] == [
        ("identity", "identity_merged"), ("cancelled", "purchased")
    ]
    assert decisions[0]["profile"] == "anon:a-vis" and decisions[0]["journeys_carried"] == 1


def test_a_journey_started_anonymously_reaches_the_customer_it_became(
    run: dict[str, Any],
) -> None:
    actions = actions_of(run, "c-two")
    assert [(a["step"], a["channel"]) for a in actions] == [(1, "push"), (2, "email")]
    # The anonymous device's token, the customer's email, the journey's own action ids.
    assert actions[0]["recipient"]["push_token"] == "tok-a-two"
    assert actions[1]["recipient"]["email"] == "c-two@example.com"
    assert [a["action_id"] for a in actions] == [
        make_action_id("cart_abandonment", "anon:a-two", "a-two-3", step) for step in (1, 2)
    ]
    assert actions_of(run, "anon:a-two") == []


def test_a_linked_anonymous_id_looks_up_the_customer(run: dict[str, Any]) -> None:
    port = run["settings"].web_port
    for asked in ("anon:a-two", "a-two", "c-two"):
        body = profile_view(port, asked)
        assert body is not None and body["customer_id"] == "c-two", asked
    body = profile_view(port, "c-two")
    assert body is not None
    # The event with only the anonymous id, sent after the link, reached the customer.
    assert "a-two-5" in body["recent_event_ids"]
    assert body["identifiers"]["merged_profiles"] == ["anon:a-two"]


def test_metrics_count_what_happened(run: dict[str, Any]) -> None:
    m = scrape(run["settings"].web_port)
    assert m["omnicue_events_invalid_total{reason=json}"] == 1
    assert m["omnicue_events_invalid_total{reason=schema}"] == 1
    assert m["omnicue_events_consumed_total{type=cart.item_added}"] == 7
    assert m["omnicue_actions_total{channel=push,rule=cart_abandonment}"] == 2
    assert m["omnicue_decisions_total{outcome=cancelled,reason=purchased}"] == 2
    assert m["omnicue_decisions_total{outcome=identity,reason=identity_merged}"] == 2
    assert m["omnicue_identity_messages_total{kind=link_request}"] == 2
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
