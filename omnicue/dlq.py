"""`omnicue dlq`: look at dead letters and put them back where they came from.

The worker writes a dead letter (streams/ingest.py `dead_letter`) with the original
key and bytes and the reason in headers. Replaying sends those bytes, with that key,
to the topic and partition the worker read them from; a record that fails again goes
back to the dead-letter topic with its new reason, so nothing is lost either way.

Replay is idempotent on its own: every dead letter it puts back is recorded, by its
dead-letter partition and offset, in a compacted topic, and later replays skip it.
The engine also drops an event whose id it saw recently, but that memory is bounded.

Topics are read to their end by consuming until a poll stays empty for a while,
never by end offsets: the dev broker reports those wrongly for multi-record batches.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient
from kafka.errors import KafkaError, TopicAlreadyExistsError, for_code

from omnicue.replay import parse_timestamp
from omnicue.settings import Settings
from schemas.rules import parse_duration
from schemas.topics import CUSTOMER_INPUTS, EVENTS, EVENTS_DLQ

# Replayed dead letters, keyed by "partition:offset" in the dead-letter topic. Compacted:
# replaying a letter again (--again) replaces its record instead of adding one.
REPLAYED_TOPIC = f"{EVENTS_DLQ}.replayed"

STAGE_HEADER = "omnicue.error.stage"
REASON_HEADER = "omnicue.error.class"
MESSAGE_HEADER = "omnicue.error.message"
SOURCE_TOPIC_HEADER = "omnicue.source.topic"
SOURCE_PARTITION_HEADER = "omnicue.source.partition"
SOURCE_OFFSET_HEADER = "omnicue.source.offset"
# How many times the record has been tried; absent means once (the original failure).
ATTEMPT_HEADER = "omnicue.dlq.attempt"
# Headers that describe one failure: a replayed record must not carry them, or a record
# that fails again would show two reasons.
_FAILURE_HEADER_PREFIXES = ("omnicue.error.", "omnicue.source.")

# Where a dead letter goes back to, by the topic it was read from. Ingest letters are
# raw producer events; decide letters are per-customer inputs (events and timer
# firings), which only the recorded partition keeps with their customer's state.
REPLAYABLE_SOURCES = (EVENTS, CUSTOMER_INPUTS)

# Published, then recorded as replayed, this many at a time: a crash in between can
# re-publish at most one chunk (which the engine's recent event ids mostly absorb).
REPLAY_CHUNK = 500
EXCERPT_BYTES = 80
DEFAULT_IDLE = 1.0

Headers = tuple[tuple[str, bytes], ...]


@dataclass(frozen=True)
class DeadLetter:
    """One record of the dead-letter topic."""

    partition: int
    offset: int
    at: datetime
    key: bytes | None
    value: bytes | None
    headers: Headers

    @property
    def id(self) -> str:
        """Its position in the dead-letter topic: what the replayed topic is keyed by."""
        return f"{self.partition}:{self.offset}"

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value.decode("utf-8", errors="replace")
        return None

    @property
    def stage(self) -> str:
        return self.header(STAGE_HEADER) or "?"

    @property
    def reason(self) -> str:
        return self.header(REASON_HEADER) or "?"

    @property
    def message(self) -> str:
        return self.header(MESSAGE_HEADER) or ""

    @property
    def source_topic(self) -> str | None:
        return self.header(SOURCE_TOPIC_HEADER)

    @property
    def source_partition(self) -> int | None:
        return _int_or_none(self.header(SOURCE_PARTITION_HEADER))

    @property
    def source(self) -> str:
        return (
            f"{self.source_topic or '?'}[{self.header(SOURCE_PARTITION_HEADER) or '?'}]"
            f"@{self.header(SOURCE_OFFSET_HEADER) or '?'}"
        )

    @property
    def attempt(self) -> int:
        """1 for a record that failed once; a replay of it is attempt 2, and so on."""
        attempt = _int_or_none(self.header(ATTEMPT_HEADER))
        return attempt if attempt is not None and attempt >= 1 else 1


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


@dataclass(frozen=True)
class Selection:
    """Which dead letters a command looks at: all, or those matching every filter."""

    reasons: frozenset[str] = frozenset()
    since: datetime | None = None

    def matches(self, letter: DeadLetter) -> bool:
        if self.reasons and letter.reason not in self.reasons:
            return False
        return self.since is None or letter.at >= self.since


def parse_since(value: str, now: datetime | None = None) -> datetime:
    """`2h`, `1d` (that long before `now`) or an ISO 8601 time with an offset."""
    try:
        return (now or datetime.now(UTC)) - parse_duration(value)
    except ValueError:
        pass
    try:
        return parse_timestamp(value)
    except ValueError as exc:
        raise ValueError(f"{exc}; or give a duration such as 30m, 2h, 1d") from None


# -- reading -----------------------------------------------------------------------


def _consumer(settings: Settings) -> Any:
    return KafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers,
        client_id=f"{settings.app_id}-dlq",
        group_id=None,
        enable_auto_commit=False,
        # Looking must not create: a topic made by a metadata request would get the
        # broker's defaults (partition count, no compaction).
        allow_auto_create_topics=False,
    )


def read_topic(settings: Settings, topic: str, idle: float = DEFAULT_IDLE) -> Iterator[Any]:
    """Every record of `topic` from the start, until a poll has been empty for `idle` s.

    Yields nothing if the topic does not exist.
    """
    consumer = _consumer(settings)
    try:
        partitions = [
            TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))
        ]
        if not partitions:
            return
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        for tp in partitions:
            # Resolve the start offsets first, so their round trip is not taken for quiet.
            consumer.position(tp)
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < idle:
            for records in consumer.poll(timeout_ms=200).values():
                yield from records
                quiet_since = time.monotonic()
    finally:
        consumer.close()


def read_dead_letters(settings: Settings, idle: float = DEFAULT_IDLE) -> Iterator[DeadLetter]:
    for record in read_topic(settings, EVENTS_DLQ, idle):
        yield DeadLetter(
            partition=record.partition,
            offset=record.offset,
            at=datetime.fromtimestamp(record.timestamp / 1000, tz=UTC),
            key=record.key,
            value=record.value,
            headers=tuple((k, v or b"") for k, v in record.headers or ()),
        )


def read_replayed(settings: Settings, idle: float = DEFAULT_IDLE) -> set[str]:
    """Ids (`DeadLetter.id`) of the dead letters replayed so far."""
    replayed: set[str] = set()
    for record in read_topic(settings, REPLAYED_TOPIC, idle):
        if record.key is None:
            continue
        if record.value is None:
            # A tombstone: someone un-recorded the replay on purpose.
            replayed.discard(record.key.decode())
        else:
            replayed.add(record.key.decode())
    return replayed


# -- list --------------------------------------------------------------------------


@dataclass
class Group:
    """The dead letters of one stage and reason."""

    stage: str
    reason: str
    count: int = 0
    replayed: int = 0
    first_at: datetime | None = None
    last_at: datetime | None = None
    examples: list[DeadLetter] = field(default_factory=list)


@dataclass
class Summary:
    groups: list[Group]
    read: int
    selection: Selection
    replayed: set[str]

    @property
    def matched(self) -> int:
        return sum(g.count for g in self.groups)

    def render(self) -> str:
        filtered = self.selection != Selection()
        head = f"{EVENTS_DLQ}: {self.read} dead letter(s)"
        if filtered:
            head += f", {self.matched} matching"
        lines = [head]
        for g in self.groups:
            replayed = f", {g.replayed} replayed" if g.replayed else ""
            span = f" ({_iso(g.first_at)} .. {_iso(g.last_at)})" if g.first_at and g.last_at else ""
            lines.append(f"{g.stage} / {g.reason}: {g.count}{replayed}{span}")
            for letter in g.examples:
                attempt = f" attempt {letter.attempt}" if letter.attempt > 1 else ""
                done = " (replayed)" if letter.id in self.replayed else ""
                lines.append(
                    f"  {letter.id}{done} {_iso(letter.at)} from {letter.source}{attempt}: "
                    f"{_one_line(letter.message, 160)}"
                )
                lines.append(f"    key {_excerpt(letter.key)} value {_excerpt(letter.value)}")
        return "\n".join(lines)


def summarise(
    letters: Iterable[DeadLetter],
    selection: Selection = Selection(),  # noqa: B008 - frozen, so one shared default is safe
    replayed: set[str] | None = None,
    examples: int = 3,
) -> Summary:
    """Counts by (stage, reason), largest first, with the newest `examples` of each."""
    replayed = replayed or set()
    groups: dict[tuple[str, str], Group] = {}
    read = 0
    for letter in letters:
        read += 1
        if not selection.matches(letter):
            continue
        group = groups.setdefault((letter.stage, letter.reason), Group(letter.stage, letter.reason))
        group.count += 1
        group.replayed += letter.id in replayed
        group.first_at = min(group.first_at or letter.at, letter.at)
        group.last_at = max(group.last_at or letter.at, letter.at)
        group.examples.append(letter)
        # Trimmed as we go: the topic can be far larger than what is worth holding.
        if len(group.examples) > 2 * examples:
            group.examples = _newest(group.examples, examples)
    for group in groups.values():
        group.examples = _newest(group.examples, examples)
    ordered = sorted(groups.values(), key=lambda g: (-g.count, g.stage, g.reason))
    return Summary(ordered, read, selection, replayed)


def _newest(letters: list[DeadLetter], n: int) -> list[DeadLetter]:
    return sorted(letters, key=lambda d: (d.at, d.partition, d.offset))[-n:] if n > 0 else []


def list_dead_letters(
    settings: Settings, selection: Selection, examples: int = 3, idle: float = DEFAULT_IDLE
) -> Summary:
    replayed = read_replayed(settings, idle)
    return summarise(read_dead_letters(settings, idle), selection, replayed, examples)


# -- replay ------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    topic: str
    partition: int


def replay_target(letter: DeadLetter, partitions: Callable[[str], set[int]]) -> Target | str:
    """Where the letter goes back to, or why it cannot (a skip reason)."""
    topic = letter.source_topic
    if topic not in REPLAYABLE_SOURCES:
        return f"source topic {topic or 'unknown'} is not replayable"
    partition = letter.source_partition
    if partition is None:
        return "no source partition"
    if partition not in partitions(topic):
        return f"partition {partition} of {topic} does not exist"
    return Target(topic, partition)


def replay_headers(letter: DeadLetter) -> list[tuple[str, bytes]]:
    """The letter's own headers minus its failure, with the attempt count raised."""
    kept = [
        (k, v)
        for k, v in letter.headers
        if k != ATTEMPT_HEADER and not k.startswith(_FAILURE_HEADER_PREFIXES)
    ]
    return [*kept, (ATTEMPT_HEADER, str(letter.attempt + 1).encode())]


@dataclass
class ReplayReport:
    dry_run: bool
    read: int = 0
    matched: int = 0
    replayed: Counter[str] = field(default_factory=Counter)  # by "stage / reason"
    targets: Counter[str] = field(default_factory=Counter)  # by topic
    skipped: Counter[str] = field(default_factory=Counter)  # by why
    failed: Counter[str] = field(default_factory=Counter)  # publish errors, by error

    @property
    def replayed_total(self) -> int:
        return sum(self.replayed.values())

    def render(self) -> str:
        verb = "would replay" if self.dry_run else "replayed"
        lines = [
            f"{self.read} dead letter(s) read, {self.matched} matching",
            f"{verb} {self.replayed_total}{_inline(self.replayed)}",
        ]
        if self.targets:
            lines.append("  to " + ", ".join(f"{t} {n}" for t, n in self.targets.most_common()))
        skipped = sum(self.skipped.values())
        lines.append(f"skipped {skipped}{_inline(self.skipped)}")
        if self.failed:
            lines.append(
                f"failed {sum(self.failed.values())}{_inline(self.failed)}: not recorded as "
                "replayed, so the next replay tries them again"
            )
        if self.dry_run:
            lines.append("dry run: nothing published")
        return "\n".join(lines)


def replay_dead_letters(
    settings: Settings,
    selection: Selection,
    *,
    dry_run: bool = False,
    again: bool = False,
    idle: float = DEFAULT_IDLE,
) -> ReplayReport:
    """Re-publish the selected dead letters to their source topic and partition.

    Letters recorded as replayed are skipped unless `again`. The letters are read in
    full before anything is published: a replayed record that fails again comes back
    to the dead-letter topic, and must not be picked up by this same run.
    """
    report = ReplayReport(dry_run=dry_run)
    replayed = set() if again else read_replayed(settings, idle)
    chosen: list[DeadLetter] = []
    for letter in read_dead_letters(settings, idle):
        report.read += 1
        if not selection.matches(letter):
            continue
        report.matched += 1
        if letter.id in replayed:
            report.skipped["already replayed"] += 1
        else:
            chosen.append(letter)
    if not chosen:
        return report
    if not dry_run:
        ensure_replayed_topic(settings)
    producer = KafkaProducer(
        bootstrap_servers=settings.bootstrap_servers,
        client_id=f"{settings.app_id}-dlq-replay",
        acks="all",
    )
    try:
        known: dict[str, set[int]] = {}

        def partitions(topic: str) -> set[int]:
            if topic not in known:
                known[topic] = set(producer.partitions_for(topic) or ())
            return known[topic]

        planned: list[tuple[DeadLetter, Target]] = []
        for letter in chosen:
            target = replay_target(letter, partitions)
            if isinstance(target, str):
                report.skipped[target] += 1
            else:
                planned.append((letter, target))
        for start in range(0, len(planned), REPLAY_CHUNK):
            chunk = planned[start : start + REPLAY_CHUNK]
            done = chunk if dry_run else _publish(producer, chunk, report)
            for letter, target in done:
                report.replayed[f"{letter.stage} / {letter.reason}"] += 1
                report.targets[target.topic] += 1
    finally:
        producer.close()
    return report


def _publish(
    producer: Any, chunk: Sequence[tuple[DeadLetter, Target]], report: ReplayReport
) -> list[tuple[DeadLetter, Target]]:
    """Publish a chunk, then record what the broker acknowledged as replayed."""
    sent = [
        (
            letter,
            target,
            producer.send(
                target.topic,
                key=letter.key,
                value=letter.value,
                partition=target.partition,
                headers=replay_headers(letter),
            ),
        )
        for letter, target in chunk
    ]
    producer.flush()
    done: list[tuple[DeadLetter, Target]] = []
    for letter, target, future in sent:
        try:
            future.get(timeout=30)
        except KafkaError as exc:
            report.failed[type(exc).__name__] += 1
            continue
        done.append((letter, target))
    now = _iso(datetime.now(UTC))
    for letter, target in done:
        marker = {
            "replayed_at": now,
            "topic": target.topic,
            "partition": target.partition,
            "attempt": letter.attempt + 1,
            "source": letter.source,
        }
        producer.send(REPLAYED_TOPIC, key=letter.id.encode(), value=orjson.dumps(marker))
    producer.flush()
    return done


def ensure_replayed_topic(settings: Settings) -> None:
    """Create the replayed-letters topic: one compacted partition, read whole by replays."""
    admin = KafkaAdminClient(
        bootstrap_servers=settings.bootstrap_servers,
        client_id=f"{settings.app_id}-dlq-admin",
        request_timeout_ms=10_000,
    )
    try:
        if REPLAYED_TOPIC in admin.list_topics():
            return
        spec = {
            "num_partitions": 1,
            "replication_factor": 1,
            "configs": {"cleanup.policy": "compact"},
        }
        response = admin.create_topics(
            {REPLAYED_TOPIC: spec}, raise_errors=False, wait_for_metadata=True
        )
        for result in response["topics"]:
            # Already-exists means another replay created it first, which is fine.
            if result["error_code"] not in (0, TopicAlreadyExistsError.errno):
                raise for_code(result["error_code"])(
                    f"creating topic {result['name']}: {result['error_message']}"
                )
    finally:
        admin.close()


# -- text --------------------------------------------------------------------------


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _one_line(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _excerpt(raw: bytes | None) -> str:
    if raw is None:
        return "(none)"
    shown = repr(raw[:EXCERPT_BYTES])
    return shown + (f"… ({len(raw)} bytes)" if len(raw) > EXCERPT_BYTES else "")


def _inline(counts: Counter[str]) -> str:
    if not counts:
        return ""
    return " (" + ", ".join(f"{k} {v}" for k, v in counts.most_common()) + ")"
