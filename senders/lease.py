"""The per-action delivery record in Redis: a short `sending` lease, then `sent`.

One key per action id holds one of:

- `sending:<token>` with a short TTL (the lease): one sender is calling the provider
  with this action now. The token is fresh per attempt, so even two tasks of one
  process never both hold it.
- `sent` (or `1`, written by the older claim-then-send sender) for the claim TTL: the
  provider accepted it; a redelivery is a duplicate.

A sender that dies while holding the lease leaves it to expire, and the next sender
then calls the provider again *with the same idempotency key*. That is the point of
the lease over claim-then-send: a crash costs at most a second provider call, never
the message.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Awaitable, Callable
from typing import Generic, Literal, TypeVar

import redis.asyncio as aioredis

KEY_PREFIX = "omnicue:sent:"
SENT = b"sent"
# The value the claim-then-send sender wrote: it meant sent, so it still does.
LEGACY_SENT = b"1"

Acquired = Literal["acquired", "sent", "held"]
Req = TypeVar("Req")
Res = TypeVar("Res")

# Atomic check-and-take, for every key of a batch: GET then SET would let two senders
# both see "free".
_ACQUIRE = """
local results = {}
for i, key in ipairs(KEYS) do
  local value = redis.call('GET', key)
  if value == false then
    redis.call('SET', key, ARGV[i + 1], 'PX', ARGV[1])
    results[i] = 'acquired'
  elseif value == 'sent' or value == '1' then
    results[i] = 'sent'
  else
    results[i] = 'held'
  end
end
return results
"""

# Every key of a batch marked sent in one command (a pipeline of SETs costs the client
# as much per key as separate calls, less only the round trips).
_MARK_SENT = """
for _, key in ipairs(KEYS) do
  redis.call('SET', key, 'sent', 'EX', ARGV[1])
end
return #KEYS
"""

# Only the lease's holder may give it back: an expired holder must not delete the
# lease a newer sender took since.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def lease_key(action_id: str) -> str:
    return f"{KEY_PREFIX}{action_id}"


# Unique per process (random) and per attempt (a counter): cheaper than a uuid each.
_PROCESS = uuid.uuid4().hex[:16]
_ATTEMPTS = itertools.count()


def new_token() -> bytes:
    return f"sending:{_PROCESS}:{next(_ATTEMPTS)}".encode()


class _Coalesced(Generic[Req, Res]):
    """Calls made in the same event-loop pass go to Redis as one batch: with dozens of
    actions in flight, one round trip for all of them instead of one each."""

    def __init__(self, flush: Callable[[list[Req]], Awaitable[list[Res]]]) -> None:
        self._flush = flush
        self._pending: list[tuple[Req, asyncio.Future[Res]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def __call__(self, request: Req) -> Res:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Res] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._start)
        self._pending.append((request, future))
        return await future

    def _start(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.create_task(self._run(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[Req, asyncio.Future[Res]]]) -> None:
        try:
            results = await self._flush([request for request, _ in batch])
        except BaseException as exc:  # every caller sees the batch's error (RedisError)
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():  # its caller may have been cancelled meanwhile
                future.set_result(result)


class Leases:
    """The lease operations on one Redis; every call may raise `redis.RedisError`."""

    def __init__(self, client: aioredis.Redis, *, lease_ms: int, sent_ttl: int) -> None:
        if lease_ms <= 0 or sent_ttl <= 0:
            raise ValueError("lease_ms and sent_ttl must be positive")
        self._client = client
        self.lease_ms = lease_ms
        self.sent_ttl = sent_ttl
        self._acquire_script = client.register_script(_ACQUIRE)
        self._mark_script = client.register_script(_MARK_SENT)
        self._release = client.register_script(_RELEASE)
        self._acquire = _Coalesced(self._acquire_many)
        self._mark_sent = _Coalesced(self._mark_many)

    async def acquire(self, action_id: str, token: bytes) -> Acquired:
        return await self._acquire((action_id, token))

    async def mark_sent(self, action_id: str) -> None:
        # Unconditional: whoever holds the lease now, the provider has accepted it.
        await self._mark_sent(action_id)

    async def release(self, action_id: str, token: bytes) -> bool:
        """Give the lease back (the action was not sent: it retries or failed)."""
        return bool(await self._release(keys=[lease_key(action_id)], args=[token]))

    async def state(self, action_id: str) -> bytes | None:
        value = await self._client.get(lease_key(action_id))
        return value.encode() if isinstance(value, str) else value

    async def _acquire_many(self, requests: list[tuple[str, bytes]]) -> list[Acquired]:
        results = await self._acquire_script(
            keys=[lease_key(action_id) for action_id, _ in requests],
            args=[self.lease_ms, *(token for _, token in requests)],
        )
        acquired: list[Acquired] = []
        for result in results:
            text = result.decode() if isinstance(result, bytes) else str(result)
            if text not in ("acquired", "sent", "held"):
                raise RuntimeError(f"unexpected lease script result {text!r}")
            acquired.append(text)  # type: ignore[arg-type]
        return acquired

    async def _mark_many(self, action_ids: list[str]) -> list[None]:
        await self._mark_script(
            keys=[lease_key(action_id) for action_id in action_ids], args=[self.sent_ttl]
        )
        return [None] * len(action_ids)


__all__ = ["KEY_PREFIX", "LEGACY_SENT", "SENT", "Acquired", "Leases", "lease_key", "new_token"]
