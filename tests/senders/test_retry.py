"""The retry policy, with the clock and the random source given."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from schemas.actions import Action, Recipient
from senders.retry import (
    RetryRecord,
    backoff_delay,
    is_retryable_status,
    parse_retry_after,
    retry_delay,
    schedule_retry,
)

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def _action(expires_in: timedelta = timedelta(hours=1)) -> Action:
    values: dict[str, Any] = {
        "action_id": "act_1", "rule_id": "r", "rule_version": "1", "step": 1,
        "customer_id": "c1", "journey_key": "j", "channel": "sms", "category": "marketing",
        "template": "t", "recipient": Recipient(phone="+82101234"), "created_at": NOW,
        "due_at": NOW, "expires_at": NOW + expires_in, "trigger_event_id": "e1",
        "trigger_occurred_at": NOW,
    }  # fmt: skip
    return Action(**values)


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504, 507, 599])
def test_retryable_statuses(status: int) -> None:
    assert is_retryable_status(status)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 410, 413, 422, 501, 505])
def test_permanent_statuses(status: int) -> None:
    assert not is_retryable_status(status)


def test_backoff_doubles_from_half_a_second_with_jitter_and_caps_at_a_minute() -> None:
    rng = random.Random(7)
    for attempt, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (8, 60.0), (200, 60.0)]:
        delays = [backoff_delay(attempt, rng) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays), attempt
        # Jitter: not one value for everybody.
        assert max(delays) - min(delays) > ceiling / 10
    with pytest.raises(ValueError):
        backoff_delay(0)


def test_retry_after_seconds_and_http_dates() -> None:
    assert parse_retry_after("120", NOW) == 120.0
    assert parse_retry_after(" 3 ", NOW) == 3.0
    assert parse_retry_after("Sun, 01 Mar 2026 12:00:30 GMT", NOW) == 30.0
    # A date in the past means now.
    assert parse_retry_after("Sun, 01 Mar 2026 11:00:00 GMT", NOW) == 0.0
    assert parse_retry_after(None, NOW) is None
    assert parse_retry_after("soon", NOW) is None
    assert parse_retry_after("-5", NOW) is None


def test_retry_after_wins_only_when_longer() -> None:
    rng = random.Random(1)
    assert retry_delay(1, 30.0, rng) == 30.0
    assert 30.0 <= retry_delay(9, 30.0, rng) <= 60.0
    assert 0.25 <= retry_delay(1, None, rng) <= 0.5


def test_schedule_retry_counts_attempts_and_stops_at_expiry() -> None:
    rng = random.Random(3)
    retry = schedule_retry(_action(), 1, "http_503", None, NOW, rng)

    assert isinstance(retry, RetryRecord)
    assert retry.attempt == 2
    assert NOW + timedelta(seconds=0.25) <= retry.not_before <= NOW + timedelta(seconds=0.5)
    assert retry.last_error == "http_503"
    assert RetryRecord.model_validate_json(retry.model_dump_json()) == retry

    # The next try would come after the action's expiry: no retry (it fails `expired`).
    assert schedule_retry(_action(timedelta(seconds=10)), 1, "http_429", 11.0, NOW) is None
    with pytest.raises(ValueError, match="timezone-aware"):
        schedule_retry(_action(), 1, "timeout", None, NOW.replace(tzinfo=None))
