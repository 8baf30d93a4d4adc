"""Nothing is lost, and nothing is decided twice, across repeated SIGKILLs of the worker.

A producer thread publishes every customer's identify, cart add and order while the
worker is killed with SIGKILL again and again (every third one in the middle of its
start) and restarted in the same data directory. Afterwards the topics are read back
by consuming them (never by end offsets: the dev broker reports those wrong): every
published event reached `omnicue.customer-inputs` or the dead-letter topic, every
event was decided, no step was decided twice, and each fired one action under one
id. A failure names the lost offsets and the group's committed ones; the worker logs
are in the test's tmp_path.

Issue 9: it failed on decisions lost by the customers stage, which wrote its states
before the decisions they record were sent (streams/customers.py), and its worker
logs showed faust committing past records it had not delivered after a seek
(streams/consumer.py).
"""

from __future__ import annotations

import random
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from kafka import KafkaConsumer, TopicPartition

from omnicue.producer import EventProducer
from omnicue.services import ManagedProcess
from omnicue.settings import Settings
from schemas import topics
from tests.e2e.harness import settings_env, start_worker

pytestmark = pytest.mark.e2e

# Every event starts a journey of its own rule whose one step is decided soon, so
# every event has exactly one decision naming it. Transactional: no consent needed,
# no caps, no quiet hours; the identify's email makes each step fire an action.
CRASH_RULES = """
version: 1
policy:
  quiet_hours: null
rules:
  - id: welcome
    category: transactional
    trigger: {event: identify}
    steps: [{after: 0s, channels: [email], template: welcome}]
  - id: cart_reminder
    category: transactional
    trigger: {event: cart.item_added, key: properties.cart_id}
    steps: [{after: 2s, channels: [email], template: cart_reminder}]
  - id: order_confirmation
    category: transactional
    trigger: {event: order.completed, key: properties.order_id}
    steps: [{after: 0s, channels: [email], template: order_confirmation}]
"""

CUSTOMERS = 2_200
PUBLISH_SECONDS = 60.0
KILLS = 10
# Seconds a worker runs after it is ready, before its SIGKILL; every third one is
# killed this many seconds after it was started instead, ready or not.
UP_FOR = (1.0, 5.0)
STARTING_FOR = (2.0, 12.0)
# Seconds the last worker gets to decide everything, and the quiet that ends it early.
FINAL_WAIT = 90.0
QUIET = 20.0


# Every fourth customer adds the cart anonymously and then identifies with both ids:
# the link merges its anonymous profile across partitions (issue 11), kills or not.
ANONYMOUS_EVERY = 4


def customer_events(n: int, at: str) -> list[dict[str, Any]]:
    customer = f"c-crash-{n}"
    base = {"customer_id": customer, "occurred_at": at, "channel": "web"}
    linked = n % ANONYMOUS_EVERY == 0
    anonymous = {"anonymous_id": f"a-crash-{n}"} if linked else {}
    cart_ids = {"customer_id": None, **anonymous} if linked else {}
    events = [
        {**base, **anonymous, "event_id": f"{customer}-identify", "type": "identify",
         "properties": {"traits": {"email": f"{customer}@example.com"}}},
        {**base, **cart_ids, "event_id": f"{customer}-cart", "type": "cart.item_added",
         "properties": {"cart_id": f"K-{n}", "product_id": "p-1", "quantity": 1,
                        "price": 1_000}},
        {**base, "event_id": f"{customer}-order", "type": "order.completed",
         "properties": {"order_id": f"O-{n}", "cart_id": f"K-{n}", "value": 1_000,
                        "currency": "KRW"}},
    ]  # fmt: skip
    for event in events:
        if event.get("customer_id") is None:
            event.pop("customer_id", None)
    return events[1::-1] + events[2:] if linked else events


class Publisher(threading.Thread):
    """Publishes every customer's events at a steady pace, remembering where each landed."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(name="crash-publisher", daemon=True)
        self._settings = settings
        # event id -> (partition, offset) of `omnicue.events`, from the broker's acks.
        self.placed: dict[str, tuple[int, int]] = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._publish()
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            self.error = exc

    def _publish(self) -> None:
        rounds = CUSTOMERS // 100
        with EventProducer(self._settings) as producer:
            start = time.monotonic()
            futures = []
            for r in range(rounds):
                now = datetime.now(UTC).isoformat()
                for n in range(r * 100, (r + 1) * 100):
                    for event in customer_events(n, now):
                        futures.append((event["event_id"], producer.send(event)))
                producer.flush()
                # A steady flow rather than one burst, so kills land mid-stream.
                pause = start + (r + 1) * PUBLISH_SECONDS / rounds - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
            producer.flush()
        for event_id, future in futures:
            meta = future.get(timeout=30)
            self.placed[event_id] = (meta.partition, meta.offset)


class Placed:
    """Where a record landed: its topic, partition and offset."""

    __slots__ = ("offset", "partition", "topic", "value")

    def __init__(self, topic: str, partition: int, offset: int, value: Any) -> None:
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.value = value


class OutputReader:
    """Reads the pipeline's topics from the beginning, by consuming, keeping each
    record's partition and offset (so a failure names the offsets that were lost)."""

    def __init__(self, bootstrap: str, names: list[str]) -> None:
        self._consumer = KafkaConsumer(
            bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False
        )
        partitions = []
        for topic in names:
            found = self._consumer.partitions_for_topic(topic) or set()
            assert found, f"topic {topic} does not exist"
            partitions += [TopicPartition(topic, p) for p in sorted(found)]
        self._consumer.assign(partitions)
        self._consumer.seek_to_beginning(*partitions)
        self.records: list[Placed] = []

    def poll(self) -> int:
        n = 0
        for batch in self._consumer.poll(timeout_ms=200).values():
            for r in batch:
                value = r.value if r.topic.endswith(".dlq") else orjson.loads(r.value)
                self.records.append(Placed(r.topic, r.partition, r.offset, value))
                n += 1
        return n

    def of(self, prefix: str) -> list[Placed]:
        return [r for r in self.records if r.topic.startswith(prefix)]

    def close(self) -> None:
        self._consumer.close()


def offset_ranges(offsets: list[int]) -> list[tuple[int, int]]:
    """Sorted offsets as inclusive (first, last) runs of consecutive numbers."""
    runs: list[tuple[int, int]] = []
    for offset in sorted(offsets):
        if runs and offset == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], offset)
        else:
            runs.append((offset, offset))
    return runs


def describe(topic: str, places: list[tuple[int, int]]) -> str:
    """`topic partition p: first-last (n), ...` for (partition, offset) pairs."""
    by_partition: dict[int, list[int]] = {}
    for partition, offset in places:
        by_partition.setdefault(partition, []).append(offset)
    return f"{topic} " + "; ".join(
        f"partition {p}: "
        + ", ".join(f"{a}-{b} ({b - a + 1})" for a, b in offset_ranges(offsets))
        for p, offsets in sorted(by_partition.items())
    )


def committed_offsets(settings: Settings, names: list[str]) -> str:
    """The worker group's committed offsets, for a failure message."""
    consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap_servers,
                             group_id=settings.app_id, enable_auto_commit=False)
    try:
        return "; ".join(
            f"{topic}[{p}]={consumer.committed(TopicPartition(topic, p))}"
            for topic in names for p in range(settings.partitions)
        )
    finally:
        consumer.close()


@pytest.mark.timeout(480)  # about 2.5 min; more on a loaded machine
def test_nothing_lost_or_decided_twice_across_repeated_sigkills(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(CRASH_RULES, encoding="utf-8")
    settings = make_settings(
        rules=rules, store="rocksdb://", data_dir=tmp_path / "data", app_id="omnicue-crash",
        partitions=8,  # as in production (`OMNICUE_PARTITIONS`)
    )
    rng = random.Random()
    publisher = Publisher(settings)
    worker: ManagedProcess | None = None
    reader = OutputReader(
        settings.bootstrap_servers[0],
        [topics.CUSTOMER_INPUTS, topics.EVENTS_DLQ, topics.DECISIONS, *topics.ACTIONS.values()],
    )

    def decided() -> set[str]:
        return {d.value.get("event_id") for d in reader.of(topics.DECISIONS)}

    try:
        publisher.start()
        for cycle in range(KILLS):
            log_path = tmp_path / f"worker-{cycle}.log"
            if cycle % 3 == 2:
                # Killed at any moment of its start: joining, recovering, or working
                # through what its predecessor left.
                worker = ManagedProcess(
                    [sys.executable, "-m", "omnicue.cli", "worker"], log_path=log_path,
                    env=settings_env(settings), name="worker",
                ).start()
                time.sleep(rng.uniform(*STARTING_FOR))
            else:
                worker = start_worker(settings, log_path)
                time.sleep(rng.uniform(*UP_FOR))
            worker.kill(signal.SIGKILL)
            worker.wait(10)
            reader.poll()
        worker = start_worker(settings, tmp_path / "worker-final.log")
        publisher.join(PUBLISH_SECONDS * 2)
        assert not publisher.is_alive(), "the publisher did not finish"
        assert publisher.error is None, repr(publisher.error)
        expected = set(publisher.placed)
        assert len(expected) == 3 * CUSTOMERS
        # Until every event is decided, or nothing new has come for a while: then the
        # last worker has caught up, and what is still missing is lost.
        deadline = time.monotonic() + FINAL_WAIT
        quiet_since = time.monotonic()
        while not expected <= decided() and time.monotonic() < deadline:
            if reader.poll():
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > QUIET:
                break
        # Whatever the last worker still re-emits after catching up shows up here.
        settle = time.monotonic() + 3
        while time.monotonic() < settle:
            reader.poll()
        group = committed_offsets(settings, [topics.EVENTS, topics.CUSTOMER_INPUTS])
    finally:
        if worker is not None:
            worker.stop()
        reader.close()

    inputs = {r.value.get("event_id"): r for r in reader.of(topics.CUSTOMER_INPUTS)}
    dead = {orjson.loads(r.value).get("event_id") for r in reader.of(topics.EVENTS_DLQ)}
    never_ingested = expected - set(inputs) - dead
    assert not never_ingested, (
        f"{len(never_ingested)} events never reached {topics.CUSTOMER_INPUTS}: "
        + describe(topics.EVENTS, [publisher.placed[e] for e in never_ingested])
        + f"; committed: {group}"
    )
    undecided = expected - decided()
    assert not undecided, (
        f"{len(undecided)} events reached {topics.CUSTOMER_INPUTS} but were never decided: "
        + describe(topics.CUSTOMER_INPUTS,
                   [(inputs[e].partition, inputs[e].offset) for e in undecided])
        + f"; as {describe(topics.EVENTS, [publisher.placed[e] for e in undecided])}"
        + f"; committed: {group}"
    )
    # At-least-once: a worker killed after sending a batch's outputs and before its
    # states reached the changelog sends them again when the batch is reprocessed, as
    # the same records (deterministic action ids, which senders deliver once). A
    # step decided twice *differently*, or an action under a second id, is a bug.
    def step_of(d: dict[str, Any]) -> tuple[Any, ...]:
        return (d["customer_id"], d["rule_id"], d["journey_key"], d["step"], d.get("event_id"))

    decisions = reader.of(topics.DECISIONS)
    ways: dict[tuple[Any, ...], set[tuple[Any, ...]]] = {}
    for d in decisions:
        v = d.value
        ways.setdefault(step_of(v), set()).add((v["outcome"], v.get("reason"), v.get("action_id")))
    twice = {step: how for step, how in ways.items() if len(how) > 1}
    assert not twice, f"{len(twice)} steps decided more than one way: " + "; ".join(
        f"{step}: {sorted(map(str, how))}" for step, how in list(twice.items())[:5]
    )
    actions = Counter(a.value["action_id"] for a in reader.of("omnicue.actions."))
    # One action per event (each rule's one step fires once), each under one id; but an
    # anonymous cart whose step came due before its link was decided (kills delay it)
    # was suppressed as unreachable: the anonymous profile has no email yet.
    before_link = {
        d.value["event_id"] for d in decisions
        if d.value["customer_id"].startswith("anon:") and d.value.get("reason") == "unreachable"
    }
    fired = {d.value["action_id"] for d in decisions if d.value["outcome"] == "fired"}
    assert set(actions) == fired, "actions without a fired decision, or the reverse"
    assert len(actions) == len(expected) - len(before_link), (
        f"{len(actions)} action ids for {len(expected)} events, {len(before_link)} of them "
        "anonymous carts suppressed before their link"
    )
    # Each anonymous profile merged into its own customer, once at most (a link
    # processed before the anonymous cart finds no profile to merge: the cart is then
    # forwarded to the customer).
    merges = Counter(
        (d.value["customer_id"], d.value["profile"]) for d in decisions
        if d.value.get("reason") == "identity_merged"
    )
    wrong = [pair for pair in merges if pair[1] != "anon:a-" + pair[0][len("c-"):]]
    assert not wrong, f"profiles merged into the wrong customer: {wrong[:5]}"
    assert len(merges) <= CUSTOMERS // ANONYMOUS_EVERY
    resent = len(decisions) - len(ways)
    print(f"decisions sent again as the same record: {resent}; actions: "
          f"{sum(actions.values()) - len(actions)}; anonymous profiles merged: {len(merges)}; "
          f"anonymous carts due before their link: {len(before_link)}")
