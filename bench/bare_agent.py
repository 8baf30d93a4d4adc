"""The baseline: a bare Faust agent with the pipeline's exact Faust settings.

Per event it parses the JSON, increments one per-key counter in a table and sends
one message, which is the least a stateful one-in/one-out stream processor does.

Run it as a worker: `python -m bench.bare_agent [worker]`, configured by the
pipeline's OMNICUE_* variables plus BENCH_INPUT_TOPIC and BENCH_OUTPUT_TOPIC.
"""

from __future__ import annotations

import os
import sys

import faust
import orjson
from faust.types import StreamT
from faust.worker import Worker

from omnicue.settings import Settings
from streams.app import faust_app
from streams.topics import raw_topic

APP_ID = "omnicue-bench-bare"
INPUT_TOPIC = "bench.bare.events"
OUTPUT_TOPIC = "bench.bare.outputs"
COUNTS_TABLE = "bench_counts"


def build_app(
    settings: Settings, input_topic: str = INPUT_TOPIC, output_topic: str = OUTPUT_TOPIC
) -> faust.App:
    # Same factory as the pipeline, so broker quirks (producer_max_batch_size=1 on the
    # dev broker), commit interval and timeouts are identical; only the group differs:
    # never the pipeline's default id, whose consumer group and tables it would join.
    app_id = settings.app_id
    if app_id == Settings.model_fields["app_id"].default:
        app_id = APP_ID
    app = faust_app(settings.model_copy(update={"app_id": app_id}))

    def raw(name: str) -> faust.TopicT:
        return raw_topic(app, name, settings.partitions)

    source, sink = raw(input_topic), raw(output_topic)
    counts = app.Table(COUNTS_TABLE, default=int, key_type=bytes, partitions=settings.partitions)

    async def count(stream: StreamT[bytes]) -> None:
        async for key, value in stream.items():
            event = orjson.loads(value)
            counts[key] += 1
            out = {"event_id": event["event_id"], "count": counts[key]}
            await sink.send(key=key, value=orjson.dumps(out))

    app.agent(source, name="bench.bare")(count)
    return app


def main(argv: list[str]) -> None:
    if argv and argv[0] != "worker":
        raise SystemExit(f"usage: python -m bench.bare_agent [worker] (got {argv[0]!r})")
    settings = Settings()
    app = build_app(
        settings,
        os.environ.get("BENCH_INPUT_TOPIC", INPUT_TOPIC),
        os.environ.get("BENCH_OUTPUT_TOPIC", OUTPUT_TOPIC),
    )
    Worker(app, loglevel=settings.log_level).execute_from_commandline()


if __name__ == "__main__":
    main(sys.argv[1:])
