"""Pending timers survive rebalances: a second worker joining, then the first leaving."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from omnicue.producer import EventProducer
from omnicue.services import free_port
from omnicue.settings import Settings
from schemas import topics
from streams.topics import partition_for
from tests.e2e.conftest import write_rules
from tests.e2e.harness import (
    TopicReader,
    pending_timers,
    scrape,
    start_worker,
    wait_for_metric,
)
from tests.factories import event_dict

pytestmark = pytest.mark.e2e

CUSTOMERS = [f"c-rebalance-{n}" for n in range(8)]


def test_timers_fire_once_across_a_worker_joining_and_one_leaving(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    # Step 1 is due after the second worker has joined, step 2 after the first left.
    rules = write_rules(tmp_path, "30s", "60s")
    first = make_settings(
        rules=rules, store="rocksdb://", data_dir=tmp_path / "data-1", app_id="omnicue-rebalance"
    )
    second = first.model_copy(update={"web_port": free_port(), "data_dir": tmp_path / "data-2"})
    assert len({partition_for(c.encode(), first.partitions) for c in CUSTOMERS}) > 1

    worker_1 = start_worker(first, tmp_path / "worker-1.log")
    worker_2 = None
    reader = TopicReader(first.bootstrap_servers[0], [topics.DECISIONS, *topics.ACTIONS.values()])
    try:
        now = datetime.now(UTC).isoformat()
        with EventProducer(first) as producer:
            for customer in CUSTOMERS:
                for e in (
                    event_dict("identify", {"traits": {"email": f"{customer}@example.com"}}),
                    event_dict(
                        "consent.updated",
                        {"channel": "email", "category": "marketing", "granted": True},
                    ),
                    event_dict("cart.item_added", {"cart_id": "K", "product_id": "p", "price": 10}),
                ):
                    producer.send({**e, "customer_id": customer, "occurred_at": now})
            producer.flush()
        wait_for_metric(first.web_port, "omnicue_timers_pending", len(CUSTOMERS))

        # A second worker joins the group: the partitions, and their timers, are split.
        worker_2 = start_worker(second, tmp_path / "worker-2.log")
        deadline = time.monotonic() + 30
        while scrape(second.web_port).get("omnicue_timers_pending", 0) == 0:
            assert time.monotonic() < deadline, "the second worker took over no timers"
            time.sleep(0.2)

        def all_at_step(n: int) -> Callable[[object], bool]:
            def done(_: object) -> bool:
                steps = {(a["customer_id"], a["step"]) for a in reader.of("omnicue.actions.")}
                return all((c, n) in steps for c in CUSTOMERS)

            return done

        reader.wait_for(all_at_step(1), timeout=90)
        # The first worker leaves: the second owns every partition and every timer.
        worker_1.stop()
        assert worker_1.returncode == 0, worker_1.log_tail()
        reader.wait_for(all_at_step(2), timeout=90)
        reader.settle(3)
        assert pending_timers([second.web_port]) == 0
    finally:
        for worker in (worker_1, worker_2):
            if worker is not None:
                worker.stop()
        reader.close()

    actions = [a for a in reader.of("omnicue.actions.") if a["customer_id"] in CUSTOMERS]
    assert Counter((a["customer_id"], a["step"]) for a in actions) == {
        (c, step): 1 for c in CUSTOMERS for step in (1, 2)
    }
    fired = [
        d
        for d in reader.of(topics.DECISIONS)
        if d["customer_id"] in CUSTOMERS and d["outcome"] == "fired"
    ]
    assert len(fired) == 2 * len(CUSTOMERS)
