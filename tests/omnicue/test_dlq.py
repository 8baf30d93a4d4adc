"""`omnicue dlq list/replay` on a real broker, with dead letters written the way the
worker writes them (streams/ingest.py `dead_letter`). The whole path through a
worker is in tests/e2e/test_dlq.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from kafka import KafkaConsumer, KafkaProducer
from typer.testing import CliRunner

from omnicue.cli import app
from omnicue.dlq import (
    ATTEMPT_HEADER,
    REPLAYED_TOPIC,
    Selection,
    list_dead_letters,
    parse_since,
    read_replayed,
    read_topic,
    replay_dead_letters,
)
from omnicue.services import TansuBroker
from omnicue.settings import Settings
from omnicue.topics import create_topics
from schemas.topics import CUSTOMER_INPUTS, EVENTS, EVENTS_DLQ

IDLE = 0.5
NOW = datetime.now(UTC)
MISSING_TIME = b'{"event_id": "y", "type": "cart.item_added"}'
TRUNCATED = b'{"event_id": "x", "type": '
BAD_TIMER = b'{"timer_due_at": "not a time"}'


@dataclass
class Stack:
    settings: Settings
    producer: KafkaProducer
    broker: TansuBroker

    def dead_letter(
        self,
        key: bytes | None,
        value: bytes | None,
        *,
        stage: str = "ingest",
        reason: str = "schema",
        message: str = "occurred_at: Field required",
        topic: str = EVENTS,
        partition: int = 0,
        offset: int = 0,
        attempt: int | None = None,
        at: datetime = NOW,
    ) -> None:
        """A record with exactly the headers the worker's `dead_letter` writes."""
        headers = [
            ("omnicue.error.stage", stage.encode()),
            ("omnicue.error.class", reason.encode()),
            ("omnicue.error.message", message.encode()),
            ("omnicue.source.topic", topic.encode()),
            ("omnicue.source.partition", str(partition).encode()),
            ("omnicue.source.offset", str(offset).encode()),
        ]
        if attempt is not None:
            headers.append((ATTEMPT_HEADER, str(attempt).encode()))
        self.producer.send(
            EVENTS_DLQ,
            key=key,
            value=value,
            headers=headers,
            timestamp_ms=int(at.timestamp() * 1000),
        )
        self.producer.flush()

    def cli(self, *args: str) -> tuple[int, str]:
        result = CliRunner().invoke(
            app,
            list(args),
            env={"OMNICUE_BROKER": self.broker.url, "OMNICUE_PARTITIONS": "4"},
        )
        return result.exit_code, result.output


@pytest.fixture
def stack(fresh_broker: TansuBroker, settings_factory: Callable[..., Settings]) -> Iterator[Stack]:
    # A broker of its own: dead letters and replay records of other tests stay out.
    settings = settings_factory(broker=fresh_broker.url, partitions=4)
    create_topics(settings)
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all")
    try:
        yield Stack(settings, producer, fresh_broker)
    finally:
        producer.close()


Published = tuple[int, bytes | None, bytes, dict[str, bytes]]  # partition, key, value, headers


def _records(settings: Settings, topic: str) -> list[Published]:
    return [
        (r.partition, r.key, r.value, dict(r.headers or ()))
        for r in read_topic(settings, topic, IDLE)
    ]


def _topic_exists(broker: TansuBroker, topic: str) -> bool:
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap_server)
    try:
        return bool(consumer.partitions_for_topic(topic))
    finally:
        consumer.close()


def _some_letters(stack: Stack) -> None:
    stack.dead_letter(b"c-1", MISSING_TIME, partition=1, offset=10)
    stack.dead_letter(b"c-2", MISSING_TIME, partition=2, offset=11)
    stack.dead_letter(b"c-3", MISSING_TIME, partition=3, offset=12, at=NOW - timedelta(days=3))
    stack.dead_letter(
        b"broken", TRUNCATED, reason="json", message="Invalid JSON: EOF", partition=0, offset=13
    )
    stack.dead_letter(
        b"c-9",
        BAD_TIMER,
        stage="decide",
        reason="ValueError",
        message="Invalid isoformat string: 'not a time'",
        topic=CUSTOMER_INPUTS,
        partition=3,
        offset=7,
    )


# -- list ------------------------------------------------------------------------------


def test_list_groups_by_stage_and_reason_with_the_newest_examples(stack: Stack) -> None:
    _some_letters(stack)

    summary = list_dead_letters(stack.settings, Selection(), examples=2, idle=IDLE)

    assert summary.read == 5
    groups = [(g.stage, g.reason, g.count) for g in summary.groups]
    assert groups == [("ingest", "schema", 3), ("decide", "ValueError", 1), ("ingest", "json", 1)]
    schema = summary.groups[0]
    # The newest two: the three-day-old one is left out.
    assert sorted(letter.key or b"" for letter in schema.examples) == [b"c-1", b"c-2"]
    assert schema.first_at is not None and schema.first_at < NOW - timedelta(days=2)

    code, out = stack.cli("dlq", "list")
    assert code == 0, out
    assert out.startswith(f"{EVENTS_DLQ}: 5 dead letter(s)\n")
    assert "ingest / schema: 3" in out
    assert "decide / ValueError: 1" in out
    assert f"from {CUSTOMER_INPUTS}[3]@7: Invalid isoformat string: 'not a time'" in out
    assert 'value b\'{"timer_due_at": "not a time"}\'' in out
    assert "occurred_at: Field required" in out


def test_list_filters_by_reason_and_since(stack: Stack) -> None:
    _some_letters(stack)

    recent = list_dead_letters(stack.settings, Selection(since=NOW - timedelta(days=1)), idle=IDLE)
    assert [(g.reason, g.count) for g in recent.groups] == [
        ("schema", 2),
        ("ValueError", 1),
        ("json", 1),
    ]

    code, out = stack.cli("dlq", "list", "--reason", "json", "--reason", "ValueError")
    assert code == 0, out
    assert "5 dead letter(s), 2 matching" in out
    assert "ingest / schema" not in out and "ingest / json: 1" in out

    code, out = stack.cli("dlq", "list", "--since", "2d", "--reason", "schema")
    assert code == 0, out
    assert "ingest / schema: 2 (" in out

    since = (NOW - timedelta(days=4)).isoformat()
    code, out = stack.cli("dlq", "list", "--since", since, "--reason", "schema")
    assert code == 0, out
    assert "ingest / schema: 3 (" in out


def test_list_and_replay_reject_a_bad_since(stack: Stack) -> None:
    for command in ("list", "replay"):
        code, out = stack.cli("dlq", command, "--since", "yesterday")
        assert code == 2
        assert "--since:" in out and "2h" in out


def test_parse_since_takes_durations_and_times_with_an_offset() -> None:
    now = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
    assert parse_since("2h", now) == datetime(2026, 3, 2, 10, 0, tzinfo=UTC)
    assert parse_since("1d", now) == datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    assert parse_since("2026-03-01T09:00:00+09:00") == datetime(2026, 3, 1, 0, 0, tzinfo=UTC)
    assert parse_since("2026-03-01T00:00:00Z") == datetime(2026, 3, 1, 0, 0, tzinfo=UTC)
    with pytest.raises(ValueError, match="needs an offset"):
        parse_since("2026-03-01T00:00:00")


# -- replay ----------------------------------------------------------------------------


def test_replay_republishes_key_bytes_and_partition_to_the_source_topic(stack: Stack) -> None:
    _some_letters(stack)
    # A letter already replayed once (it failed again): the next try is attempt 3.
    stack.dead_letter(b"c-4", MISSING_TIME, partition=2, offset=20, attempt=2)

    code, out = stack.cli("dlq", "replay")

    assert code == 0, out
    assert "6 dead letter(s) read, 6 matching" in out
    assert "replayed 6 (ingest / schema 4, " in out
    assert f"to {EVENTS} 5, {CUSTOMER_INPUTS} 1" in out
    events = _records(stack.settings, EVENTS)
    attempt = ATTEMPT_HEADER
    assert sorted(events, key=lambda r: r[1] or b"") == [
        (0, b"broken", TRUNCATED, {attempt: b"2"}),
        (1, b"c-1", MISSING_TIME, {attempt: b"2"}),
        (2, b"c-2", MISSING_TIME, {attempt: b"2"}),
        (3, b"c-3", MISSING_TIME, {attempt: b"2"}),
        (2, b"c-4", MISSING_TIME, {attempt: b"3"}),
    ]
    # Timer and internal inputs go back to their recorded partition, not the key's hash.
    assert _records(stack.settings, CUSTOMER_INPUTS) == [(3, b"c-9", BAD_TIMER, {attempt: b"2"})]
    assert len(read_replayed(stack.settings, IDLE)) == 6


def test_dry_run_publishes_nothing(stack: Stack) -> None:
    _some_letters(stack)

    code, out = stack.cli("dlq", "replay", "--dry-run")

    assert code == 0, out
    assert "would replay 5 " in out and "dry run: nothing published" in out
    assert _records(stack.settings, EVENTS) == []
    assert _records(stack.settings, CUSTOMER_INPUTS) == []
    assert not _topic_exists(stack.broker, REPLAYED_TOPIC)
    # Nothing was recorded either: the real replay still has everything to do.
    report = replay_dead_letters(stack.settings, Selection(), idle=IDLE)
    assert report.replayed_total == 5


def test_a_second_replay_replays_nothing_unless_again(stack: Stack) -> None:
    _some_letters(stack)
    first = replay_dead_letters(stack.settings, Selection(), idle=IDLE)
    assert first.replayed_total == 5

    code, out = stack.cli("dlq", "replay")

    assert code == 0, out
    assert "replayed 0\n" in out and "skipped 5 (already replayed 5)" in out
    assert len(_records(stack.settings, EVENTS)) == 4
    code, out = stack.cli("dlq", "list")
    assert "ingest / schema: 3, 3 replayed" in out

    again = replay_dead_letters(
        stack.settings, Selection(reasons=frozenset({"json"})), again=True, idle=IDLE
    )
    assert again.replayed_total == 1
    assert len(_records(stack.settings, EVENTS)) == 5


def test_replay_filters_by_reason_and_since(stack: Stack) -> None:
    _some_letters(stack)

    code, out = stack.cli("dlq", "replay", "--reason", "json")

    assert code == 0, out
    assert "5 dead letter(s) read, 1 matching" in out and "replayed 1 (ingest / json 1)" in out
    assert [r[1] for r in _records(stack.settings, EVENTS)] == [b"broken"]
    recent = replay_dead_letters(
        stack.settings, Selection(since=NOW - timedelta(days=1)), idle=IDLE
    )
    # The json letter is done already; the three-day-old schema letter is too old.
    assert recent.replayed == {"ingest / schema": 2, "decide / ValueError": 1}
    assert recent.skipped == {"already replayed": 1}
    assert sorted(r[1] or b"" for r in _records(stack.settings, EVENTS)) == [
        b"broken",
        b"c-1",
        b"c-2",
    ]


def test_letters_without_a_replayable_source_are_skipped_and_reported(stack: Stack) -> None:
    stack.dead_letter(b"a", b"{}", topic="omnicue.actions.push", partition=0)
    stack.dead_letter(b"b", b"{}", partition=9)  # the topic has 4 partitions
    stack.dead_letter(b"c", MISSING_TIME, partition=1)

    code, out = stack.cli("dlq", "replay")

    assert code == 0, out
    assert "replayed 1 (ingest / schema 1)" in out
    assert "source topic omnicue.actions.push is not replayable 1" in out
    assert f"partition 9 of {EVENTS} does not exist 1" in out
    assert [r[1] for r in _records(stack.settings, EVENTS)] == [b"c"]
    # Skipped letters are not recorded: once fixed (more partitions, say) they can go.
    assert len(read_replayed(stack.settings, IDLE)) == 1
