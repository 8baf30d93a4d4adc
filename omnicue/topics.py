"""Create Omnicue's Kafka topics up front.

Brokers auto-create unknown topics on first produce with their own default
partition count (4 on Tansu), which would silently break co-partitioning, so
every topic is created explicitly before any worker or producer starts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from kafka.admin import KafkaAdminClient
from kafka.errors import RetriableError, TopicAlreadyExistsError, for_code

from omnicue.settings import Settings
from schemas.topics import CUSTOMER_INPUTS, PUBLIC_TOPICS, RULES

log = logging.getLogger(__name__)

# The latest applied rules file; compaction keeps it bounded however often rules change.
RULES_TOPIC = RULES


def topic_specs(settings: Settings, extra: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
    """kafka-python `create_topics` specs for every topic Omnicue needs."""
    plain = {"num_partitions": settings.partitions, "replication_factor": 1}
    specs: dict[str, dict[str, Any]] = {
        name: dict(plain) for name in (*PUBLIC_TOPICS, CUSTOMER_INPUTS, *extra)
    }
    # One partition: every worker reads the whole topic, in order.
    specs[RULES_TOPIC] = {
        "num_partitions": 1,
        "replication_factor": 1,
        "configs": {"cleanup.policy": "compact"},
    }
    return specs


def create_topics(
    settings: Settings, extra: Iterable[str] = (), *, timeout: float = 20.0
) -> list[str]:
    """Create the missing topics; returns the names this call created.

    Idempotent: topics that already exist are left alone, including ones whose
    partition count differs from `settings.partitions` (that is logged, since
    changing it would reshuffle keys across partitions).
    """
    specs = topic_specs(settings, extra)
    deadline = time.monotonic() + timeout
    while True:
        try:
            return _create(settings, specs)
        except RetriableError as exc:
            # The broker may still be starting; everything above is safe to repeat.
            if time.monotonic() >= deadline:
                raise
            log.debug("broker not ready for topic creation yet: %s", exc)
            time.sleep(0.2)


def _create(settings: Settings, specs: dict[str, dict[str, Any]]) -> list[str]:
    admin = KafkaAdminClient(
        bootstrap_servers=settings.bootstrap_servers,
        client_id=f"{settings.app_id}-admin",
        bootstrap_timeout_ms=2000,
        request_timeout_ms=10_000,
    )
    try:
        existing = set(admin.list_topics())
        missing = {name: spec for name, spec in specs.items() if name not in existing}
        created: list[str] = []
        if missing:
            response = admin.create_topics(missing, raise_errors=False, wait_for_metadata=True)
            for result in response["topics"]:
                error = for_code(result["error_code"])
                # Already-exists means another process won the race, which is fine.
                if result["error_code"] == 0:
                    created.append(result["name"])
                elif error is not TopicAlreadyExistsError:
                    raise error(f"creating topic {result['name']}: {result['error_message']}")
        _warn_on_partition_mismatch(admin, specs)
        return sorted(created)
    finally:
        admin.close()


def _warn_on_partition_mismatch(admin: KafkaAdminClient, specs: dict[str, dict[str, Any]]) -> None:
    for topic in admin.describe_topics(list(specs)):
        wanted = specs[topic["name"]]["num_partitions"]
        if topic["error_code"] == 0 and len(topic["partitions"]) != wanted:
            log.warning(
                "topic %s has %d partitions, settings want %d",
                topic["name"], len(topic["partitions"]), wanted,
            )  # fmt: skip
