"""The webhook transport against a real local HTTP server acting as the provider."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import web

from omnicue.services import free_port
from schemas.actions import Action, Recipient
from senders.transports import (
    Accepted,
    ConsoleTransport,
    Rejected,
    WebhookTransport,
    sign,
    verify,
    webhook_body,
)

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
SECRET = "s3cret"


def _action(action_id: str = "act_abc") -> Action:
    values: dict[str, Any] = {
        "action_id": action_id, "rule_id": "r", "rule_version": "1", "step": 1,
        "customer_id": "c1", "journey_key": "j", "channel": "kakao", "category": "marketing",
        "template": "cart_reminder_1", "recipient": Recipient(phone="+82101234"),
        "created_at": NOW, "due_at": NOW, "expires_at": NOW, "trigger_event_id": "e1",
        "trigger_occurred_at": NOW,
    }  # fmt: skip
    return Action(**values)


class Provider:
    """Replies with the queued (status, headers, delay) per request; records each one."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.replies: list[tuple[int, dict[str, str], float]] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append((request.path, dict(request.headers), body))
        status, headers, delay = self.replies.pop(0) if self.replies else (200, {}, 0.0)
        await asyncio.sleep(delay)
        return web.Response(status=status, headers=headers, text="{}")


@pytest.fixture
async def provider() -> AsyncIterator[tuple[Provider, int]]:
    recorder = Provider()
    app = web.Application()
    app.router.add_post("/hooks/{channel}", recorder.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield recorder, port
    await runner.cleanup()


async def _send(port: int, action: Action, timeout: float = 2.0) -> Any:
    transport = WebhookTransport(
        f"http://127.0.0.1:{port}/hooks/{{channel}}", "kakao",
        secret=SECRET, timeout=timeout, connections=4,
    )  # fmt: skip
    await transport.start()
    try:
        return await transport.send(action)
    finally:
        await transport.close()


async def test_posts_the_action_signed_with_its_idempotency_key(
    provider: tuple[Provider, int],
) -> None:
    recorder, port = provider
    action = _action()

    assert await _send(port, action) == Accepted(200)

    [(path, headers, body)] = recorder.requests
    assert path == "/hooks/kakao"
    assert headers["Idempotency-Key"] == action.action_id
    assert headers["Content-Type"] == "application/json"
    assert body == webhook_body(action)
    sent = json.loads(body)
    # What the provider echoes back with its delivery feedback (omnicue/feedback.py).
    assert sent.pop("feedback") == {
        "custom_args": {"omnicue_action_id": action.action_id,
                        "omnicue_customer_id": action.customer_id},
        "status_callback": None,
    }
    assert Action.model_validate(sent) == action
    assert headers["X-Omnicue-Signature"] == sign(body, SECRET)
    assert verify(body, SECRET, headers["X-Omnicue-Signature"])
    assert not verify(body + b" ", SECRET, headers["X-Omnicue-Signature"])
    assert not verify(body, "other", headers["X-Omnicue-Signature"])


@pytest.mark.parametrize(
    ("status", "retryable"), [(400, False), (404, False), (501, False), (505, False),
                              (408, True), (500, True), (503, True)],
)  # fmt: skip
async def test_statuses_are_classified(
    provider: tuple[Provider, int], status: int, retryable: bool
) -> None:
    recorder, port = provider
    recorder.replies.append((status, {}, 0.0))

    assert await _send(port, _action()) == Rejected(
        f"http_{status}", retryable=retryable, status=status
    )


async def test_429_carries_retry_after(provider: tuple[Provider, int]) -> None:
    recorder, port = provider
    recorder.replies.append((429, {"Retry-After": "7"}, 0.0))

    result = await _send(port, _action())

    assert isinstance(result, Rejected)
    assert (result.status, result.retryable, result.retry_after) == (429, True, 7.0)
    assert result.rate_limited


async def test_a_slow_provider_is_a_retryable_timeout(provider: tuple[Provider, int]) -> None:
    recorder, port = provider
    recorder.replies.append((200, {}, 2.0))

    assert await _send(port, _action(), timeout=0.3) == Rejected("timeout", retryable=True)


async def test_a_refused_connection_is_retryable() -> None:
    assert await _send(free_port(), _action()) == Rejected("connection_error", retryable=True)


def test_the_webhook_needs_a_secret() -> None:
    with pytest.raises(ValueError, match="OMNICUE_WEBHOOK_SECRET"):
        WebhookTransport("http://x/{channel}", "sms", secret="", timeout=1, connections=1)


async def test_console_prints_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert await ConsoleTransport().send(_action()) == Accepted()
    assert "act_abc" in capsys.readouterr().out
