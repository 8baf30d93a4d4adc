"""Encoding of the internal per-customer input topic: events, timer firings and
identity messages between keys (`triggers.linking`).

All travel on one topic keyed by customer, so a timer firing or a merge goes
through exactly the same per-customer path, in order with that customer's events.
"""

from __future__ import annotations

from datetime import datetime

import orjson

from schemas.events import event_from_dict
from triggers.engine import TimerFired
from triggers.linking import KeyInput, decode_message, encode_message

__all__ = ["decode_input", "encode_message", "encode_timer"]


def encode_timer(due_at: datetime) -> bytes:
    return orjson.dumps({"timer_due_at": due_at.isoformat()})


def decode_input(raw: bytes) -> KeyInput:
    data = orjson.loads(raw)
    if isinstance(data, dict):
        due = data.get("timer_due_at")
        if due is not None:
            return TimerFired(due_at=datetime.fromisoformat(due))
        if "kind" in data:
            return decode_message(data)
    return event_from_dict(data)
