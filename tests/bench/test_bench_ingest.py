"""bench.ingest's workload is what the ingest accepts, every message of it."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson

from bench.ingest import build_bodies
from omnicue.ingest import BATCH_LIMIT, map_segment


def test_every_benchmark_message_is_accepted() -> None:
    bodies = build_bodies(250, 100, 20)
    assert len(bodies) == 3
    ids = set()
    for body in bodies:
        assert len(body) < BATCH_LIMIT
        batch = orjson.loads(body)["batch"]
        outcome = map_segment(batch, "web", datetime.now(UTC))
        assert outcome.errors == []
        ids |= {message["messageId"] for message in batch}
    assert len(ids) == 250
