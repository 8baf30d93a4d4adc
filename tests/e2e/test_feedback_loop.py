"""The feedback loop on real processes: a worker emits a cart reminder, the provider's
feedback comes back through `omnicue ingest` (`POST /v1/feedback`), and the worker's
next decision changes. On Tansu and on Apache Kafka."""

from __future__ import annotations

import base64
import json
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from omnicue.producer import EventProducer
from omnicue.services import ManagedProcess, free_port
from omnicue.settings import Settings
from schemas import topics
from tests.e2e.conftest import write_rules
from tests.e2e.harness import TopicReader, profile_view, settings_env, start_worker
from tests.factories import event_dict

pytestmark = pytest.mark.e2e

KEY = "wk-esp"


def post_feedback(port: int, body: Any) -> int:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/feedback",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json",
                 "Authorization": "Basic " + base64.b64encode(f"{KEY}:".encode()).decode()},
        method="POST",
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=30) as response:
        return int(response.status)


@pytest.fixture(scope="module")
def loop(make_settings: Callable[..., Settings], run_dir: Path) -> Iterator[dict[str, Any]]:
    # Step 1 by email 4 s after the cart, step 2 by email 14 s after: room for the
    # feedback on step 1 to come back before step 2 is decided.
    settings = make_settings(
        rules=write_rules(run_dir, "4s", "14s"), store="memory://",
        ingest_port=free_port(), ingest_write_keys=f"{KEY}=email",
    )  # fmt: skip
    worker = start_worker(settings, run_dir / "worker.log")
    ingest = ManagedProcess(
        [sys.executable, "-m", "omnicue.cli", "ingest"], log_path=run_dir / "ingest.log",
        env=settings_env(settings), name="ingest",
    ).start()  # fmt: skip
    reader = TopicReader(
        settings.bootstrap_servers[0],
        [topics.DECISIONS, topics.EVENTS_DLQ, *topics.ACTIONS.values()],
    )
    try:
        ingest.wait_for_line("ingest http://", timeout=60)
        yield {"settings": settings, "reader": reader}
    finally:
        reader.close()
        ingest.stop()
        worker.stop()


def cart_journey(settings: Settings, customer: str) -> None:
    now = datetime.now(UTC).isoformat()
    with EventProducer(settings) as producer:
        for n, e in enumerate((
            event_dict("identify", {"traits": {"email": f"{customer}@example.com"}}),
            event_dict("consent.updated",
                       {"channel": "email", "category": "marketing", "granted": True}),
            event_dict("cart.item_added",
                       {"cart_id": "K", "product_id": "p-1", "quantity": 1, "price": 1_000}),
        )):  # fmt: skip
            producer.send({**e, "customer_id": customer, "occurred_at": now,
                           "event_id": f"{customer}-{n}"})
        producer.flush()


def first_email(reader: TopicReader, customer: str) -> dict[str, Any]:
    def sent(_: Any) -> bool:
        return bool(reader.of(topics.ACTIONS["email"], customer))

    reader.wait_for(sent, timeout=60)
    action: dict[str, Any] = reader.of(topics.ACTIONS["email"], customer)[0]
    return action


def step_two(reader: TopicReader, customer: str) -> dict[str, Any]:
    def decided(_: Any) -> bool:
        return any(d["step"] == 2 for d in reader.of(topics.DECISIONS, customer))

    reader.wait_for(decided, timeout=60)
    decision: dict[str, Any] = next(
        d for d in reader.of(topics.DECISIONS, customer) if d["step"] == 2
    )
    return decision


def feedback(action: dict[str, Any], status: str) -> dict[str, Any]:
    return {"action_id": action["action_id"], "customer_id": action["customer_id"],
            "status": status, "occurred_at": datetime.now(UTC).isoformat()}


def test_a_hard_bounce_makes_the_next_step_unreachable(loop: dict[str, Any]) -> None:
    settings, reader = loop["settings"], loop["reader"]
    cart_journey(settings, "c-bounce")
    action = first_email(reader, "c-bounce")
    assert post_feedback(settings.ingest_port, feedback(action, "bounced")) == 200
    decision = step_two(reader, "c-bounce")
    assert (decision["outcome"], decision.get("reason")) == ("suppressed", "unreachable")


def test_opens_and_clicks_count_one_engaged_message_and_the_next_step_goes_out(
    loop: dict[str, Any],
) -> None:
    settings, reader = loop["settings"], loop["reader"]
    cart_journey(settings, "c-open")
    action = first_email(reader, "c-open")
    # A provider retrying its callback sends the same status twice: deduplicated.
    for status in ("delivered", "opened", "opened", "clicked"):
        assert post_feedback(settings.ingest_port, feedback(action, status)) == 200
    assert step_two(reader, "c-open")["outcome"] == "fired"
    deadline = time.monotonic() + 30
    engagement: dict[str, Any] = {}
    while time.monotonic() < deadline:
        body = profile_view(settings.web_port, "c-open")
        engagement = (body or {}).get("channels", {}).get("email", {}).get("engagement") or {}
        if engagement.get("engaged"):
            break
        time.sleep(0.2)
    assert engagement.get("engaged") == 1, engagement


def test_an_unsubscribe_revokes_marketing_email(loop: dict[str, Any]) -> None:
    settings, reader = loop["settings"], loop["reader"]
    cart_journey(settings, "c-unsub")
    action = first_email(reader, "c-unsub")
    assert post_feedback(settings.ingest_port, feedback(action, "unsubscribed")) == 200
    decision = step_two(reader, "c-unsub")
    assert decision["outcome"] == "suppressed", decision


def test_feedback_for_an_action_never_emitted_is_dead_lettered(loop: dict[str, Any]) -> None:
    settings, reader = loop["settings"], loop["reader"]
    cart_journey(settings, "c-stray")
    first_email(reader, "c-stray")
    stray = {"action_id": "act_never_emitted", "customer_id": "c-stray", "status": "opened",
             "occurred_at": datetime.now(UTC).isoformat()}
    assert post_feedback(settings.ingest_port, stray) == 200

    def dead(_: Any) -> bool:
        return any(r.key == b"c-stray" for r in reader.of(topics.EVENTS_DLQ))

    reader.wait_for(dead, timeout=60)
    [letter] = [r for r in reader.of(topics.EVENTS_DLQ) if r.key == b"c-stray"]
    assert letter.headers["omnicue.error.class"] == b"unknown_action"
