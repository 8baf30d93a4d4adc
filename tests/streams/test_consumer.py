"""The consumer delivers acked topics in offset order, and never commits past a record
no agent got: faust's own loop (`Consumer._drain_messages`) and bookkeeping (acks,
gaps, `_new_offset`), driven with fetch results instead of a broker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aiokafka.structs import ConsumerRecord
from faust.transport.consumer import Consumer
from faust.transport.drivers.aiokafka import Consumer as FaustAIOKafkaConsumer
from faust.types import TP
from mode import Service

from omnicue.settings import Settings
from streams.app import faust_app
from streams.consumer import DeliveryGuard, PromptFetchConsumer, Verdict

TOPIC = "omnicue.events"
TP0 = TP(TOPIC, 0)
COMMITTED = 100


def records(offsets: range) -> dict[TP, list[Any]]:
    return {TP0: [ConsumerRecord(TOPIC, 0, o, 0, 0, None, b"{}", None, 0, 2, ()) for o in offsets]}


class Run:
    """One consumer of a faust app, its partition just sought to `COMMITTED` (as after
    a rebalance), fed these fetch results in turn; every record the loop delivers is
    acked, as a stage acks its batch."""

    def __init__(self, tmp_path: Path, consumer_class: type[Consumer]) -> None:
        app = faust_app(Settings(dev_broker=True, data_dir=tmp_path, store="memory://"))
        app.transport.Consumer = consumer_class  # type: ignore[misc]
        self.consumer = consumer = app.consumer
        self.delivered: list[int] = []
        self.seeks: list[int] = []
        app.topics.acks_enabled_for = lambda topic: True  # type: ignore[method-assign]
        consumer.highwater = lambda tp: 0  # type: ignore[method-assign]
        consumer.assignment = lambda: {TP0}  # type: ignore[method-assign]
        consumer.callback = self._deliver
        consumer._seek = self._seek  # type: ignore[method-assign]

    async def _deliver(self, message: Any) -> None:
        self.delivered.append(message.offset)
        self.consumer.ack(message)

    async def _seek(self, tp: TP, offset: int) -> None:
        self.seeks.append(offset)

    async def drain(self, *fetches: dict[TP, list[Any]]) -> int | None:
        """Run the loop over the fetches; the offset a commit would store now."""
        consumer = self.consumer
        pending = list(fetches)

        async def seek_to_committed() -> dict[TP, int]:
            return {TP0: COMMITTED}

        async def next_records(timeout: float) -> tuple[dict[TP, list[Any]], set[TP]]:
            if not pending:
                consumer._stopped.set()
                return {}, {TP0}
            return pending.pop(0), {TP0}

        consumer.seek_to_committed = seek_to_committed  # type: ignore[method-assign]
        consumer._wait_next_records = next_records  # type: ignore[method-assign]
        await consumer.perform_seek()
        consumer.flow_active = True
        await consumer._drain_messages(Service())
        return consumer._new_offset(TP0)


async def test_faust_alone_commits_past_records_it_never_delivered(tmp_path: Path) -> None:
    # Why the guard exists: a fetch from an older position (150, in flight while the
    # partition was sought back to 100) arrives first, then the one from 100.
    run = Run(tmp_path, FaustAIOKafkaConsumer)
    committed = await run.drain(records(range(150, 160)), records(range(100, 160)))
    assert 120 not in run.delivered  # 100-149 dropped as "already read"
    assert committed is not None and committed > COMMITTED + 1


async def test_a_stale_fetch_is_dropped_and_the_partition_fetched_again(tmp_path: Path) -> None:
    run = Run(tmp_path, PromptFetchConsumer)
    committed = await run.drain(records(range(150, 160)), records(range(100, 160)))
    assert run.seeks == [COMMITTED]
    assert run.delivered == list(range(100, 160))
    assert committed == 160


async def test_the_committed_record_is_not_skipped_when_a_fetch_starts_one_later(
    tmp_path: Path,
) -> None:
    # faust sees no gap between 100 (the read offset after the seek) and 101.
    run = Run(tmp_path, PromptFetchConsumer)
    committed = await run.drain(records(range(101, 110)), records(range(100, 110)))
    assert run.delivered == list(range(100, 110))
    assert committed == 110


async def test_a_real_hole_is_taken_once_the_partition_was_fetched_again(tmp_path: Path) -> None:
    run = Run(tmp_path, PromptFetchConsumer)
    committed = await run.drain(records(range(105, 110)), records(range(105, 110)))
    assert run.seeks == [COMMITTED]
    assert run.delivered == list(range(105, 110))
    # faust's gap bookkeeping counts 105 twice, so it gets there in two commits.
    assert committed == 106
    run.consumer._committed_offset[TP0] = committed
    assert run.consumer._new_offset(TP0) == 110


def test_the_guard_skips_what_was_delivered_and_forgets_revoked_partitions() -> None:
    guard = DeliveryGuard()
    guard.sought(TP0, 10)
    assert [guard.admit(TP0, o) for o in (10, 11, 11, 9)] == [
        Verdict.DELIVER, Verdict.DELIVER, Verdict.SKIP, Verdict.SKIP,
    ]
    assert guard.admit(TP0, 20) is Verdict.RESEEK
    assert guard.admit(TP0, 12) is Verdict.DELIVER
    guard.forget({TP0})
    assert guard.admit(TP0, 500) is Verdict.DELIVER  # position unknown: whatever comes
