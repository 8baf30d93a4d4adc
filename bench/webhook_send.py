"""Webhook sends per second: one `omnicue send --transport webhook` process against a
bare aiohttp client loop, in the same run, against the same local server that only
acknowledges.

The bare loop is the physical limit of a Python webhook client: N concurrent POSTs
of the same body with the same headers, nothing else. The sender does everything a
delivery needs on top: read the action from Kafka, parse it, take its lease in Redis,
POST, publish `message.sent`, mark it sent, commit. The target is at least half the
bare loop's rate.

`python -m bench.webhook_send [--actions N] [--concurrency C]` starts its own Tansu
broker, Redis and ack server, prints a JSON line and, with --save, writes it to
bench/results/webhook_send.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import sys
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from kafka import KafkaProducer

from omnicue.services import ManagedProcess, RedisServer, TansuBroker, free_port
from omnicue.settings import Settings
from omnicue.topics import create_topics
from schemas.actions import Action, Recipient, make_action_id
from schemas.topics import ACTIONS
from senders.render import build_renderer
from senders.transports import sign, webhook_body

REPO = Path(__file__).resolve().parent.parent
SECRET = "bench-secret"
CHANNEL = "sms"


# -- the ack server (its own process, so it takes no CPU from the measured client) ----


def _serve(port: int) -> None:
    counts = {"requests": 0, "first": 0.0, "last": 0.0}

    async def ack(request: web.Request) -> web.Response:
        await request.read()
        now = time.monotonic()
        if not counts["requests"]:
            counts["first"] = now
        counts["requests"] += 1
        counts["last"] = now
        return web.Response(text="{}")

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(counts)

    async def reset(request: web.Request) -> web.Response:
        counts.update(requests=0, first=0.0, last=0.0)
        return web.json_response(counts)

    app = web.Application()
    app.router.add_post("/hooks/{channel}", ack)
    app.router.add_get("/stats", stats)
    app.router.add_post("/reset", reset)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def _stats(port: int, path: str = "stats") -> dict[str, float]:
    method = "GET" if path == "stats" else "POST"
    request = urllib.request.Request(f"http://127.0.0.1:{port}/{path}", method=method)
    with urllib.request.urlopen(request, timeout=5) as response:
        stats: dict[str, float] = json.loads(response.read())
        return stats


def _wait_for_server(port: int) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            _stats(port)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# -- the two clients ---------------------------------------------------------------


def make_actions(count: int) -> list[Action]:
    now = datetime.now(UTC)
    return [
        Action(
            action_id=make_action_id("cart_abandonment", f"c{i}", now.isoformat(), 1),
            rule_id="cart_abandonment", rule_version="1", step=1, customer_id=f"c{i}",
            journey_key="j", channel=CHANNEL, category="marketing",
            # A packaged template: the sender renders it into the body.
            template="cart_reminder_1",
            recipient=Recipient(phone="+821012345678"), created_at=now, due_at=now,
            expires_at=now + timedelta(hours=1), trigger_event_id=f"e{i}",
            trigger_occurred_at=now,
        )  # fmt: skip
        for i in range(count)
    ]


async def bare_loop(url: str, bodies: list[tuple[str, bytes]], concurrency: int) -> float:
    """Sends per second of N concurrent POSTs of ready bodies (the sender's very bytes,
    rendered beforehand) with the sender's headers."""
    queue = iter(bodies)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            for key, body in queue:
                headers = {
                    "Content-Type": "application/json",
                    "Idempotency-Key": key,
                    "X-Omnicue-Signature": sign(body, SECRET),
                }
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    assert response.status == 200

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return len(bodies) / (time.monotonic() - started)


def bodies(settings: Settings, actions: list[Action]) -> list[tuple[str, bytes]]:
    render = build_renderer(settings, CHANNEL, strict=False).render
    return [(a.action_id, webhook_body(a, render(a))) for a in actions]


def run_sender(
    settings: Settings, url: str, actions: list[Action], concurrency: int, logs: Path,
    ack_port: int,
) -> float:  # fmt: skip
    """Sends per second of one sender process over a backlog of `actions`, from the
    provider's first request to its last (startup and group join excluded)."""
    producer = KafkaProducer(
        bootstrap_servers=settings.bootstrap_servers, linger_ms=5, batch_size=1
    )
    for action in actions:
        producer.send(
            ACTIONS[CHANNEL], key=action.customer_id.encode(),
            value=action.model_dump_json().encode(),
        )  # fmt: skip
    producer.flush()
    producer.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNICUE_")}
    env.update(
        PYTHONPATH=str(REPO),
        OMNICUE_BROKER=settings.broker,
        OMNICUE_REDIS_URL=settings.redis_url,
        OMNICUE_PARTITIONS=str(settings.partitions),
        OMNICUE_DEV_BROKER="true",
        OMNICUE_SENDER_METRICS_PORT="0",
        OMNICUE_SENDER_MAX_IN_FLIGHT=str(concurrency),
        OMNICUE_WEBHOOK_SECRET=SECRET,
        OMNICUE_LOG_LEVEL="warning",
    )
    sender = ManagedProcess(
        [sys.executable, "-m", "omnicue.cli", "send", "--channel", CHANNEL,
         "--transport", "webhook", "--url", url],
        env=env, cwd=REPO, log_path=logs / "sender.log", name="sender",
    )  # fmt: skip
    _stats(ack_port, "reset")
    with sender:
        deadline = time.monotonic() + 600
        while (stats := _stats(ack_port))["requests"] < len(actions):
            if time.monotonic() > deadline or not sender.running:
                raise RuntimeError(f"sender stopped at {stats}\n{sender.log_tail()}")
            time.sleep(0.2)
    return (len(actions) - 1) / (stats["last"] - stats["first"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--actions", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--save", action="store_true", help="write bench/results/…json")
    args = parser.parse_args()

    logs = REPO / ".omnicue" / "bench-webhook"
    logs.mkdir(parents=True, exist_ok=True)
    ack_port = free_port()
    server = multiprocessing.get_context("spawn").Process(
        target=_serve, args=(ack_port,), daemon=True
    )
    server.start()
    try:
        _wait_for_server(ack_port)
        url = f"http://127.0.0.1:{ack_port}/hooks/{{channel}}"
        with (
            TansuBroker(free_port(), log_path=logs / "tansu.log") as broker,
            RedisServer(free_port(), log_path=logs / "redis.log") as redis_server,
        ):
            settings = Settings(
                broker=broker.url, redis_url=redis_server.url, dev_broker=True, partitions=4
            )
            create_topics(settings)
            # Warm-up, then rounds of the bare loop and the sender, alternating, on the
            # same server: a shared machine's load drifts, so each round is a pair.
            target = url.format(channel=CHANNEL)
            asyncio.run(bare_loop(target, bodies(settings, make_actions(500)), 16))
            rounds = []
            for _ in range(args.rounds):
                ready = bodies(settings, make_actions(args.actions))
                bare = asyncio.run(bare_loop(target, ready, args.concurrency))
                sender = run_sender(
                    settings, url, make_actions(args.actions), args.concurrency, logs, ack_port
                )
                rounds.append({"bare_aiohttp_per_s": round(bare, 1),
                               "sender_per_s": round(sender, 1),
                               "ratio": round(sender / bare, 3)})  # fmt: skip
    finally:
        server.terminate()
        server.join(5)
    ratios = sorted(r["ratio"] for r in rounds)
    result: dict[str, Any] = {
        "bench": "webhook_send",
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "actions": args.actions,
        "concurrency": args.concurrency,
        "rounds": rounds,
        "median_ratio": ratios[len(ratios) // 2],
        "cpus": os.cpu_count(),
        "load_avg": os.getloadavg(),
        "python": platform.python_version(),
    }
    print(json.dumps(result))
    if args.save:
        # The default concurrency (the senders' default in flight) keeps the plain name.
        suffix = "" if args.concurrency == 128 else f"-{args.concurrency}"
        out = REPO / "bench" / "results" / f"webhook_send{suffix}.json"
        out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
