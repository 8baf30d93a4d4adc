from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from omnicue.services import RedisServer, free_port
from omnicue.settings import Settings
from omnicue.topics import create_topics
from tests.brokers import Broker, broker_dir, broker_params, is_dev_broker, start_broker

# Seconds, so a whole journey runs within a test.
E2E_RULES = """
version: 1
policy:
  quiet_hours: null
  caps: {per_channel: {limit: 5}}
rules:
  - id: cart_abandonment
    category: marketing
    trigger: {event: cart.item_added, key: properties.cart_id}
    cancel_on:
      - event: order.completed
        when: event.properties.cart_id == journey.key
        reason: purchased
      - event: cart.item_removed
        when: event.properties.cart_id == journey.key && !(journey.key in customer.carts)
        reason: cart_emptied
    steps:
      - {after: STEP1, channels: [push, email], template: cart_reminder_1}
      - {after: STEP2, channels: [email], template: cart_reminder_2, payload: {coupon: CART10}}
"""


def write_rules(directory: Path, step1: str, step2: str) -> Path:
    path = directory / "rules.yaml"
    path.write_text(E2E_RULES.replace("STEP1", step1).replace("STEP2", step2), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def stack_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stack")


@pytest.fixture(scope="module", params=broker_params())
def e2e_broker(request: pytest.FixtureRequest, stack_dir: Path) -> Iterator[Broker]:
    """A broker per test module and kind (Tansu, Apache Kafka): modules don't see
    each other's records, and every end-to-end test runs on both brokers."""
    with start_broker(request.param, stack_dir / request.param) as server:
        yield server


@pytest.fixture(scope="module")
def run_dir(e2e_broker: Broker, stack_dir: Path) -> Path:
    """The module's directory for this broker's run: worker logs, rules files."""
    return broker_dir(stack_dir, e2e_broker)


@pytest.fixture(scope="module")
def e2e_redis(e2e_broker: Broker, stack_dir: Path) -> Iterator[RedisServer]:
    # One per broker too: senders remember sent action ids, which are deterministic.
    log_path = broker_dir(stack_dir, e2e_broker) / "redis.log"
    with RedisServer(free_port(), log_path=log_path) as server:
        yield server


@pytest.fixture(scope="module")
def make_settings(
    e2e_broker: Broker, e2e_redis: RedisServer, stack_dir: Path
) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "broker": e2e_broker.url,
            "redis_url": e2e_redis.url,
            # The Tansu workarounds on Tansu only: Apache Kafka runs as in production.
            "dev_broker": is_dev_broker(e2e_broker),
            "partitions": 4,
            "data_dir": broker_dir(stack_dir, e2e_broker) / "data",
            "web_port": free_port(),
        }
        values.update(overrides)
        settings = Settings(**values)
        create_topics(settings)
        return settings

    return make
