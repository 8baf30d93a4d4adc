"""Live equals offline: the worker's attribution records (`omnicue.conversions`) and
`omnicue report` on the same log give the same attribution, model by model and
channel by channel (issue 13)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from omnicue.producer import EventProducer
from omnicue.settings import Settings
from schemas import topics
from schemas.conversions import LIVE_MODELS, ConversionRecord
from tests.e2e.harness import ROOT, TopicReader, scrape, settings_env, start_worker
from tests.factories import event_dict

pytestmark = pytest.mark.e2e

# Two marketing rules on two channels, a step each second: several touches per order.
RULES = """
version: 1
policy:
  quiet_hours: null
  caps: {per_channel: {limit: 20}}
rules:
  - id: browse
    category: marketing
    trigger: {event: product.viewed, key: properties.product_id}
    steps:
      - {after: 1s, channels: [push], template: browse_reminder}
  - id: cart
    category: marketing
    holdout: 0.3
    conversion: {within: 1d}
    trigger: {event: cart.item_added, key: properties.cart_id}
    steps:
      - {after: 1s, channels: [email], template: cart_reminder_1}
      - {after: 2s, channels: [push], template: cart_reminder_2}
"""
CUSTOMERS = [f"c-{n}" for n in range(8)]


def now() -> str:
    return datetime.now(UTC).isoformat()


def with_id(event: dict[str, Any], event_id: str) -> dict[str, Any]:
    return {**event, "event_id": event_id}


def visits(customer: str, n: int) -> list[dict[str, Any]]:
    """Contact points and consent, `n % 3 + 1` product views and a cart."""
    at = now()
    base: dict[str, Any] = {"customer_id": customer, "occurred_at": at}
    events = [
        event_dict("identify", {"traits": {"email": f"{customer}@example.com"}}, **base),
        event_dict("device.registered", {"push_token": f"tok-{customer}", "platform": "ios"},
                   channel="app", **base),
        event_dict("consent.updated", {"channel": "push", "category": "marketing",
                                       "granted": True}, **base),
        event_dict("consent.updated", {"channel": "email", "category": "marketing",
                                       "granted": True}, **base),
        *(event_dict("product.viewed", {"product_id": f"p-{v}"}, **base)
          for v in range(n % 3 + 1)),
        event_dict("cart.item_added", {"cart_id": f"cart-{customer}", "product_id": "p-0",
                                       "quantity": 1, "price": 12_000}, **base),
    ]  # fmt: skip
    return [with_id(e, f"{customer}-{i}") for i, e in enumerate(events)]


def order(customer: str, n: int, value: float) -> dict[str, Any]:
    props = {"order_id": f"o-{customer}-{n}", "value": value, "currency": "KRW"}
    e = event_dict("order.completed", props, customer_id=customer, occurred_at=now())
    return with_id(e, f"{customer}-order-{n}")


def feedback(kind: str, action: dict[str, Any], n: int) -> dict[str, Any]:
    e = event_dict(f"message.{kind}", {"action_id": action["action_id"]},
                   customer_id=action["customer_id"], channel=action["channel"],
                   occurred_at=now())  # fmt: skip
    return with_id(e, f"fb-{n}")


def publish(settings: Settings, events: list[dict[str, Any]]) -> None:
    with EventProducer(settings) as producer:
        for e in events:
            producer.send(e)
        producer.flush()


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def run(make_settings: Callable[..., Settings], run_dir: Path) -> Iterator[dict[str, Any]]:
    rules = run_dir / "attribution-rules.yaml"
    rules.write_text(RULES, encoding="utf-8")
    settings = make_settings(rules=rules, store="memory://")
    worker = start_worker(settings, run_dir / "attribution-worker.log")
    reader = TopicReader(
        settings.bootstrap_servers[0],
        [topics.DECISIONS, topics.CONVERSIONS, *topics.ACTIONS.values()],
    )
    try:
        log = [e for n, c in enumerate(CUSTOMERS) for e in visits(c, n)]
        publish(settings, log)
        views = sum(n % 3 + 1 for n in range(len(CUSTOMERS)))

        def decided(records: list[Any]) -> bool:
            steps = {(r.key, r.json()["rule_id"], r.json()["journey_key"], r.json()["step"])
                     for r in records if r.topic == topics.DECISIONS}  # fmt: skip
            cart = {s for s in steps if s[1] == "cart"}
            return len(steps) - len(cart) >= views and len(cart) >= 2 * len(CUSTOMERS)

        reader.wait_for(decided, timeout=60)
        actions = reader.of("omnicue.actions.")
        pushes = [a for a in actions if a["channel"] == "push"]
        emails = [a for a in actions if a["channel"] == "email"]
        assert pushes and emails
        # A failed push is no touch; a delivered email still is (offline and live alike).
        fb = [feedback("failed", pushes[0], 0), feedback("delivered", emails[0], 1)]
        # Orders, each after its customer's touches: one customer twice, one without a
        # touch (unattributed), one with no order.
        orders = [order(c, 0, 10_000 + 1_000 * n) for n, c in enumerate(CUSTOMERS[:-1])]
        orders += [order(CUSTOMERS[0], 1, 25_000), order("c-stranger", 0, 7_000)]
        publish(settings, fb + orders)
        log += fb + orders
        reader.wait_for(lambda rs: len({r.json()["conversion_id"] for r in rs
                                        if r.topic == topics.CONVERSIONS}) >= len(orders),
                        timeout=30)  # fmt: skip
        reader.settle(1)
        yield {"reader": reader, "settings": settings, "log": log, "orders": orders,
               "rules": rules, "dir": run_dir, "failed": pushes[0]["action_id"]}  # fmt: skip
    finally:
        reader.close()
        worker.stop()


def records(run: dict[str, Any]) -> list[ConversionRecord]:
    """The records, one per conversion id (a redelivery would send the same again)."""
    found: dict[str, ConversionRecord] = {}
    for value in run["reader"].of(topics.CONVERSIONS):
        record = ConversionRecord.model_validate(value)
        assert found.setdefault(record.conversion_id, record) == record
    return list(found.values())


def offline_report(run: dict[str, Any]) -> dict[str, Any]:
    """`omnicue report` on the same log: the events published, and the actions and
    decisions the worker wrote."""
    reader: TopicReader = run["reader"]
    directory: Path = run["dir"]
    events = write_jsonl(directory / "log.jsonl", run["log"])
    actions = write_jsonl(directory / "actions.jsonl", reader.of("omnicue.actions."))
    decisions = write_jsonl(directory / "decisions.jsonl", reader.of(topics.DECISIONS))
    out = directory / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "omnicue.cli", "report", "--events", str(events),
         "--actions", str(actions), "--decisions", str(decisions), "--rules", str(run["rules"]),
         "--json", str(out)],
        cwd=ROOT, env=settings_env(run["settings"]), capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    report: dict[str, Any] = json.loads(out.read_text())
    return report


def test_one_record_per_conversion_keyed_by_customer(run: dict[str, Any]) -> None:
    found = records(run)
    assert sorted(r.conversion_id for r in found) == sorted(o["event_id"] for o in run["orders"])
    keys = {r.key for r in run["reader"].records if r.topic == topics.CONVERSIONS}
    assert keys == {o["customer_id"].encode() for o in run["orders"]}
    by_id = {r.conversion_id: r for r in found}
    assert not by_id["c-stranger-order-0"].attributed
    assert by_id["c-stranger-order-0"].credits == {m: [] for m in LIVE_MODELS}
    # Several touches before most orders, on both channels; the failed push is none.
    touched = [r for r in found if r.attributed]
    assert len(touched) == len(found) - 1
    assert any(len(r.credits["linear"]) >= 3 for r in touched)
    channels = {c.channel for r in touched for c in r.credits["last_touch"]}
    assert channels == {"push", "email"}
    assert all(c.action_id != run["failed"] for r in found for c in r.credits["linear"])


def test_live_attribution_equals_omnicue_report_on_the_same_log(run: dict[str, Any]) -> None:
    found = records(run)
    report = offline_report(run)
    assert report["conversions"] == len(found)
    assert report["attributed_conversions"] == sum(r.attributed for r in found)
    assert report["attributed_revenue"] == pytest.approx(sum(r.value for r in found
                                                             if r.attributed))  # fmt: skip
    for model in LIVE_MODELS:
        live: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        for record in found:
            for credit in record.credits[model]:
                live[credit.channel][0] += credit.conversions
                live[credit.channel][1] += credit.revenue
        offline = report["attribution"][model]
        assert set(offline) == set(live), model
        for channel, credit in offline.items():
            assert live[channel] == pytest.approx(
                [credit["conversions"], credit["revenue"]], rel=1e-9
            ), (model, channel)


def test_the_worker_counts_what_the_records_say(run: dict[str, Any]) -> None:
    found = records(run)
    samples = scrape(run["settings"].web_port)

    def total(prefix: str, **labels: str) -> float:
        return sum(v for k, v in samples.items() if k.startswith(prefix + "{")
                   and all(f"{n}={v}" in k for n, v in labels.items()))  # fmt: skip

    attributed = sum(r.attributed for r in found)
    assert total("omnicue_orders_total", attributed="true") == attributed
    assert total("omnicue_orders_total", attributed="false") == len(found) - attributed
    for model in LIVE_MODELS:
        assert total("omnicue_conversions_total", model=model) == pytest.approx(attributed)
        revenue = sum(r.value for r in found if r.attributed)
        assert total("omnicue_attributed_revenue_total", model=model) == pytest.approx(revenue)
    # Every customer entered the cart rule, in one group or the other.
    entries = total("omnicue_holdout_entries_total", rule="cart")
    assert entries == len(CUSTOMERS)
    holdout = [h for r in found for h in r.holdout]
    assert {h.rule_id for h in holdout} == {"cart"}
    assert total("omnicue_holdout_conversions_total", rule="cart") == len(holdout)
