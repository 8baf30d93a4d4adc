"""The pipeline's own records: collected per batch, sent in producer batches, awaited.

Faust's producer also writes the table changelogs, and on the dev broker it must
send one record per producer batch (with several, the broker reports end offsets
that make table recovery read stale values). The records the pipeline emits itself
(the repartition to customers, timer inputs, actions, decisions, dead letters) are
never recovered from end offsets, so they go through a second producer with normal
batching: a processing batch of 500 inputs then costs a few round trips instead of
one per record.

A batch's records are awaited until the broker has them, before the batch's input
offsets can be committed: at-least-once, as with faust's own producer (which is
flushed before every commit).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.structs import RecordMetadata
from faust.types import TopicT
from mode import Service

from omnicue.settings import Settings

log = logging.getLogger(__name__)

# Seconds between attempts to send a batch's records while the broker refuses them.
FLUSH_RETRY_FIRST = 0.5
FLUSH_RETRY_MAX = 30.0

Headers = list[tuple[str, bytes]]
_Record = tuple[str, bytes | None, bytes | None, int | None, Headers | None]


class RecordSender(Service):
    """One batching Kafka producer per worker, started before the agents, stopped after."""

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        self._settings = settings
        self._producer: AIOKafkaProducer | None = None
        super().__init__(**kwargs)

    def build_producer(self) -> AIOKafkaProducer:
        return AIOKafkaProducer(
            bootstrap_servers=self._settings.bootstrap_servers,
            client_id=f"{self._settings.app_id}-records",
            acks="all",
            # On Apache Kafka a retried batch is then never written twice or out of
            # order; the dev broker (Tansu) rejects idempotent producers from aiokafka.
            enable_idempotence=not self._settings.dev_broker,
            # No linger: the records of a processing batch are appended without
            # yielding to the event loop, so they leave together anyway.
            linger_ms=0,
            max_batch_size=256 * 1024,
        )

    async def on_start(self) -> None:
        producer = self.build_producer()
        await producer.start()
        self._producer = producer

    async def on_stop(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()  # sends what is still queued

    async def send_all(self, records: list[_Record]) -> list[RecordMetadata]:
        """Send and await the records; where each one landed, in their order."""
        if self._producer is None:
            raise RuntimeError("the record sender is not started")
        deliveries = [
            await self._producer.send(topic, value, key=key, partition=partition, headers=headers)
            for topic, key, value, partition, headers in records
        ]
        return list(await asyncio.gather(*deliveries))


class Outbox:
    """The records one processing batch emits, in order (and so in order per partition)."""

    def __init__(self, sender: RecordSender) -> None:
        self._sender = sender
        self._records: list[_Record] = []

    def __len__(self) -> int:
        return len(self._records)

    def add(
        self,
        topic: TopicT,
        key: bytes | None,
        value: bytes | None,
        *,
        partition: int | None = None,
        headers: Headers | None = None,
    ) -> None:
        # Without a partition, the producer picks murmur2(key), as Kafka clients do.
        self._records.append((topic.get_topic_name(), key, value, partition, headers))

    async def flush(self) -> list[RecordMetadata]:
        """Send what was added; where each record landed (the timer task waits on it).

        Never gives up. faust's take_events acks a batch whatever its body did, so a
        flush that raised would let the next commit pass inputs whose outputs never
        reached the broker. Waiting stalls the stage instead (consumer lag shows it),
        and resending after a failure duplicates at most what had already landed,
        which every consumer of these topics deduplicates (event ids, action ids).
        """
        records, self._records = self._records, []
        if not records:
            return []
        delay = FLUSH_RETRY_FIRST
        while True:
            try:
                return await self._sender.send_all(records)
            except KafkaError as exc:
                log.error(
                    "could not send %d records (%r); sending them again in %.1f s",
                    len(records), exc, delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, FLUSH_RETRY_MAX)
