"""`omnicue dlq replay` through real workers: fix the cause, replay, and see what happens.

The fix is one operators really make: a producer sends a time zone that is newer
than the worker's tz database, so its identify event is dead-lettered; the workers
are redeployed with a newer database (here: PYTHONTZPATH naming a directory that
has the zone) and the dead letters are replayed. Two other letters stay bad and
must come back to the dead-letter topic: a truncated JSON event (ingest stage) and
a broken timer input on the per-customer topic (decide stage).
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import orjson
import pytest
from kafka import KafkaProducer
from kafka.partitioner.default import murmur2

from omnicue.dlq import ATTEMPT_HEADER
from omnicue.producer import EventProducer
from omnicue.services import ManagedProcess
from omnicue.settings import Settings
from schemas import topics
from tests.e2e.conftest import write_rules
from tests.e2e.harness import (
    ROOT,
    WORKER_READY,
    Record,
    TopicReader,
    settings_env,
    wait_for_commit,
)
from tests.factories import event_dict

pytestmark = pytest.mark.e2e

PARTITIONS = 4
NEW_ZONE = "Omnicue/Testzone"
FIXED = "c-tz"  # the customer whose identify event is fixed by the redeploy
TRUNCATED = b'{"event_id": "x", "type": '
BAD_TIMER = b'{"timer_due_at": "not a time"}'


def hash_partition(key: bytes) -> int:
    return (int(murmur2(key)) & 0x7FFFFFFF) % PARTITIONS


# Timer inputs are partitioned explicitly: put this one where its key's hash would not.
TIMER_PARTITION = (hash_partition(b"c-timer") + 1) % PARTITIONS


def start_worker(settings: Settings, log: Path, env: dict[str, str]) -> ManagedProcess:
    worker = ManagedProcess(
        [sys.executable, "-m", "omnicue.cli", "worker"],
        log_path=log,
        env=settings_env(settings) | env,
        name="worker",
    ).start()
    worker.wait_for_line(WORKER_READY, timeout=90)
    return worker


def omnicue(settings: Settings, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "omnicue.cli", *args],
        env=settings_env(settings),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def dead(records: list[Record]) -> list[Record]:
    return [r for r in records if r.topic == topics.EVENTS_DLQ]


@pytest.fixture(scope="module")
def run(make_settings: Callable[..., Settings], run_dir: Path) -> Iterator[dict[str, Any]]:
    settings = make_settings(
        rules=write_rules(run_dir, "1s", "2s"), store="memory://", partitions=PARTITIONS
    )
    bootstrap = settings.bootstrap_servers[0]
    # The newer tz database: the packaged one plus the new zone (a copy of Seoul's rules).
    tzpath = run_dir / "tz-new"
    zone_file = tzpath / NEW_ZONE
    zone_file.parent.mkdir(parents=True)
    zone_file.write_bytes(resources.files("tzdata").joinpath("zoneinfo/Asia/Seoul").read_bytes())
    reader = TopicReader(bootstrap, [topics.EVENTS_DLQ, *topics.ACTIONS.values()])
    worker = start_worker(settings, run_dir / "worker-old.log", {})
    try:
        raw = KafkaProducer(bootstrap_servers=bootstrap)
        identify = event_dict(
            "identify",
            {"traits": {"email": f"{FIXED}@example.com", "timezone": NEW_ZONE}},
            customer_id=FIXED,
            at=datetime.now(UTC),
        )
        # Raw, as a producer that skips the client's validation sends it.
        raw.send(topics.EVENTS, key=FIXED.encode(), value=orjson.dumps(identify))
        raw.send(topics.EVENTS, key=b"c-broken", value=TRUNCATED)
        raw.send(topics.CUSTOMER_INPUTS, key=b"c-timer", value=BAD_TIMER, partition=TIMER_PARTITION)
        raw.flush()
        raw.close()
        first = dead(reader.wait_for(lambda rs: len(dead(rs)) >= 3, timeout=60))
        # Processed is not yet committed: stopped now, the next worker would dead-letter
        # the timer input once more (at-least-once), and the counts below are exact.
        wait_for_commit(settings, topics.CUSTOMER_INPUTS, TIMER_PARTITION, 1)
        published = Counter(hash_partition(key) for key in (FIXED.encode(), b"c-broken"))
        for partition, count in published.items():
            wait_for_commit(settings, topics.EVENTS, partition, count)
        worker.stop()

        worker = start_worker(settings, run_dir / "worker-new.log", {"PYTHONTZPATH": str(tzpath)})
        replay_out = omnicue(settings, "dlq", "replay")
        # Now that the customer has an email address, an abandoned cart reaches them.
        with EventProducer(settings) as producer:
            producer.send(
                event_dict(
                    "consent.updated",
                    {"channel": "email", "category": "marketing", "granted": True},
                    customer_id=FIXED,
                    at=datetime.now(UTC),
                )
            )
            producer.send(
                event_dict(
                    "cart.item_added",
                    {"cart_id": f"cart-{FIXED}", "product_id": "p-7", "price": 9_000},
                    customer_id=FIXED,
                    at=datetime.now(UTC),
                )
            )
            producer.flush()

        def done(records: list[Record]) -> bool:
            emails = [r for r in records if r.topic == topics.ACTIONS["email"]]
            return len(dead(records)) >= 5 and len(emails) >= 1

        reader.wait_for(done, timeout=60)
        reader.settle(2)
        again_out = omnicue(settings, "dlq", "replay", "--dry-run")
        yield {
            "reader": reader,
            "first": first,
            "replay": replay_out,
            "again": again_out,
        }
    finally:
        reader.close()
        worker.stop()


def test_the_old_workers_dead_letter_all_three(run: dict[str, Any]) -> None:
    first: list[Record] = run["first"]
    by_key = {r.key: r for r in first}
    assert set(by_key) == {FIXED.encode(), b"c-broken", b"c-timer"}
    assert by_key[FIXED.encode()].headers["omnicue.error.class"] == b"schema"
    assert NEW_ZONE.encode() in by_key[FIXED.encode()].headers["omnicue.error.message"]
    timer = by_key[b"c-timer"].headers
    assert timer["omnicue.error.stage"] == b"decide"
    assert timer["omnicue.source.partition"] == str(TIMER_PARTITION).encode()
    assert "replayed 3 (" in run["replay"]


def test_a_fixed_event_replayed_from_the_dlq_is_processed(run: dict[str, Any]) -> None:
    reader: TopicReader = run["reader"]
    emails = reader.of(topics.ACTIONS["email"], FIXED)
    # The address came only from the replayed identify event.
    assert [(a["step"], a["recipient"]["email"]) for a in emails][:1] == [
        (1, f"{FIXED}@example.com")
    ]
    returned = dead(reader.records)[len(run["first"]) :]
    assert FIXED.encode() not in {r.key for r in returned}, "the fixed event came back"


def test_still_bad_records_return_to_the_dlq_with_their_new_reason(run: dict[str, Any]) -> None:
    reader: TopicReader = run["reader"]
    returned = dead(reader.records)[len(run["first"]) :]
    by_key = {r.key: r for r in returned}
    assert set(by_key) == {b"c-broken", b"c-timer"}
    broken, timer = by_key[b"c-broken"], by_key[b"c-timer"]
    assert broken.value == TRUNCATED, "original bytes unchanged"
    assert broken.headers["omnicue.error.class"] == b"json"
    assert broken.headers["omnicue.source.topic"] == topics.EVENTS.encode()
    assert broken.headers["omnicue.source.partition"] == str(hash_partition(b"c-broken")).encode()
    assert timer.value == BAD_TIMER
    assert timer.headers["omnicue.error.stage"] == b"decide"
    assert timer.headers["omnicue.source.topic"] == topics.CUSTOMER_INPUTS.encode()
    assert timer.headers["omnicue.source.partition"] == str(TIMER_PARTITION).encode()
    # A new record: the replay, not the original read again.
    first_timer = next(r for r in run["first"] if r.key == b"c-timer")
    assert timer.headers["omnicue.source.offset"] != first_timer.headers["omnicue.source.offset"]


def test_a_second_replay_takes_only_the_letters_that_came_back(run: dict[str, Any]) -> None:
    assert "would replay 2 (" in run["again"]
    assert "skipped 3 (already replayed 3)" in run["again"]


def test_a_letter_that_fails_again_carries_its_attempt_count(run: dict[str, Any]) -> None:
    returned = dead(run["reader"].records)[len(run["first"]) :]
    assert {r.key: r.headers.get(ATTEMPT_HEADER) for r in returned} == {
        b"c-broken": b"2",
        b"c-timer": b"2",
    }
