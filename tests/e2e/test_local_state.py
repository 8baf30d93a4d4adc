"""Local table state is a cache of the changelog: a worker restarted in the same data
directory against a broker that lost the changelog discards the stale partitions,
restores from the changelog and carries on, instead of crashing at every start."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import pytest
from faust.stores.rocksdb import Store as RocksDBStore
from faust.types import TP
from faust.types.transports import ConsumerT

from omnicue.producer import EventProducer
from omnicue.settings import Settings
from schemas import topics
from streams.app import faust_app
from streams.stores import StateCacheRecovery, StateCacheTableManager
from streams.tables import declare_customer_table
from streams.topics import partition_for
from tests.brokers import Broker, broker_kind, start_broker
from tests.e2e.conftest import write_rules
from tests.e2e.harness import TopicReader, scrape, start_worker, wait_for_metric
from tests.factories import event_dict

pytestmark = pytest.mark.e2e

DISCARDED = "discarding local state"


def has_state(port: int, customer: str) -> bool:
    url = f"http://127.0.0.1:{port}/customers/{customer}/decisions"
    try:
        with urllib.request.urlopen(url, timeout=5):
            return True
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return False
        raise


def send_cart_journey(settings: Settings, customer: str) -> None:
    now = datetime.now(UTC).isoformat()
    batches = scrape(settings.web_port).get("omnicue_batch_events_count", 0)
    with EventProducer(settings) as producer:
        for e in (
            event_dict("identify", {"traits": {"email": "kim@example.com"}}),
            event_dict(
                "consent.updated", {"channel": "email", "category": "marketing", "granted": True}
            ),
            event_dict(
                "cart.item_added",
                {"cart_id": "K", "product_id": "p-1", "quantity": 1, "price": 1_000},
            ),
        ):
            producer.send({**e, "customer_id": customer, "occurred_at": now})
            producer.flush()
            # One batch per event, so one changelog record each: the partition's
            # persisted offset ends above 0 (faust checks no offset of 0).
            batches += 1
            wait_for_metric(settings.web_port, "omnicue_batch_events_count", batches)


@pytest.mark.parametrize("store", ["rocksdb://", "memory://"])
def test_worker_restarted_against_a_fresh_broker_restores_from_the_changelog(
    make_settings: Callable[..., Settings], e2e_broker: Broker, tmp_path: Path, store: str
) -> None:
    rules = write_rules(tmp_path, "2s", "30m")
    data_dir = tmp_path / "data"
    customer = f"c-local-{store[:3]}"
    first = make_settings(
        rules=rules, store=store, data_dir=data_dir, app_id=f"omnicue-local-{store[:3]}"
    )

    worker = start_worker(first, tmp_path / "worker-1.log")
    try:
        send_cart_journey(first, customer)
        wait_for_metric(first.web_port, "omnicue_timers_pending", 1)
        assert has_state(first.web_port, customer)
    finally:
        assert worker.stop() == 0, worker.log_tail()

    partition = partition_for(customer.encode(), first.partitions)
    stale = sorted(data_dir.glob(f"**/customers-{partition}.db"))
    assert bool(stale) == (store == "rocksdb://"), stale

    # A fresh broker of the same kind (Tansu, or Apache Kafka run as in production).
    with start_broker(broker_kind(e2e_broker), tmp_path / "fresh-broker") as fresh:
        settings = make_settings(
            rules=rules, store=store, data_dir=data_dir, app_id=first.app_id, broker=fresh.url
        )
        # Crashed here with ConsistencyError: the rocksdb partition's persisted
        # offset (2) is above the empty changelog's last offset (-1).
        worker = start_worker(settings, tmp_path / "worker-2.log")
        reader = TopicReader(settings.bootstrap_servers[0], [*topics.ACTIONS.values()])
        try:
            warnings = [line for line in worker.log_text().splitlines() if DISCARDED in line]
            # The customer's state partition, and the identity table's partitions that
            # the identify's email claim wrote to (those of offset 0 faust cannot tell).
            assert all(any(str(path) in line for line in warnings) for path in stale), warnings
            assert all("customers-changelog" in line or "identity-changelog" in line
                       for line in warnings), warnings
            assert bool(warnings) == bool(stale), warnings
            # The changelog is the truth: the old broker's state is gone with it.
            assert not has_state(settings.web_port, customer)

            # The discarded partition takes new state, and its journeys run.
            send_cart_journey(settings, customer)
            reader.wait_for(lambda _: bool(reader.of("omnicue.actions.", customer)), timeout=30)
            assert worker.running, worker.log_tail()
        finally:
            assert worker.stop() == 0, worker.log_tail()
            reader.close()

        # A normal restart against the same broker keeps the state it has now.
        worker = start_worker(settings, tmp_path / "worker-3.log")
        try:
            assert DISCARDED not in worker.log_text(), worker.log_tail()
            assert has_state(settings.web_port, customer)
        finally:
            assert worker.stop() == 0, worker.log_tail()


class ChangelogEnds:
    """The two offset queries of recovery, answered with fixed end offsets."""

    def __init__(self, ends: Mapping[TP, int]) -> None:
        self.ends = ends

    async def highwaters(self, *tps: TP) -> dict[TP, int]:
        return {tp: self.ends[tp] for tp in tps}

    async def earliest_offsets(self, *tps: TP) -> dict[TP, int]:
        return {tp: 0 for tp in tps}


@pytest.mark.parametrize("role", ["active", "standby"])
async def test_only_partitions_ahead_of_the_changelog_are_discarded(
    tmp_path: Path, role: str
) -> None:
    # In-process, for what the e2e test above cannot reach: standbys (dev workers
    # have none), offsets of 0 (faust checks none), and the boundary.
    app = faust_app(Settings(store="rocksdb://", data_dir=tmp_path / "data", partitions=3))
    table = declare_customer_table(app, 3)
    store = table.data
    assert isinstance(store, RocksDBStore)
    ahead, ahead_at_0, level = (TP(table.changelog_topic.get_topic_name(), p) for p in range(3))
    applied = {ahead: 5, ahead_at_0: 0, level: 5}
    # End offsets: the changelog's last offsets are 2, -1 (empty) and 5.
    ends = {ahead: 3, ahead_at_0: 0, level: 6}
    for tp, offset in applied.items():
        store._db_for_partition(tp.partition).put(b"customer", b"{}")
        store.set_persisted_offset(tp, offset)
    assert isinstance(app.tables, StateCacheTableManager)
    recovery = app.tables.recovery
    assert isinstance(recovery, StateCacheRecovery)
    if role == "active":
        for tp in applied:
            recovery.add_active(table, tp)
        # Recovery reads the active end offsets just before.
        recovery.active_highwaters.update({tp: end - 1 for tp, end in ends.items()})
        offsets = recovery.active_offsets
    else:
        for tp in applied:
            recovery.add_standby(table, tp)
        offsets = recovery.standby_offsets

    consumer = cast(ConsumerT, ChangelogEnds(ends))
    await recovery._build_offsets(consumer, set(applied), offsets, role)

    for tp in (ahead, ahead_at_0):
        assert store.persisted_offset(tp) is None
        assert store._db_for_partition(tp.partition).get(b"customer") is None
    # Applied the changelog's last record and no further: kept.
    assert store.persisted_offset(level) == 5
    assert store._db_for_partition(level.partition).get(b"customer") == b"{}"
    assert dict(offsets) == {ahead: -1, ahead_at_0: -1, level: 5}
