"""Static group membership on Apache Kafka: a restarted worker rejoins as itself."""

from __future__ import annotations

from pathlib import Path

from omnicue.settings import Settings
from streams.app import faust_app


def test_each_worker_has_its_own_group_instance_id_and_keeps_it_across_restarts(
    tmp_path: Path,
) -> None:
    one = Settings(data_dir=tmp_path / "data-1", web_port=7001)
    # The same worker started again: the same settings.
    assert Settings(data_dir=tmp_path / "data-1", web_port=7001).group_instance_id == (
        one.group_instance_id
    )
    # Two workers on one host never share one (they would fence each other).
    others = [
        Settings(data_dir=tmp_path / "data-2", web_port=7001),
        Settings(data_dir=tmp_path / "data-1", web_port=7002),
        Settings(data_dir=tmp_path / "data-1", web_port=7001, app_id="other"),
    ]
    ids = {one.group_instance_id, *(s.group_instance_id for s in others)}
    assert len(ids) == 4
    assert Settings(worker_id="w-3").group_instance_id == "w-3"


def test_static_membership_on_apache_kafka_only(tmp_path: Path) -> None:
    kafka = Settings(dev_broker=False, data_dir=tmp_path, store="memory://")
    assert faust_app(kafka).conf.consumer_group_instance_id == kafka.group_instance_id
    dev = Settings(dev_broker=True, data_dir=tmp_path, store="memory://")
    assert faust_app(dev).conf.consumer_group_instance_id is None
