"""Timers: fire each customer's pending journey step at its due time.

The truth is the `due_at` of journeys in the state table (changelog-backed, so it
survives restarts and rebalances). The in-memory `TimerSchedule` only indexes it:
rebuilt from the table after each recovery, updated on every state write. A due
customer gets a timer input on the per-customer topic; the engine decides there,
so a duplicate or stale timer input does nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from faust.types import TP

from schemas import topics as names
from streams.inputs import encode_timer
from streams.outbox import Outbox
from streams.topics import partition_for
from triggers.state import CustomerState

if TYPE_CHECKING:
    from streams.app import Pipeline

log = logging.getLogger(__name__)

# If a timer input is lost (the worker died after sending it), fire again this
# much later; the state write that follows a processed timer replaces the retry.
TIMER_RETRY = timedelta(seconds=5)


def register_timers(p: Pipeline) -> None:
    async def fire_due_timers() -> None:
        now = p.clock()
        outbox = Outbox(p.sender)
        for partition in p.schedule.partitions():
            # A partition that is behind holds the steps its backlog may still cancel.
            horizon = p.progress.horizon(partition, now)
            if horizon is None:
                continue
            for key, due_at, _ in p.schedule.pop_partition(partition, horizon):
                outbox.add(
                    p.topics.customer_inputs, key, encode_timer(due_at), partition=partition
                )
                p.schedule.set_due(key, now + TIMER_RETRY, partition)
        await outbox.flush()
        p.metrics.timers_pending.set(len(p.schedule))

    p.app.timer(p.settings.timer_interval, name="omnicue.timers")(fire_due_timers)

    async def rebuild_schedule() -> None:
        rebuild_from_table(p)

    p.customers.on_recover(rebuild_schedule)

    async def forget_revoked(sender: Any, *args: Any, **kwargs: Any) -> None:
        revoked: set[TP] = args[0]
        p.progress.forget(revoked)
        gone = {tp.partition for tp in revoked if tp.topic == names.CUSTOMER_INPUTS}
        if gone:
            p.schedule.drop_partitions(gone)

    p.app.on_partitions_revoked.connect(forget_revoked)  # type: ignore[arg-type]


def _owned_partitions(p: Pipeline) -> set[int]:
    return {
        tp.partition
        for tp in p.app.assignor.assigned_actives()
        if tp.topic == names.CUSTOMER_INPUTS
    }


def rebuild_from_table(p: Pipeline) -> None:
    """One scan of the owned state after recovery, never one per tick."""
    owned = _owned_partitions(p)
    p.schedule.clear()
    customers = 0
    for key, raw in p.customers.items():
        partition = partition_for(key, p.settings.partitions)
        if partition not in owned:
            continue
        customers += 1
        state = CustomerState.model_validate_json(raw)
        due = state.next_due()
        if p.rules.removed and any(j.rule_id in p.rules.removed for j in state.journeys.values()):
            due = p.clock()  # journeys of removed rules end now (see `wake_journeys_of`)
        p.schedule.set_due(key, due, partition)
    p.metrics.customers_in_state.set(customers)
    p.metrics.timers_pending.set(len(p.schedule))
    log.info("timer schedule rebuilt: %d customers, %d pending", customers, len(p.schedule))


def wake_journeys_of(p: Pipeline, rule_ids: Iterable[str]) -> int:
    """Make every owned customer with a journey of these (removed) rules due now, so
    the engine ends those journeys at once rather than at their own due times.

    One scan of the owned state, on a rules update that removes rules. The stored
    JSON is searched for the rule id before anything is parsed; a false match
    (the id in the send log) only costs a timer input that changes nothing.
    """
    needles = [f'"rule_id":"{rule_id}"'.encode() for rule_id in rule_ids]
    owned = _owned_partitions(p)
    now = p.clock()
    woken = 0
    for key, raw in p.customers.items():
        partition = partition_for(key, p.settings.partitions)
        if partition in owned and any(needle in raw for needle in needles):
            p.schedule.set_due(key, now, partition)
            woken += 1
    return woken
