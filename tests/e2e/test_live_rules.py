"""Rules applied while workers run, and `omnicue explain` against a live worker."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from omnicue.producer import EventProducer
from omnicue.settings import Settings
from schemas import topics
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

        # A restarted worker starts from the applied rules, not from its rules file.
        worker.stop()
        worker = start_worker(settings, tmp_path / "worker-2.log")
        rules_in_use = cli(settings, "explain", "c-live", "--json", "--worker",
                           f"http://127.0.0.1:{settings.web_port}")
        assert rules_in_use.returncode == 0
        bad = tmp_path / "bad.yaml"
        bad.write_text("version: 1\nrules:\n  - id: x\n    category: marketing\n", encoding="utf-8")
        rejected = cli(settings, "rules", "apply", str(bad))
        assert rejected.returncode == 2 and "rule 'x' (rules[0]) field trigger" in rejected.stderr
    finally:
        worker.stop()
        reader.close()
