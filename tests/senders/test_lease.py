"""The lease in a real Redis: acquire, held, sent, expiry, release by the holder only."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import redis
import redis.asyncio as aioredis

from omnicue.services import RedisServer, free_port
from senders.lease import LEGACY_SENT, Leases, lease_key, new_token


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


def _id() -> str:
    # Redis is shared by the whole session: a fresh id per test.
    return f"act_{uuid.uuid4().hex}"


async def test_first_acquire_wins_a_second_waits_and_sent_is_final(
    client: aioredis.Redis,
) -> None:
    leases = Leases(client, lease_ms=5000, sent_ttl=60)
    action_id, first, second = _id(), new_token(), new_token()

    assert await leases.acquire(action_id, first) == "acquired"
    assert 0 < await client.pttl(lease_key(action_id)) <= 5000
    # Another sender, or another task of the same one: held, whatever the token.
    assert await leases.acquire(action_id, second) == "held"
    assert await leases.acquire(action_id, first) == "held"

    await leases.mark_sent(action_id)
    assert await leases.acquire(action_id, second) == "sent"
    assert 0 < await client.ttl(lease_key(action_id)) <= 60


async def test_an_expired_lease_is_taken_again(client: aioredis.Redis) -> None:
    leases = Leases(client, lease_ms=200, sent_ttl=60)
    action_id = _id()

    assert await leases.acquire(action_id, new_token()) == "acquired"
    await asyncio.sleep(0.3)  # the holder died: nobody released or marked it

    assert await leases.acquire(action_id, new_token()) == "acquired"


async def test_only_the_holder_releases(client: aioredis.Redis) -> None:
    leases = Leases(client, lease_ms=200, sent_ttl=60)
    action_id, old, new = _id(), new_token(), new_token()
    assert await leases.acquire(action_id, old) == "acquired"
    await asyncio.sleep(0.3)
    assert await leases.acquire(action_id, new) == "acquired"

    # The first holder comes back late: it must not free the second one's lease.
    assert not await leases.release(action_id, old)
    assert await leases.acquire(action_id, new_token()) == "held"
    assert await leases.release(action_id, new)
    assert await leases.state(action_id) is None


async def test_the_claim_then_send_marks_still_mean_sent(client: aioredis.Redis) -> None:
    action_id = _id()
    await client.set(lease_key(action_id), LEGACY_SENT, ex=60)

    assert await Leases(client, lease_ms=1000, sent_ttl=60).acquire(action_id, new_token()) == (
        "sent"
    )


async def test_many_racing_senders_one_acquires(client: aioredis.Redis) -> None:
    leases = Leases(client, lease_ms=5000, sent_ttl=60)
    action_id = _id()

    results = await asyncio.gather(*(leases.acquire(action_id, new_token()) for _ in range(50)))

    assert sorted(results) == ["acquired"] + ["held"] * 49


async def test_concurrent_calls_go_to_redis_as_one_batch(client: aioredis.Redis) -> None:
    leases = Leases(client, lease_ms=5000, sent_ttl=60)
    ids = [_id() for _ in range(50)]
    await leases.acquire(_id(), new_token())  # loads the scripts
    await leases.mark_sent(_id())
    before = (await client.info("commandstats"))["cmdstat_evalsha"]["calls"]

    results = await asyncio.gather(*(leases.acquire(i, new_token()) for i in ids))
    await asyncio.gather(*(leases.mark_sent(i) for i in ids))

    assert results == ["acquired"] * 50
    # One call for the 50 acquires, one for the 50 marks.
    assert (await client.info("commandstats"))["cmdstat_evalsha"]["calls"] == before + 2
    assert set(await client.mget([lease_key(i) for i in ids])) == {b"sent"}


async def test_every_caller_of_a_failed_batch_sees_the_error() -> None:
    dead = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0")
    leases = Leases(dead, lease_ms=1000, sent_ttl=60)

    results = await asyncio.gather(
        *(leases.acquire(_id(), new_token()) for _ in range(3)), return_exceptions=True
    )

    assert all(isinstance(r, redis.ConnectionError) for r in results), results
    await dead.aclose()
