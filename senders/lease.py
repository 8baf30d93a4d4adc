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

import uuid
from typing import Literal

import redis.asyncio as aioredis

KEY_PREFIX = "omnicue:sent:"
SENT = b"sent"
# The value the claim-then-send sender wrote: it meant sent, so it still does.
LEGACY_SENT = b"1"

Acquired = Literal["acquired", "sent", "held"]

# Atomic check-and-take: GET then SET would let two senders both see "free".
_ACQUIRE = """
local value = redis.call('GET', KEYS[1])
if value == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 'acquired'
end
if value == 'sent' or value == '1' then
  return 'sent'
end
return 'held'
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


def new_token() -> bytes:
    return f"sending:{uuid.uuid4().hex}".encode()


class Leases:
    """The lease operations on one Redis; every call may raise `redis.RedisError`."""

    def __init__(self, client: aioredis.Redis, *, lease_ms: int, sent_ttl: int) -> None:
        if lease_ms <= 0 or sent_ttl <= 0:
            raise ValueError("lease_ms and sent_ttl must be positive")
        self._client = client
        self.lease_ms = lease_ms
        self.sent_ttl = sent_ttl
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)

    async def acquire(self, action_id: str, token: bytes) -> Acquired:
        result = await self._acquire(keys=[lease_key(action_id)], args=[token, self.lease_ms])
        text = result.decode() if isinstance(result, bytes) else str(result)
        if text not in ("acquired", "sent", "held"):
            raise RuntimeError(f"unexpected lease script result {text!r}")
        return text  # type: ignore[return-value]

    async def mark_sent(self, action_id: str) -> None:
        # Unconditional: whoever holds the lease now, the provider has accepted it.
        await self._client.set(lease_key(action_id), SENT, ex=self.sent_ttl)

    async def release(self, action_id: str, token: bytes) -> bool:
        """Give the lease back (the action was not sent: it retries or failed)."""
        return bool(await self._release(keys=[lease_key(action_id)], args=[token]))

    async def state(self, action_id: str) -> bytes | None:
        value = await self._client.get(lease_key(action_id))
        return value.encode() if isinstance(value, str) else value


__all__ = ["KEY_PREFIX", "LEGACY_SENT", "SENT", "Acquired", "Leases", "lease_key", "new_token"]
