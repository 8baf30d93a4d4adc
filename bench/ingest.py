"""HTTP ingest throughput: Segment batches into `omnicue ingest`, against a bare aiohttp
handler that only acknowledges, in the same run.

Both servers run as one process each on the same machine, fed by the same load
generator (one aiohttp client process, `--concurrency` requests in flight) with the
same pre-built bodies: `/v1/batch` requests of `--batch` Segment messages (product
views, cart adds, orders, custom tracks, identifies), each with its own messageId.
The bare handler reads the body and answers 200; the ingest parses, maps, checks each
message against the contract and answers only once the broker has acknowledged every
event. The ratio ingest/bare is the cost of all that, per process; the bare figure is
also a bound on what the load generator can send on this machine.

Rounds alternate bare and ingest, so a noisy neighbour hurts both alike; the median of
the rounds is reported. After the ingest rounds the events are counted by consuming
`omnicue.events`, so a 200 is checked against what reached the broker.

    python -m bench.ingest                  # Tansu (the dev broker)
    python -m bench.ingest --broker kafka   # Apache Kafka (Java 17+)

Results: a table on stdout and bench/results/ingest.json (ingest-kafka.json).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
WRITE_KEY = "bench"
_CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- the bare server ------------------------------------------------------------------


def serve_bare(port: int) -> None:
    """An aiohttp server whose every POST reads the body and answers 200."""
    from aiohttp import web

    reply = orjson.dumps({"success": True})

    async def ack(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=reply, content_type="application/json")

    app = web.Application(client_max_size=500 * 1024 + 1)
    app.add_routes([web.post("/v1/batch", ack)])

    print(f"bare http://127.0.0.1:{port}", flush=True)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


# -- the workload ---------------------------------------------------------------------


def build_bodies(messages: int, batch: int, customers: int) -> list[bytes]:
    """`/v1/batch` bodies as Segment's libraries send them, every messageId distinct."""
    start = datetime(2026, 12, 4, tzinfo=UTC)
    bodies = []
    for first in range(0, messages, batch):
        items = []
        for n in range(first, min(first + batch, messages)):
            customer = f"c-{n % customers}"
            at = (start + timedelta(milliseconds=n)).isoformat()
            base: dict[str, Any] = {
                "messageId": str(uuid.uuid4()),
                "timestamp": at,
                "userId": customer,
                "context": {"library": {"name": "analytics-python", "version": "2.4.0"}},
                "integrations": {},
            }
            kind = n % 10
            if kind < 5:
                base |= {"type": "track", "event": "Product Viewed",
                         "properties": {"product_id": f"p-{n % 500}", "price": 19.9,
                                        "category": "mugs", "name": "Mug"}}  # fmt: skip
            elif kind < 7:
                base |= {"type": "track", "event": "Product Added",
                         "properties": {"cart_id": f"k-{customer}", "product_id": f"p-{n % 500}",
                                        "price": 19.9, "quantity": 1}}  # fmt: skip
            elif kind == 7:
                base |= {"type": "track", "event": "Order Completed",
                         "properties": {"order_id": f"o-{n}", "cart_id": f"k-{customer}",
                                        "total": 39.8, "currency": "KRW",
                                        "products": [{"product_id": "p-1", "price": 19.9,
                                                      "quantity": 2}]}}  # fmt: skip
            elif kind == 8:
                base |= {"type": "track", "event": "Video Played",
                         "properties": {"title": "Intro", "position": 3}}  # fmt: skip
            else:
                base |= {"type": "identify",
                         "traits": {"email": f"{customer}@example.com", "plan": "pro"}}  # fmt: skip
            items.append(base)
        bodies.append(orjson.dumps({"batch": items, "sentAt": start.isoformat()}))
    return bodies


async def send_all(url: str, bodies: Sequence[bytes], concurrency: int) -> dict[str, Any]:
    """Post every body with `concurrency` requests in flight; the wall time and status
    counts."""
    import aiohttp

    headers = {
        "Authorization": "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode(),
        "Content-Type": "application/json",
    }
    statuses: dict[str, int] = {}
    latencies: list[float] = []
    queue = list(reversed(bodies))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            while queue:
                body = queue.pop()
                sent = time.perf_counter()
                async with session.post(f"{url}/v1/batch", data=body, headers=headers) as reply:
                    await reply.read()
                    status = str(reply.status)
                    statuses[status] = statuses.get(status, 0) + 1
                latencies.append(time.perf_counter() - sent)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "seconds": elapsed,
        "statuses": statuses,
        "request_p50_ms": round(latencies[len(latencies) // 2] * 1000, 2),
        "request_p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 2),
    }


# -- processes ------------------------------------------------------------------------


def cpu_seconds(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def count_events(bootstrap: str, expected: int, timeout: float = 120) -> int:
    """Records on `omnicue.events`, by consuming (the dev broker's end offsets are wrong)."""
    from kafka import KafkaConsumer, TopicPartition

    from schemas.topics import EVENTS

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    try:
        partitions = [TopicPartition(EVENTS, p) for p in consumer.partitions_for_topic(EVENTS)]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        count = 0
        deadline = time.monotonic() + timeout
        while count < expected and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500, max_records=50_000).values():
                count += len(records)
        return count
    finally:
        consumer.close()


def run(args: argparse.Namespace) -> dict[str, Any]:
    from omnicue.services import ManagedProcess, TansuBroker, free_port
    from omnicue.settings import Settings
    from omnicue.topics import create_topics

    workdir = Path(tempfile.mkdtemp(prefix="omnicue-bench-ingest-"))
    broker: Any
    if args.broker == "kafka":
        from omnicue.kafka_broker import KafkaBroker

        broker = KafkaBroker(free_port(), log_path=workdir / "kafka.log").start()
    else:
        broker = TansuBroker(free_port(), log_path=workdir / "tansu.log").start(timeout=30)
    procs: list[ManagedProcess] = [broker]
    try:
        settings = Settings(
            broker=broker.url, partitions=args.partitions, dev_broker=args.broker == "tansu"
        )
        create_topics(settings)
        env = {k: v for k, v in os.environ.items() if not k.startswith("OMNICUE_")}
        ingest_port, bare_port = free_port(), free_port()
        env |= {
            "PYTHONPATH": str(REPO),
            "PYTHONUNBUFFERED": "1",
            "OMNICUE_BROKER": broker.url,
            "OMNICUE_DEV_BROKER": "true" if args.broker == "tansu" else "false",
            "OMNICUE_INGEST_PORT": str(ingest_port),
            "OMNICUE_INGEST_WRITE_KEYS": f"{WRITE_KEY}=web",
            "OMNICUE_LOG_LEVEL": "warning",
        }
        ingest = ManagedProcess(
            [sys.executable, "-m", "omnicue.cli", "ingest"],
            log_path=workdir / "ingest.log", env=env, name="ingest",
        ).start()  # fmt: skip
        procs.append(ingest)
        bare = ManagedProcess(
            [sys.executable, "-m", "bench.ingest", "--bare-server", str(bare_port)],
            log_path=workdir / "bare.log", env=env, name="bare", cwd=REPO,
        ).start()  # fmt: skip
        procs.append(bare)
        ingest.wait_for_line("ingest http://", timeout=60)
        bare.wait_for_line("bare http://", timeout=60)
        servers = {
            "bare": (f"http://127.0.0.1:{bare_port}", bare),
            "ingest": (f"http://127.0.0.1:{ingest_port}", ingest),
        }
        log(f"building {args.messages} messages in batches of {args.batch}")
        bodies = build_bodies(args.messages, args.batch, args.customers)
        warm = build_bodies(args.batch * 20, args.batch, args.customers)
        for url, _ in servers.values():
            # First requests pay for imports, the producer's metadata and connections.
            asyncio.run(send_all(url, warm, args.concurrency))
        rounds: dict[str, list[dict[str, Any]]] = {"bare": [], "ingest": []}
        sent_to_ingest = len(warm) * args.batch
        for round_number in range(args.rounds):
            for name, (url, proc) in servers.items():
                if name == "ingest" and round_number > 0:
                    bodies = build_bodies(args.messages, args.batch, args.customers)
                cpu_before = cpu_seconds(proc.pid)
                result = asyncio.run(send_all(url, bodies, args.concurrency))
                cpu = cpu_seconds(proc.pid) - cpu_before
                result |= {
                    "messages_per_s": round(args.messages / result["seconds"]),
                    "server_cores": round(cpu / result["seconds"], 2),
                    # Robust to a busy machine, where a process gets less than a core.
                    "messages_per_cpu_s": round(args.messages / cpu) if cpu > 0 else None,
                    "loadavg_1m": round(os.getloadavg()[0], 2),
                }
                if name == "ingest":
                    sent_to_ingest += args.messages
                rounds[name].append(result)
                log(
                    f"round {round_number + 1} {name}: {result['messages_per_s']} msg/s, "
                    f"server {result['server_cores']} cores, statuses {result['statuses']}, "
                    f"p99 {result['request_p99_ms']} ms, load {result['loadavg_1m']}"
                )
        on_topic = count_events(settings.bootstrap_servers[0], sent_to_ingest)
        summary = {
            name: {
                "messages_per_s": statistics.median(r["messages_per_s"] for r in results),
                "server_cores": statistics.median(r["server_cores"] for r in results),
                "messages_per_cpu_s": statistics.median(
                    r["messages_per_cpu_s"] or 0 for r in results
                ),
                "request_p99_ms": statistics.median(r["request_p99_ms"] for r in results),
                "non_200": sum(
                    count for r in results for status, count in r["statuses"].items()
                    if status != "200"
                ),  # fmt: skip
            }
            for name, results in rounds.items()
        }
        ratio = summary["ingest"]["messages_per_s"] / summary["bare"]["messages_per_s"]
        bare_per_cpu = summary["bare"]["messages_per_cpu_s"]
        cpu_ratio = summary["ingest"]["messages_per_cpu_s"] / bare_per_cpu if bare_per_cpu else 0
        return {
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "broker": args.broker,
            "messages_per_round": args.messages,
            "batch": args.batch,
            "concurrency": args.concurrency,
            "partitions": args.partitions,
            "rounds": rounds,
            "summary": summary,
            "ingest_over_bare": round(ratio, 3),
            "ingest_over_bare_per_cpu_s": round(cpu_ratio, 4),
            "events_sent_to_ingest": sent_to_ingest,
            "events_on_topic": on_topic,
            "machine": {
                "cores": os.cpu_count(),
                "python": platform.python_version(),
                "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
            },
        }
    finally:
        for proc in reversed(procs):
            proc.stop(timeout=20)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--broker", choices=["tansu", "kafka"], default="tansu")
    parser.add_argument("--messages", type=int, default=50_000, help="messages per round")
    parser.add_argument("--batch", type=int, default=100, help="messages per request")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    parser.add_argument("--customers", type=int, default=2_000)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="results JSON path")
    parser.add_argument("--bare-server", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.bare_server is not None:
        serve_bare(args.bare_server)
        return 0
    result = run(args)
    out = args.out or RESULTS / ("ingest-kafka.json" if args.broker == "kafka" else "ingest.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")
    s = result["summary"]
    print(f"HTTP ingest on {args.broker}, batches of {args.batch}, {args.concurrency} in flight")
    for name in ("bare", "ingest"):
        row = s[name]
        print(
            f"  {name:<7} {row['messages_per_s']:>9,.0f} msg/s  "
            f"{row['messages_per_cpu_s']:>10,.0f} msg/CPU-s  server {row['server_cores']} cores  "
            f"p99 {row['request_p99_ms']} ms  non-200 {row['non_200']}"
        )
    print(
        f"  ingest/bare {result['ingest_over_bare']:.3f} (per CPU-s "
        f"{result['ingest_over_bare_per_cpu_s']:.4f}); events on the topic "
        f"{result['events_on_topic']} of {result['events_sent_to_ingest']}; "
        f"load {result['machine']['loadavg_1m_at_end']} -> {out}"
    )
    delivered = result["events_on_topic"] >= result["events_sent_to_ingest"]
    return 0 if s["ingest"]["non_200"] == 0 and delivered else 1


if __name__ == "__main__":
    raise SystemExit(main())
