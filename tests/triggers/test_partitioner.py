"""The pure murmur2 agrees with Kafka's: the Java client's published vectors and the
Python clients' implementations (kafka-python's DefaultPartitioner, aiokafka's)."""

from __future__ import annotations

import random

import pytest
from aiokafka.partitioner import murmur2 as aiokafka_murmur2
from kafka.partitioner.default import DefaultPartitioner
from kafka.partitioner.default import murmur2 as kafka_python_murmur2

from triggers.partitioner import murmur2, partition_for

# org.apache.kafka.common.utils.UtilsTest.testMurmur2 (Java's signed ints).
JAVA_VECTORS = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}


@pytest.mark.parametrize(("key", "java"), sorted(JAVA_VECTORS.items()))
def test_the_java_clients_vectors(key: bytes, java: int) -> None:
    assert murmur2(key) == java & 0xFFFFFFFF


def test_agrees_with_the_python_clients_on_random_keys() -> None:
    rng = random.Random(14)
    keys = [b"", b"a", "고객-1".encode(), b"anon:7f3e", b"512475445"]
    keys += [rng.randbytes(rng.randrange(0, 40)) for _ in range(2000)]
    for key in keys:
        assert murmur2(key) == kafka_python_murmur2(key) & 0xFFFFFFFF == aiokafka_murmur2(key)


class _Cluster:
    """The little of kafka-python's ClusterMetadata that its partitioner reads."""

    def __init__(self, partitions: int) -> None:
        self._partitions = set(range(partitions))

    def topics(self) -> set[str]:
        return {"t"}

    def partitions_for_topic(self, topic: str) -> set[int]:
        return self._partitions

    def available_partitions_for_topic(self, topic: str) -> set[int]:
        return self._partitions


def test_partition_is_kafka_python_default_partitioners() -> None:
    rng = random.Random(9)
    partitioner = DefaultPartitioner()
    for _ in range(500):
        key = str(rng.randrange(10**9)).encode()
        partitions = rng.randrange(1, 64)
        expected = partitioner.partition("t", key, key, None, None, _Cluster(partitions))
        assert partition_for(key, partitions) == expected


def test_streams_partitions_with_the_same_function() -> None:
    from streams.topics import partition_for as streams_partition_for

    for key in (b"c-1", b"anon:x", b"512475445", b""):
        assert streams_partition_for(key, 8) == partition_for(key, 8)
