"""`omnicue ingest`: the Segment-compatible HTTP ingest (aiohttp), publishing to
`omnicue.events`.

Segment's Tracking API (`/v1/track`, `/identify`, `/alias`, `/page`, `/screen`,
`/batch`) goes through the mapping in `omnicue.segment`; `/v1/events` takes contract
JSON as it is. Every event is then checked by the contract, keyed by customer and
published; the reply waits for the broker's acknowledgement of every accepted one, so
a 200 (or a 400 that lists the rejected messages) never loses an accepted message. A
5xx means "retry the whole request": the retried messages keep their `messageId`,
which is their `event_id`, and the pipeline drops the duplicates.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec
from kafka import KafkaProducer
from kafka.errors import KafkaError
from pydantic import ValidationError

from omnicue.feedback import (
    SENDGRID_SIGNATURE,
    SENDGRID_TIMESTAMP,
    TWILIO_SIGNATURE,
    FeedbackError,
    Mapped,
    generic_event,
    load_sendgrid_key,
    sendgrid_event,
    twilio_event,
    verify_sendgrid,
    verify_twilio,
)
from omnicue.producer import InvalidEvent
from omnicue.segment import MappingError, map_message
from omnicue.settings import Settings
from schemas.events import (
    Channel,
    customer_key,
    describe_validation_error,
    event_adapter,
    event_to_json,
)
from schemas.topics import EVENTS

log = logging.getLogger("omnicue.ingest")

# Segment's limits, which its libraries enforce on their side too.
MESSAGE_LIMIT = 32 * 1024
BATCH_LIMIT = 500 * 1024
# A provider's feedback post (SendGrid batches its events; its documentation names no
# size): larger than Segment's limit.
FEEDBACK_LIMIT = 2 * 1024 * 1024
# How long a request waits for the broker before it gets a 503 (and is retried).
ACK_TIMEOUT = 30.0
SEGMENT_ENDPOINTS = ("track", "identify", "alias", "page", "screen")

Record = tuple[bytes, bytes]  # (key, value) for `omnicue.events`


class Publisher(Protocol):
    """Where accepted events go: `KafkaPublisher`, or an in-memory list in tests."""

    async def publish(self, records: Sequence[Record]) -> None:
        """Return once the broker has acknowledged every record; raise if it has not."""


class KafkaPublisher:
    """kafka-python's producer for `omnicue.events`, configured as `EventProducer` is
    (idempotent, acks=all: retries neither duplicate nor reorder a customer's events,
    and an acknowledged event survives a failover; the dev broker accepts this from
    kafka-python), with its deliveries awaited on the event loop."""

    def __init__(self, settings: Settings, **config: Any) -> None:
        options: dict[str, Any] = {
            "bootstrap_servers": settings.bootstrap_servers,
            "client_id": f"{settings.app_id}-ingest",
            "enable_idempotence": True,
            "acks": "all",
            # Concurrent requests share producer batches; a request's own messages do
            # anyway, as they are appended together.
            "linger_ms": 5,
            "batch_size": 256 * 1024,
            # send() blocks while the broker is unknown or the buffer is full; bounded,
            # so a request gets its 503 well within ACK_TIMEOUT.
            "max_block_ms": 10_000,
        }
        options.update(config)
        self._producer = KafkaProducer(**options)

    def close(self, timeout: float = 10) -> None:
        """Deliver what is queued (bounded), then disconnect."""
        self._producer.close(timeout=timeout)

    async def publish(self, records: Sequence[Record]) -> None:
        loop = asyncio.get_running_loop()
        acked: asyncio.Future[None] = loop.create_future()
        remaining = len(records)
        lock = threading.Lock()

        # Called on the producer's I/O thread (or here, for a record already done).
        def delivered(_: object) -> None:
            nonlocal remaining
            with lock:
                remaining -= 1
                last = remaining == 0
            if last:
                loop.call_soon_threadsafe(_settle, acked, None)

        def failed(exc: BaseException) -> None:
            loop.call_soon_threadsafe(_settle, acked, exc)

        def send_all() -> None:
            for key, value in records:
                future = self._producer.send(EVENTS, key=key, value=value)
                future.add_callback(delivered)
                future.add_errback(failed)

        # In a thread: send() may block (see max_block_ms), the event loop must not.
        await loop.run_in_executor(None, send_all)
        await acked


def _settle(future: asyncio.Future[None], exc: BaseException | None) -> None:
    if future.done():
        return  # a second failure of the same request
    if exc is None:
        future.set_result(None)
    else:
        future.set_exception(exc)


@dataclass
class Outcome:
    """What became of one request's messages."""

    records: list[Record] = field(default_factory=list)
    accepted: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    too_large: bool = False

    def reject(self, index: int, message: Any, code: str, text: str) -> None:
        message_id = message.get("messageId") if isinstance(message, dict) else None
        if message_id is None and isinstance(message, dict):
            message_id = message.get("event_id")
        self.errors.append(
            {
                "index": index,
                "messageId": message_id if isinstance(message_id, str) else None,
                "code": code,
                "message": text,
            }
        )
        self.too_large = self.too_large or code == "too_large"


def _json_error(status: int, code: str, message: str) -> web.Response:
    # `code` and `message` are what Segment's libraries log from an error reply.
    return web.json_response(
        {"success": False, "code": code, "message": message},
        status=status,
        dumps=lambda value: orjson.dumps(value).decode(),
    )


def _write_key(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() != "basic" or not credentials:
        return None
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    # Segment sends `<writeKey>:`, the key as the user name and no password.
    return decoded.partition(":")[0] or None


def _size(message: Any) -> int:
    return len(orjson.dumps(message))


def _accept(outcome: Outcome, index: int, message: Any, events: list[dict[str, Any]]) -> None:
    records = []
    for event in events:
        try:
            valid = event_adapter.validate_python(event)
        except ValidationError as exc:
            raise InvalidEvent(describe_validation_error(exc)) from exc
        records.append((customer_key(valid).encode(), event_to_json(valid)))
    outcome.records.extend(records)
    outcome.accepted += 1


def map_segment(messages: Sequence[Any], channel: Channel, received_at: datetime) -> Outcome:
    """Map and check a request's Segment messages; each one is accepted or rejected."""
    outcome = Outcome()
    for index, message in enumerate(messages):
        if type(message) is not dict:
            outcome.reject(index, message, "invalid", "a message must be a JSON object")
            continue
        if _size(message) > MESSAGE_LIMIT:
            outcome.reject(index, message, "too_large", f"larger than {MESSAGE_LIMIT} bytes")
            continue
        try:
            _accept(outcome, index, message, map_message(message, channel, received_at))
        except (MappingError, InvalidEvent) as exc:
            outcome.reject(index, message, "invalid", str(exc))
    return outcome


def check_native(messages: Sequence[Any], channel: Channel) -> Outcome:
    """Check contract events (`/v1/events`); a missing `channel` is the write key's."""
    outcome = Outcome()
    for index, message in enumerate(messages):
        if type(message) is not dict:
            outcome.reject(index, message, "invalid", "an event must be a JSON object")
            continue
        if _size(message) > MESSAGE_LIMIT:
            outcome.reject(index, message, "too_large", f"larger than {MESSAGE_LIMIT} bytes")
            continue
        event = dict(message)
        event.setdefault("channel", channel)
        try:
            _accept(outcome, index, message, [event])
        except InvalidEvent as exc:
            outcome.reject(index, message, "invalid", str(exc))
    return outcome


def check_feedback(items: Sequence[Any], channel: Channel) -> Outcome:
    """The generic feedback form (`/v1/feedback`); a missing `channel` is the write key's."""
    outcome = Outcome()
    for index, item in enumerate(items):
        if isinstance(item, dict) and _size(item) > MESSAGE_LIMIT:
            outcome.reject(index, item, "too_large", f"larger than {MESSAGE_LIMIT} bytes")
            continue
        try:
            _accept(outcome, index, item, [generic_event(item, channel)])
        except (FeedbackError, InvalidEvent) as exc:
            outcome.reject(index, item, "invalid", str(exc))
    return outcome


@dataclass(frozen=True)
class ProviderFeedback:
    """How the providers' callbacks are authenticated; None: that endpoint is off."""

    sendgrid_key: ec.EllipticCurvePublicKey | None = None
    twilio_auth_token: str | None = None
    # The ingest's URL as providers call it (scheme, host, port, any path prefix), when
    # a proxy in front changes it: Twilio signs the URL it called.
    public_url: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> ProviderFeedback:
        key = settings.feedback_sendgrid_public_key
        token = settings.feedback_twilio_auth_token
        return cls(
            sendgrid_key=load_sendgrid_key(key) if key else None,
            twilio_auth_token=token.get_secret_value() if token else None,
            public_url=settings.feedback_public_url,
        )


class Ingest:
    """The request handlers, over a publisher and the write keys."""

    def __init__(
        self,
        write_keys: Mapping[str, Channel],
        publisher: Publisher,
        providers: ProviderFeedback | None = None,
    ) -> None:
        self._write_keys = dict(write_keys)
        self._publisher = publisher
        self._providers = providers or ProviderFeedback()

    def routes(self) -> list[web.RouteDef]:
        routes = [web.post(f"/v1/{name}", self._single(name)) for name in SEGMENT_ENDPOINTS]
        return [
            *routes,
            web.post("/v1/batch", self.batch),
            web.post("/v1/events", self.events),
            web.post("/v1/feedback", self.feedback),
            web.post("/v1/feedback/sendgrid", self.sendgrid),
            web.post("/v1/feedback/twilio", self.twilio),
            web.get("/health", self.health),
        ]

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    def _single(self, kind: str) -> Any:
        async def handle(request: web.Request) -> web.Response:
            return await self._handle(request, kind)

        return handle

    async def batch(self, request: web.Request) -> web.Response:
        return await self._handle(request, "batch")

    async def events(self, request: web.Request) -> web.Response:
        return await self._handle(request, "events")

    async def feedback(self, request: web.Request) -> web.Response:
        return await self._handle(request, "feedback")

    async def sendgrid(self, request: web.Request) -> web.Response:
        """The SendGrid Event Webhook: a JSON array of events, signed (ECDSA)."""
        key = self._providers.sendgrid_key
        if key is None:
            return _json_error(404, "not_configured", "SendGrid feedback is not configured "
                               "(OMNICUE_FEEDBACK_SENDGRID_PUBLIC_KEY)")  # fmt: skip
        body = await self._provider_body(request)
        if isinstance(body, web.Response):
            return body
        headers = request.headers
        if not verify_sendgrid(
            key, body, headers.get(SENDGRID_SIGNATURE), headers.get(SENDGRID_TIMESTAMP)
        ):
            return _json_error(403, "bad_signature", f"{SENDGRID_SIGNATURE} does not verify "
                               f"over {SENDGRID_TIMESTAMP} and the body")  # fmt: skip
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            return _json_error(400, "invalid_json", f"the body is not JSON: {exc}")
        if not isinstance(payload, list):
            return _json_error(400, "invalid", "the body must be a JSON array of events")
        outcome, skipped = Outcome(), 0
        for index, item in enumerate(payload):
            try:
                skipped += self._accept_mapped(outcome, index, item, sendgrid_event(item))
            except (FeedbackError, InvalidEvent) as exc:
                outcome.reject(index, item, "invalid", str(exc))
        # 200 even with rejected events: SendGrid would retry the whole batch for days,
        # and a malformed event never gets better. They are logged and listed.
        return await self._provider_reply(outcome, skipped, "SendGrid")

    async def twilio(self, request: web.Request) -> web.Response:
        """Twilio's status callback: a form, signed (HMAC-SHA1 of URL and parameters)."""
        token = self._providers.twilio_auth_token
        if token is None:
            return _json_error(404, "not_configured", "Twilio feedback is not configured "
                               "(OMNICUE_FEEDBACK_TWILIO_AUTH_TOKEN)")  # fmt: skip
        body = await self._provider_body(request)
        if isinstance(body, web.Response):
            return body
        form = await request.post()
        params = [(name, value) for name, value in form.items() if isinstance(value, str)]
        # The path and query exactly as requested (raw_path: not re-encoded), after the
        # public base when a proxy in front changes scheme, host or prefix.
        base = self._providers.public_url or f"{request.scheme}://{request.host}"
        url = base.rstrip("/") + request.raw_path
        if not verify_twilio(token, url, params, request.headers.get(TWILIO_SIGNATURE)):
            return _json_error(403, "bad_signature",
                               f"{TWILIO_SIGNATURE} does not verify for {url}")  # fmt: skip
        outcome = Outcome()
        try:
            mapped = twilio_event(dict(params), request.query, datetime.now(UTC))
            skipped = self._accept_mapped(outcome, 0, dict(params), mapped)
        except (FeedbackError, InvalidEvent) as exc:
            return _json_error(400, "invalid", str(exc))
        return await self._provider_reply(outcome, skipped, "Twilio")

    async def _provider_body(self, request: web.Request) -> bytes | web.Response:
        too_large = _json_error(
            413, "too_large", f"request body larger than {FEEDBACK_LIMIT} bytes"
        )
        if request.content_length is not None and request.content_length > FEEDBACK_LIMIT:
            return too_large
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return too_large
        return too_large if len(body) > FEEDBACK_LIMIT else body

    def _accept_mapped(self, outcome: Outcome, index: int, item: Any, mapped: Mapped) -> int:
        """Accept the mapped event; 1 when the item was skipped (no feedback)."""
        if mapped.event is None:
            return 1
        _accept(outcome, index, item, [mapped.event])
        return 0

    async def _provider_reply(self, outcome: Outcome, skipped: int, provider: str) -> web.Response:
        if outcome.records and not await self._publish(outcome.records):
            return _unavailable()
        if outcome.errors:
            log.warning("%s feedback: %d rejected: %s", provider, len(outcome.errors),
                        outcome.errors[:3])  # fmt: skip
        body: dict[str, Any] = {
            "success": not outcome.errors,
            "accepted": outcome.accepted,
            "skipped": skipped,
            "rejected": len(outcome.errors),
        }
        if outcome.errors:
            body["errors"] = outcome.errors
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    async def _publish(self, records: Sequence[Record]) -> bool:
        """Publish and wait for the broker's acknowledgement; False if it did not come."""
        try:
            await asyncio.wait_for(self._publisher.publish(records), ACK_TIMEOUT)
        except Exception as exc:  # any failure: nothing of this request is promised
            log.warning("publishing %d records failed: %r", len(records), exc)
            return False
        return True

    async def _handle(self, request: web.Request, kind: str) -> web.Response:
        key = _write_key(request)
        channel = self._write_keys.get(key) if key is not None else None
        if channel is None:
            return _json_error(
                401,
                "unauthorized",
                "missing write key (HTTP Basic, the key as user name)"
                if key is None
                else "unknown write key",
            )
        limit = MESSAGE_LIMIT if kind in SEGMENT_ENDPOINTS else BATCH_LIMIT
        if request.content_length is not None and request.content_length > limit:
            return _json_error(413, "too_large", f"request body larger than {limit} bytes")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _json_error(413, "too_large", f"request body larger than {limit} bytes")
        if len(body) > limit:
            return _json_error(413, "too_large", f"request body larger than {limit} bytes")
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            return _json_error(400, "invalid_json", f"the body is not JSON: {exc}")
        received_at = datetime.now(UTC)
        if kind == "events":
            messages = payload if isinstance(payload, list) else [payload]
            outcome = check_native(messages, channel)
        elif kind == "feedback":
            items = payload if isinstance(payload, list) else [payload]
            outcome = check_feedback(items, channel)
        else:
            messages_or_error = _segment_messages(payload, kind)
            if isinstance(messages_or_error, str):
                return _json_error(400, "invalid", messages_or_error)
            outcome = map_segment(messages_or_error, channel, received_at)
        if outcome.records and not await self._publish(outcome.records):
            return _unavailable()
        return _reply(outcome)


def _unavailable() -> web.Response:
    return _json_error(
        503,
        "unavailable",
        "the broker did not acknowledge the events; retry the request "
        "(events keep their messageId, so a retry does not duplicate them)",
    )


def _segment_messages(payload: Any, kind: str) -> list[Any] | str:
    if kind != "batch":
        if not isinstance(payload, dict):
            return "the body must be a JSON object"
        message = {k: v for k, v in payload.items() if k != "writeKey"}
        message["type"] = kind  # the endpoint names the type
        return [message]
    if not isinstance(payload, dict) or not isinstance(payload.get("batch"), list):
        return 'the body must be {"batch": [messages]}'
    shared = payload.get("context")
    messages: list[Any] = []
    for message in payload["batch"]:
        # A batch's top-level context applies to each message; the message's own wins.
        if isinstance(shared, dict) and isinstance(message, dict):
            own = message.get("context")
            message = {**message, "context": {**shared, **own} if isinstance(own, dict) else shared}
        messages.append(message)
    return messages


def _reply(outcome: Outcome) -> web.Response:
    total = outcome.accepted + len(outcome.errors)
    body: dict[str, Any] = {
        "success": not outcome.errors,
        "accepted": outcome.accepted,
        "rejected": len(outcome.errors),
    }
    status = 200
    if outcome.errors:
        status = 413 if outcome.too_large else 400
        body["code"] = "too_large" if outcome.too_large else "invalid"
        body["message"] = (
            f"{len(outcome.errors)} of {total} messages rejected (see errors); "
            f"the other {outcome.accepted} were accepted and published"
        )
        body["errors"] = outcome.errors
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def build_app(
    write_keys: Mapping[str, Channel],
    publisher: Publisher,
    providers: ProviderFeedback | None = None,
) -> web.Application:
    # One byte over the largest limit still reads, so the handler can answer in JSON
    # (each endpoint checks its own limit).
    app = web.Application(client_max_size=FEEDBACK_LIMIT + 1)
    app.add_routes(Ingest(write_keys, publisher, providers).routes())
    return app


def run_ingest(settings: Settings) -> None:
    """Serve until SIGINT/SIGTERM; the ready line names the URL."""
    if not settings.write_keys:
        raise SystemExit(
            "OMNICUE_INGEST_WRITE_KEYS is empty: set key=channel pairs, e.g. wk-web=web,wk-app=app"
        )
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(levelname)s %(name)s %(message)s"
    )
    try:
        asyncio.run(_serve(settings))
    except KafkaError as exc:
        message = f"omnicue ingest: cannot reach the broker {settings.broker}: {exc}"
        raise SystemExit(message) from None


async def _serve(settings: Settings) -> None:
    loop = asyncio.get_running_loop()
    publisher = await loop.run_in_executor(None, KafkaPublisher, settings)
    app = build_app(settings.write_keys, publisher, ProviderFeedback.from_settings(settings))
    runner = web.AppRunner(app, access_log=None)
    try:
        await runner.setup()
        site = web.TCPSite(runner, settings.ingest_host, settings.ingest_port)
        await site.start()
        # The bound port: OMNICUE_INGEST_PORT=0 picks a free one.
        port = runner.addresses[0][1] if runner.addresses else settings.ingest_port
        print(f"ingest http://{settings.ingest_host}:{port}", flush=True)
        await _until_stopped()
    finally:
        await runner.cleanup()  # finishes requests in flight, then
        await loop.run_in_executor(None, publisher.close)


async def _until_stopped() -> None:
    import signal

    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopped.set)
    await stopped.wait()
