"""The physical limit for a Python worker: a bare aiokafka loop, no Faust, no work.

It consumes a batch, produces every record of it unchanged to another topic, waits
until the broker has them all, and commits the batch's offsets: the least any
at-least-once consume-transform-produce worker in Python does. The pipeline is
measured against it.

Run it as a process: `python -m bench.passthrough`, configured by the pipeline's
OMNICUE_* variables (broker, app id as the group) plus BENCH_INPUT_TOPIC and
BENCH_OUTPUT_TOPIC.
"""

from __future__ import annotations

import asyncio
import os
import signal

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from omnicue.settings import Settings

APP_ID = "omnicue-bench-passthrough"
OUTPUT_TOPIC = "bench.passthrough.outputs"
# As many records as faust's pipeline takes per batch (OMNICUE_BATCH_SIZE's default).
MAX_RECORDS = 500


async def forward(settings: Settings, source: str, sink: str, stop: asyncio.Event) -> None:
    consumer = AIOKafkaConsumer(
        source,
        bootstrap_servers=settings.bootstrap_servers,
        group_id=settings.app_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers, acks="all", linger_ms=0,
        max_batch_size=256 * 1024,
    )
    await consumer.start()
    await producer.start()
    print("passthrough ready", flush=True)
    try:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=100, max_records=MAX_RECORDS)
            deliveries = [
                await producer.send(sink, record.value, key=record.key)
                for records in batches.values()
                for record in records
            ]
            if deliveries:
                await asyncio.gather(*deliveries)
                await consumer.commit()
    finally:
        await producer.stop()
        await consumer.stop()


def main() -> None:
    settings = Settings()
    if settings.app_id == Settings.model_fields["app_id"].default:
        settings = settings.model_copy(update={"app_id": APP_ID})
    source = os.environ["BENCH_INPUT_TOPIC"]
    sink = os.environ.get("BENCH_OUTPUT_TOPIC", OUTPUT_TOPIC)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await forward(settings, source, sink, stop)

    asyncio.run(run())


if __name__ == "__main__":
    main()
