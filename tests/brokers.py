"""The two brokers the end-to-end tests run on: Tansu (embedded, the dev default) and
Apache Kafka (what production runs), as a pytest parameter.

Apache Kafka needs Java 17+. Outside CI a machine without it skips the Kafka runs
with a one-line reason; with CI set (as `.ci/run` runs) they run and fail, so CI
never passes by skipping them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from omnicue.kafka_broker import JavaNotFound, KafkaBroker, find_java
from omnicue.services import ServiceError, TansuBroker, free_port

BROKERS = ("tansu", "kafka")
Broker = TansuBroker | KafkaBroker


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def _java_missing() -> str | None:
    try:
        find_java()
    except JavaNotFound as exc:
        return str(exc)
    return None


def skip_without_java(broker: str) -> None:
    """Skip a Kafka run where there is no Java, except in CI (where it must fail)."""
    missing = None if broker != "kafka" or in_ci() else _java_missing()
    if missing:
        pytest.skip(f"Apache Kafka: {missing}")


def broker_params() -> list[Any]:
    """`params=` for a broker fixture: ids `tansu` and `kafka`."""
    missing = None if in_ci() else _java_missing()
    kafka_marks = [pytest.mark.skip(reason=f"Apache Kafka: {missing}")] if missing else []
    return [pytest.param("tansu", id="tansu"), pytest.param("kafka", id="kafka",
                                                             marks=kafka_marks)]


def start_broker(kind: str, log_dir: Path) -> Broker:
    """A started broker of that kind on a free port; stop it (or use `with`)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    if kind == "tansu":
        return TansuBroker(free_port(), log_path=log_dir / "tansu.log").start(timeout=30)
    if kind == "kafka":
        return _start_kafka(log_dir)
    raise ValueError(f"unknown broker {kind!r}; expected one of {BROKERS}")


# Ports are picked free, then bound by the JVM a few seconds later: on a busy
# machine another process can take one in between (seen in a CI run while other
# test sessions started brokers). Such a start is retried on new ports.
KAFKA_START_ATTEMPTS = 3


def _start_kafka(log_dir: Path) -> KafkaBroker:
    for attempt in range(1, KAFKA_START_ATTEMPTS + 1):
        log_path = log_dir / ("kafka.log" if attempt == 1 else f"kafka-{attempt}.log")
        try:
            return KafkaBroker(free_port(), log_path=log_path).start()
        except ServiceError:
            log = log_path.read_text(encoding="utf-8", errors="replace")
            if "Address already in use" not in log or attempt == KAFKA_START_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


def broker_kind(broker: Broker) -> str:
    return "tansu" if isinstance(broker, TansuBroker) else "kafka"


def broker_dir(root: Path, broker: Broker) -> Path:
    """A directory of `root` for this broker's run (logs, worker data)."""
    path = root / broker_kind(broker)
    path.mkdir(parents=True, exist_ok=True)
    return path


def is_dev_broker(broker: Broker) -> bool:
    """True where the Tansu workarounds apply (`OMNICUE_DEV_BROKER`)."""
    return isinstance(broker, TansuBroker)
