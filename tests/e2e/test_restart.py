"""Pending timers and state survive SIGKILL and SIGTERM of the worker, and fire once."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from omnicue.producer import EventProducer
from omnicue.settings import Settings
from schemas import topics
from tests.e2e.conftest import write_rules
from tests.e2e.harness import TopicReader, start_worker, wait_for_metric
from tests.factories import event_dict

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("store", ["rocksdb://", "memory://"])
def test_timers_and_state_survive_sigkill_and_sigterm_and_fire_once(
    make_settings: Callable[..., Settings], tmp_path: Path, store: str
) -> None:
    # Step 1 is due well after the killed worker's replacement is up.
    rules = write_rules(tmp_path, "20s", "40s")
    settings = make_settings(rules=rules, store=store, data_dir=tmp_path / "data",
                             app_id=f"omnicue-restart-{store[:3]}")
    bootstrap = settings.bootstrap_servers[0]
    customer = f"c-restart-{store[:3]}"
    now = datetime.now(UTC).isoformat()
    events = [
        event_dict("identify", {"traits": {"email": "lee@example.com"}}),
        event_dict("consent.updated", {"channel": "email", "category": "marketing",
                                       "granted": True}),
        event_dict("cart.item_added", {"cart_id": "K", "product_id": "p-1", "quantity": 3,
                                       "price": 9_900}),
    ]

    worker = start_worker(settings, tmp_path / "worker-1.log")
    with EventProducer(settings) as producer:
        for e in events:
            producer.send({**e, "customer_id": customer, "occurred_at": now})
        producer.flush()
    wait_for_metric(settings.web_port, "omnicue_timers_pending", 1)
    # Give the changelog write and the offset commit a moment, as in a real crash
    # some time after processing; the timer must survive either way.
    time.sleep(1.5)
    worker.kill(signal.SIGKILL)
    worker.wait(10)

    worker = start_worker(settings, tmp_path / "worker-2.log")
    reader = TopicReader(bootstrap, [topics.DECISIONS, *topics.ACTIONS.values()])
    try:
        def step(n: int) -> Callable[[list[object]], bool]:
            return lambda _: any(a["step"] == n for a in reader.of("omnicue.actions.", customer))

        reader.wait_for(step(1), timeout=60)
        # A graceful stop between the steps: the second step must survive it too.
        worker.stop()
        assert worker.returncode == 0, worker.log_tail()
        worker = start_worker(settings, tmp_path / "worker-3.log")
        reader.wait_for(step(2), timeout=60)
        reader.settle(3)
    finally:
        worker.stop()
        reader.close()

    actions = reader.of("omnicue.actions.", customer)
    assert sorted((a["step"], a["channel"]) for a in actions) == [(1, "email"), (2, "email")]
    # State survived: the consent allowed the email, the cart is in the payload.
    assert actions[0]["payload"]["items"] == [
        {"product_id": "p-1", "quantity": 3, "price": 9900.0}
    ]
    fired = [d for d in reader.of(topics.DECISIONS, customer) if d["outcome"] == "fired"]
    assert len(fired) == 2
