"""IngestClient (what the simulator sends web and app traffic with) against the
ingest's handlers on a real port, with an in-memory publisher."""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Iterator
from datetime import UTC, datetime

import orjson
import pytest
from aiohttp import web

from omnicue.ingest import build_app
from omnicue.ingest_client import IngestClient
from omnicue.services import free_port
from omnicue.simulator import JourneyPlanner
from schemas.events import event_adapter
from tests.omnicue.test_ingest import MemoryPublisher


@pytest.fixture
def served() -> Iterator[tuple[str, MemoryPublisher]]:
    publisher = MemoryPublisher()
    port = free_port()
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(build_app({"dev": "web"}, publisher))
    ready = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    ready.wait(10)
    yield f"http://127.0.0.1:{port}", publisher
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def test_simulated_events_arrive_as_they_were(served: tuple[str, MemoryPublisher]) -> None:
    url, publisher = served
    planner = JourneyPlanner(random.Random(11), 40)
    events = [e for _ in range(60) for e in planner.next_journey(datetime.now(UTC))]
    assert len(events) > 100  # more than one request
    result = IngestClient(url, "dev").send(events)
    assert (result.accepted, result.failed, result.errors) == (len(events), 0, [])
    published = [event_adapter.validate_json(value) for _, value in publisher.records]
    assert published == [event_adapter.validate_python(e) for e in events]


def test_rejections_and_a_bad_key_are_counted(served: tuple[str, MemoryPublisher]) -> None:
    url, publisher = served
    good = JourneyPlanner(random.Random(2), 5).next_journey(datetime.now(UTC))[0]
    bad = {**good, "event_id": "bad", "type": "cart.item_added", "properties": {}}
    result = IngestClient(url, "dev").send([good, bad])
    assert (result.accepted, result.failed) == (1, 1)
    assert "cart_id" in result.errors[0]
    result = IngestClient(url, "nope").send([good])
    assert (result.accepted, result.failed) == (0, 1)
    assert "unknown write key" in result.errors[0]
    assert len(publisher.records) == 1
    assert orjson.loads(publisher.records[0][1])["event_id"] == good["event_id"]
