"""A batch's records are sent whatever the broker does meanwhile: a flush that gave up
would let faust's take_events ack and commit inputs whose outputs never left."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiokafka.errors import KafkaTimeoutError, NotLeaderForPartitionError

import streams.outbox
from omnicue.settings import Settings
from streams.app import create_app
from streams.outbox import Outbox
from tests.factories import ruleset
from tests.streams.conftest import CapturingSender


class RefusingSender(CapturingSender):
    """The broker refuses the first `refusals` sends, as during an outage."""

    def __init__(self, settings: Settings, refusals: list[Exception]) -> None:
        super().__init__(settings)
        self.refusals = refusals
        self.attempts = 0

    async def send_all(self, records: list[Any]) -> Any:
        self.attempts += 1
        if self.refusals:
            raise self.refusals.pop(0)
        return await super().send_all(records)


async def test_a_flush_sends_again_until_the_broker_takes_the_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(streams.outbox, "FLUSH_RETRY_FIRST", 0.01)
    settings = Settings(store="memory://", data_dir=tmp_path)
    topic = create_app(settings, ruleset()).topics.decisions
    sender = RefusingSender(settings, [KafkaTimeoutError(), NotLeaderForPartitionError()])
    outbox = Outbox(sender)
    outbox.add(topic, b"c-1", b"one")
    outbox.add(topic, b"c-2", b"two")

    landed = await outbox.flush()

    assert sender.attempts == 3 and len(landed) == 2
    assert [value for _, _, value, _, _ in sender.records] == [b"one", b"two"]
    assert "could not send 2 records" in caplog.text
