"""faust's producer with idempotence on, for Apache Kafka.

faust enables the idempotent producer only inside transactions (exactly_once).
Under at-least-once a retried produce request can then write a changelog record
twice, or out of order after a reordered retry; with idempotence the broker
drops the duplicate and keeps the order. The dev broker (Tansu) rejects
idempotent producers from aiokafka, so dev-broker mode keeps faust's default.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from faust.transport.drivers.aiokafka import Producer


class IdempotentProducer(Producer):
    def _settings_extra(self) -> Mapping[str, Any]:
        return {**super()._settings_extra(), "acks": "all", "enable_idempotence": True}
