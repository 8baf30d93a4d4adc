"""A faust consumer that waits at most 100 ms for a fetch, on either broker.

faust fixes aiokafka's `fetch_max_wait_ms` at 1500. That wait holds up data on
both brokers, for different reasons:

- The dev broker (Tansu) answers a fetch on an empty partition only after the
  whole wait, so a caught-up stage sees new records up to 1.5 s late, at each of
  the pipeline's two hops. Measured: p50 event-to-action latency 3.4 s at
  1500 ms, 0.35 s at 100 ms.
- Apache Kafka answers as soon as one fetched partition has data, but aiokafka
  sends one fetch at a time per broker, and only for the partitions that hold no
  unconsumed records. When the worker is slower to take records than the broker
  is to send them, the next fetch names only the idle partitions (at worst only
  faust's assignor topic `<app id>-__assignor-__leader`, which never gets a
  record). Kafka holds that fetch for the whole wait, and until it returns no
  other partition is fetched again, however soon its records are consumed.
  Measured on Kafka 4.4.0 (issue 10; `python -m bench.pipeline --broker kafka`,
  3 alternated pairs at 800 events/s on a shared 2-core machine, load 2.2-3.4):
  pipeline p50/p99 156/719, 371/1066, 262/1118 ms with 100 ms against
  2860/3508, 160/1901, 2750/3429 ms with 1500 ms, every pair's p99 better. With
  1500 ms the latency jumped to ~3 s within seconds and stayed there, and the
  worker fell behind the load in two of the three runs (608 and 632 outputs/s).
  On a backlog 1500 ms was 10-18% faster (fewer, fuller fetches): the price of
  the shorter wait.

An idle worker then sends ten empty fetches a second instead of two thirds of
one: nothing for either broker.

It also delivers every record of an acked topic exactly in offset order, or not at
all (`DeliveryGuard`, below, says why).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable
from enum import Enum
from typing import Any

import aiokafka
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread, Consumer
from faust.types import TP, Message

log = logging.getLogger(__name__)

FETCH_MAX_WAIT_MS = 100


class Verdict(Enum):
    DELIVER = "deliver"
    SKIP = "skip"
    RESEEK = "reseek"


class DeliveryGuard:
    """Per partition, the next offset the agents must get; records out of that order
    are not delivered, and a jump past it fetches again from it.

    faust's consumer loop (`Consumer._drain_messages`) compares each fetched
    record's offset with the partition's "read offset" (the last one delivered, or
    the committed offset after a seek). A record more than one past it is taken for
    a gap in the log: `_add_gap` marks every offset in between as acked, and the
    next commit moves past them although no agent ever saw them. Those records,
    fetched again from the committed position, are then below the read offset and
    dropped without a word. One past it (the first record after a seek to `C` being
    `C + 1`) is not even a gap, and `C` is committed past as well.

    Such a jump happens when records reach the loop from a position the consumer
    no longer has: a fetch that was in flight when the partition was sought back to
    its committed offset (faust compares the generation only after the fetch
    returned). Traced in the crash test (tests/e2e/test_crash.py, Tansu, before
    this guard): a worker starting on a backlog had fetched customer-inputs[6] up
    to 815 while it recovered; `perform_seek` put it back to the committed 777; 1 ms
    later the loop got 816 from a fetch made before the seek: faust acked
    778-816 as a gap, dropped 777-815 when they came again (2,214 records
    dropped over all partitions), and its next commit was 795. Its predecessor had
    decided those records, so nothing went missing that time; records not yet
    processed when the seek came are lost that way, as in issue 9's ranges of
    `omnicue.events`. Shown with faust's own
    bookkeeping in tests/streams/test_consumer.py: committed 100, a stale fetch
    from 150, then the real one from 100: faust delivers 150-159, drops 100-158
    and commits past 100-149.

    Our topics hold no offsets without records (no compaction, no transactions),
    so a jump is never a real gap: the guard drops what does not follow, seeks
    the partition back to the offset that does, and only if that fetch again
    starts later takes the hole as real. Changelogs (compacted, not acked) are not
    guarded.
    """

    def __init__(self) -> None:
        self._next: dict[TP, int] = {}
        # Partitions sought back to this offset after a jump, and not yet past it.
        self._sought: dict[TP, int] = {}

    def expected(self, tp: TP) -> int | None:
        return self._next.get(tp)

    def sought(self, tp: TP, offset: int | None) -> None:
        """The partition's position is now `offset` (None: unknown, take what comes)."""
        if offset is None:
            self._next.pop(tp, None)
        else:
            self._next[tp] = offset
        self._sought.pop(tp, None)

    def forget(self, tps: Iterable[TP]) -> None:
        for tp in tps:
            self._next.pop(tp, None)
            self._sought.pop(tp, None)

    def admit(self, tp: TP, offset: int) -> Verdict:
        expected = self._next.get(tp)
        if expected is None or offset == expected:
            self._deliver(tp, offset)
            return Verdict.DELIVER
        if offset < expected:
            return Verdict.SKIP  # delivered already
        if self._sought.get(tp) == expected:
            # Fetched again from `expected`, and it still starts later: a real hole.
            self._deliver(tp, offset)
            return Verdict.DELIVER
        self._sought[tp] = expected
        return Verdict.RESEEK

    def _deliver(self, tp: TP, offset: int) -> None:
        self._next[tp] = offset + 1
        self._sought.pop(tp, None)


class _PromptFetchThread(AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        # Read by AIOKafkaConsumer.start() when it builds its fetcher.
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS
        return consumer


class PromptFetchConsumer(Consumer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.delivery_guard = DeliveryGuard()
        super().__init__(*args, **kwargs)

    def _new_consumer_thread(self) -> AIOKafkaConsumerThread:
        return _PromptFetchThread(self, loop=self.loop, beacon=self.beacon)

    async def getmany(self, timeout: float) -> AsyncIterator[tuple[TP, Message]]:
        guard = self.delivery_guard
        acked = self.app.topics.acks_enabled_for
        # Partitions sought back during this fetch: the rest of its records are stale.
        stale: set[TP] = set()
        async for tp, message in super().getmany(timeout):
            if tp in stale or not acked(tp.topic):
                if tp not in stale:
                    yield tp, message
                continue
            verdict = guard.admit(tp, message.offset)
            if verdict is Verdict.DELIVER:
                yield tp, message
            elif verdict is Verdict.RESEEK:
                expected = guard.expected(tp)
                assert expected is not None
                log.warning(
                    "%s[%s]: fetched offset %s where %s was next; fetching again from %s",
                    tp.topic, tp.partition, message.offset, expected, expected,
                )
                stale.add(tp)
                # faust's seek, not ours: the guard must remember the jump.
                await super().seek(tp, expected)

    async def perform_seek(self) -> None:
        await super().perform_seek()
        # faust has just set each assigned partition's read offset to its committed one.
        for tp in self.assignment():
            self.delivery_guard.sought(tp, self._read_offset.get(tp))

    async def seek(self, partition: TP, offset: int) -> None:
        await super().seek(partition, offset)
        self.delivery_guard.sought(partition, offset)

    async def on_partitions_revoked(self, revoked: set[TP]) -> None:
        self.delivery_guard.forget(revoked)
        await super().on_partitions_revoked(revoked)
