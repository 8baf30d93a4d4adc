"""Stage 1: raw events -> validated, keyed by customer -> the per-customer topic.

Bad input never stops the worker: it goes to the dead-letter topic with its
original key and bytes, and the reason in headers.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, cast

from faust import Stream
from faust.types import EventT, Message, StreamT
from pydantic import ValidationError

from schemas.events import describe_validation_error, event_adapter, event_to_json
from streams.outbox import Outbox
from triggers.linking import route_key

if TYPE_CHECKING:
    from streams.app import Pipeline

log = logging.getLogger(__name__)

# Set by `omnicue dlq replay`; kept on the way through, so a replayed record that
# fails again returns to the dead-letter topic with its attempt count.
ATTEMPT_HEADER = "omnicue.dlq.attempt"


def register_ingest_agent(p: Pipeline) -> None:
    async def ingest(stream: StreamT[bytes]) -> None:
        batches = cast("Stream[bytes]", stream).take_events(
            p.settings.batch_size, p.settings.batch_within
        )
        async for batch in batches:
            outbox = Outbox(p.sender)
            for event in batch:
                route_event(p, event, outbox)
            await outbox.flush()

    p.app.agent(p.topics.events, name="omnicue.ingest")(ingest)


def route_event(p: Pipeline, event: EventT[bytes], outbox: Outbox) -> None:
    message = event.message
    raw = message.value
    if not raw:
        dead_letter(p, event, outbox, "ingest", "empty", "the record has no value")
        return
    try:
        parsed = event_adapter.validate_json(raw)
    except ValidationError as exc:
        reason = "json" if _is_json_error(exc) else "schema"
        dead_letter(p, event, outbox, "ingest", reason, describe_validation_error(exc))
        return
    p.metrics.events_consumed.labels(type=parsed.type).inc()
    # To its customer, else its device; the customer's key resolves the rest
    # (`triggers.linking`).
    key = route_key(parsed, p.identity_policy)
    outbox.add(
        p.topics.customer_inputs,
        key.encode(),
        event_to_json(parsed),
        headers=carried_headers(message) or None,
    )


def carried_headers(message: Message) -> list[tuple[str, bytes]]:
    """The input's headers that travel on with it: the replay attempt count."""
    raw = message.headers or ()
    pairs = raw.items() if isinstance(raw, Mapping) else raw
    return [(name, value) for name, value in pairs if name == ATTEMPT_HEADER]


def _is_json_error(exc: ValidationError) -> bool:
    return any(e["type"] == "json_invalid" for e in exc.errors())


def dead_letter(
    p: Pipeline, event: EventT[bytes], outbox: Outbox, stage: str, reason: str, message: str
) -> None:
    """The original key and bytes, unchanged, with the reason in headers."""
    source = event.message
    log.warning(
        "dead letter from %s (%s[%s]@%s): %s: %s",
        stage, source.topic, source.partition, source.offset, reason, message,
    )
    p.metrics.events_invalid.labels(reason=reason).inc()
    headers = [
        ("omnicue.error.stage", stage.encode()),
        ("omnicue.error.class", reason.encode()),
        ("omnicue.error.message", message[:4000].encode()),
        ("omnicue.source.topic", source.topic.encode()),
        ("omnicue.source.partition", str(source.partition).encode()),
        ("omnicue.source.offset", str(source.offset).encode()),
        *carried_headers(source),
    ]
    outbox.add(p.topics.dead_letters, source.key, source.value, headers=headers)
