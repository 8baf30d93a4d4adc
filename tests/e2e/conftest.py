from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from omnicue.services import RedisServer, TansuBroker, free_port
from omnicue.settings import Settings
from omnicue.topics import create_topics

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


@pytest.fixture(scope="module")
def e2e_broker(stack_dir: Path) -> Iterator[TansuBroker]:
    """A broker per test module: modules don't see each other's records."""
    with TansuBroker(free_port(), log_path=stack_dir / "tansu.log") as server:
        yield server


@pytest.fixture(scope="module")
def e2e_redis(stack_dir: Path) -> Iterator[RedisServer]:
    with RedisServer(free_port(), log_path=stack_dir / "redis.log") as server:
        yield server


@pytest.fixture(scope="module")
def make_settings(
    e2e_broker: TansuBroker, e2e_redis: RedisServer, stack_dir: Path
) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "broker": e2e_broker.url,
            "redis_url": e2e_redis.url,
            "dev_broker": True,
            "partitions": 4,
            "data_dir": stack_dir / "data",
            "web_port": free_port(),
        }
        values.update(overrides)
        settings = Settings(**values)
        create_topics(settings)
        return settings

    return make
