"""Shared fixtures. Services start lazily: only tests that ask for them pay for them."""

from __future__ import annotations

import fcntl
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from omnicue.services import RedisServer, TansuBroker, free_port
from omnicue.settings import Settings

# `make test` runs the suite in two processes (pytest-xdist, `--dist loadscope`: a
# module stays in one process, so its module-scoped broker serves all its tests),
# since most end-to-end time is spent waiting for timers and rebalances.


@pytest.fixture(scope="module")
def dev_stack_lock() -> Iterator[None]:
    """One `omnicue dev` at a time across test processes: it binds fixed ports (9092,
    8088, ...). Modules that run it use this fixture."""
    path = Path(tempfile.gettempdir()) / "omnicue-tests-dev-stack.lock"
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TansuBroker]:
    """One in-memory Tansu for the session; topics outlive individual tests."""
    logs = tmp_path_factory.mktemp("broker")
    with TansuBroker(free_port(), log_path=logs / "tansu.log") as server:
        yield server


@pytest.fixture
def fresh_broker(tmp_path: Path) -> Iterator[TansuBroker]:
    """A broker of its own, for tests that need an empty cluster (starts in ~0.1s)."""
    with TansuBroker(free_port(), log_path=tmp_path / "tansu.log") as server:
        yield server


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    logs = tmp_path_factory.mktemp("redis")
    with RedisServer(free_port(), log_path=logs / "redis.log") as server:
        yield server


@pytest.fixture
def settings_factory(
    broker: TansuBroker, redis_server: RedisServer, tmp_path: Path
) -> Callable[..., Settings]:
    """`make(**overrides) -> Settings` pointing at the session broker and Redis."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "broker": broker.url,
            "redis_url": redis_server.url,
            "dev_broker": True,
            "partitions": 4,
            "data_dir": tmp_path,
            "store": "memory://",
            "web_port": free_port(),
        }
        values.update(overrides)
        return Settings(**values)

    return make
