"""The sends of one batch: concurrent across partitions, in order within each.

aiokafka holds one open batch per partition, and `send` waits while that batch is
full. With one record per batch (the dev broker setting) every send then waits for
the previous record of its partition to go out, so awaiting sends one by one
serialises the whole batch on network round trips. Sending each partition's
records as their own sequence, all partitions at once, keeps per-partition order
(and so per-customer order) while the round trips overlap.
"""

from __future__ import annotations

import asyncio

from faust.types import TopicT

from streams.topics import partition_for

Headers = list[tuple[str, bytes]]
_Record = tuple[TopicT, bytes | None, bytes | None, int | None, Headers | None]


class Outbox:
    def __init__(self, partitions: int) -> None:
        self._partitions = partitions
        self._queues: dict[tuple[str, int | None], list[_Record]] = {}

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def add(
        self,
        topic: TopicT,
        key: bytes | None,
        value: bytes | None,
        *,
        headers: Headers | None = None,
    ) -> None:
        # The partition the producer's default partitioner would pick, made explicit
        # so records can be grouped by it; keyless records let the producer choose.
        partition = None if key is None else partition_for(key, self._partitions)
        queue = self._queues.setdefault((topic.get_topic_name(), partition), [])
        queue.append((topic, key, value, partition, headers))

    async def flush(self) -> None:
        queues = list(self._queues.values())
        self._queues = {}
        await asyncio.gather(*(_send_in_order(queue) for queue in queues))


async def _send_in_order(queue: list[_Record]) -> None:
    for topic, key, value, partition, headers in queue:
        await topic.send(key=key, value=value, partition=partition, headers=headers)
