"""The local webhook provider (`omnicue webhook-catcher`), fed by the real webhook transport."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from omnicue.services import free_port
from senders.transports import Accepted, Rejected, WebhookTransport
from senders.webhook_catcher import catcher_app
from tests.senders.test_transports import _action

SECRET = "catcher-secret"


@pytest.fixture
async def catcher(tmp_path: Path) -> AsyncIterator[tuple[int, Path]]:
    runner = web.AppRunner(catcher_app(tmp_path / "webhooks", SECRET))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield port, tmp_path / "webhooks"
    await runner.cleanup()


async def send(port: int, action_id: str, secret: str = SECRET) -> object:
    transport = WebhookTransport(
        f"http://127.0.0.1:{port}/{{channel}}", "kakao", secret=secret, timeout=5, connections=2
    )
    await transport.start()
    try:
        return await transport.send(_action(action_id))
    finally:
        await transport.close()


async def test_each_message_is_written_once_per_idempotency_key(
    catcher: tuple[int, Path],
) -> None:
    port, directory = catcher
    assert await send(port, "act_1") == Accepted(200)
    # A sender that lost its commit sends again with the same key: acknowledged, not
    # delivered twice.
    assert await send(port, "act_1") == Accepted(200)
    assert await send(port, "act_2") == Accepted(200)
    written = sorted(p.name for p in (directory / "kakao").iterdir())
    assert written == ["act_1.json", "act_2.json"]
    body = json.loads((directory / "kakao" / "act_1.json").read_text(encoding="utf-8"))
    assert body["action_id"] == "act_1" and "feedback" in body


async def test_a_body_signed_with_another_secret_is_refused_and_not_written(
    catcher: tuple[int, Path],
) -> None:
    port, directory = catcher
    result = await send(port, "act_3", secret="someone-else")
    assert isinstance(result, Rejected) and not result.retryable
    assert not (directory / "kakao").exists()
