"""Live rules: every worker follows the compacted `omnicue.rules` topic.

Not a faust agent: agents share the worker group, so only one worker would see
each update. Each worker reads the whole (one-partition) topic itself instead.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from aiokafka import AIOKafkaConsumer

from omnicue.rules import decode_applied, latest_valid_rules
from schemas.rules import RulesError
from schemas.topics import RULES, RULES_KEY
from streams.timers import wake_journeys_of
from triggers.ruleset import compile_rules

if TYPE_CHECKING:
    from streams.app import Pipeline

log = logging.getLogger(__name__)


def register_rules_watcher(p: Pipeline) -> None:
    async def follow_rules() -> None:
        consumer = AIOKafkaConsumer(
            RULES,
            bootstrap_servers=p.settings.bootstrap_servers,
            group_id=None,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        try:
            # On start only the newest valid record counts: an older one, applied even
            # for a moment, would mark current rules as removed and end their journeys.
            latest, errors = latest_valid_rules(await _read_until_quiet(consumer))
            for error in errors:
                _reject(p, error)
            if latest is not None:
                apply_record(p, latest)
            async for record in consumer:
                if record.key == RULES_KEY and record.value:
                    apply_record(p, record.value)
        except asyncio.CancelledError:
            raise
        finally:
            await consumer.stop()

    p.app.task(follow_rules)


async def _read_until_quiet(consumer: AIOKafkaConsumer, idle: float = 1.0) -> list[bytes]:
    """The topic's records so far. Read until a fetch stays empty for `idle` seconds,
    not up to end offsets, which the dev broker reports wrongly."""
    records: list[bytes] = []
    while True:
        batches = await consumer.getmany(timeout_ms=int(idle * 1000))
        if not batches:
            return records
        for batch in batches.values():
            records += [r.value for r in batch if r.key == RULES_KEY and r.value]


def _reject(p: Pipeline, error: str) -> None:
    # `omnicue rules apply` validates first; a bad record here keeps the rules running.
    log.error("ignoring an invalid rules update, keeping the rules in use: %s", error)
    p.metrics.rules_invalid.inc()


def apply_record(p: Pipeline, value: bytes) -> None:
    try:
        rules_file, source = decode_applied(value)
        new = compile_rules(rules_file, previous=p.rules)
    except RulesError as exc:
        _reject(p, str(exc))
        return
    changed = {r.id: r.version for r in new.rules} != {r.id: r.version for r in p.rules.rules}
    removed = new.removed - p.rules.removed
    p.rules = new
    if changed:
        versions = ", ".join(f"{r.id}@{r.version}" for r in new.rules)
        log.info("rules updated from %s: %s", source, versions)
    if removed:
        woken = wake_journeys_of(p, removed)
        log.info("rules removed: %s; %d customers to update", ", ".join(sorted(removed)), woken)
