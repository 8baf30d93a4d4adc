"""How an action reaches a provider: the console (dev) or an HTTP webhook.

A transport makes one attempt and says what happened; retrying, rate limiting and
the lease are the runtime's, so every transport gets them the same way.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, Protocol

import aiohttp
import orjson

from omnicue.feedback import ACTION_ARG, CUSTOMER_ARG, status_callback_url
from schemas.actions import Action, mask_email, mask_phone, mask_secret
from senders.render import RenderedMessage, TemplateError
from senders.retry import is_retryable_status, parse_retry_after

TransportName = Literal["console", "webhook"]
TRANSPORTS: tuple[TransportName, ...] = ("console", "webhook")
SIGNATURE_HEADER = "X-Omnicue-Signature"
IDEMPOTENCY_HEADER = "Idempotency-Key"


@dataclass(frozen=True)
class Accepted:
    status: int | None = None


@dataclass(frozen=True)
class Rejected:
    """The provider did not take the action; `reason` is a bounded metric label."""

    reason: str
    retryable: bool
    status: int | None = None
    retry_after: float | None = None

    @property
    def rate_limited(self) -> bool:
        return self.status == 429


Result = Accepted | Rejected


class Transport(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def send(self, action: Action) -> Result: ...


def _contact(action: Action) -> str:
    # Masked: a console sender's output lands in terminals and log collectors.
    recipient = action.recipient
    if action.channel == "push":
        token = recipient.push_token
        return f"token={mask_secret(token) if token else '-'}"
    if action.channel == "email":
        return f"email={mask_email(recipient.email) if recipient.email else '-'}"
    return f"phone={mask_phone(recipient.phone) if recipient.phone else '-'}"


def format_action(action: Action) -> str:
    """The one stdout line a console "send" is."""
    return (
        f"{action.channel:<5} -> {action.customer_id} {action.template} step {action.step} "
        f"({action.rule_id}) {action.action_id}  {_contact(action)}"
    )


class ConsoleTransport:
    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def send(self, action: Action) -> Result:
        print(format_action(action), flush=True)
        return Accepted()


def feedback_routing(action: Action, status_callback: str | None = None) -> dict[str, object]:
    """What a provider must echo back for its delivery feedback to reach this action's
    customer (omnicue/feedback.py): SendGrid custom args, and a Twilio StatusCallback
    URL with the ids in its query when `status_callback` (the ingest's
    `/v1/feedback/twilio`) is configured."""
    return {
        "custom_args": {ACTION_ARG: action.action_id, CUSTOMER_ARG: action.customer_id},
        "status_callback": (
            status_callback_url(status_callback, action.action_id, action.customer_id)
            if status_callback else None
        ),
    }


def webhook_body(
    action: Action, message: RenderedMessage | None = None, status_callback: str | None = None
) -> bytes:
    """The POST body: the action as in its contract (schemas/actions.py), with a
    renderer its rendered message under `message` (senders/render.py), and under
    `feedback` what the provider is to echo back with its delivery feedback."""
    body = action.model_dump_json()
    if message is not None:
        body = f'{body[:-1]},"message":{message.model_dump_json()}}}'
    routing = orjson.dumps(feedback_routing(action, status_callback)).decode()
    body = f'{body[:-1]},"feedback":{routing}}}'
    return body.encode()


def sign(body: bytes, secret: str) -> str:
    """`X-Omnicue-Signature`: `sha256=` and the hex HMAC-SHA256 of the exact body."""
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def verify(body: bytes, secret: str, header: str | None) -> bool:
    """For receivers (and tests): constant-time check of a signature header."""
    return header is not None and hmac.compare_digest(sign(body, secret), header)


class WebhookTransport:
    """POST each action to `url` (`{channel}` in it replaced), one attempt per call."""

    def __init__(
        self,
        url: str,
        channel: str,
        *,
        secret: str,
        timeout: float,
        connections: int,
        render: Callable[[Action], RenderedMessage] | None = None,
        status_callback: str | None = None,
    ) -> None:
        if not secret:
            raise ValueError("the webhook transport needs OMNICUE_WEBHOOK_SECRET")
        self.url = url.replace("{channel}", channel)
        self._secret = secret
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._connections = connections
        self._render = render
        self._status_callback = status_callback
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=self._timeout,
            connector=aiohttp.TCPConnector(limit=self._connections),
            # No cookies: every request stands on its own.
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def send(self, action: Action) -> Result:
        if self._session is None:
            raise RuntimeError("WebhookTransport.start() was not called")
        try:
            message = self._render(action) if self._render is not None else None
        except TemplateError:
            return Rejected("template_error", retryable=False)
        body = webhook_body(action, message, self._status_callback)
        headers = {
            "Content-Type": "application/json",
            IDEMPOTENCY_HEADER: action.action_id,
            SIGNATURE_HEADER: sign(body, self._secret),
        }
        try:
            async with self._session.post(self.url, data=body, headers=headers) as response:
                status = response.status
                retry_after = parse_retry_after(
                    response.headers.get("Retry-After"), datetime.now(UTC)
                )
                # Read the body so the connection goes back to the pool.
                await response.read()
        except TimeoutError:
            return Rejected("timeout", retryable=True)
        except aiohttp.ClientError:
            # Refused, reset, DNS, TLS: the provider may not have seen it, or may have.
            # Either way the idempotency key makes a retry safe.
            return Rejected("connection_error", retryable=True)
        if 200 <= status < 300:
            return Accepted(status)
        return Rejected(
            f"http_{status}",
            retryable=is_retryable_status(status),
            status=status,
            retry_after=retry_after,
        )


__all__ = [
    "IDEMPOTENCY_HEADER",
    "SIGNATURE_HEADER",
    "TRANSPORTS",
    "Accepted",
    "ConsoleTransport",
    "Rejected",
    "Result",
    "Transport",
    "TransportName",
    "WebhookTransport",
    "feedback_routing",
    "format_action",
    "sign",
    "verify",
    "webhook_body",
]
