"""Stage 2: per-customer decisions over the state table, a batch at a time.

Inputs (events, timer firings, identity messages) arrive keyed by customer. Each
batch is grouped by key so every key's state and identity entry are read once,
taken through all of its inputs in order (identity first, `triggers.linking`,
then the engine), and written once.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, cast

from faust import Stream
from faust.streams import _current_event
from faust.types import EventT, StreamT

from schemas.events import describe_validation_error
from streams import conversions
from streams.ingest import dead_letter
from streams.inputs import decode_input, encode_message
from streams.outbox import Outbox
from triggers import linking
from triggers.engine import Output, TimerFired
from triggers.linking import IdentityEntry, IdentityMessage, KeyInput
from triggers.state import CustomerState, UnknownAction

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
    groups: dict[bytes, list[tuple[EventT[bytes], KeyInput | Exception, datetime | None]]] = {}
    progress = p.progress
    # In offset order, so each input knows its partition's event time as of itself.
    for event in batch:
        message = event.message
        try:
            item: KeyInput | Exception = decode_input(message.value or b"")
        except Exception as exc:  # noqa: BLE001 - dead-lettered below, in order
            item = exc
        produced = None if isinstance(item, Exception) else linking.event_of(item)
        if produced is not None:
            progress.observe(message.partition, produced.occurred_at)
        progress.processed(message.tp, message.offset)
        # Every input is produced with its customer key (ingest, timers, identity).
        groups.setdefault(message.key or b"", []).append(
            (event, item, progress.watermark(message.partition))
        )
    p.metrics.batch_events.observe(len(batch))
    now = p.clock()
    outbox = Outbox(p.sender)
    writes: list[tuple[EventT[bytes], _CustomerRun]] = []
    for key, inputs in groups.items():
        last = inputs[-1][0].message
        _use_event_context(inputs[-1][0])
        raw = p.customers.get(key)
        run = _CustomerRun(p, key, raw, p.identities.get(key), now)
        timer_failed = False
        for event, item, watermark in inputs:
            if isinstance(item, Exception):
                _fail(p, event, outbox, item, key)
                continue
            # Due steps that this input's partition has passed in event time come first,
            # as in replay; until the worker has caught up, no later ones.
            horizon = _NOTHING_DUE if watermark is None else watermark - p.progress.lateness
            try:
                if isinstance(item, TimerFired):
                    # Its step is evaluated up to its own due time (`linking.process`).
                    p.metrics.timer_lateness.observe(max(0.0, (now - item.due_at).total_seconds()))
                elif linking.event_of(item) is not None:
                    run.due_steps(horizon, event.message.timestamp)
                run.feed(item, horizon, event.message.timestamp)
            except Exception as exc:  # noqa: BLE001 - one bad input must not stop everyone
                _fail(p, event, outbox, exc, key)
                run.undo_last()
                timer_failed = timer_failed or isinstance(item, TimerFired)
        # Then what the partition's progress after this batch allows.
        batch_horizon = p.progress.horizon(last.partition, now)
        if batch_horizon is not None:
            try:
                run.due_steps(batch_horizon, last.timestamp)
            except Exception:  # noqa: BLE001 - as above; there is no input to dead-letter
                log.exception("cannot evaluate due steps for customer %r", key)
                run.undo_last()
                timer_failed = True
        due = run.state.next_due() if run.state is not None else None
        if timer_failed:
            p.metrics.timer_errors.inc()
            if due is not None and due <= now:
                # Due in the past, the timer task would send it again at every tick.
                due = now + TIMER_FAILURE_RETRY
        writes.append((inputs[-1][0], run))
        p.schedule.set_due(key, due, last.partition)
        for out, arrived in run.outputs:
            emit(p, key, out, outbox, arrived)
        for target, sent in run.sends:
            outbox.add(p.topics.customer_inputs, target.encode(), encode_message(sent))
            p.metrics.identity_messages.labels(kind=sent.kind).inc()
    # What the batch decided reaches the broker before the states that record it: a
    # state written first (RocksDB at once, the changelog soon after) survived a SIGKILL
    # before the flush, and the inputs, processed again, decided nothing (issue 9: cart
    # reminders lost, their journeys no longer pending after the restart). A kill after
    # the flush, before the states reach the changelog, sends the outputs again instead:
    # the same records (deterministic action ids), which senders deliver once. Identity
    # messages likewise: each step is idempotent at the key that receives it.
    await outbox.flush()
    for event, run in writes:
        _use_event_context(event)
        run.write()
    p.metrics.timers_pending.set(len(p.schedule))


class _CustomerRun:
    """One key's inputs of a batch, applied to private copies of its state and its
    identity entry."""

    def __init__(
        self, p: Pipeline, key: bytes, raw: bytes | None, raw_entry: bytes | None, now: datetime
    ) -> None:
        self._p, self._key, self._raw, self._raw_entry, self._now = p, key, raw, raw_entry, now
        self._name = key.decode()
        self.state, self.entry = self._load()
        self._state_changed = False
        # What each applied input decided, and when that input arrived (seconds).
        self.outputs: list[tuple[Output, float]] = []
        # Identity messages to other keys (and this one), in order.
        self.sends: list[tuple[str, IdentityMessage]] = []
        # What has been applied, to rebuild the state if an input fails.
        self._applied: list[tuple[KeyInput, datetime, float]] = []

    def feed(self, item: KeyInput, horizon: datetime, arrived: float) -> None:
        """One input: its identity step (`triggers.linking`), then the engine on what
        that step lets through. Nothing of it is kept if it raises."""
        outputs, sends = self._feed(item, horizon, arrived)
        self.outputs.extend(outputs)
        self.sends.extend(sends)
        self._applied.append((item, horizon, arrived))

    def _feed(
        self, item: KeyInput, horizon: datetime, arrived: float
    ) -> tuple[list[tuple[Output, float]], list[tuple[str, IdentityMessage]]]:
        p = self._p
        done = linking.process(
            self._name, self.entry, self.state, item, self._now, p.identity_policy, p.rules,
            p.policy, horizon,
        )  # fmt: skip
        self.entry, self.state = done.entry, done.state
        self._state_changed = self._state_changed or done.state_changed
        return [(out, arrived) for out in done.outputs], done.sends

    def due_steps(self, horizon: datetime, arrived: float) -> None:
        state = self.state
        if state is None or self.entry.pending:
            return  # nothing here, or waiting for a link: its inputs are parked
        due = state.next_due()
        if due is not None and due <= horizon:
            self.feed(TimerFired(due_at=horizon), horizon, arrived)

    def undo_last(self) -> None:
        """After an input raised: the state as it was before that input, rebuilt from
        the stored state and the inputs applied before it (`evolve` and the identity
        step are deterministic), so that the dead letter, once fixed, can be replayed
        and is not a duplicate."""
        self.state, self.entry = self._load()
        self._state_changed = False
        for item, horizon, arrived in self._applied:
            self._feed(item, horizon, arrived)

    def write(self) -> None:
        p, key = self._p, self._key
        if self.state is not None:
            p.customers[key] = self.state.model_dump_json(exclude_defaults=True).encode()
            if self._raw is None:
                p.metrics.customers_in_state.inc()
        elif self._state_changed and self._raw is not None:
            del p.customers[key]  # merged into another profile
            p.metrics.customers_in_state.dec()
        entry = self.entry.model_dump_json(exclude_defaults=True).encode()
        if entry != (self._raw_entry or b"{}"):
            p.identities[key] = entry

    def _load(self) -> tuple[CustomerState | None, IdentityEntry]:
        state = None if self._raw is None else CustomerState.model_validate_json(self._raw)
        entry = (
            IdentityEntry() if self._raw_entry is None
            else IdentityEntry.model_validate_json(self._raw_entry)
        )
        return state, entry


# A customer whose due steps could not be evaluated is tried again this much later.
TIMER_FAILURE_RETRY = timedelta(minutes=1)
# A horizon before every due time: the input is applied, no step is evaluated.
_NOTHING_DUE = datetime.min.replace(tzinfo=UTC)


def _fail(
    p: Pipeline, event: EventT[bytes], outbox: Outbox, exc: Exception, key: bytes
) -> None:
    log.error("cannot process input for customer %r", key, exc_info=exc)
    # Feedback for an action this customer never got: `omnicue dlq replay --reason
    # unknown_action` brings it back once the action's state is there.
    reason = "unknown_action" if isinstance(exc, UnknownAction) else type(exc).__name__
    dead_letter(p, event, outbox, "decide", reason, describe_validation_error(exc))


def emit(p: Pipeline, key: bytes, out: Output, outbox: Outbox, arrived: float) -> None:
    """Send what one input decided. `arrived`: the input record's timestamp (seconds)."""
    for action, effective_due in zip(out.actions, out.effective_due, strict=True):
        topic = p.topics.actions[action.channel]
        outbox.add(topic, key, action.model_dump_json().encode())
        p.metrics.actions.labels(rule=action.rule_id, channel=action.channel).inc()
        # Processing latency: from when the action could first have been sent (its
        # step due, after any deferral, and its input there), not from `due_at`, which
        # a deferral by quiet hours or a cap does not move.
        ready = max(effective_due.timestamp(), arrived)
        p.metrics.event_to_action_latency.observe(max(0.0, action.created_at.timestamp() - ready))
        p.metrics.action_deferral.observe((effective_due - action.due_at).total_seconds())
    for rule_id, error in out.step_errors:
        log.error("step of rule %s failed for customer %r, retried later: %s", rule_id, key, error)
        p.metrics.step_errors.labels(rule=rule_id).inc()
    for decision in out.decisions:
        outbox.add(p.topics.decisions, key, decision.model_dump_json(exclude_none=True).encode())
        p.metrics.decisions.labels(
            outcome=decision.outcome, reason=decision.reason or "none"
        ).inc()
    for rule_id, held_out in out.entered:
        group = "control" if held_out else "treatment"
        p.metrics.holdout_entries.labels(rule=rule_id, group=group).inc()
    if out.conversion is not None:
        # One attribution record per conversion, its id the order's event id: a
        # redelivered order sends the same record again.
        record = conversions.record_of(
            out.conversion, p.policy, p.settings.attribution_half_life()
        )
        outbox.add(p.topics.conversions, key, record.model_dump_json().encode())
        conversions.count(p.metrics, record)

