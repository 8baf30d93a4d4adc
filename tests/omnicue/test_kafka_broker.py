"""The Apache Kafka launcher: its settings against docker-compose.yml, a real broker
used by both Python clients, the jar cache, and what it says when Java or Maven is
missing.

Tests that run Java skip when there is no Java 17+ on a developer's machine; with CI
set they run and fail, so that CI never passes by skipping them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic

from omnicue.kafka_broker import (
    BROKER_SETTINGS,
    JAVA_MISSING,
    KAFKA_POM,
    KAFKA_VERSION,
    MAVEN_MISSING,
    STAMP_NAME,
    JavaNotFound,
    KafkaBroker,
    MavenNotFound,
    _cache_is_complete,
    find_java,
    kafka_cache_root,
    kafka_jars,
)
from omnicue.services import free_port

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"

# Compose variables the launcher sets differently on purpose, and why.
COMPOSE_ONLY = {
    "KAFKA_LISTENERS": "the launcher listens on free ports of 127.0.0.1",
    "KAFKA_ADVERTISED_LISTENERS": "clients reach the launcher's broker on 127.0.0.1",
    "KAFKA_CONTROLLER_QUORUM_VOTERS": "the controller is on a free port of 127.0.0.1",
    "CLUSTER_ID": "the launcher formats every broker with a random cluster id",
}
# server.properties keys the launcher sets per run, beyond BROKER_SETTINGS.
LAUNCHER_PER_RUN = {"listeners", "advertised.listeners", "controller.quorum.voters", "log.dirs"}


def _ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def _has_java() -> bool:
    try:
        find_java()
    except JavaNotFound:
        return False
    return True


needs_java = pytest.mark.skipif(
    not _has_java() and not _ci(),
    reason="no Java 17+ on PATH or JAVA_HOME (install openjdk-17-jre-headless)",
)
needs_maven = pytest.mark.skipif(
    shutil.which("mvn") is None and not _ci(), reason="no Maven on PATH (install maven)"
)


def _property_name(variable: str) -> str:
    """The apache/kafka image's mapping: KAFKA_A_B → a.b, `__` → `_`, `___` → `-`."""
    name = variable.removeprefix("KAFKA_").lower()
    return name.replace("___", "-").replace("__", "\0").replace("_", ".").replace("\0", "_")


def _compose_broker() -> dict[str, Any]:
    compose = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    broker = compose["services"]["broker"]
    assert isinstance(broker, dict)
    return broker


def _compose_broker_env() -> dict[str, str]:
    env = _compose_broker()["environment"]
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return {
        key: str(value).lower() if isinstance(value, bool) else str(value)
        for key, value in env.items()
    }


def _fake_tool(directory: Path, name: str, script: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(f"#!/bin/sh\n{script}\n", encoding="utf-8")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _failing_mvn(directory: Path, marker: Path) -> None:
    """An `mvn` that records being run: proof that a start did not resolve again."""
    _fake_tool(directory, "mvn", f"touch '{marker}'\nexit 1")


# -- settings, without Java -------------------------------------------------------------


def test_property_names_follow_the_image() -> None:
    assert _property_name("KAFKA_NODE_ID") == "node.id"
    assert _property_name("KAFKA_LOG4J__LOGGERS") == "log4j_loggers"
    assert _property_name("KAFKA_SASL___MECHANISM") == "sasl-mechanism"


def test_launcher_settings_match_the_compose_broker() -> None:
    env = _compose_broker_env()
    assert set(COMPOSE_ONLY) <= set(env), "an exception names a variable compose lacks"
    unknown = {key for key in env if not key.startswith("KAFKA_") and key not in COMPOSE_ONLY}
    assert not unknown, "compose variables that are no broker property"
    compose = {_property_name(key): value for key, value in env.items() if key not in COMPOSE_ONLY}
    assert compose == dict(BROKER_SETTINGS)


def test_per_run_settings_add_addresses_and_override_nothing(tmp_path: Path) -> None:
    broker = KafkaBroker(free_port(), log_path=tmp_path / "kafka.log", data_dir=tmp_path)
    settings = broker.server_settings()
    assert set(settings) - set(BROKER_SETTINGS) == LAUNCHER_PER_RUN
    assert {key: settings[key] for key in BROKER_SETTINGS} == dict(BROKER_SETTINGS)
    assert settings["advertised.listeners"] == f"PLAINTEXT://{broker.bootstrap_server}"
    assert settings["controller.quorum.voters"] == f"1@127.0.0.1:{broker.controller_port}"
    assert broker.controller_port != broker.port


def test_compose_runs_the_launchers_kafka_version() -> None:
    assert _compose_broker()["image"] == f"apache/kafka:{KAFKA_VERSION}"


def test_cache_stamp_must_match_version_pom_and_jars(tmp_path: Path) -> None:
    version_dir = tmp_path / KAFKA_VERSION
    (version_dir / "libs").mkdir(parents=True)
    (version_dir / "libs" / f"kafka_2.13-{KAFKA_VERSION}.jar").write_bytes(b"")
    assert not _cache_is_complete(version_dir, KAFKA_VERSION)  # no stamp: Maven died

    stamp: dict[str, Any] = {
        "kafka_version": KAFKA_VERSION,
        "pom_sha256": hashlib.sha256(KAFKA_POM.read_bytes()).hexdigest(),
        "jars": [f"kafka_2.13-{KAFKA_VERSION}.jar"],
    }
    (version_dir / STAMP_NAME).write_text(json.dumps(stamp))
    assert _cache_is_complete(version_dir, KAFKA_VERSION)
    assert not _cache_is_complete(version_dir, "0.0.1")

    (version_dir / STAMP_NAME).write_text(json.dumps({**stamp, "pom_sha256": "changed"}))
    assert not _cache_is_complete(version_dir, KAFKA_VERSION)

    (version_dir / STAMP_NAME).write_text(json.dumps({**stamp, "jars": ["gone.jar"]}))
    assert not _cache_is_complete(version_dir, KAFKA_VERSION)


# -- missing tools ------------------------------------------------------------------------


def test_without_java_the_error_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "no-jdk"))
    broker = KafkaBroker(free_port(), log_path=tmp_path / "kafka.log")
    with pytest.raises(JavaNotFound) as raised:
        broker.start()
    assert str(raised.value) == (
        "Apache Kafka needs Java 17 or newer: `apt-get install openjdk-17-jre-headless`, "
        "or set JAVA_HOME"
    )
    assert str(raised.value) == JAVA_MISSING
    assert not broker.running


def test_an_old_java_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    _fake_tool(bin_dir, "java", """echo 'openjdk version "11.0.22" 2024-01-16' >&2""")
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    with pytest.raises(JavaNotFound) as raised:
        find_java()
    assert str(raised.value) == f"{JAVA_MISSING} ({bin_dir / 'java'} is Java 11)"


def test_an_empty_cache_without_maven_says_how_to_fill_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    _fake_tool(bin_dir, "java", """echo 'openjdk version "17.0.15" 2025-04-15' >&2""")
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("OMNICUE_KAFKA_CACHE", str(tmp_path / "cache"))
    broker = KafkaBroker(free_port(), log_path=tmp_path / "kafka.log")
    with pytest.raises(MavenNotFound) as raised:
        broker.start()
    cache = tmp_path / "cache" / KAFKA_VERSION
    assert str(raised.value) == MAVEN_MISSING.format(cache=cache)
    assert str(raised.value) == (
        f"Apache Kafka's jars are not in the cache {cache} yet, and resolving them needs "
        "Maven once: `apt-get install maven`, or put `mvn` on PATH"
    )


def test_cache_root_is_outside_the_repository(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMNICUE_KAFKA_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "/var/cache/someone")
    assert kafka_cache_root() == Path("/var/cache/someone/omnicue/kafka")
    monkeypatch.setenv("OMNICUE_KAFKA_CACHE", "/srv/kafka-jars")
    assert kafka_cache_root() == Path("/srv/kafka-jars")
    monkeypatch.delenv("OMNICUE_KAFKA_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert kafka_cache_root() == Path.home() / ".cache" / "omnicue" / "kafka"


# -- a real broker ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    logs = tmp_path_factory.mktemp("kafka")
    with KafkaBroker(free_port(), log_path=logs / "kafka.log") as server:
        yield server


def _create_topic(bootstrap: str, partitions: int) -> str:
    topic = f"test.kafka.{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    finally:
        admin.close()
    return topic


async def _aiokafka_round_trip(bootstrap: str, topic: str, sent: list[bytes]) -> None:
    # Idempotent and transactional producers: what the dev broker refuses, and what
    # faust's exactly_once needs.
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True)
    await producer.start()
    try:
        for i, value in enumerate(sent[:-1]):
            await producer.send_and_wait(topic, value, key=f"k{i}".encode())
    finally:
        await producer.stop()
    transactional = AIOKafkaProducer(
        bootstrap_servers=bootstrap, transactional_id=f"omnicue-test-{topic}"
    )
    await transactional.start()
    try:
        async with transactional.transaction():
            await transactional.send(topic, sent[-1], key=b"k-txn")
    finally:
        await transactional.stop()

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"aiokafka-{topic}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level="read_committed",
    )
    await consumer.start()
    try:
        received: list[bytes] = []
        deadline = time.monotonic() + 30
        while len(received) < len(sent) and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                received.extend(record.value for record in records if record.value is not None)
        assert sorted(received) == sorted(sent)
        await consumer.commit()
        partitions = sorted(consumer.assignment(), key=lambda tp: tp.partition)
        assert len(partitions) == 3
        ends = await consumer.end_offsets(partitions)
        committed = {tp: await consumer.committed(tp) for tp in partitions}
        # Kafka reports end offsets correctly (the dev broker does not); with the
        # transaction's commit marker they pass the records by one.
        assert sum(ends.values()) == len(sent) + 1
        assert committed == {tp: ends[tp] for tp in partitions}
    finally:
        await consumer.stop()


@needs_java
def test_aiokafka_and_kafka_python_produce_consume_and_commit_in_groups(
    kafka: KafkaBroker,
) -> None:
    topic = _create_topic(kafka.bootstrap_server, partitions=3)
    from_aiokafka = [f"aio-{i}".encode() for i in range(10)]
    asyncio.run(_aiokafka_round_trip(kafka.bootstrap_server, topic, from_aiokafka))

    # kafka-python 3.x: idempotent, acks=all by default.
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap_server)
    from_kafka_python = [f"kp-{i}".encode() for i in range(10)]
    for i, value in enumerate(from_kafka_python):
        producer.send(topic, key=f"kp{i}".encode(), value=value)
    producer.flush()
    producer.close()

    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=kafka.bootstrap_server,
        group_id=f"kafka-python-{topic}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level="read_committed",
    )
    try:
        want = from_aiokafka + from_kafka_python
        received: list[bytes] = []
        deadline = time.monotonic() + 30
        while len(received) < len(want) and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                received.extend(record.value for record in records)
        assert sorted(received) == sorted(want)
        consumer.commit()
        partitions = [TopicPartition(topic, p) for p in range(3)]
        assert consumer.assignment() == set(partitions)
        ends = consumer.end_offsets(partitions)
        assert {tp: consumer.committed(tp) for tp in partitions} == ends
    finally:
        consumer.close()

    admin = KafkaAdminClient(bootstrap_servers=kafka.bootstrap_server)
    try:
        groups = {group["group_id"] for group in admin.list_groups()}
    finally:
        admin.close()
    assert {f"aiokafka-{topic}", f"kafka-python-{topic}"} <= groups


@needs_java
def test_a_second_start_uses_the_cache_without_maven(
    kafka: KafkaBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `kafka` started first, so the cache is filled and stamped.
    stamp = kafka_cache_root() / KAFKA_VERSION / STAMP_NAME
    before = stamp.stat()
    ran_maven = tmp_path / "mvn-was-run"
    _failing_mvn(tmp_path / "bin", ran_maven)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")

    broker = KafkaBroker(free_port(), log_path=tmp_path / "kafka.log")
    with broker:
        assert broker.running
        pid, data_dir = broker.pid, broker.data_dir
        assert pid is not None and data_dir.is_dir()
    assert not ran_maven.exists()
    after = stamp.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not data_dir.exists(), "a temporary data dir outlived its broker"


@needs_java
def test_a_restarted_broker_keeps_its_records(tmp_path: Path) -> None:
    # Kafka reads server.properties as ISO-8859-1: a non-ASCII path must still work.
    data_dir = tmp_path / "데이터"
    broker = KafkaBroker(free_port(), log_path=tmp_path / "kafka.log", data_dir=data_dir)
    with broker:
        topic = _create_topic(broker.bootstrap_server, partitions=1)
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap_server)
        producer.send(topic, value=b"kept").get(timeout=30)
        producer.close()
        broker.stop()
        broker.start()
        consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap_server)
        try:
            consumer.assign([TopicPartition(topic, 0)])
            consumer.seek_to_beginning()
            records = consumer.poll(timeout_ms=10_000)
        finally:
            consumer.close()
        assert [r.value for batch in records.values() for r in batch] == [b"kept"]
    assert (data_dir / "log" / "meta.properties").is_file(), "a caller's data dir is theirs"


@needs_java
@needs_maven
def test_an_empty_cache_is_filled_by_maven_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMNICUE_KAFKA_CACHE", str(tmp_path / "cache"))
    libs = kafka_jars()
    assert libs == tmp_path / "cache" / KAFKA_VERSION / "libs"
    jars = {path.name for path in libs.glob("*.jar")}
    assert f"kafka_2.13-{KAFKA_VERSION}.jar" in jars
    assert any(jar.startswith("log4j-slf4j-impl-") for jar in jars), "the broker would not log"
    stamp = libs.parent / STAMP_NAME
    assert json.loads(stamp.read_text())["jars"] == sorted(jars)
    before = stamp.stat().st_mtime_ns

    ran_maven = tmp_path / "mvn-was-run"
    _failing_mvn(tmp_path / "bin", ran_maven)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    assert kafka_jars() == libs
    assert not ran_maven.exists()
    assert stamp.stat().st_mtime_ns == before
