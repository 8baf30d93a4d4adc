"""When to try an action again, and what travels with it on the retry topic.

Pure: the clock and the random source are arguments, so the policy is tested
without sleeping.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from schemas.actions import Action

BASE_DELAY = 0.5
MAX_DELAY = 60.0
# 501 Not Implemented and 505 HTTP Version Not Supported will not change on retry.
_PERMANENT_5XX = frozenset({501, 505})


def is_retryable_status(status: int) -> bool:
    return status in (408, 429) or (500 <= status <= 599 and status not in _PERMANENT_5XX)


def backoff_delay(attempt: int, rng: random.Random | None = None) -> float:
    """Seconds before retry number `attempt` (1 = the first retry): 0.5 s doubling,
    capped at 60 s, with "equal jitter" (between half and all of it), so senders that
    failed together do not retry together, yet a retry never comes back at once."""
    if attempt < 1:
        raise ValueError("attempt counts from 1")
    ceiling = min(MAX_DELAY, BASE_DELAY * 2 ** min(attempt - 1, 32))
    return (rng or random).uniform(ceiling / 2, ceiling)


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """`Retry-After` in seconds: delta-seconds or an HTTP date (RFC 9110 §10.2.3)."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        # HTTP dates are GMT by definition; parsedate leaves `-0000` naive.
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


def retry_delay(
    attempt: int, retry_after: float | None, rng: random.Random | None = None
) -> float:
    """The provider's Retry-After wins when it asks for longer than our backoff."""
    delay = backoff_delay(attempt, rng)
    return max(delay, retry_after) if retry_after is not None else delay


class RetryRecord(BaseModel):
    """A record on `omnicue.actions.<channel>.retry`: the action and its next attempt."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    action: Action
    attempt: int = Field(ge=1, description="The attempt this record is for (2 = first retry)")
    not_before: AwareDatetime
    last_error: str


def schedule_retry(
    action: Action,
    attempt: int,
    error: str,
    retry_after: float | None,
    now: datetime,
    rng: random.Random | None = None,
) -> RetryRecord | None:
    """The retry after failed attempt `attempt`, or None once it would be past expiry."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    not_before = now + timedelta(seconds=retry_delay(attempt, retry_after, rng))
    if not_before > action.expires_at:
        return None
    return RetryRecord(action=action, attempt=attempt + 1, not_before=not_before, last_error=error)


__all__ = [
    "BASE_DELAY",
    "MAX_DELAY",
    "RetryRecord",
    "backoff_delay",
    "is_retryable_status",
    "parse_retry_after",
    "retry_delay",
    "schedule_retry",
]
