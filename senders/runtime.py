"""`omnicue send`: one channel's sender process.

It reads `omnicue.actions.<channel>` and the channel's retry topic in the channel's
consumer group, and handles every record in a task of its own, so a slow provider
call, a wait for a token or a retry's backoff never holds up the next customer's
action. A partition's offset is committed only up to its oldest unfinished record,
and a record is finished only once its action was sent (and `message.sent`
published), failed for good (`message.failed` published) or handed to the retry
topic: a crash redelivers, never loses.

Per action: skip it if expired; take a token from the channel's shared rate limit;
take the `sending` lease (senders/lease.py); call the provider with the action id as
the idempotency key; mark it `sent`. A redelivered action already `sent` is a
duplicate; one whose lease another sender holds waits for that sender; one whose
lease expired (its sender died) is sent again with the same key. Redis down means
no lease, hence no send: every action waits until Redis answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

import redis
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, KafkaError
from prometheus_client import start_http_server
from pydantic import ValidationError

from omnicue.metrics import SenderMetrics
from omnicue.settings import Settings
from schemas.actions import Action
from schemas.events import Event, describe_validation_error, event_from_dict, event_to_json
from schemas.topics import ACTION_CHANNELS, ACTIONS, EVENTS, SENDER_RETRIES
from senders.lease import Leases, new_token
from senders.ratelimit import SharedRateLimit
from senders.render import build_renderer
from senders.retry import RetryRecord, schedule_retry
from senders.smtp import build_smtp_transport
from senders.transports import (
    Accepted,
    ConsoleTransport,
    Rejected,
    Transport,
    WebhookTransport,
)

log = logging.getLogger(__name__)

# `expired` stays apart from the other failures (the sender-lag alert watches it);
# `omnicue_sender_failed_total{reason}` counts both.
Outcome = Literal["sent", "duplicate", "expired", "failed"]
OUTCOMES: tuple[Outcome, ...] = ("sent", "duplicate", "expired", "failed")
T = TypeVar("T")

_POLL_TIMEOUT_MS = 500
_COMMIT_INTERVAL = 0.5
_REDIS_RETRY_MAX = 10.0
# Unfinished records per topic, per send slot, before reading that topic pauses:
# retries waiting for their time do not count against fresh actions, nor the other way
# round. Generous, because a record stays unfinished until the broker has acknowledged
# its feedback event, well after its slot is free (at 4, that wait capped a bench run
# at under half the rate it reaches at 16).
_PENDING_PER_SLOT = 16


class UnknownChannelError(ValueError):
    pass


class _Stopping(Exception):
    """The sender is stopping: leave this record unfinished (it will be redelivered)."""


def check_channel(channel: str) -> str:
    if channel not in ACTIONS:
        raise UnknownChannelError(
            f"unknown channel {channel!r}: expected one of {', '.join(ACTION_CHANNELS)}"
        )
    return channel


def default_group(channel: str) -> str:
    return f"omnicue-sender-{channel}"


def feedback_event(
    action: Action, occurred_at: datetime, *, failed: str | None = None
) -> Event:
    """`message.sent`, or `message.failed` with its reason, validated by the contract.

    The id derives from the action id, so consumers can deduplicate a re-published one.
    """
    properties: dict[str, Any] = {"action_id": action.action_id}
    if failed is not None:
        properties["reason"] = failed
    kind = "failed" if failed is not None else "sent"
    return event_from_dict(
        {
            "event_id": f"fb-{kind}-{action.action_id}",
            "type": f"message.{kind}",
            "occurred_at": occurred_at,
            "channel": action.channel,
            "customer_id": action.customer_id,
            "properties": properties,
        }
    )


@dataclass
class PartitionOffsets:
    """What may be committed on one partition: up to its oldest unfinished record."""

    pending: set[int] = field(default_factory=set)
    next_offset: int | None = None
    committed: int | None = None

    def read(self, offset: int) -> None:
        self.pending.add(offset)
        self.next_offset = max(offset + 1, self.next_offset or 0)

    def finish(self, offset: int) -> None:
        self.pending.discard(offset)

    def committable(self) -> int | None:
        """The offset to commit, or None when nothing new is finished."""
        if self.next_offset is None:
            return None
        offset = min(self.pending) if self.pending else self.next_offset
        return None if offset == self.committed else offset


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, sender: Sender) -> None:
        self._sender = sender
        self._announced = False

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self._sender._revoke(set(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        log.info("sender %s assigned %s", self._sender.channel, sorted(assigned))
        if not self._announced:
            self._announced = True
            print(f"sender {self._sender.channel} ready", flush=True)


def build_transport(settings: Settings, channel: str) -> Transport:
    if settings.sender_transport == "console":
        return ConsoleTransport()
    if settings.sender_transport == "smtp":
        # Templates and the advertising settings are checked here, at start.
        return build_smtp_transport(settings, build_renderer(settings, channel))
    if not settings.sender_url:
        raise ValueError("the webhook transport needs --url (or OMNICUE_SENDER_URL)")
    secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else ""
    renderer = build_renderer(settings, channel, strict=False)
    return WebhookTransport(
        settings.sender_url,
        channel,
        secret=secret,
        timeout=settings.sender_timeout,
        connections=settings.sender_max_in_flight,
        render=renderer.render,
        status_callback=settings.sender_status_callback_url,
    )


class Sender:
    """`await run()` until `stop()`."""

    def __init__(
        self,
        settings: Settings,
        channel: str,
        group: str | None = None,
        *,
        transport: Transport | None = None,
        metrics: SenderMetrics | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.channel = check_channel(channel)
        self.group = group or default_group(channel)
        self.transport = transport or build_transport(settings, channel)
        self.metrics = metrics or SenderMetrics()
        self._rng = rng or random.Random()
        self._topics = (ACTIONS[channel], SENDER_RETRIES[channel])
        self._offsets: dict[TopicPartition, PartitionOffsets] = {}
        self._tasks: dict[asyncio.Task[None], str] = {}
        self._pending = dict.fromkeys(self._topics, 0)
        self._slots = asyncio.Semaphore(settings.sender_max_in_flight)
        self._stop = asyncio.Event()
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._leases: Leases | None = None
        self._limit: SharedRateLimit | None = None
        self._redis_down_since: float | None = None
        # Expose zeros from the start, so a dashboard can tell "none yet" from "no sender".
        for outcome in OUTCOMES:
            self.metrics.actions.labels(channel=self.channel, outcome=outcome)
        for counter in (self.metrics.retries, self.metrics.rate_limited):
            counter.labels(channel=self.channel)
        self.metrics.in_flight.labels(channel=self.channel).set(0)

    def stop(self) -> None:
        self._stop.set()

    # -- lifecycle ---------------------------------------------------------------

    async def run(self) -> None:
        settings = self.settings
        http = None
        if settings.sender_metrics_port:
            http, _ = start_http_server(
                settings.sender_metrics_port, addr=settings.web_host, registry=self.metrics.registry
            )
        # Timeouts turn a hung Redis into a RedisError, which _redis() waits out.
        client = aioredis.Redis.from_url(
            settings.redis_url, socket_timeout=5, socket_connect_timeout=5
        )
        self._leases = Leases(
            client,
            lease_ms=int(settings.sender_lease_ttl * 1000),
            sent_ttl=settings.sender_claim_ttl,
        )
        if settings.sender_rate is not None:
            self._limit = SharedRateLimit(client, self.channel, settings.sender_rate)
            self.metrics.rate_limit.labels(channel=self.channel).set(settings.sender_rate)
        name = f"{settings.app_id}-sender-{self.channel}"
        session_ms = int((settings.broker_session_timeout or (6 if settings.dev_broker else 10))
                         * 1000)  # fmt: skip
        consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.bootstrap_servers,
            client_id=name,
            group_id=self.group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=settings.sender_max_in_flight,
            # A SIGKILLed sender's partitions wait this long for a new owner. (The dev
            # broker takes about half of it for a first join.)
            session_timeout_ms=session_ms,
            heartbeat_interval_ms=min(3000, session_ms // 6),
        )
        producer = AIOKafkaProducer(
            bootstrap_servers=settings.bootstrap_servers,
            client_id=name,
            acks="all",
            linger_ms=0,
            # The dev broker rejects idempotent producers.
            enable_idempotence=not settings.dev_broker,
        )
        self._consumer, self._producer = consumer, producer
        await self.transport.start()
        await producer.start()
        await consumer.start()
        try:
            consumer.subscribe(list(self._topics), listener=_Listener(self))
            await self._loop(consumer)
        finally:
            await self._drain()
            await self._commit(consumer)
            await consumer.stop()
            # Bounded, so a dead broker can't turn SIGTERM into a hang.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), 10)
            await self.transport.close()
            await client.aclose()
            if http is not None:
                http.shutdown()
                http.server_close()
        log.info("sender %s stopped", self.channel)

    async def _loop(self, consumer: AIOKafkaConsumer) -> None:
        last_commit = time.monotonic()
        while not self._stop.is_set():
            self._pause_when_full(consumer)
            batches = await consumer.getmany(timeout_ms=_POLL_TIMEOUT_MS)
            for tp, records in batches.items():
                offsets = self._offsets.setdefault(tp, PartitionOffsets())
                for record in records:
                    offsets.read(record.offset)
                    task = asyncio.create_task(self._handle(record, offsets))
                    self._tasks[task] = tp.topic
                    self._pending[tp.topic] += 1
                    task.add_done_callback(self._finished)
            self.metrics.in_flight.labels(channel=self.channel).set(len(self._tasks))
            if time.monotonic() - last_commit >= _COMMIT_INTERVAL:
                await self._commit(consumer)
                last_commit = time.monotonic()

    def _finished(self, task: asyncio.Task[None]) -> None:
        topic = self._tasks.pop(task, None)
        if topic is not None:
            self._pending[topic] -= 1
        self.metrics.in_flight.labels(channel=self.channel).set(len(self._tasks))
        if not task.cancelled() and (exc := task.exception()) is not None:
            # A bug, not a provider failure: the record stays unfinished (redelivered
            # after a restart) and its partition's commits stop here. Say so loudly.
            log.error("sender task failed", exc_info=exc)

    def _pause_when_full(self, consumer: AIOKafkaConsumer) -> None:
        limit = self.settings.sender_max_in_flight * _PENDING_PER_SLOT
        for topic in self._topics:
            pending = self._pending[topic]
            partitions = [tp for tp in consumer.assignment() if tp.topic == topic]
            if pending >= limit:
                consumer.pause(*partitions)
            else:
                consumer.resume(*partitions)

    async def _drain(self) -> None:
        """On stop: let provider calls under way finish (they are bounded by the call
        timeout); waits (tokens, leases, retry times) end at once, unfinished."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self.settings.sender_timeout + 1)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _commit(self, consumer: AIOKafkaConsumer) -> None:
        offsets = {}
        for tp, tracked in self._offsets.items():
            if (offset := tracked.committable()) is not None:
                offsets[tp] = offset
        if not offsets:
            return
        try:
            await consumer.commit(offsets)
        except (CommitFailedError, KafkaError) as exc:
            # Lost in a rebalance: the next owner redelivers these records, and the
            # `sent` marks make them duplicates.
            log.warning("offset commit failed, records will be redelivered: %s", exc)
            return
        for tp, offset in offsets.items():
            self._offsets[tp].committed = offset

    async def _revoke(self, revoked: set[TopicPartition]) -> None:
        if self._consumer is not None:
            await self._commit(self._consumer)
        # Tasks of revoked partitions may still finish (the lease keeps the new owner
        # from sending beside them), but they can no longer commit anything.
        for tp in revoked:
            self._offsets.pop(tp, None)

    # -- one record --------------------------------------------------------------

    async def _handle(
        self, record: ConsumerRecord[bytes, bytes], offsets: PartitionOffsets
    ) -> None:
        where = f"{record.topic}[{record.partition}]@{record.offset}"
        try:
            parsed = self._parse(record, where)
            if parsed is not None:
                action, attempt, not_before = parsed
                if not_before is not None:
                    wait = (not_before - datetime.now(UTC)).total_seconds()
                    if wait > 0 and not await self._sleep(wait):
                        return
                await self._deliver(action, attempt)
        except _Stopping:
            return
        offsets.finish(record.offset)

    def _parse(
        self, record: ConsumerRecord[bytes, bytes], where: str
    ) -> tuple[Action, int, datetime | None] | None:
        try:
            if record.topic == SENDER_RETRIES[self.channel]:
                retry = RetryRecord.model_validate_json(record.value or b"")
                action, attempt, not_before = retry.action, retry.attempt, retry.not_before
            else:
                action = Action.model_validate_json(record.value or b"")
                attempt, not_before = 1, None
        except ValidationError as exc:
            # A poison record must not wedge the partition: log it and move past it.
            log.error(
                "skipping unparseable action at %s: %s", where, describe_validation_error(exc)
            )
            return None
        if action.channel != self.channel:
            log.error(
                "skipping %s action %s at %s: this sender handles %s",
                action.channel, action.action_id, where, self.channel,
            )  # fmt: skip
            return None
        return action, attempt, not_before

    async def _deliver(self, action: Action, attempt: int) -> None:
        assert self._leases is not None
        leases = self._leases
        if action.expires_at < datetime.now(UTC):
            await self._fail(action, "expired")
            return
        async with self._slots:
            if self._limit is not None:
                limit = self._limit
                wait = await self._redis(limit.take)
                self.metrics.rate_limit.labels(channel=self.channel).set(limit.current)
                if wait > 0 and not await self._sleep(wait):
                    raise _Stopping
            token = new_token()
            while (state := await self._redis(lambda: leases.acquire(action.action_id, token))) \
                    == "held":  # fmt: skip
                # Another sender is calling the provider with it: wait for its outcome,
                # or for its lease to lapse if it died.
                if not await self._sleep(min(1.0, leases.lease_ms / 4000)):
                    raise _Stopping
            if state == "sent":
                log.info("duplicate action %s", action.action_id)
                self._count("duplicate")
                return
            try:
                result = await self.transport.send(action)
            except BaseException:
                # Cancelled mid-call (stop): the provider may have it; the next sender
                # sends again with the same key, which is why there is a key.
                await self._release(action.action_id, token)
                raise
        if isinstance(result, Accepted):
            latency = (datetime.now(UTC) - action.created_at).total_seconds()
            self.metrics.send_latency.labels(channel=self.channel).observe(max(0.0, latency))
            # Feedback before the `sent` mark: a crash between them sends again with the
            # same key and publishes `message.sent` again with the same event id (which
            # the worker deduplicates), where the other order would lose the feedback.
            await self._publish(EVENTS, action.customer_id, event_to_json(
                feedback_event(action, datetime.now(UTC))))  # fmt: skip
            # Redis down here: wait, holding the record. A crash here lets the lease
            # lapse and the action go again with the same key, never lost.
            await self._redis(lambda: leases.mark_sent(action.action_id))
            self._count("sent")
            return
        await self._rejected(action, attempt, result, token)

    async def _rejected(self, action: Action, attempt: int, result: Rejected, token: bytes) -> None:
        assert self._leases is not None
        if result.rate_limited:
            self.metrics.rate_limited.labels(channel=self.channel).inc()
            if self._limit is not None:
                limit = self._limit
                rate = await self._redis(limit.cut)
                self.metrics.rate_limit.labels(channel=self.channel).set(rate)
        if not result.retryable:
            log.warning("action %s failed: %s", action.action_id, result.reason)
            await self._release(action.action_id, token)
            await self._fail(action, result.reason)
            return
        retry = schedule_retry(
            action, attempt, result.reason, result.retry_after, datetime.now(UTC), self._rng
        )
        if retry is None:
            log.warning("action %s expired retrying (%s)", action.action_id, result.reason)
            await self._release(action.action_id, token)
            await self._fail(action, "expired")
            return
        # Handed over before the lease goes, so no other sender slips in between.
        await self._publish(
            SENDER_RETRIES[self.channel], action.customer_id, retry.model_dump_json().encode()
        )
        await self._release(action.action_id, token)
        self.metrics.retries.labels(channel=self.channel).inc()
        log.info(
            "action %s: %s, attempt %d at %s",
            action.action_id, result.reason, retry.attempt, retry.not_before.isoformat(),
        )  # fmt: skip

    async def _fail(self, action: Action, reason: str) -> None:
        event = feedback_event(action, datetime.now(UTC), failed=reason)
        await self._publish(EVENTS, action.customer_id, event_to_json(event))
        self.metrics.failed.labels(channel=self.channel, reason=reason).inc()
        self._count("expired" if reason == "expired" else "failed")

    async def _release(self, action_id: str, token: bytes) -> None:
        assert self._leases is not None
        leases = self._leases
        try:
            await leases.release(action_id, token)
        except redis.RedisError as exc:
            # Harmless: the lease lapses by itself within its TTL.
            log.warning("releasing the lease of %s failed: %s", action_id, exc)

    def _count(self, outcome: Outcome) -> None:
        self.metrics.actions.labels(channel=self.channel, outcome=outcome).inc()

    # -- waiting -----------------------------------------------------------------

    async def _redis(self, call: Callable[[], Awaitable[T]]) -> T:
        """`call()` once Redis answers: without Redis there is no lease and no send."""
        delay = 0.25
        while True:
            try:
                result = await call()
            except redis.RedisError as exc:
                now = time.monotonic()
                if self._redis_down_since is None or now - self._redis_down_since > 10:
                    self._redis_down_since = now
                    log.warning("Redis unavailable, not sending until it is back: %s", exc)
            else:
                if self._redis_down_since is not None:
                    self._redis_down_since = None
                    log.warning("Redis is back, sending again")
                return result
            if not await self._sleep(delay * self._rng.uniform(0.5, 1.0)):
                raise _Stopping
            delay = min(delay * 2, _REDIS_RETRY_MAX)

    async def _publish(self, topic: str, key: str, value: bytes) -> None:
        """Publish and wait for the broker's ack; retried until it works or we stop."""
        assert self._producer is not None
        delay = 0.25
        while True:
            try:
                await self._producer.send_and_wait(topic, key=key.encode(), value=value)
                return
            except KafkaError as exc:
                log.warning("publishing to %s failed, retrying: %s", topic, exc)
            if not await self._sleep(delay):
                raise _Stopping
            delay = min(delay * 2, _REDIS_RETRY_MAX)

    async def _sleep(self, seconds: float) -> bool:
        """Sleep unless stopped; False when stopped."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout=max(0.0, seconds))
        return not self._stop.is_set()


def run_sender(settings: Settings, channel: str, group: str | None) -> None:
    """The `omnicue send` command: run until SIGTERM/SIGINT, then return (exit 0)."""
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # The Kafka clients' INFO lines (connections, joins) drown the sent lines.
    for name in ("aiokafka", "kafka"):
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        check_channel(channel)
        transport = build_transport(settings, channel)
    except ValueError as exc:
        raise SystemExit(f"omnicue send: {exc}") from None
    asyncio.run(_main(settings, channel, group, transport))


async def _main(settings: Settings, channel: str, group: str | None, transport: Transport) -> None:
    sender = Sender(settings, channel, group, transport=transport)
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        sender.stop()
        # A second signal kills outright, should the clean stop hang.
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    await sender.run()


__all__ = [
    "OUTCOMES",
    "Outcome",
    "PartitionOffsets",
    "Sender",
    "UnknownChannelError",
    "build_transport",
    "check_channel",
    "default_group",
    "feedback_event",
    "run_sender",
]
