from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from omnicue.services import ManagedProcess, TansuBroker, free_port
from omnicue.settings import Settings
from omnicue.topics import create_topics
from schemas.actions import Action, Recipient, make_action_id
from schemas.events import MessageFeedback, event_to_json, parse_event
from schemas.topics import ACTIONS, EVENTS
from senders.runtime import check_channel, feedback_event
from senders.transports import format_action

REPO_ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def _action(
    now: datetime = NOW, *, expires_in: timedelta = timedelta(hours=1), **over: Any
) -> Action:
    # A fresh journey id per action: Redis is shared by the whole session.
    customer = over.pop("customer_id", f"c-{uuid.uuid4().hex[:8]}")
    values: dict[str, Any] = {
        "action_id": make_action_id("cart_abandonment", customer, uuid.uuid4().hex, 1),
        "rule_id": "cart_abandonment",
        "rule_version": "1",
        "step": 1,
        "customer_id": customer,
        "journey_key": "cart-1",
        "channel": "push",
        "category": "marketing",
        "template": "cart_reminder_1",
        "recipient": Recipient(push_token="tok-123"),
        "created_at": now,
        "due_at": now,
        "expires_at": now + expires_in,
        "trigger_event_id": "e-1",
        "trigger_occurred_at": now,
    }
    values.update(over)
    return Action(**values)


def test_feedback_event_is_a_valid_deterministic_message_sent() -> None:
    action = _action(customer_id="c123")

    event = feedback_event(action, NOW)

    assert isinstance(event, MessageFeedback)
    assert event.type == "message.sent"
    assert event.event_id == f"fb-sent-{action.action_id}"
    assert (event.channel, event.customer_id) == ("push", "c123")
    assert event.properties.action_id == action.action_id
    assert parse_event(event_to_json(event)) == event
    assert feedback_event(action, NOW).event_id == event.event_id


def test_format_action_is_one_readable_line() -> None:
    action = _action(customer_id="c123")

    assert format_action(action) == (
        f"push  -> c123 cart_reminder_1 step 1 (cart_abandonment) {action.action_id}  token=tok-…"
    )
    # Contact points are masked: console output lands in terminals and log collectors.
    sms = _action(customer_id="c9", channel="sms", recipient=Recipient(phone="+821012345678"))
    assert format_action(sms).endswith("phone=*********5678")
    email = _action(channel="email", recipient=Recipient(email="kim@example.com"))
    assert format_action(email).endswith("email=k**@example.com")


def test_unknown_channel_is_a_clear_error() -> None:
    assert check_channel("kakao") == "kakao"
    with pytest.raises(ValueError, match="unknown channel 'fax': expected one of push, email"):
        check_channel("fax")


# -- the sender process ------------------------------------------------------------------


def _env(settings: Settings, metrics_port: int) -> dict[str, str]:
    # Only our OMNICUE_* settings: whatever the developer's shell exports must not leak in.
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNICUE_")}
    # PYTHONPATH makes a source checkout importable; an installed omnicue works either way.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(
        OMNICUE_BROKER=settings.broker,
        OMNICUE_REDIS_URL=settings.redis_url,
        OMNICUE_PARTITIONS=str(settings.partitions),
        OMNICUE_DEV_BROKER="true",
        OMNICUE_SENDER_METRICS_PORT=str(metrics_port),
    )
    return env


def _sender(settings: Settings, metrics_port: int, tmp_path: Path) -> ManagedProcess:
    return ManagedProcess(
        [sys.executable, "-m", "omnicue.cli", "send", "--channel", "push"],
        env=_env(settings, metrics_port),
        cwd=REPO_ROOT,
        log_path=tmp_path / "sender.log",
        name="sender-push",
    )


def _outcomes(metrics_port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2) as resp:
        text = resp.read().decode()
    return {
        sample.labels["outcome"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "omnicue_sender_actions_total" and sample.labels["channel"] == "push"
    }


def _wait_for_outcomes(metrics_port: int, want: dict[str, float], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while (got := _outcomes(metrics_port)) != want:
        assert time.monotonic() < deadline, f"outcomes {got}, want {want}"
        time.sleep(0.1)


def _produce(broker: TansuBroker, records: list[tuple[str, bytes]]) -> None:
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap_server)
    try:
        for key, value in records:
            producer.send(ACTIONS["push"], key=key.encode(), value=value)
        producer.flush()
    finally:
        producer.close()


def _consume_all(broker: TansuBroker, topic: str, partitions: int) -> list[Any]:
    """Every record on `topic`: read until quiet, since Tansu's end offsets are wrong."""
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap_server, enable_auto_commit=False)
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
        consumer.seek_to_beginning()
        records: list[Any] = []
        quiet_since = time.monotonic()
        deadline = time.monotonic() + 15
        # Wait for the first record, then for 1.5s without another one.
        while time.monotonic() < deadline and (not records or time.monotonic() - quiet_since < 1.5):
            for batch in consumer.poll(timeout_ms=200).values():
                records.extend(batch)
                quiet_since = time.monotonic()
        return records
    finally:
        consumer.close()


def _sent_lines(sender: ManagedProcess, action_id: str) -> list[str]:
    return [
        line
        for line in sender.log_text().splitlines()
        if re.match(rf"^push\s+-> .* {re.escape(action_id)}\s", line)
    ]


def test_sender_process_sends_once_counts_outcomes_and_publishes_feedback(
    fresh_broker: TansuBroker,
    settings_factory: Callable[..., Settings],
    tmp_path: Path,
) -> None:
    # A broker of its own: on the session one, other tests' actions would be sent too.
    settings = settings_factory(broker=fresh_broker.url)
    create_topics(settings)
    metrics_port = free_port()
    now = datetime.now(UTC)
    action = _action(now)
    expired = _action(now, expires_in=timedelta(seconds=-30))

    with _sender(settings, metrics_port, tmp_path) as sender:
        sender.wait_for_line(r"^sender push ready$")
        _produce(
            fresh_broker,
            [
                (action.customer_id, b"{not an action"),
                (action.customer_id, action.model_dump_json().encode()),
                (action.customer_id, action.model_dump_json().encode()),
                (expired.customer_id, expired.model_dump_json().encode()),
            ],
        )
        sender.wait_for_line(re.escape(action.action_id))
        _wait_for_outcomes(metrics_port, {"sent": 1, "duplicate": 1, "expired": 1, "failed": 0})
        assert sender.running, sender.log_tail()
        assert sender.stop() == 0, sender.log_tail()

    assert len(_sent_lines(sender, action.action_id)) == 1, sender.log_tail()
    assert _sent_lines(sender, expired.action_id) == []
    assert "skipping unparseable action" in sender.log_text()

    feedback = {
        record.key: parse_event(record.value)
        for record in _consume_all(fresh_broker, EVENTS, settings.partitions)
    }
    assert set(feedback) == {action.customer_id.encode(), expired.customer_id.encode()}
    event = feedback[action.customer_id.encode()]
    assert event.type == "message.sent"
    assert event.event_id == f"fb-sent-{action.action_id}"
    assert isinstance(event, MessageFeedback)
    assert event.properties.action_id == action.action_id
    # An action already expired when read is failed with reason `expired`, not dropped.
    failed = feedback[expired.customer_id.encode()]
    assert isinstance(failed, MessageFeedback)
    assert (failed.type, failed.event_id) == ("message.failed", f"fb-failed-{expired.action_id}")
    assert failed.properties.reason == "expired"

    # Offsets were committed: a restarted sender in the same group sees only new actions.
    later = _action(now)
    sender.start()
    try:
        sender.wait_for_line(r"^sender push ready$")
        _produce(fresh_broker, [(later.customer_id, later.model_dump_json().encode())])
        sender.wait_for_line(re.escape(later.action_id))
        _wait_for_outcomes(metrics_port, {"sent": 1, "duplicate": 0, "expired": 0, "failed": 0})
    finally:
        assert sender.stop() == 0, sender.log_tail()


def test_cli_rejects_an_unknown_channel() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNICUE_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", "omnicue.cli", "send", "--channel", "fax"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "unknown channel 'fax': expected one of push, email, sms, kakao" in result.stderr
    assert "Traceback" not in result.stderr
