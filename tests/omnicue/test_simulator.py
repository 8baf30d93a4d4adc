from __future__ import annotations

import os
import random
import signal
import sys
import time
from collections import Counter
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, TopicPartition
from pydantic import ValidationError

from omnicue.services import ManagedProcess, TansuBroker
from omnicue.settings import Settings
from omnicue.simulator import (
    BROKEN_KINDS,
    JourneyPlanner,
    generate_journey,
    invalid_event,
    make_customer,
    run_simulator,
)
from omnicue.topics import create_topics
from schemas.events import customer_key, event_from_dict, parse_event
from schemas.topics import EVENTS

NOW = datetime(2025, 3, 14, 9, 26, 53, tzinfo=UTC)


def _journeys(seed: int, count: int = 400) -> list[list[dict[str, Any]]]:
    """`count` visits over 100 customers, one starting every second like a live run."""
    planner = JourneyPlanner(random.Random(seed), customers=100)
    return [planner.next_journey(NOW + timedelta(seconds=n)) for n in range(count)]


def test_every_event_matches_the_contract() -> None:
    for journey in _journeys(1):
        assert journey
        for data in journey:
            event = event_from_dict(data)
            assert event.occurred_at.tzinfo is not None
            assert event.occurred_at.utcoffset() == timedelta(0)


def test_event_ids_are_unique() -> None:
    ids = [event["event_id"] for journey in _journeys(2) for event in journey]
    assert len(ids) == len(set(ids))


def test_each_customer_sees_time_move_forward() -> None:
    last: dict[str, datetime] = {}
    for journey in _journeys(3):
        # One customer, with its cookie only before it signs up on the web.
        assert len({e["customer_id"] for e in journey if "customer_id" in e}) == 1
        for data in journey:
            event = event_from_dict(data)
            key = event.customer_id or journey[-1]["customer_id"]
            assert event.occurred_at >= last.get(key, event.occurred_at)
            last[key] = event.occurred_at


def test_journeys_are_realistic() -> None:
    journeys = _journeys(4, count=1000)
    types = Counter(e["type"] for journey in journeys for e in journey)
    # Every kind of behaviour the brief promises shows up in a thousand journeys.
    for expected in (
        "identify",
        "consent.updated",
        "device.registered",
        "product.viewed",
        "cart.item_added",
        "cart.item_removed",
        "checkout.started",
        "order.completed",
        "store.visited",
    ):
        assert types[expected] > 0, expected
    # Signing up happens once per customer, not once per visit.
    assert types["identify"] <= 100
    grants = Counter(
        (e["properties"]["channel"], e["properties"]["granted"])
        for journey in journeys
        for e in journey
        if e["type"] == "consent.updated"
    )
    assert grants[("email", True)] and grants[("email", False)]
    assert grants[("push", True)] and grants[("push", False)]

    outcomes = Counter()
    for journey in journeys:
        added = [e for e in journey if e["type"] == "cart.item_added"]
        if not added:
            continue
        assert 1 <= len(added) <= 3
        cart_id = added[0]["properties"]["cart_id"]
        orders = [
            e for e in journey
            if e["type"] == "order.completed" and e["properties"].get("cart_id") == cart_id
        ]  # fmt: skip
        removed = [e for e in journey if e["type"] == "cart.item_removed"]
        if orders:
            (order,) = orders
            props = order["properties"]
            assert props["currency"] == "KRW"
            assert len(props["items"]) == len(added)
            assert props["value"] == sum(
                a["properties"]["price"] * a["properties"]["quantity"] for a in added
            )
            outcomes["purchased"] += 1
        elif removed:
            assert len(removed) == len(added)
            outcomes["emptied"] += 1
        else:
            outcomes["abandoned"] += 1
    assert outcomes["purchased"] and outcomes["emptied"] and outcomes["abandoned"]
    store_channels = {
        e["channel"] for journey in journeys for e in journey
        if e["type"] in ("store.visited", "order.completed") and e["channel"] in ("store", "pos")
    }  # fmt: skip
    assert store_channels == {"store", "pos"}


def test_journeys_span_a_few_seconds() -> None:
    for journey in _journeys(5, count=200):
        first = datetime.fromisoformat(str(journey[0]["occurred_at"]))
        last = datetime.fromisoformat(str(journey[-1]["occurred_at"]))
        assert timedelta(0) <= last - first <= timedelta(seconds=30)


def test_same_seed_same_journeys() -> None:
    assert _journeys(7, count=50) == _journeys(7, count=50)
    assert _journeys(7, count=50) != _journeys(8, count=50)
    a, b = random.Random(9), random.Random(9)
    assert [invalid_event(a) for _ in range(50)] == [invalid_event(b) for _ in range(50)]


def test_now_is_converted_to_utc_and_must_be_aware() -> None:
    rng = random.Random(0)
    seoul = NOW.astimezone(timezone(timedelta(hours=9)))
    journey = generate_journey(rng, make_customer(rng, 1), seoul)
    assert str(journey[0]["occurred_at"]).endswith("+00:00")
    with pytest.raises(ValueError, match="timezone-aware"):
        generate_journey(rng, make_customer(rng, 1), NOW.replace(tzinfo=None))


def test_invalid_events_fail_validation() -> None:
    rng = random.Random(11)
    seen = Counter()
    for _ in range(600):
        broken = invalid_event(rng, NOW)
        seen[broken.kind] += 1
        with pytest.raises(ValidationError):
            parse_event(broken.value)
    assert set(seen) == set(BROKEN_KINDS)


# -- publishing, against a broker of its own -------------------------------------------


def _read_events(bootstrap: str, partitions: int, want: int) -> list[tuple[int, bytes, bytes]]:
    # Tansu reports wrong end offsets, so read until `want` records arrive.
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        consumer.assign([TopicPartition(EVENTS, p) for p in range(partitions)])
        consumer.seek_to_beginning()
        records: list[tuple[int, bytes, bytes]] = []
        deadline = time.monotonic() + 20
        while len(records) < want and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=200).values():
                records.extend((r.partition, r.key, r.value) for r in batch)
        # Anything beyond `want` would be a duplicate or a stray: give it a moment.
        for batch in consumer.poll(timeout_ms=500).values():
            records.extend((r.partition, r.key, r.value) for r in batch)
        return records
    finally:
        consumer.close()


def _check_published(records: list[tuple[int, bytes, bytes]], events: int, invalid: int) -> None:
    assert len(records) == events + invalid
    valid = []
    broken = 0
    for partition, key, value in records:
        try:
            event = parse_event(value)
        except ValidationError:
            broken += 1
            continue
        assert key == customer_key(event).encode()
        valid.append((partition, event))
    assert (len(valid), broken) == (events, invalid)
    # Keyed by customer, in time order within each customer.
    last: dict[str, datetime] = {}
    for _, event in valid:
        key = customer_key(event)
        assert event.occurred_at >= last.get(key, event.occurred_at)
        last[key] = event.occurred_at


def test_run_simulator_paces_and_publishes(fresh_broker: TansuBroker) -> None:
    settings = Settings(broker=fresh_broker.url, dev_broker=True, partitions=2)
    create_topics(settings)
    started = time.monotonic()

    stats = run_simulator(settings, rate=10, customers=30, invalid_ratio=0.1, duration=3, seed=5)

    assert 3 <= time.monotonic() - started < 10
    # 30 journeys started over 3s; those still running at the end are cut short.
    assert stats.journeys == 30
    assert stats.events > 40 and stats.invalid > 0 and stats.failed == 0
    records = _read_events(fresh_broker.bootstrap_server, 2, stats.events + stats.invalid)
    _check_published(records, stats.events, stats.invalid)


def test_simulate_command_flushes_on_sigterm(fresh_broker: TansuBroker, tmp_path: Path) -> None:
    settings = Settings(broker=fresh_broker.url, dev_broker=True, partitions=2)
    create_topics(settings)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNICUE_")}
    env.update(OMNICUE_BROKER=fresh_broker.url, OMNICUE_PARTITIONS="2", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH")) if p
    )
    sim = ManagedProcess(
        [sys.executable, "-m", "omnicue.cli", "simulate", "--rate", "20", "--seed", "3",
         "--invalid-ratio", "0.05"],
        log_path=tmp_path / "simulate.log",
        env=env,
        name="simulate",
    ).start()  # fmt: skip
    try:
        sim.wait_for_line("simulator started", timeout=30)
        time.sleep(3)
        sim.kill(signal.SIGTERM)
        assert sim.wait(15) == 0
    finally:
        sim.stop()
    summary = sim.wait_for_line(r"simulator stopped: (\d+) journeys, (\d+) events, (\d+) invalid")
    events, invalid = int(summary.group(2)), int(summary.group(3))
    assert events > 0
    records = _read_events(fresh_broker.bootstrap_server, 2, events + invalid)
    _check_published(records, events, invalid)


def test_some_web_visitors_browse_anonymously_then_sign_up_with_both_ids() -> None:
    linked = 0
    for journey in _journeys(5, count=400):
        anonymous = [e for e in journey if "customer_id" not in e]
        if not anonymous:
            continue
        cookie = {e["anonymous_id"] for e in anonymous}
        assert len(cookie) == 1 and all(e["type"] == "product.viewed" for e in anonymous)
        identify = next(e for e in journey if e["type"] == "identify")
        # The sign-up links the cookie to the customer; the anonymous views came first.
        assert identify["anonymous_id"] in cookie and identify["customer_id"]
        assert journey.index(identify) == len(anonymous)
        linked += 1
    assert linked > 20
