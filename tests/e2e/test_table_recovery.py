"""The customer table recovers exactly: after SIGKILL, and after a rebalance both ways.

Exactly means every customer's whole profile (identifiers, traits, consents, carts,
orders, activity, journeys, decisions, remembered event ids) is the same after the
recovery as before it, read through the worker that owns the customer. The rocksdb
store is used throughout: its restart keeps local data and reads only the changelog's
tail, where the memory store (covered by test_restart) reads the whole changelog.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from omnicue.producer import EventProducer
from omnicue.services import free_port
from omnicue.settings import Settings
from streams.topics import partition_for
from tests.e2e.harness import pending_timers, profile_view, start_worker
from tests.factories import event_dict

pytestmark = pytest.mark.e2e

# Journeys start and stay pending (nothing is due within the test), so the state
# depends on the events alone, never on when a worker evaluated a step.
LEDGER_RULES = """
version: 1
policy:
  quiet_hours: null
rules:
  - id: cart_abandonment
    category: marketing
    trigger: {event: cart.item_added, key: properties.cart_id}
    cancel_on:
      - event: order.completed
        when: event.properties.cart_id == journey.key
        reason: purchased
    steps: [{after: 6h, channels: [email], template: cart_reminder_1}]
"""

CUSTOMERS = [f"c-ledger-{n}" for n in range(60)]


def ledger_events(customer: str, n: int, start: datetime) -> list[dict[str, Any]]:
    """Per customer: an identify, consents, two carts over several adds, one order."""
    events = [
        event_dict("identify", {"traits": {"email": f"{customer}@example.com",
                                           "timezone": "Asia/Seoul", "tier": n % 3}}),
        event_dict("consent.updated", {"channel": "email", "category": "marketing",
                                       "granted": n % 2 == 0}),
        *[event_dict("cart.item_added", {"cart_id": f"K{n}-{i % 2}", "product_id": f"p-{i}",
                                         "quantity": 1 + (n + i) % 4, "price": 1_000 * (i + 1)})
          for i in range(5)],
        event_dict("order.completed", {"order_id": f"O-{n}", "cart_id": f"K{n}-0",
                                       "value": 7_000 + n, "currency": "KRW"}),
    ]  # fmt: skip
    return [
        {**e, "customer_id": customer, "event_id": f"{customer}-{i}",
         "occurred_at": (start + timedelta(milliseconds=i)).isoformat()}
        for i, e in enumerate(events)
    ]  # fmt: skip


def profiles(port: int) -> dict[str, dict[str, Any] | None]:
    return {customer: profile_view(port, customer) for customer in CUSTOMERS}


def complete(found: dict[str, dict[str, Any] | None]) -> bool:
    """Every customer's events are all applied (orders are each customer's last event)."""
    return all(p is not None and p["orders"]["count"] == 1 for p in found.values())


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.3)


def test_table_recovery_is_exact_after_sigkill_and_across_a_rebalance(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(LEDGER_RULES, encoding="utf-8")
    first = make_settings(
        rules=rules, store="rocksdb://", data_dir=tmp_path / "data-1", app_id="omnicue-ledger"
    )
    second = first.model_copy(update={"web_port": free_port(), "data_dir": tmp_path / "data-2"})
    assert len({partition_for(c.encode(), first.partitions) for c in CUSTOMERS}) == 4

    worker_1 = start_worker(first, tmp_path / "worker-1.log")
    worker_2 = None
    try:
        start = datetime.now(UTC)
        with EventProducer(first) as producer:
            for n, customer in enumerate(CUSTOMERS):
                for e in ledger_events(customer, n, start):
                    producer.send(e)
            producer.flush()
        wait_until(lambda: complete(profiles(first.web_port)), 60, "every event is applied")
        before = profiles(first.web_port)
        # The state is the events' and nothing else's: check a few parts against them.
        for n, customer in enumerate(CUSTOMERS):
            p = before[customer]
            assert p is not None
            assert p["orders"] == {"count": 1, "revenue": 7_000.0 + n}
            assert p["channels"]["email"]["consents"] == {"marketing": n % 2 == 0}
            # The ordered cart is gone; the other holds the odd adds.
            assert list(p["carts"]) == [f"K{n}-1"]
            assert [i["quantity"] for i in p["carts"][f"K{n}-1"]["items"]] == [
                1 + (n + i) % 4 for i in (1, 3)
            ]
            assert [j["key"] for j in p["journeys"]] == [f"K{n}-1"]
            assert len(p["recent_event_ids"]) == 8
        # Past the commit interval (1 s), then a crash with nothing left to do.
        time.sleep(2.5)
        worker_1.kill(signal.SIGKILL)
        worker_1.wait(10)

        worker_1 = start_worker(first, tmp_path / "worker-1-restarted.log")
        after_kill = profiles(first.web_port)
        assert after_kill == before, "the table differs after SIGKILL and restart"

        # A second worker with an empty data dir joins: it restores its share of the
        # partitions from the changelog alone.
        worker_2 = start_worker(second, tmp_path / "worker-2.log")
        wait_until(lambda: pending_timers([second.web_port]) > 0, 60, "worker 2 owns partitions")
        wait_until(
            lambda: pending_timers([first.web_port, second.web_port])
            == len(CUSTOMERS),
            60,
            "the partitions are split",
        )
        # Each request is answered by the customer's owner, whichever worker it hits.
        assert profiles(second.web_port) == before, "the table differs after worker 2 joined"

        # The first worker leaves: the second now restores the rest.
        worker_1.stop()
        assert worker_1.returncode == 0, worker_1.log_tail()
        wait_until(
            lambda: pending_timers([second.web_port]) == len(CUSTOMERS), 60, "worker 2 owns all"
        )
        assert profiles(second.web_port) == before, "the table differs after worker 1 left"
    finally:
        for worker in (worker_1, worker_2):
            if worker is not None:
                worker.stop()
