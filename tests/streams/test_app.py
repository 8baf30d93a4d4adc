"""The faust app's settings on each broker: Tansu workarounds on Tansu only."""

from __future__ import annotations

from pathlib import Path

from omnicue.settings import Settings
from streams.app import faust_app
from streams.outbox import RecordSender


def producer_settings(tmp_path: Path, dev_broker: bool) -> dict[str, object]:
    app = faust_app(Settings(dev_broker=dev_broker, data_dir=tmp_path, store="memory://"))
    producer = app.transport.create_producer()
    return {**producer._settings_default(), **producer._settings_extra()}  # type: ignore[attr-defined]


def test_on_apache_kafka_faust_produces_idempotently_in_normal_batches(tmp_path: Path) -> None:
    settings = producer_settings(tmp_path, dev_broker=False)
    assert settings["enable_idempotence"] is True and settings["acks"] == "all"
    assert settings["max_batch_size"] == 16384
    # Kafka's own clients' default since 4.0; faust's is 0.
    assert settings["linger_ms"] == 5


def test_on_the_dev_broker_faust_produces_one_record_per_batch_without_idempotence(
    tmp_path: Path,
) -> None:
    settings = producer_settings(tmp_path, dev_broker=True)
    assert "enable_idempotence" not in settings
    assert settings["max_batch_size"] == 1
    assert settings["linger_ms"] == 0


def test_the_session_timeout_lets_a_dead_workers_partitions_move_within_seconds(
    tmp_path: Path,
) -> None:
    kafka = faust_app(Settings(data_dir=tmp_path, store="memory://")).conf
    assert kafka.broker_session_timeout == 10.0 and kafka.broker_heartbeat_interval == 3.0
    custom = faust_app(
        Settings(data_dir=tmp_path, store="memory://", broker_session_timeout=30)
    ).conf
    assert custom.broker_session_timeout == 30.0



async def test_the_pipelines_own_records_are_sent_idempotently_on_apache_kafka_only(
    tmp_path: Path,
) -> None:
    for dev_broker, idempotent in [(False, True), (True, False)]:
        settings = Settings(dev_broker=dev_broker, data_dir=tmp_path, store="memory://")
        producer = RecordSender(settings).build_producer()
        assert (producer._txn_manager is not None) is idempotent  # type: ignore[attr-defined]
