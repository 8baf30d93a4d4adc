"""A faust consumer that waits at most 100 ms for a fetch, on either broker.

faust fixes aiokafka's `fetch_max_wait_ms` at 1500. That wait holds up data on
both brokers, for different reasons:

- The dev broker (Tansu) answers a fetch on an empty partition only after the
  whole wait, so a caught-up stage sees new records up to 1.5 s late, at each of
  the pipeline's two hops. Measured: p50 event-to-action latency 3.4 s at
  1500 ms, 0.35 s at 100 ms.
- Apache Kafka answers as soon as one fetched partition has data, but aiokafka
  sends one fetch at a time per broker, and only for the partitions that hold no
  unconsumed records. When the worker is slower to take records than the broker
  is to send them, the next fetch names only the idle partitions (at worst only
  faust's assignor topic `<app id>-__assignor-__leader`, which never gets a
  record). Kafka holds that fetch for the whole wait, and until it returns no
  other partition is fetched again, however soon its records are consumed.
  Measured on Kafka 4.4.0 (issue 10; `python -m bench.pipeline --broker kafka`,
  3 alternated pairs at 800 events/s on a shared 2-core machine, load 2.2-3.4):
  pipeline p50/p99 156/719, 371/1066, 262/1118 ms with 100 ms against
  2860/3508, 160/1901, 2750/3429 ms with 1500 ms, every pair's p99 better. With
  1500 ms the latency jumped to ~3 s within seconds and stayed there, and the
  worker fell behind the load in two of the three runs (608 and 632 outputs/s).
  On a backlog 1500 ms was 10-18% faster (fewer, fuller fetches): the price of
  the shorter wait.

An idle worker then sends ten empty fetches a second instead of two thirds of
one: nothing for either broker.
"""

from __future__ import annotations

from typing import Any

import aiokafka
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread, Consumer

FETCH_MAX_WAIT_MS = 100


class _PromptFetchThread(AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        # Read by AIOKafkaConsumer.start() when it builds its fetcher.
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS
        return consumer


class PromptFetchConsumer(Consumer):
    def _new_consumer_thread(self) -> AIOKafkaConsumerThread:
        return _PromptFetchThread(self, loop=self.loop, beacon=self.beacon)
