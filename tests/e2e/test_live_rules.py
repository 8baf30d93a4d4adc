"""Rules applied while workers run, and `omnicue explain` against a live worker."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from kafka import KafkaProducer

from omnicue.producer import EventProducer
from omnicue.settings import Settings
from schemas import topics
from schemas.topics import RULES_KEY
from tests.e2e.conftest import write_rules
from tests.e2e.harness import ROOT, TopicReader, settings_env, start_worker, wait_for_metric
from tests.factories import event_dict

pytestmark = pytest.mark.e2e

CONFIRMATION = """
  - id: order_confirmation
    category: transactional
    trigger: {event: order.completed, key: properties.order_id}
    steps:
      - {after: 0s, channels: [email], template: order_confirmation}
  - id: browse
    category: marketing
    trigger:
      event: product.viewed
      key: properties.product_id
      repeat: {count: 3, within: 24h}
    steps:
      - {after: 1h, channels: [email], template: browse}
"""


STORE_RULE = """
  - id: store_follow_up
    category: marketing
    trigger: {event: store.visited}
    steps:
      - {after: 1h, channels: [email], template: store_follow_up}
"""


def publish(settings: Settings, event: dict[str, object]) -> None:
    with EventProducer(settings) as producer:
        producer.send({**event, "customer_id": "c-live",
                       "occurred_at": datetime.now(UTC).isoformat()})
        producer.flush()


def produce_raw(settings: Settings, topic: str, key: bytes, value: bytes) -> None:
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap_servers)
    try:
        producer.send(topic, key=key, value=value).get(timeout=30)
    finally:
        producer.close()


def confirmed_order(reader: TopicReader, order_id: str) -> bool:
    return any(a["rule_id"] == "order_confirmation" and a["journey_key"] == order_id
               for a in reader.of("omnicue.actions.", "c-live"))


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "omnicue.cli", *args],
        env=settings_env(settings), cwd=ROOT, capture_output=True, text=True, timeout=60,
    )


def test_applied_rules_reach_running_workers_and_explain_answers(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    # The cart steps are far off: the removed rule's journey must end when the rules
    # are applied, not when its step comes due.
    settings = make_settings(rules=write_rules(tmp_path, "10m", "20m"), store="memory://",
                             app_id="omnicue-live-rules", data_dir=tmp_path / "data")
    worker = start_worker(settings, tmp_path / "worker.log")
    reader = TopicReader(settings.bootstrap_servers[0],
                         [topics.DECISIONS, *topics.ACTIONS.values()])
    now = datetime.now(UTC).isoformat()
    try:
        with EventProducer(settings) as producer:
            for e in (
                event_dict("identify", {"traits": {"email": "live@example.com"}}),
                event_dict("consent.updated", {"channel": "email", "category": "marketing",
                                               "granted": True}),
                event_dict("cart.item_added", {"cart_id": "K1", "product_id": "p", "price": 5}),
            ):
                producer.send({**e, "customer_id": "c-live", "occurred_at": now})
            producer.flush()
        wait_for_metric(settings.web_port, "omnicue_timers_pending", 1)

        # A new file: the cart rule removed, an order confirmation added.
        new_rules = tmp_path / "new.yaml"
        new_rules.write_text(
            "version: 1\npolicy: {quiet_hours: null}\nrules:" + CONFIRMATION, encoding="utf-8"
        )
        applied = cli(settings, "rules", "apply", str(new_rules))
        assert applied.returncode == 0, applied.stderr
        assert "applied order_confirmation version" in applied.stdout
        worker.wait_for_line("rules updated from", timeout=30)
        worker.wait_for_line("rules removed: cart_abandonment; 1 customers to update", timeout=30)

        def removed(_: object) -> bool:
            return any(d.get("reason") == "rule_removed"
                       for d in reader.of(topics.DECISIONS, "c-live"))

        reader.wait_for(removed, timeout=30)

        with EventProducer(settings) as producer:
            for e in (
                event_dict("product.viewed", {"product_id": "p-9"}),
                event_dict("product.viewed", {"product_id": "p-9"}),
                event_dict("order.completed", {"order_id": "O-1", "value": 5,
                                               "currency": "KRW"}),
            ):
                producer.send({**e, "customer_id": "c-live",
                               "occurred_at": datetime.now(UTC).isoformat()})
            producer.flush()

        def confirmed(_: object) -> bool:
            return any(a["rule_id"] == "order_confirmation"
                       for a in reader.of("omnicue.actions.", "c-live"))

        reader.wait_for(confirmed, timeout=30)
        actions = reader.of("omnicue.actions.", "c-live")
        assert [a["rule_id"] for a in actions] == ["order_confirmation"], "the cart rule is gone"

        explained = cli(settings, "explain", "c-live", "--worker",
                        f"http://127.0.0.1:{settings.web_port}")
        assert explained.returncode == 0, explained.stderr
        assert "order_confirmation step 1 (O-1): sent on email" in explained.stdout
        assert "cart_abandonment step 1 (K1): journey ended, the rule was removed" in (
            explained.stdout
        )
        # Two views of three: no decision yet, but explain says where the count stands.
        assert "browse (p-9): 2 of the 3 product.viewed events it needs within 1d" in (
            explained.stdout
        )
        missing = cli(settings, "explain", "nobody", "--worker",
                      f"http://127.0.0.1:{settings.web_port}")
        assert missing.returncode == 1 and "no state" in missing.stdout
        profiled = cli(settings, "profile", "c-live", "--worker",
                       f"http://127.0.0.1:{settings.web_port}")
        assert profiled.returncode == 0, profiled.stderr
        body = json.loads(profiled.stdout)
        assert body["customer_id"] == "c-live" and body["orders"]["count"] == 1
        assert body["identifiers"]["email"] is None or "*" in body["identifiers"]["email"]

        # A newer rules record adds a rule, and a journey of it starts.
        newer = tmp_path / "newer.yaml"
        newer.write_text(
            "version: 1\npolicy: {quiet_hours: null}\nrules:" + CONFIRMATION + STORE_RULE,
            encoding="utf-8",
        )
        assert cli(settings, "rules", "apply", str(newer)).returncode == 0
        worker.wait_for_line("store_follow_up@", timeout=30)
        publish(settings, event_dict("store.visited", {"store_id": "s-1"}, channel="store"))
        wait_for_metric(settings.web_port, "omnicue_timers_pending", 1)

        # A restarted worker starts from the newest applied rules, not from its rules
        # file, and never from the topic's history in order: the older record (without
        # the store rule), applied even for a moment, would end the store journey.
        worker.stop()
        worker = start_worker(settings, tmp_path / "worker-2.log")
        publish(settings, event_dict("order.completed", {"order_id": "O-2", "value": 5,
                                                         "currency": "KRW"}))
        reader.wait_for(lambda _: confirmed_order(reader, "O-2"), timeout=30)
        assert not [d for d in reader.of(topics.DECISIONS, "c-live")
                    if d["rule_id"] == "store_follow_up"], "the store journey runs on"
        assert "rules removed" not in worker.log_text()
        explained = cli(settings, "explain", "c-live", "--worker",
                        f"http://127.0.0.1:{settings.web_port}")
        assert "store_follow_up" in explained.stdout

        # A record that is not a valid rules file, written past `rules apply`: logged,
        # counted, and the rules in use stay, in the running worker and after a restart.
        produce_raw(settings, topics.RULES, RULES_KEY, b'{"text": "rules: [oops"}')
        worker.wait_for_line("ignoring an invalid rules update", timeout=30)
        wait_for_metric(settings.web_port, "omnicue_rules_invalid_total", 1)
        worker.stop()
        worker = start_worker(settings, tmp_path / "worker-3.log")
        publish(settings, event_dict("order.completed", {"order_id": "O-3", "value": 5,
                                                         "currency": "KRW"}))
        reader.wait_for(lambda _: confirmed_order(reader, "O-3"), timeout=30)
        assert "Traceback" not in worker.log_text()
        bad = tmp_path / "bad.yaml"
        bad.write_text("version: 1\nrules:\n  - id: x\n    category: marketing\n", encoding="utf-8")
        rejected = cli(settings, "rules", "apply", str(bad))
        assert rejected.returncode == 2 and "rule 'x' (rules[0]) field trigger" in rejected.stderr
    finally:
        worker.stop()
        reader.close()
