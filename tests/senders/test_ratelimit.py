"""The shared token bucket in a real Redis: N senders together keep the channel's rate,
and a 429 halves it once per overload, then it recovers additively."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from omnicue.services import RedisServer
from senders.ratelimit import SharedRateLimit, parse_rate


@pytest.fixture
async def clients(redis_server: RedisServer) -> AsyncIterator[list[aioredis.Redis]]:
    # One client each, as separate sender processes have.
    clients = [aioredis.Redis.from_url(redis_server.url) for _ in range(3)]
    yield clients
    for client in clients:
        await client.aclose()


def _channel() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


async def test_three_senders_share_one_bucket(clients: list[aioredis.Redis]) -> None:
    channel, rate = _channel(), 20.0
    limits = [SharedRateLimit(client, channel, rate) for client in clients]

    waits = sorted(
        await asyncio.gather(*(limit.take() for limit in limits for _ in range(30)))
    )

    # 90 sends at 20/s: reservations spread over ~4.4 s, whichever process asked.
    burst = 2  # a tenth of a second's tokens
    for t in (0.0, 0.5, 1.0, 2.0, 4.0):
        assert sum(1 for w in waits if w <= t) <= burst + rate * t + 1e-6, t
    assert waits[-1] >= (90 - burst) / rate - 0.2


async def test_a_429_halves_the_rate_once_then_it_recovers(
    clients: list[aioredis.Redis],
) -> None:
    channel = _channel()
    first, second = (SharedRateLimit(client, channel, 100.0) for client in clients[:2])
    await first.take()

    assert await first.cut() == 50.0
    # The other in-flight requests' 429s are the same overload: no second halving.
    assert await second.cut() == 50.0
    await asyncio.sleep(1.05)
    assert await second.cut() == 25.0

    # Additive recovery: 5% of the configured rate per second, shared by all.
    await asyncio.sleep(1.0)
    await first.take()
    assert 29.0 <= first.current <= 31.0
    await second.take()
    assert second.current >= first.current


async def test_the_rate_never_falls_to_nothing(clients: list[aioredis.Redis]) -> None:
    limit = SharedRateLimit(clients[0], _channel(), 1.0)
    for _ in range(3):
        await limit.cut()
        await clients[0].hdel(f"omnicue:rate:{limit.channel}", "cut_at")
    assert limit.current == 0.125
    await limit.cut()
    assert limit.current == 0.1


def test_parse_rate() -> None:
    assert parse_rate("50/s") == 50.0
    assert parse_rate("0.5/s") == 0.5
    assert parse_rate("12") == 12.0
    for bad in ("fast", "0/s", "-1"):
        with pytest.raises(ValueError):
            parse_rate(bad)
