from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer
from kafka.errors import KafkaTimeoutError, MessageSizeTooLargeError
from kafka.future import Future
from typer.testing import CliRunner

from omnicue.cli import app
from omnicue.producer import (
    EventProducer,
    InvalidEvent,
    RawEvent,
    publish_file,
    publish_lines,
    validate_event,
)
from omnicue.services import TansuBroker
from omnicue.settings import Settings
from omnicue.topics import create_topics
from schemas.events import customer_key, event_to_json, parse_event
from schemas.topics import EVENTS


def _event(n: int, tag: str = "t", **fields: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "event_id": f"{tag}-e{n}",
        "occurred_at": "2024-05-01T09:00:00+09:00",
        "channel": "web",
        "customer_id": f"{tag}-c{n}",
        "type": "checkout.started",
        "properties": {"cart_id": f"cart-{n}"},
    }
    event.update(fields)
    return event


def _line(event: dict[str, Any]) -> str:
    return json.dumps(event) + "\n"


class MemorySink:
    """Stands in for the Kafka transport only; validation is publish_lines' own."""

    def __init__(
        self,
        fail: dict[int, Exception] | None = None,
        raise_on: dict[int, Exception] | None = None,
    ) -> None:
        self.sent: list[RawEvent] = []
        self.flushes = 0
        # By 0-based send number: a delivery that fails later, or a send() that raises.
        self.fail = fail or {}
        self.raise_on = raise_on or {}
        self._calls = 0

    def send(self, event: RawEvent) -> Future:
        call, self._calls = self._calls, self._calls + 1
        if call in self.raise_on:
            raise self.raise_on[call]
        self.sent.append(event)
        if call in self.fail:
            return Future().failure(self.fail[call])
        return Future().success(None)

    def flush(self, timeout: float | None = None) -> None:
        self.flushes += 1


# -- line handling, no broker ----------------------------------------------------------


def test_invalid_lines_are_reported_with_their_line_numbers() -> None:
    no_cart = _event(4)
    no_cart["properties"] = {}
    lines = [
        _line(_event(1)),
        "\n",
        "{not json\n",
        _line(no_cart),
        _line(_event(5, occurred_at="2024-05-01T09:00:00")),  # naive timestamp
        "   \n",
        _line(_event(7)),
    ]
    sink = MemorySink()

    report = publish_lines(sink, lines)

    assert report.sent == 2
    assert report.invalid == 3
    assert report.failed == 0
    assert [number for number, _ in report.errors] == [3, 4, 5]
    assert report.errors[0][1].startswith("(event): Invalid JSON")
    assert report.errors[1][1] == "checkout.started.properties.cart_id: Field required"
    assert report.errors[2][1] == "checkout.started.occurred_at: Input should have timezone info"
    # Validated models, not the raw lines, reach the transport.
    assert [validate_event(event).event_id for event in sink.sent] == ["t-e1", "t-e7"]
    assert all(not isinstance(event, str | bytes | dict) for event in sink.sent)
    assert sink.flushes == 1


def test_bytes_lines_bad_utf8_and_bom() -> None:
    lines = [
        b"\xef\xbb\xbf" + _line(_event(1)).encode(),  # stripped: editors add it
        b'{"event_id": "\xff"}\n',
        _line(_event(3)).encode(),
    ]
    report = publish_lines(MemorySink(), lines)
    assert report.sent == 2
    assert report.errors == [(2, "(event): not valid UTF-8 at byte 15")]


def test_delivery_failures_count_as_errors() -> None:
    sink = MemorySink(
        fail={1: KafkaTimeoutError("batch expired")},
        raise_on={2: MessageSizeTooLargeError("too big")},
    )
    lines = [_line(_event(n)) for n in range(1, 5)]

    report = publish_lines(sink, lines)

    assert report.sent == 2
    assert report.invalid == 0
    assert report.failed == 2
    assert report.errors == [
        (2, "not delivered: KafkaTimeoutError: batch expired"),
        (3, "not sent: [Error 10] MessageSizeTooLargeError: too big"),
    ]


def test_a_broker_error_on_send_stops_the_run() -> None:
    sink = MemorySink(raise_on={1: KafkaTimeoutError("no metadata")})
    report = publish_lines(sink, [_line(_event(n)) for n in range(1, 5)])
    assert report.sent == 1
    assert [number for number, _ in report.errors] == [2]
    assert "stopped" in report.errors[0][1]
    assert sink.flushes == 1  # what was sent before still gets delivered


def test_validate_event_accepts_every_form_and_normalizes() -> None:
    raw = _event(1, anonymous_id="a1")
    del raw["customer_id"]
    text = json.dumps(raw)
    forms: list[RawEvent] = [raw, text, text.encode(), parse_event(text)]
    for form in forms:
        event = validate_event(form)
        assert customer_key(event) == "anon:a1"
        assert json.loads(event_to_json(event))["occurred_at"] == "2024-05-01T00:00:00Z"


def test_invalid_event_message_names_the_field() -> None:
    with pytest.raises(InvalidEvent, match=r"^checkout\.started\.properties\.cart_id: Field req"):
        validate_event(_event(1, properties={}))
    with pytest.raises(InvalidEvent, match="customer_id or anonymous_id is required"):
        validate_event(_event(1, customer_id=None))
    assert issubclass(InvalidEvent, ValueError)


def test_unreadable_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The file is opened before any connection is made, so no broker is needed.
    missing = tmp_path / "missing.jsonl"
    assert publish_file(Settings(), str(missing)) == 2
    assert publish_file(Settings(), str(tmp_path)) == 2
    err = capsys.readouterr().err
    assert f"{missing}: cannot read: No such file or directory" in err


# -- against the broker ----------------------------------------------------------------


def _settings(broker: TansuBroker) -> Settings:
    # No settings_factory: it would start Redis, which the producer doesn't use.
    return Settings(broker=broker.url, dev_broker=True, partitions=4)


def _consume_ours(broker: TansuBroker, tag: str, expected: int) -> list[tuple[bytes, bytes]]:
    """Records of this test (the session broker holds others'), read by consuming."""
    consumer = KafkaConsumer(
        EVENTS,
        bootstrap_servers=broker.bootstrap_server,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    ours: list[tuple[bytes, bytes]] = []
    try:
        deadline = time.monotonic() + 15
        # Keep polling a little after the expected count to catch duplicates.
        settle: float | None = None
        while time.monotonic() < deadline and (settle is None or time.monotonic() < settle):
            for records in consumer.poll(timeout_ms=200).values():
                for record in records:
                    if tag in record.value.decode():
                        ours.append((record.key, record.value))
            if settle is None and len(ours) >= expected:
                settle = time.monotonic() + 1.0
    finally:
        consumer.close()
    return ours


def test_publish_file_sends_only_valid_events(
    broker: TansuBroker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = _settings(broker)
    create_topics(settings)
    tag = uuid.uuid4().hex
    anonymous = _event(3, tag)
    del anonymous["customer_id"]
    anonymous["anonymous_id"] = f"{tag}-visitor"
    good = [_event(1, tag), _event(2, tag, channel="app"), anonymous]
    bad = _event(4, tag, properties={"product_id": "p"})
    source = tmp_path / "events.jsonl"
    source.write_text(_line(good[0]) + _line(good[1]) + _line(bad) + "\n" + _line(good[2]))

    assert publish_file(settings, str(source)) == 1

    out, err = capsys.readouterr()
    assert out == "published 3 events, 1 invalid\n"
    assert err == f"{source}:3: checkout.started.properties.cart_id: Field required\n"
    records = _consume_ours(broker, tag, expected=3)
    expected = {
        customer_key(event).encode(): event_to_json(event)
        for event in (validate_event(raw) for raw in good)
    }
    assert len(records) == 3
    assert dict(records) == expected
    assert {key.decode() for key, _ in records} == {
        f"{tag}-c1",
        f"{tag}-c2",
        f"anon:{tag}-visitor",
    }
    for key, value in records:
        assert customer_key(parse_event(value)) == key.decode()


def test_event_producer_send(broker: TansuBroker) -> None:
    settings = _settings(broker)
    create_topics(settings)
    tag = uuid.uuid4().hex
    with EventProducer(settings) as producer:
        with pytest.raises(InvalidEvent, match="cart_id: Field required"):
            producer.send(_event(9, tag, properties={}))
        metadata = producer.send(_event(1, tag)).get(timeout=10)
        producer.flush(timeout=10)
    assert metadata.topic == EVENTS
    [(key, value)] = _consume_ours(broker, tag, expected=1)
    assert key == f"{tag}-c1".encode()
    assert parse_event(value).event_id == f"{tag}-e1"


def test_cli_publish_reads_stdin_and_exits_1_on_a_bad_line(broker: TansuBroker) -> None:
    create_topics(_settings(broker))
    tag = uuid.uuid4().hex
    stdin = _line(_event(1, tag)) + '{"type": "identify"}\n'

    result = CliRunner().invoke(
        app,
        ["publish", "-"],
        input=stdin,
        env={"OMNICUE_BROKER": broker.url, "OMNICUE_DEV_BROKER": "true"},
    )

    assert result.exit_code == 1, result.output
    assert result.stdout == "published 1 events, 1 invalid\n"
    assert result.stderr.startswith("<stdin>:2: identify.event_id: Field required")
