"""Stage 2 writes a batch's states only once its outputs have reached the broker: a
worker killed in between then reprocesses inputs that its state does not record yet,
and decides them again, instead of finding them "already decided" with nothing sent
(issue 9: cart reminders lost across kill -9)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from omnicue.settings import Settings
from schemas import topics
from streams.app import create_app
from streams.inputs import encode_timer
from tests.factories import T0, ruleset
from tests.streams.conftest import CapturingSender, Shell, caught_up_progress
from tests.streams.test_customers import C1, CART_START, settle, state_of


class GatedSender(CapturingSender):
    """Holds every batch's records until the gate opens: a flush still in flight."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.gate = asyncio.Event()

    async def send_all(self, records: list[Any]) -> Any:
        await self.gate.wait()
        return await super().send_all(records)


@pytest.fixture
async def gated(tmp_path: Path) -> AsyncIterator[Shell]:
    settings = Settings(store="memory://", data_dir=tmp_path / "data", batch_within=0.01)
    clock: list[datetime] = [T0]
    pipeline = create_app(settings, ruleset(), clock=lambda: clock[0])
    pipeline.progress = caught_up_progress()
    sender = GatedSender(settings)
    pipeline.sender = sender
    pipeline.app.finalize()
    yield Shell(pipeline, sender, clock)


async def test_no_state_is_written_before_the_batch_outputs_are_sent(gated: Shell) -> None:
    sender = gated.sender
    assert isinstance(sender, GatedSender)
    agent = gated.pipeline.app.agents["omnicue.customers"]
    async with agent.test_context() as customers:
        sender.gate.set()
        for value in CART_START:
            await customers.put(value, key=C1)
        await settle()
        journey = state_of(gated).journeys["cart_abandonment|K"]
        assert journey.next_step == 1

        sender.gate.clear()
        gated.now[0] = journey.due_at + timedelta(seconds=1)
        await customers.put(encode_timer(journey.due_at), key=C1)
        await settle()
        # Step 1 is decided and its action on its way: a kill now must leave a state
        # that has not fired it, so that the timer, processed again, fires it.
        assert state_of(gated).journeys["cart_abandonment|K"].next_step == 1
        assert gated.on(topics.ACTIONS["email"]) == []
        sender.gate.set()
        await settle()
    assert state_of(gated).journeys["cart_abandonment|K"].next_step == 2
    assert [a["step"] for a in gated.on(topics.ACTIONS["email"])] == [1]
