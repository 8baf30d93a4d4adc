"""Encoding of the internal per-customer input topic: events and timer firings.

Both kinds travel on one topic keyed by customer, so a timer firing goes through
exactly the same per-customer path, in order with that customer's events.
"""

from __future__ import annotations

from datetime import datetime

import orjson

from schemas.events import event_from_dict
from triggers.engine import Input, TimerFired


def encode_timer(due_at: datetime) -> bytes:
    return orjson.dumps({"timer_due_at": due_at.isoformat()})


def decode_input(raw: bytes) -> Input:
    data = orjson.loads(raw)
    due = data.get("timer_due_at") if isinstance(data, dict) else None
    if due is not None:
        return TimerFired(due_at=datetime.fromisoformat(due))
    return event_from_dict(data)
