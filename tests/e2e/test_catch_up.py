"""A worker that starts behind a backlog applies it before it fires what it cancels.

With the worker stopped, customers add a cart and order it a millisecond later,
others only add a cart; the worker then starts after the step's delay has passed.
Nobody who ordered may get a reminder, and everybody else gets theirs at once.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from omnicue.producer import EventProducer
from omnicue.services import ManagedProcess, free_port
from omnicue.settings import Settings
from schemas import topics
from tests.e2e.conftest import write_rules
from tests.e2e.harness import TopicReader, start_worker
from tests.factories import event_dict

pytestmark = pytest.mark.e2e

STEP = 4.0  # seconds: the cart rule's first step


def publish_backlog(settings: Settings, buyers: list[str], leavers: list[str]) -> None:
    start = datetime.now(UTC)
    with EventProducer(settings) as producer:
        for customer in buyers + leavers:
            for e in (
                event_dict("identify", {"traits": {"email": f"{customer}@example.com"}}),
                event_dict("consent.updated",
                           {"channel": "email", "category": "marketing", "granted": True}),
                event_dict("cart.item_added", {"cart_id": "K", "product_id": "p", "price": 10}),
            ):
                producer.send({**e, "customer_id": customer, "occurred_at": start.isoformat()})
        for customer in buyers:
            bought = start + timedelta(milliseconds=1)
            producer.send({
                **event_dict("order.completed", {"order_id": f"o-{customer}", "value": 10,
                                                 "currency": "KRW", "cart_id": "K"}),
                "customer_id": customer, "occurred_at": bought.isoformat(),
            })
        producer.flush()
    # Past the step's delay before any worker runs: every reminder is overdue.
    time.sleep(STEP + 1)


def check_reminders(reader: TopicReader, buyers: list[str], leavers: list[str]) -> None:
    def all_reminded(_: object) -> bool:
        reminded = {a["customer_id"] for a in reader.of(topics.ACTIONS["email"])}
        return set(leavers) <= reminded

    reader.wait_for(all_reminded, timeout=90)
    reader.settle(3)
    ours = set(buyers) | set(leavers)  # the module's broker has the other test's too
    reminders = Counter(a["customer_id"] for a in reader.of(topics.ACTIONS["email"])
                        if a["customer_id"] in ours)
    wrongly = sorted(set(reminders) & set(buyers))
    assert not wrongly, f"{len(wrongly)} of {len(buyers)} buyers got a cart reminder"
    assert set(reminders) == set(leavers)
    assert max(reminders.values()) == 1, "one reminder each"


def test_a_worker_behind_a_backlog_sends_no_reminder_for_carts_already_bought(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings(rules=write_rules(tmp_path, f"{STEP:g}s", "1h"),
                             store="memory://", app_id="omnicue-catch-up",
                             data_dir=tmp_path / "data")
    buyers = [f"buyer-{n}" for n in range(150)]
    leavers = [f"leaver-{n}" for n in range(150)]
    publish_backlog(settings, buyers, leavers)
    reader = TopicReader(settings.bootstrap_servers[0], [topics.ACTIONS["email"]])
    worker = start_worker(settings, tmp_path / "worker.log")
    try:
        check_reminders(reader, buyers, leavers)
    finally:
        worker.stop()
        reader.close()


def test_catching_up_across_a_rebalance_sends_no_reminder_for_carts_already_bought(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    first = make_settings(rules=write_rules(tmp_path, f"{STEP:g}s", "1h"),
                          store="memory://", app_id="omnicue-catch-up-rebalance",
                          data_dir=tmp_path / "data-1")
    second = first.model_copy(update={"web_port": free_port(), "data_dir": tmp_path / "data-2"})
    buyers = [f"r-buyer-{n}" for n in range(150)]
    leavers = [f"r-leaver-{n}" for n in range(150)]
    publish_backlog(first, buyers, leavers)
    reader = TopicReader(first.bootstrap_servers[0], [topics.ACTIONS["email"]])
    workers: list[ManagedProcess] = []
    try:
        workers.append(start_worker(first, tmp_path / "worker-1.log"))
        # A second worker joins while the first is catching up: partitions move.
        workers.append(start_worker(second, tmp_path / "worker-2.log"))
        check_reminders(reader, buyers, leavers)
    finally:
        for worker in workers:
            worker.stop()
        reader.close()
