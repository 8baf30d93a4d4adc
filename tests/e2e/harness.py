"""Real processes for end-to-end tests: a worker started like `omnicue worker`,
and a reader that counts records by consuming (never by end offsets: the dev
broker reports those wrong)."""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from kafka import KafkaConsumer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from omnicue.services import ManagedProcess
from omnicue.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
WORKER_READY = "timer schedule rebuilt"


def settings_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    # Run this checkout's code even where the package is installed elsewhere.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    for name, value in settings.model_dump().items():
        if value is not None:
            env[f"OMNICUE_{name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(
                value
            )
    return env


def start_worker(settings: Settings, log_path: Path, timeout: float = 90) -> ManagedProcess:
    worker = ManagedProcess(
        [sys.executable, "-m", "omnicue.cli", "worker"],
        log_path=log_path,
        env=settings_env(settings),
        name="worker",
    ).start()
    worker.wait_for_line(WORKER_READY, timeout=timeout)
    return worker


class Record:
    def __init__(self, topic: str, key: bytes | None, value: bytes, headers: list[Any]) -> None:
        self.topic = topic
        self.key = key
        self.value = value
        self.headers = dict(headers)

    def json(self) -> Any:
        return orjson.loads(self.value)


class TopicReader:
    """Reads whole topics from the beginning, accumulating every record."""

    def __init__(self, bootstrap: str, topics: list[str]) -> None:
        self._consumer = KafkaConsumer(
            bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False
        )
        partitions = []
        for topic in topics:
            found = self._consumer.partitions_for_topic(topic) or set()
            assert found, f"topic {topic} does not exist"
            partitions += [TopicPartition(topic, p) for p in sorted(found)]
        self._consumer.assign(partitions)
        self._consumer.seek_to_beginning(*partitions)
        self.records: list[Record] = []

    def poll(self) -> None:
        for batch in self._consumer.poll(timeout_ms=200).values():
            for r in batch:
                self.records.append(Record(r.topic, r.key, r.value, list(r.headers or [])))

    def wait_for(self, condition: Callable[[list[Record]], bool], timeout: float) -> list[Record]:
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            if condition(self.records):
                return self.records
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"condition not met in {timeout}s; {len(self.records)} records: "
                    + "; ".join(f"{r.topic} {r.value[:160]!r}" for r in self.records[-20:])
                )

    def settle(self, seconds: float) -> list[Record]:
        """Keep reading for a while: to assert that nothing *more* arrives."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.poll()
        return self.records

    def of(self, topic_prefix: str, customer: str | None = None) -> list[Any]:
        out = []
        for r in self.records:
            if not r.topic.startswith(topic_prefix):
                continue
            if customer is not None and r.key != customer.encode():
                continue
            out.append(r.json() if not r.topic.endswith(".dlq") else r)
        return out

    def close(self) -> None:
        self._consumer.close()


def scrape(port: int) -> dict[str, float]:
    """Sample name (with labels) -> value from a worker's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


def pending_timers(ports: list[int]) -> float:
    """Timers pending over these workers (a worker not answering counts none)."""
    total = 0.0
    for port in ports:
        try:
            total += scrape(port).get("omnicue_timers_pending", 0)
        except OSError:
            pass
    return total


def wait_for_metric(port: int, name: str, at_least: float, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if scrape(port).get(name, 0) >= at_least:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} did not reach {at_least} in {timeout}s")
        time.sleep(0.2)


def wait_for_commit(settings: Settings, topic: str, partition: int, offset: int,
                    timeout: float = 30) -> None:
    """Until the worker group has committed `topic[partition]` up to `offset`: what a
    worker processed but has not committed yet is processed again after it stops
    (at-least-once), which a test counting records exactly must wait out."""
    # A consumer of the group that never joins it: `committed` only fetches offsets.
    consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap_servers,
                             group_id=settings.app_id, enable_auto_commit=False)
    try:
        deadline = time.monotonic() + timeout
        while (consumer.committed(TopicPartition(topic, partition)) or 0) < offset:
            assert time.monotonic() < deadline, f"{topic}[{partition}] not committed to {offset}"
            time.sleep(0.2)
    finally:
        consumer.close()


def profile_view(port: int, profile: str) -> dict[str, Any] | None:
    """GET /customers/{profile} of a worker (redirects followed); None on 404."""
    url = f"http://127.0.0.1:{port}/customers/{urllib.parse.quote(profile, safe='')}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            body: dict[str, Any] = json.loads(response.read())
            return body
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise
