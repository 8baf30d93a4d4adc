"""Sender processes, actions and feedback for the sender tests (and the e2e crash test)."""

from __future__ import annotations

import os
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from omnicue.services import ManagedProcess
from omnicue.settings import Settings
from schemas.actions import Action, Recipient, make_action_id
from schemas.events import Event, parse_event
from schemas.topics import ACTIONS, EVENTS

REPO_ROOT = Path(__file__).resolve().parents[2]


def make_action(
    channel: str = "sms", *, expires_in: timedelta = timedelta(hours=1), **over: Any
) -> Action:
    # A fresh journey per action: action ids are deterministic and Redis is shared.
    now = datetime.now(UTC)
    customer = over.pop("customer_id", f"c-{uuid.uuid4().hex[:8]}")
    values: dict[str, Any] = {
        "action_id": make_action_id("cart_abandonment", customer, uuid.uuid4().hex, 1),
        "rule_id": "cart_abandonment", "rule_version": "1", "step": 1,
        "customer_id": customer, "journey_key": "cart-1", "channel": channel,
        "category": "marketing", "template": "cart_reminder_1",
        "recipient": Recipient(phone="+821012345678"), "created_at": now, "due_at": now,
        "expires_at": now + expires_in, "trigger_event_id": "e-1", "trigger_occurred_at": now,
    }  # fmt: skip
    values.update(over)
    return Action(**values)


def sender_env(settings: Settings, **extra: str) -> dict[str, str]:
    # Only our OMNICUE_* settings: whatever the developer's shell exports must not leak in.
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNICUE_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(
        OMNICUE_BROKER=settings.broker,
        OMNICUE_REDIS_URL=settings.redis_url,
        OMNICUE_PARTITIONS=str(settings.partitions),
        OMNICUE_DEV_BROKER="true" if settings.dev_broker else "false",
    )
    env.update(extra)
    return env


def webhook_sender(
    settings: Settings,
    channel: str,
    url: str,
    secret: str,
    log_path: Path,
    metrics_port: int,
    *args: str,
    **extra: str,
) -> ManagedProcess:
    env = sender_env(
        settings,
        OMNICUE_WEBHOOK_SECRET=secret,
        OMNICUE_SENDER_METRICS_PORT=str(metrics_port),
        # Short, so a test sees a dead sender's leases lapse: a call takes at most 2 s.
        OMNICUE_SENDER_TIMEOUT="2",
        OMNICUE_SENDER_LEASE_TTL="3",
        **extra,
    )
    return ManagedProcess(
        [sys.executable, "-m", "omnicue.cli", "send", "--channel", channel,
         "--transport", "webhook", "--url", url, *args],
        env=env, cwd=REPO_ROOT, log_path=log_path, name=f"sender-{channel}",
    )  # fmt: skip


def produce(bootstrap: str, actions: Iterable[Action]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    try:
        for action in actions:
            producer.send(
                ACTIONS[action.channel],
                key=action.customer_id.encode(),
                value=action.model_dump_json().encode(),
            )
        producer.flush()
    finally:
        producer.close()


def feedback(bootstrap: str, partitions: int, want: int, timeout: float = 30.0) -> list[Event]:
    """The events on omnicue.events, once there are at least `want` of them (read until
    quiet: the dev broker's end offsets are wrong)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        consumer.assign([TopicPartition(EVENTS, p) for p in range(partitions)])
        consumer.seek_to_beginning()
        events: list[Event] = []
        deadline = time.monotonic() + timeout
        quiet_since = time.monotonic()
        while time.monotonic() < deadline and (
            len(events) < want or time.monotonic() - quiet_since < 1.0
        ):
            for batch in consumer.poll(timeout_ms=200).values():
                events.extend(parse_event(record.value) for record in batch)
                quiet_since = time.monotonic()
        return events
    finally:
        consumer.close()


def metric_samples(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """`(name, sorted labels) -> value` of a sender's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
        text = resp.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def metric(port: int, name: str, **labels: str) -> float:
    return metric_samples(port).get((name, tuple(sorted(labels.items()))), 0.0)
