"""Stage 2: per-customer decisions over the state table, a batch at a time.

Inputs (events and timer firings) arrive keyed by customer. Each batch is grouped
by customer so every customer's state is read once, evolved through all of its
inputs in order, and written once.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

from faust import Stream
from faust.streams import _current_event
from faust.types import EventT, StreamT

from schemas.events import describe_validation_error
from streams.ingest import dead_letter
from streams.inputs import decode_input
from streams.outbox import Outbox
from triggers.engine import Output, TimerFired, evolve, new_state
from triggers.state import CustomerState

if TYPE_CHECKING:
    from streams.app import Pipeline

log = logging.getLogger(__name__)


def register_customer_agent(p: Pipeline) -> None:
    async def customers(stream: StreamT[bytes]) -> None:
        batches = cast("Stream[bytes]", stream).take_events(
            p.settings.batch_size, p.settings.batch_within
        )
        async for batch in batches:
            await process_batch(p, batch)

    p.app.agent(p.topics.customer_inputs, name="omnicue.customers")(customers)


def _use_event_context(event: EventT[bytes]) -> None:
    # Table reads and writes take their partition from the "current event". A batch
    # mixes partitions, so point it at an input of the customer being written;
    # otherwise the changelog entry would land in another customer's partition.
    _current_event.set(weakref.ref(event))


async def process_batch(p: Pipeline, batch: Sequence[EventT[bytes]]) -> None:
    groups: dict[bytes, list[EventT[bytes]]] = {}
    for event in batch:
        # Every input is produced with its customer key (ingest and timers).
        groups.setdefault(event.message.key or b"", []).append(event)
    p.metrics.batch_events.observe(len(batch))
    now = p.clock()
    outbox = Outbox(p.sender)
    for key, inputs in groups.items():
        _use_event_context(inputs[-1])
        raw = p.customers.get(key)
        if raw is None:
            state = new_state(key.decode())
            p.metrics.customers_in_state.inc()
        else:
            state = CustomerState.model_validate_json(raw)
        outputs: list[Output] = []
        for event in inputs:
            try:
                item = decode_input(event.message.value or b"")
                if isinstance(item, TimerFired):
                    p.metrics.timer_lateness.observe(max(0.0, (now - item.due_at).total_seconds()))
                outputs.append(evolve(state, item, now, p.rules, p.policy))
            except Exception as exc:  # noqa: BLE001 - one bad input must not stop everyone
                log.exception("cannot process input for customer %r", key)
                dead_letter(
                    p, event, outbox, "decide", type(exc).__name__, describe_validation_error(exc)
                )
        p.customers[key] = state.model_dump_json(exclude_defaults=True).encode()
        p.schedule.set_due(key, state.next_due(), inputs[-1].message.partition)
        for out in outputs:
            emit(p, key, out, outbox)
    await outbox.flush()
    p.metrics.timers_pending.set(len(p.schedule))


def emit(p: Pipeline, key: bytes, out: Output, outbox: Outbox) -> None:
    for action in out.actions:
        topic = p.topics.actions[action.channel]
        outbox.add(topic, key, action.model_dump_json().encode())
        p.metrics.actions.labels(rule=action.rule_id, channel=action.channel).inc()
        latency = (action.created_at - action.due_at).total_seconds()
        p.metrics.event_to_action_latency.observe(max(0.0, latency))
    for decision in out.decisions:
        outbox.add(p.topics.decisions, key, decision.model_dump_json(exclude_none=True).encode())
        p.metrics.decisions.labels(
            outcome=decision.outcome, reason=decision.reason or "none"
        ).inc()

