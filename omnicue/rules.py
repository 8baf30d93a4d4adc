"""Loading rules files (YAML) into a compiled `RuleSet`."""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

import orjson
import yaml
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from omnicue.settings import Settings
from schemas.rules import RulesError, RulesFile, rules_from_data
from schemas.topics import RULES, RULES_KEY
from triggers.ruleset import RuleSet, compile_rules


def packaged_rules_path(name: str = "default") -> Path:
    return Path(str(resources.files("omnicue") / "rulesets" / f"{name}.yaml"))


def parse_rules_text(text: str, source: str = "rules file") -> RulesFile:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RulesError(f"{source}: not valid YAML: {exc}") from None
    return rules_from_data(data, source)


def read_rules_file(path: Path | None) -> RulesFile:
    path = path or packaged_rules_path()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RulesError(f"{path}: cannot read rules file: {exc.strerror}") from None
    return parse_rules_text(text, str(path))


def load_rules(path: Path | None) -> RuleSet:
    """Validate and compile; raises `RulesError` naming the rule and field."""
    return compile_rules(read_rules_file(path))


def apply_rules(settings: Settings, path: Path) -> RulesFile:
    """Validate, then publish the file to the compacted rules topic for live workers."""
    text = path.read_text(encoding="utf-8")
    rules_file = parse_rules_text(text, str(path))
    compile_rules(rules_file)  # CEL errors fail here, before anything is published
    message = orjson.dumps(
        {"source": str(path), "text": text, "versions": {r.id: r.version for r in rules_file.rules}}
    )
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all")
    try:
        producer.send(RULES, key=RULES_KEY, value=message).get(timeout=30)
    finally:
        producer.close()
    return rules_file


def decode_applied(value: bytes) -> tuple[RulesFile, str]:
    """An `omnicue.rules` record: the rules file and where it came from.

    Raises `RulesError` for a record that is not an applied rules file (`omnicue rules
    apply` validates before it publishes, but anything can write to a topic).
    """
    try:
        data = orjson.loads(value)
        source = str(data.get("source", RULES))
        text = str(data["text"])
    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError) as exc:
        raise RulesError(f"{RULES}: not an applied rules record ({exc!r})") from None
    return parse_rules_text(text, f"{RULES} ({source})"), source


def latest_valid_rules(records: list[bytes]) -> tuple[bytes | None, list[str]]:
    """The newest record that is a valid rules file, and the errors of newer ones."""
    errors: list[str] = []
    for value in reversed(records):
        try:
            rules_file, _ = decode_applied(value)
            compile_rules(rules_file)
        except RulesError as exc:
            errors.append(str(exc))
            continue
        return value, errors
    return None, errors


def read_rules_records(settings: Settings, idle: float = 1.0) -> list[bytes]:
    """Every record of the rules topic, oldest first (compaction keeps it short).

    Reads the topic from the start until it stays quiet for `idle` seconds rather
    than comparing with end offsets, which the dev broker reports wrongly.
    """
    consumer = KafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers, group_id=None, enable_auto_commit=False
    )
    try:
        partitions = consumer.partitions_for_topic(RULES) or set()
        if not partitions:
            return []
        assigned = [TopicPartition(RULES, p) for p in sorted(partitions)]
        consumer.assign(assigned)
        consumer.seek_to_beginning(*assigned)
        records: list[bytes] = []
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < idle:
            for batch in consumer.poll(timeout_ms=200).values():
                for record in batch:
                    if record.key == RULES_KEY and record.value:
                        records.append(record.value)
                    quiet_since = time.monotonic()
        return records
    finally:
        consumer.close()
