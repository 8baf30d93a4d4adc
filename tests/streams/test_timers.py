"""The timer task and the schedule's rebuild from the state table."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from faust.types import TP

from schemas import topics
from streams import timers
from streams.inputs import decode_input
from streams.topics import partition_for
from tests.factories import T0, cart_add, consent, identify, minutes, ruleset
from tests.streams.conftest import Shell
from triggers.engine import EnginePolicy, TimerFired, decide
from triggers.state import CustomerState

KST = timezone(timedelta(hours=9))


def stored(*events: Any, customer: str = "c1") -> bytes:
    rules, state = ruleset(), None
    for event in events:
        state = decide(state, event, event.occurred_at, rules, EnginePolicy(), customer).state
    assert state is not None
    return state.model_dump_json(exclude_defaults=True).encode()


def test_the_stored_due_time_is_the_states_next_due_time() -> None:
    no_journey = stored(identify())
    one = stored(identify(), consent("email"), cart_add("K"))
    two = stored(identify(), consent("email"), cart_add("K"),
                 cart_add("L", at=T0 + minutes(7)))  # fmt: skip
    # A due time stored with another offset than UTC compares by the instant.
    state = CustomerState.model_validate_json(two)
    first = min(state.journeys.values(), key=lambda j: j.due_at)
    earlier = (first.due_at - minutes(1)).astimezone(KST)
    state.journeys["x|y"] = replace(first, key="y", due_at=earlier)
    offset = state.model_dump_json(exclude_defaults=True).encode()
    assert b"+09:00" in offset
    for raw in (no_journey, one, two, offset):
        due, removed = timers.stored_due(raw, frozenset({"other_rule"}))
        assert due == CustomerState.model_validate_json(raw).next_due()
        assert not removed
    assert timers.stored_due(no_journey) == (None, False)
    assert len(CustomerState.model_validate_json(two).journeys) == 2
    assert timers.stored_due(two, frozenset({"cart_abandonment"}))[1]


def timer_inputs(shell: Shell) -> list[tuple[bytes | None, int | None]]:
    return [
        (key, partition)
        for name, key, value, partition, _ in shell.sender.records
        if name == topics.CUSTOMER_INPUTS and isinstance(decode_input(value or b""), TimerFired)
    ]


async def test_a_partition_gets_no_timer_inputs_until_its_last_ones_are_handled(
    shell: Shell,
) -> None:
    p = shell.pipeline
    task = timers.TimerTask(p)
    p.schedule.set_due(b"a", T0, 0)
    p.schedule.set_due(b"b", T0, 0)
    p.schedule.set_due(b"c", T0, 1)
    await task.fire_due()
    assert sorted(timer_inputs(shell)) == [(b"a", 0), (b"b", 0), (b"c", 1)]

    # The customers agent has not handled them yet: past their retry time, and with
    # a new customer due, nothing more goes to either partition.
    p.schedule.set_due(b"d", T0, 0)
    shell.now[0] = T0 + timers.TIMER_RETRY + timedelta(seconds=1)
    await task.fire_due()
    assert len(timer_inputs(shell)) == 3

    # Partition 1's input handled (offset 0 there): its retry goes out, not partition 0's.
    p.progress.processed(TP(topics.CUSTOMER_INPUTS, 1), 0)
    await task.fire_due()
    assert timer_inputs(shell)[3:] == [(b"c", 1)]
    # Partition 0's last one (offset 1) handled: the new customer and both retries.
    p.progress.processed(TP(topics.CUSTOMER_INPUTS, 0), 1)
    await task.fire_due()
    assert sorted(timer_inputs(shell)[4:]) == [(b"a", 0), (b"b", 0), (b"d", 0)]


async def test_the_rebuild_yields_to_the_agents_and_schedules_every_owned_customer(
    shell: Shell, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.streams.test_catch_up import cart_journey
    from tests.streams.test_customers import settle

    p = shell.pipeline
    customers = [f"c{i}" for i in range(6)]
    agent = p.app.agents["omnicue.customers"]
    async with agent.test_context() as inputs:
        for customer in customers:
            for value in cart_journey(customer):
                await inputs.put(value, key=customer.encode())
        await settle()
        owned = {partition_for(c.encode(), p.settings.partitions) for c in customers[:4]}
        monkeypatch.setattr(timers, "_owned_partitions", lambda p: owned)
        p.schedule.clear()

        rebuild = asyncio.ensure_future(timers.rebuild_from_table(p, chunk=1))
        await asyncio.sleep(0)
        assert not rebuild.done(), "it yields after each chunk"
        await rebuild
    expected = {
        c.encode(): CustomerState.model_validate_json(p.customers[c.encode()]).next_due()
        for c in customers
        if partition_for(c.encode(), p.settings.partitions) in owned
    }
    assert {key: p.schedule.due_at(key) for key in expected} == expected
    assert len(p.schedule) == len(expected)
    assert all(due == T0 + timedelta(minutes=30) for due in expected.values())


async def test_the_rebuild_reads_a_rocksdb_store_partition_by_partition(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from faust.stores.rocksdb import Store as RocksDBStore

    from omnicue.settings import Settings
    from streams.app import create_app

    settings = Settings(store="rocksdb://", data_dir=tmp_path / "data", partitions=4)
    p = create_app(settings, ruleset())
    store = p.customers.data
    assert isinstance(store, RocksDBStore) and store.use_rocksdict
    raw = stored(identify(), consent("email"), cart_add("K"))
    due = CustomerState.model_validate_json(raw).next_due()
    keys = [f"c{i}".encode() for i in range(40)]
    for key in keys:
        partition = partition_for(key, 4)
        store._db_for_partition(partition).put(key, raw)
    for partition in range(4):
        store.set_persisted_offset(TP(p.customers.changelog_topic.get_topic_name(), partition), 9)
    owned = {1, 3}
    expected = {k: partition_for(k, 4) for k in keys if partition_for(k, 4) in owned}
    assert expected and len(expected) < len(keys)
    states = list(timers._owned_states(p, owned))
    assert {key: partition for key, _, partition in states} == expected
    assert all(value == raw for _, value, _ in states), "not the stored offsets"

    monkeypatch.setattr(timers, "_owned_partitions", lambda p: owned)
    await timers.rebuild_from_table(p, chunk=3)
    assert len(p.schedule) == len(expected)
    assert all(p.schedule.due_at(key) == due for key in expected)
