"""Publish events to `omnicue.events`: validated against the contract, keyed by customer.

Validation happens here, before Kafka, so a producer learns about a bad event at once
(with the field that is wrong) instead of finding it later in the dead-letter topic.
What goes on the wire is the *validated* event re-serialized, so it is normalized
(timestamps in UTC, no nulls) the same way for every producer.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import IO, Any, Protocol, Self

from kafka import KafkaProducer
from kafka.errors import KafkaError, KafkaTimeoutError, MessageSizeTooLargeError
from kafka.future import Future
from pydantic import BaseModel, ValidationError

from omnicue.settings import Settings
from schemas.events import (
    Event,
    customer_key,
    describe_validation_error,
    event_adapter,
    event_from_dict,
    event_to_json,
    parse_event,
)
from schemas.topics import EVENTS

RawEvent = Event | Mapping[str, Any] | bytes | str

# Delivery results are collected every this many sends, so a long file does not keep
# one future per line alive until the end.
_SWEEP_EVERY = 1000


class InvalidEvent(ValueError):
    """The event breaks the contract; the message names each bad field."""


def validate_event(event: RawEvent) -> Event:
    """The contract-checked event for a model, a dict, or one JSON document."""
    try:
        if isinstance(event, BaseModel):
            # Still checked: it must be one of the contract's event classes, not any model.
            return event_adapter.validate_python(event)
        if isinstance(event, Mapping):
            return event_from_dict(dict(event))
        if isinstance(event, bytes | str):
            return parse_event(event)
    except ValidationError as exc:
        raise InvalidEvent(describe_validation_error(exc)) from exc
    raise TypeError(f"cannot publish {type(event).__name__}: expected an event, dict or JSON")


class EventProducer:
    """An idempotent Kafka producer for `omnicue.events`; use it as a context manager."""

    topic = EVENTS

    def __init__(self, settings: Settings, **config: Any) -> None:
        """`config` overrides KafkaProducer settings (e.g. `max_block_ms` in tests)."""
        options: dict[str, Any] = {
            "bootstrap_servers": settings.bootstrap_servers,
            "client_id": f"{settings.app_id}-producer",
            # Both are kafka-python 3 defaults; spelled out because the pipeline's
            # per-customer ordering relies on them: retries must neither duplicate nor
            # reorder events, and an acknowledged event must survive a broker failover.
            # Checked against the dev broker (Tansu 0.6.0): it hands out producer ids
            # and accepts idempotent batches, so it needs no non-idempotent fallback.
            "enable_idempotence": True,
            "acks": "all",
            # A few ms of batching costs nothing noticeable for a trigger engine and
            # saves a request per event when a file or a busy app publishes in bursts.
            "linger_ms": 5,
        }
        options.update(config)
        self._producer = KafkaProducer(**options)

    def send(self, event: RawEvent) -> Future:
        """Validate and queue one event; the future resolves when the broker acknowledges.

        Raises `InvalidEvent` (nothing is sent) if the event breaks the contract.
        """
        valid = validate_event(event)
        return self._producer.send(
            self.topic,
            key=customer_key(valid).encode("utf-8"),
            value=event_to_json(valid),
        )

    def flush(self, timeout: float | None = None) -> None:
        """Wait until everything queued is acknowledged or failed (KafkaTimeoutError)."""
        self._producer.flush(timeout=timeout)

    def close(self, timeout: float | None = None) -> None:
        """Deliver what is queued, then disconnect."""
        self._producer.close(timeout=timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class EventSink(Protocol):
    """What `publish_lines` needs: `EventProducer`, or an in-memory stand-in in tests."""

    def send(self, event: RawEvent) -> Future: ...

    def flush(self, timeout: float | None = None) -> None: ...


@dataclass
class PublishReport:
    sent: int = 0
    """Events the broker acknowledged."""
    invalid: int = 0
    """Lines that broke the contract (or were not JSON)."""
    errors: list[tuple[int, str]] = field(default_factory=list)
    """(1-based line number, message) for invalid lines and failed deliveries, in order."""

    @property
    def failed(self) -> int:
        return len(self.errors) - self.invalid

    @property
    def ok(self) -> bool:
        return not self.errors


def publish_lines(
    producer: EventSink, lines: Iterable[str | bytes], *, flush_timeout: float | None = None
) -> PublishReport:
    """Publish JSONL, one event per line; blank lines are skipped.

    Waits for delivery at the end, so the report counts acknowledged events. A send
    error other than an oversized record (e.g. the broker stayed unreachable for
    `max_block_ms`) stops the run: every later line would wait just as long.
    """
    report = PublishReport()
    pending: list[tuple[int, Future]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            event = validate_event(_decode(line, first=number == 1))
            pending.append((number, producer.send(event)))
        except InvalidEvent as exc:
            report.invalid += 1
            report.errors.append((number, str(exc)))
            continue
        except MessageSizeTooLargeError as exc:
            report.errors.append((number, f"not sent: {exc}"))
            continue
        except KafkaError as exc:
            report.errors.append((number, f"not sent: {exc}; stopped, later lines not read"))
            break
        if len(pending) >= _SWEEP_EVERY:
            pending = _sweep(pending, report, final=False)
    try:
        producer.flush(timeout=flush_timeout)
    except KafkaTimeoutError:
        pass  # the final sweep reports every event that is still undelivered
    _sweep(pending, report, final=True)
    report.errors.sort(key=lambda error: error[0])
    return report


def _decode(line: str | bytes, *, first: bool) -> str:
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            # The JSON parser would only say "expected value at column 1" here.
            raise InvalidEvent(f"(event): not valid UTF-8 at byte {exc.start + 1}") from exc
    # Editors on Windows start UTF-8 files with a byte order mark; JSON forbids it.
    return line.removeprefix("\ufeff") if first else line


def _sweep(
    pending: list[tuple[int, Future]], report: PublishReport, *, final: bool
) -> list[tuple[int, Future]]:
    """Count finished deliveries into `report`; returns the unfinished ones."""
    unfinished = []
    for number, future in pending:
        if not future.is_done:
            if final:
                report.errors.append((number, "not delivered: timed out waiting for the broker"))
            else:
                unfinished.append((number, future))
        elif future.failed():
            report.errors.append((number, f"not delivered: {future.exception}"))
        else:
            report.sent += 1
    return unfinished


def publish_file(settings: Settings, source: str) -> int:
    """`omnicue publish`: publish a JSONL file (`-` for stdin), report bad lines.

    Per-line errors go to stderr as `file:line: message`, the summary to stdout.
    Returns 0 if every line was published, 1 if any was invalid or not delivered,
    2 if the input could not be read.
    """
    name = "<stdin>" if source == "-" else source
    stream: IO[bytes]
    try:
        # Bytes, decoded per line: one line of bad UTF-8 is then one invalid line
        # rather than an exception that ends the run halfway through the file.
        stream = sys.stdin.buffer if source == "-" else open(source, "rb")
    except OSError as exc:
        print(f"{name}: cannot read: {exc.strerror or exc}", file=sys.stderr)
        return 2
    read_errors: list[OSError] = []
    try:
        with EventProducer(settings) as producer:
            report = publish_lines(producer, _read_lines(stream, read_errors))
    except KafkaError as exc:
        print(f"{name}: cannot publish to {settings.broker}: {exc}", file=sys.stderr)
        return 1
    finally:
        if source != "-":
            stream.close()
    for number, message in report.errors:
        print(f"{name}:{number}: {message}", file=sys.stderr)
    for error in read_errors:
        print(f"{name}: read failed: {error.strerror or error}", file=sys.stderr)
    summary = f"published {report.sent} events, {report.invalid} invalid"
    if report.failed:
        summary += f", {report.failed} failed"
    print(summary)
    if read_errors:
        return 2
    return 0 if report.ok else 1


def _read_lines(stream: IO[bytes], errors: list[OSError]) -> Iterator[bytes]:
    # A read error ends the input like EOF would, so what was already sent still gets
    # flushed and reported; the caller turns the recorded error into exit code 2.
    try:
        yield from stream
    except OSError as exc:
        errors.append(exc)
