from __future__ import annotations

import os
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient

from omnicue.services import (
    ManagedProcess,
    RedisServer,
    ServiceError,
    TansuBroker,
    free_port,
)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _consume(bootstrap: str, topic: str, partitions: int, want: int) -> list[bytes]:
    # Tansu reports wrong end offsets, so read until `want` records arrive.
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
        consumer.seek_to_beginning()
        values: list[bytes] = []
        deadline = time.monotonic() + 15
        while len(values) < want and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=200).values():
                values.extend(record.value for record in records)
        return values
    finally:
        consumer.close()


def test_broker_round_trip(broker: TansuBroker) -> None:
    topic = f"test.round-trip.{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap_server)
    try:
        admin.create_topics({topic: {"num_partitions": 2, "replication_factor": 1}})
    finally:
        admin.close()
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap_server)
    sent = [f"v{i}".encode() for i in range(10)]
    for i, value in enumerate(sent):
        producer.send(topic, key=f"k{i}".encode(), value=value)
    producer.flush()
    producer.close()

    assert sorted(_consume(broker.bootstrap_server, topic, 2, len(sent))) == sorted(sent)
    assert broker.running and broker.url == f"kafka://127.0.0.1:{broker.port}"


def test_redis_ping(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url)
    try:
        assert client.ping()
    finally:
        client.close()


@pytest.mark.parametrize("service", [TansuBroker, RedisServer])
def test_stop_leaves_no_process(service: type[TansuBroker | RedisServer], tmp_path: Path) -> None:
    server = service(free_port(), log_path=tmp_path / "service.log").start()
    pid = server.pid
    assert pid is not None and not _gone(pid)
    server.stop()
    assert not server.running
    assert _gone(pid)
    server.stop()  # idempotent


def test_start_fails_clearly_when_port_taken(redis_server: RedisServer, tmp_path: Path) -> None:
    squatted = RedisServer(redis_server.port, log_path=tmp_path / "redis.log")
    with pytest.raises(ServiceError, match="Address already in use"):
        squatted.start(timeout=5)
    assert not squatted.running


def test_stop_sigkills_a_process_ignoring_sigterm(tmp_path: Path) -> None:
    script = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ignoring sigterm', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = ManagedProcess([sys.executable, "-c", script], log_path=tmp_path / "stubborn.log")
    proc.start()
    # Stopping before the handler is installed would test nothing.
    proc.wait_for_line("ignoring sigterm", timeout=10)
    pid = proc.pid
    assert pid is not None

    started = time.monotonic()
    assert proc.stop(timeout=0.5) == -signal.SIGKILL
    assert time.monotonic() - started < 5
    assert _gone(pid)


def test_kill_and_wait_for_line(tmp_path: Path) -> None:
    proc = ManagedProcess(
        [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"],
        log_path=tmp_path / "crash.log",
    )
    with proc:
        assert proc.wait_for_line(r"^(up)$").group(1) == "up"
        proc.kill(signal.SIGKILL)
        assert proc.wait(timeout=5) == -signal.SIGKILL
        with pytest.raises(ServiceError, match="exited before logging"):
            proc.wait_for_line("never printed", timeout=5)
        # A restart appends to the same log but must not match the old run's lines.
        proc.start()
        proc.wait_for_line("up")
        assert proc.log_text().count("up") == 1
