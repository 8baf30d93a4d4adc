"""The Faust shell tested in-process: agents through `agent.test_context()`, the
memory store, an explicit clock, and the records the pipeline emits captured at its
own producer. End-to-end tests (tests/e2e) run the same code against a real broker."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka.structs import RecordMetadata, TopicPartition

from omnicue.settings import Settings
from schemas import topics
from streams.app import Pipeline, create_app
from streams.outbox import RecordSender
from streams.progress import Progress
from tests.factories import T0, ruleset


class CapturingSender(RecordSender):
    """The pipeline's record producer, keeping the records instead of sending them."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.records: list[tuple[str, bytes | None, bytes | None, int | None, Any]] = []
        self.offsets: dict[tuple[str, int], int] = {}

    async def on_start(self) -> None:
        pass

    async def on_stop(self) -> None:
        pass

    async def send_all(self, records: list[Any]) -> list[RecordMetadata]:
        # Where each record would have landed: offsets counted per topic partition
        # (-1 for a record the producer would have partitioned itself).
        delivered = []
        for topic, _, _, partition, _ in records:
            at = (topic, -1 if partition is None else partition)
            offset = self.offsets[at] = self.offsets.get(at, -1) + 1
            delivered.append(
                RecordMetadata(topic, at[1], TopicPartition(*at), offset, -1, 0, -1)
            )
        self.records.extend(records)
        return delivered


@dataclass
class Shell:
    pipeline: Pipeline
    sender: CapturingSender
    now: list[datetime] = field(default_factory=lambda: [T0])

    def on(self, topic: str) -> list[dict[str, Any]]:
        return [
            orjson.loads(value)
            for name, _, value, _, _ in self.sender.records
            if name == topic and value is not None
        ]

    def headers(self, topic: str) -> list[dict[str, bytes]]:
        return [dict(h or []) for name, _, _, _, h in self.sender.records if name == topic]

    def keys(self, topic: str) -> list[bytes | None]:
        return [key for name, key, _, _, _ in self.sender.records if name == topic]

    def sent(self, topic: str) -> list[tuple[bytes | None, bytes]]:
        """(key, value) of what was sent to `topic`, in order."""
        return [(key, value) for name, key, value, _, _ in self.sender.records if name == topic]


def caught_up_progress(lateness: timedelta = timedelta(0)) -> Progress:
    return Progress(
        events_topic=topics.EVENTS,
        inputs_topic=topics.CUSTOMER_INPUTS,
        lateness=lateness,
        highwater=lambda tp: 0,
        assignment=lambda: (),
        committed=lambda tp: None,
    )


@pytest.fixture
async def shell(tmp_path: Path) -> AsyncIterator[Shell]:
    settings = Settings(store="memory://", data_dir=tmp_path / "data", batch_within=0.01)
    clock: list[datetime] = [T0]
    pipeline = create_app(settings, ruleset(), clock=lambda: clock[0])
    # No consumer under `test_context()`: the shell has always handled everything
    # there is (tests of catching up set their own).
    pipeline.progress = caught_up_progress()
    sender = CapturingSender(settings)
    pipeline.sender = sender
    pipeline.app.finalize()
    yield Shell(pipeline, sender, clock)

