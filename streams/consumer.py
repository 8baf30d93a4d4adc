"""A faust consumer that waits less for data on the dev broker.

faust fixes aiokafka's `fetch_max_wait_ms` at 1500. Kafka answers a fetch as soon as
one byte is there; the dev broker (Tansu) answers an empty partition only after the
whole wait, so a caught-up stage sees new records up to 1.5 s late, at each of the
pipeline's two hops. Measured: p50 event-to-action latency 3.4 s at 1500 ms,
0.35 s at 100 ms.
"""

from __future__ import annotations

from typing import Any

import aiokafka
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread, Consumer

DEV_BROKER_FETCH_MAX_WAIT_MS = 100


class _PromptFetchThread(AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        # Read by AIOKafkaConsumer.start() when it builds its fetcher.
        consumer._fetch_max_wait_ms = DEV_BROKER_FETCH_MAX_WAIT_MS
        return consumer


class PromptFetchConsumer(Consumer):
    def _new_consumer_thread(self) -> AIOKafkaConsumerThread:
        return _PromptFetchThread(self, loop=self.loop, beacon=self.beacon)
