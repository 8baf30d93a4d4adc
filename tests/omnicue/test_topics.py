from __future__ import annotations

from collections.abc import Callable

from kafka import KafkaConsumer

from omnicue.services import TansuBroker
from omnicue.settings import Settings
from omnicue.topics import RULES_TOPIC, create_topics, topic_specs
from schemas.topics import CUSTOMER_INPUTS, PUBLIC_TOPICS


def _partitions(broker: TansuBroker, topic: str) -> set[int]:
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap_server)
    try:
        return consumer.partitions_for_topic(topic) or set()
    finally:
        consumer.close()


def test_create_topics_is_idempotent(
    fresh_broker: TansuBroker, settings_factory: Callable[..., Settings]
) -> None:
    # A broker of its own: the session one may already hold these names.
    settings = settings_factory(broker=fresh_broker.url, partitions=3)
    expected = {*PUBLIC_TOPICS, CUSTOMER_INPUTS, RULES_TOPIC, "test.extra"}

    created = create_topics(settings, extra=["test.extra"])

    assert set(created) == expected
    for topic in expected - {RULES_TOPIC}:
        assert _partitions(fresh_broker, topic) == {0, 1, 2}, topic
    # Every worker reads the whole rules topic in order: one partition.
    assert _partitions(fresh_broker, RULES_TOPIC) == {0}
    assert create_topics(settings, extra=["test.extra"]) == []
    assert create_topics(settings, extra=["test.other"]) == ["test.other"]


def test_rules_topic_is_compacted() -> None:
    # Tansu 0.6 accepts topic configs but describes none back, so check the request.
    spec = topic_specs(Settings(partitions=2))[RULES_TOPIC]
    assert spec == {
        "num_partitions": 1,
        "replication_factor": 1,
        "configs": {"cleanup.policy": "compact"},
    }
