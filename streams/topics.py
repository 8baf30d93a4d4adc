"""The Faust topic objects (all raw bytes: the contracts are JSON, parsed by us)."""

from __future__ import annotations

from dataclasses import dataclass

import faust
from faust.types import TopicT

from schemas import topics as names
from triggers.partitioner import partition_for as _kafka_partition_for


@dataclass(frozen=True)
class Topics:
    events: TopicT
    dead_letters: TopicT
    customer_inputs: TopicT
    decisions: TopicT
    actions: dict[str, TopicT]
    conversions: TopicT


def partition_for(key: bytes, partitions: int) -> int:
    """The partition the producer's default partitioner picks for a key (murmur2);
    the same function as the partitioned replay's (`triggers.partitioner`)."""
    return _kafka_partition_for(key, partitions)


def raw_topic(app: faust.App, name: str, partitions: int) -> TopicT:
    """A topic of plain bytes: our contracts are JSON that we parse ourselves."""
    return app.topic(
        name,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=partitions,
    )


def declare_topics(app: faust.App, partitions: int) -> Topics:
    def raw(name: str) -> TopicT:
        return raw_topic(app, name, partitions)

    return Topics(
        events=raw(names.EVENTS),
        dead_letters=raw(names.EVENTS_DLQ),
        customer_inputs=raw(names.CUSTOMER_INPUTS),
        decisions=raw(names.DECISIONS),
        actions={channel: raw(topic) for channel, topic in names.ACTIONS.items()},
        conversions=raw(names.CONVERSIONS),
    )
