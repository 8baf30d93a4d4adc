"""The console sender: consume one channel's actions and "send" each one exactly once.

Delivery from the worker is at-least-once (replays, rebalances, re-fired timers), so
the sender is where duplicates stop: every action id is claimed in Redis with
`SET NX EX` before sending, and a failed claim means someone already sent it.
Offsets are committed manually after handling, so a crash redelivers rather than
loses; the claim turns that redelivery into a `duplicate` instead of a second message.

Real channel senders will replace the stdout line with a provider call; the decision
(`handle_action`) and the Kafka/Redis wiring stay the same.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from types import FrameType
from typing import Any, Literal

import redis
from kafka import KafkaConsumer, KafkaProducer
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata
from prometheus_client import start_http_server
from pydantic import ValidationError

from omnicue.metrics import SenderMetrics
from omnicue.settings import Settings
from schemas.actions import Action
from schemas.events import Event, describe_validation_error, event_from_dict, event_to_json
from schemas.topics import ACTION_CHANNELS, ACTIONS, EVENTS

log = logging.getLogger(__name__)

Outcome = Literal["sent", "duplicate", "expired"]
OUTCOMES: tuple[Outcome, ...] = ("sent", "duplicate", "expired")

CLAIM_PREFIX = "omnicue:sent:"
# Short enough that SIGTERM is noticed promptly, long enough not to spin when idle.
_POLL_TIMEOUT_MS = 500
_REDIS_RETRY_MAX = 10.0


class UnknownChannelError(ValueError):
    pass


def check_channel(channel: str) -> str:
    if channel not in ACTIONS:
        raise UnknownChannelError(
            f"unknown channel {channel!r}: expected one of {', '.join(ACTION_CHANNELS)}"
        )
    return channel


def default_group(channel: str) -> str:
    return f"omnicue-sender-{channel}"


def claim_key(action_id: str) -> str:
    return f"{CLAIM_PREFIX}{action_id}"


def redis_claim(client: redis.Redis, ttl: int) -> Callable[[str], bool]:
    """A `claim` for `handle_action`: True only for the first claimer within `ttl` seconds."""

    def claim(action_id: str) -> bool:
        # SET NX is atomic, so two senders racing on a redelivered action can't both win.
        return bool(client.set(claim_key(action_id), b"1", nx=True, ex=ttl))

    return claim


def handle_action(action: Action, now: datetime, claim: Callable[[str], bool]) -> Outcome:
    """Decide what happens to one action; `claim` is only called for sendable actions.

    Expiry is checked first so an expired action never takes a claim: were the same
    id re-fired later with a fresh expiry, it could still be sent.
    """
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")
    if action.expires_at < now:
        return "expired"
    if not claim(action.action_id):
        return "duplicate"
    return "sent"


def _contact(action: Action) -> str:
    recipient = action.recipient
    if action.channel == "push":
        return f"token={recipient.push_token or '-'}"
    if action.channel == "email":
        return f"email={recipient.email or '-'}"
    return f"phone={recipient.phone or '-'}"


def format_action(action: Action) -> str:
    """The one stdout line a console "send" is."""
    return (
        f"{action.channel:<5} -> {action.customer_id} {action.template} step {action.step} "
        f"({action.rule_id}) {action.action_id}  {_contact(action)}"
    )


def feedback_event(action: Action, occurred_at: datetime) -> Event:
    """The `message.sent` delivery-feedback event, validated against the event contract.

    The id derives from the action id, so consumers can deduplicate a re-published one.
    """
    return event_from_dict(
        {
            "event_id": f"fb-sent-{action.action_id}",
            "type": "message.sent",
            "occurred_at": occurred_at,
            "channel": action.channel,
            "customer_id": action.customer_id,
            "properties": {"action_id": action.action_id},
        }
    )


class _ReadyListener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Prints the readiness line on the first assignment, even an empty one."""

    def __init__(self, channel: str) -> None:
        self._channel = channel
        self._announced = False

    def on_partitions_revoked(self, revoked: Any) -> None:
        # Offsets are committed after every batch, before the next poll (where
        # rebalances run), so there is nothing left to commit here.
        pass

    def on_partitions_assigned(self, assigned: Any) -> None:
        log.info("sender %s assigned %s", self._channel, sorted(assigned))
        if not self._announced:
            self._announced = True
            print(f"sender {self._channel} ready", flush=True)


class ConsoleSender:
    """Consume `omnicue.actions.<channel>` and log each action once.

    `run()` blocks until `stop()` (from a signal handler or another thread).
    """

    def __init__(
        self,
        settings: Settings,
        channel: str,
        group: str | None = None,
        *,
        metrics: SenderMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.channel = check_channel(channel)
        self.group = group or default_group(channel)
        self.metrics = metrics or SenderMetrics()
        # Expose zeros from the start, so a dashboard can tell "none yet" from "no sender".
        for outcome in OUTCOMES:
            self.metrics.actions.labels(channel=self.channel, outcome=outcome)
        self._stopping = False

    def stop(self) -> None:
        self._stopping = True

    def run(self) -> None:
        settings = self.settings
        http = None
        if settings.sender_metrics_port:
            http, _ = start_http_server(
                settings.sender_metrics_port,
                addr=settings.web_host,
                registry=self.metrics.registry,
            )
        # Timeouts turn a hung Redis into a RedisError, which _decide retries.
        redis_client = redis.Redis.from_url(
            settings.redis_url, socket_timeout=5, socket_connect_timeout=5
        )
        consumer = KafkaConsumer(
            bootstrap_servers=settings.bootstrap_servers,
            client_id=f"{settings.app_id}-sender-{self.channel}",
            group_id=self.group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            # The dev broker takes about half the session timeout for a first join.
            session_timeout_ms=6000 if settings.dev_broker else 45000,
            heartbeat_interval_ms=1000 if settings.dev_broker else 3000,
        )
        producer = KafkaProducer(
            bootstrap_servers=settings.bootstrap_servers,
            client_id=f"{settings.app_id}-sender-{self.channel}",
            # The dev broker reports wrong offsets for multi-record batches.
            batch_size=1 if settings.dev_broker else 16384,
        )
        try:
            consumer.subscribe([ACTIONS[self.channel]], listener=_ReadyListener(self.channel))
            self._loop(consumer, producer, redis_claim(redis_client, settings.sender_claim_ttl))
        finally:
            # close() delivers feedback still in flight; bounded so a dead broker can't
            # turn SIGTERM into a hang.
            producer.close(timeout=10)
            consumer.close(autocommit=False)
            redis_client.close()
            if http is not None:
                http.shutdown()
                http.server_close()
        log.info("sender %s stopped", self.channel)

    def _loop(
        self, consumer: KafkaConsumer, producer: KafkaProducer, claim: Callable[[str], bool]
    ) -> None:
        while not self._stopping:
            batches = consumer.poll(timeout_ms=_POLL_TIMEOUT_MS)
            done: dict[Any, Any] = {}
            feedback: list[Any] = []
            for tp, records in batches.items():
                for record in records:
                    if self._stopping or not self._process(record, producer, claim, feedback):
                        break
                    done[tp] = OffsetAndMetadata(record.offset + 1, "", -1)
                else:
                    continue
                break
            self._commit(consumer, producer, done, feedback)

    def _process(
        self,
        record: Any,
        producer: KafkaProducer,
        claim: Callable[[str], bool],
        feedback: list[Any],
    ) -> bool:
        """Handle one record; False means stop before it (shutdown while Redis is down)."""
        where = f"{record.topic}[{record.partition}]@{record.offset}"
        try:
            action = Action.model_validate_json(record.value or b"")
        except ValidationError as exc:
            # A poison record must not wedge the partition: log it and move past it.
            log.error(
                "skipping unparseable action at %s: %s", where, describe_validation_error(exc)
            )
            return True
        if action.channel != self.channel:
            log.error(
                "skipping %s action %s at %s: this sender handles %s",
                action.channel, action.action_id, where, self.channel,
            )  # fmt: skip
            return True

        outcome = self._decide(action, claim)
        if outcome is None:
            return False
        if outcome == "sent":
            print(format_action(action), flush=True)
            event = feedback_event(action, datetime.now(UTC))
            feedback.append(
                producer.send(EVENTS, key=action.customer_id.encode(), value=event_to_json(event))
            )
        else:
            log.info("%s action %s (%s)", outcome, action.action_id, where)
        self.metrics.actions.labels(channel=self.channel, outcome=outcome).inc()
        return True

    def _decide(self, action: Action, claim: Callable[[str], bool]) -> Outcome | None:
        # Sending without a claim could send twice, so a Redis outage blocks the
        # sender instead; the record stays uncommitted until the claim works.
        delay = 0.25
        while True:
            try:
                # `now` per attempt: an action can expire while Redis is down.
                return handle_action(action, datetime.now(UTC), claim)
            except redis.RedisError as exc:
                log.warning(
                    "claiming %s failed, retrying in %.1fs: %s", action.action_id, delay, exc
                )
            if not self._sleep(delay):
                return None
            delay = min(delay * 2, _REDIS_RETRY_MAX)

    def _sleep(self, seconds: float) -> bool:
        """Sleep unless stopped; False when stopped."""
        deadline = time.monotonic() + seconds
        while not self._stopping and time.monotonic() < deadline:
            time.sleep(min(0.1, deadline - time.monotonic()))
        return not self._stopping

    def _commit(
        self,
        consumer: KafkaConsumer,
        producer: KafkaProducer,
        done: dict[Any, Any],
        feedback: list[Any],
    ) -> None:
        if feedback:
            # Feedback goes out before the offsets that produced it are committed.
            producer.flush()
            for future in feedback:
                if future.failed():
                    # The message was sent and its claim taken, so a redelivery would be a
                    # duplicate and never re-publish: the feedback is lost, say so loudly.
                    log.error("message.sent feedback not published: %s", future.exception)
        if not done:
            return
        try:
            consumer.commit(done)
        except (CommitFailedError, KafkaError) as exc:
            # We lost the partitions in a rebalance; their next owner redelivers these
            # records and the claims turn them into duplicates.
            log.warning("offset commit failed, records will be redelivered: %s", exc)


def run_console_sender(settings: Settings, channel: str, group: str | None) -> None:
    """The `omnicue send` command: run until SIGTERM/SIGINT, then return (exit 0)."""
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # kafka-python's INFO lines (connections, joins) drown the sent lines.
    logging.getLogger("kafka").setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        sender = ConsoleSender(settings, channel, group)
    except UnknownChannelError as exc:
        raise SystemExit(f"omnicue send: {exc}") from None

    def on_signal(signum: int, frame: FrameType | None) -> None:
        # No logging here: a handler interrupting a write to the same stream can fail.
        sender.stop()
        # A second signal kills outright, should the clean stop hang.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        sender.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


__all__ = [
    "CLAIM_PREFIX",
    "OUTCOMES",
    "ConsoleSender",
    "Outcome",
    "UnknownChannelError",
    "check_channel",
    "claim_key",
    "default_group",
    "feedback_event",
    "format_action",
    "handle_action",
    "redis_claim",
    "run_console_sender",
]
