"""A token bucket per channel in Redis, shared by all of that channel's senders,
with AIMD: a 429 halves the rate, which then recovers additively.

The bucket lives in one Redis hash and is only touched by Lua scripts, which run
atomically and read Redis's own clock, so N processes on N hosts (with skewed
clocks) draw from one bucket and together stay under the provider's limit.
A take *reserves* a token, possibly going into debt, and returns how long to wait
before using it: one round trip per send, and waiters are served in order.
"""

from __future__ import annotations

import redis.asyncio as aioredis

KEY_PREFIX = "omnicue:rate:"
# At most one halving per this many ms: the in-flight requests of one overload
# all come back 429 together, and that is one signal, not twenty.
_CUT_HOLD_MS = 1000
# Recovery: this share of the configured rate is added back per second.
_RECOVERY_SHARE = 0.05
# Never below this share of the configured rate (nor below 0.1/s).
_FLOOR_SHARE = 0.01
# The bucket holds a tenth of a second's tokens (at least one): little burst.
_BURST_SECONDS = 0.1

_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local configured = tonumber(ARGV[1])
local recovery = tonumber(ARGV[2])
local h = redis.call('HMGET', KEYS[1], 'tokens', 'ts', 'rate', 'grown_at')
local rate = math.min(configured, tonumber(h[3]) or configured)
local ts = tonumber(h[2]) or now
-- Recovery counts from the later of the last cut and the last take.
local grown_at = math.max(ts, tonumber(h[4]) or ts)
rate = math.min(configured, rate + recovery * math.max(0, now - grown_at) / 1000)
local elapsed = math.max(0, now - ts) / 1000
local cap = math.max(1, rate * tonumber(ARGV[3]))
local tokens = math.min(cap, (tonumber(h[1]) or cap) + elapsed * rate)
tokens = tokens - 1
local wait = 0
if tokens < 0 then wait = -tokens / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now),
           'rate', tostring(rate), 'grown_at', tostring(now))
redis.call('PEXPIRE', KEYS[1], 3600000)
return {tostring(wait), tostring(rate)}
"""

_CUT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local configured = tonumber(ARGV[1])
local floor = tonumber(ARGV[2])
local h = redis.call('HMGET', KEYS[1], 'rate', 'cut_at')
local rate = math.min(configured, tonumber(h[1]) or configured)
local cut_at = tonumber(h[2]) or 0
if now - cut_at >= tonumber(ARGV[3]) then
  rate = math.max(floor, rate / 2)
  redis.call('HSET', KEYS[1], 'rate', tostring(rate), 'cut_at', tostring(now),
             'grown_at', tostring(now))
  redis.call('PEXPIRE', KEYS[1], 3600000)
end
return tostring(rate)
"""


def rate_key(channel: str) -> str:
    return f"{KEY_PREFIX}{channel}"


class SharedRateLimit:
    """`await take()` before every provider call; `await cut()` on a 429."""

    def __init__(self, client: aioredis.Redis, channel: str, rate: float) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.channel = channel
        self.configured = rate
        # The latest rate Redis reported, for the gauge.
        self.current = rate
        self._key = rate_key(channel)
        self._take = client.register_script(_TAKE)
        self._cut = client.register_script(_CUT)

    async def take(self) -> float:
        """Reserve one send; returns the seconds to wait before making it."""
        wait, rate = await self._take(
            keys=[self._key],
            args=[self.configured, self.configured * _RECOVERY_SHARE, _BURST_SECONDS],
        )
        self.current = float(rate)
        return float(wait)

    async def cut(self) -> float:
        """The provider said 429: halve the shared rate (once per overload)."""
        floor = max(0.1, self.configured * _FLOOR_SHARE)
        rate = await self._cut(keys=[self._key], args=[self.configured, floor, _CUT_HOLD_MS])
        self.current = float(rate)
        return self.current


def parse_rate(text: str) -> float:
    """`--rate 50/s`, `50` or `0.5/s`: sends per second."""
    value = text.strip()
    if value.endswith("/s"):
        value = value[:-2]
    try:
        rate = float(value)
    except ValueError:
        raise ValueError(f"rate {text!r} is not N/s (e.g. 50/s)") from None
    if rate <= 0:
        raise ValueError(f"rate {text!r} must be positive")
    return rate


__all__ = ["KEY_PREFIX", "SharedRateLimit", "parse_rate", "rate_key"]
