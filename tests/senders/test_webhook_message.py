"""The webhook body carries the rendered message (senders/render.py)."""

from __future__ import annotations

import json

from omnicue.settings import Settings
from schemas.actions import Action
from senders.render import RenderedMessage, Renderer, RenderOptions
from senders.runtime import build_transport
from senders.transports import Rejected, WebhookTransport, webhook_body
from tests.senders.harness import make_action


def test_the_body_is_the_action_with_its_rendered_message() -> None:
    action = make_action("sms", payload={"value": 12000.0}, locale="ko-KR")
    message = Renderer(options=RenderOptions(unsubscribe_url="https://u/{action_id}")).render(
        action
    )
    body = json.loads(webhook_body(action, message))
    rendered = RenderedMessage.model_validate(body.pop("message"))
    body.pop("feedback")
    assert Action.model_validate(body) == action
    assert rendered == message
    assert rendered.text.startswith("(광고) [Omnicue] 장바구니에")
    assert rendered.advertising
    # Without a renderer the body is the action and its feedback routing.
    alone = json.loads(webhook_body(action))
    alone.pop("feedback")
    assert alone == json.loads(action.model_dump_json())


def test_the_body_tells_the_provider_how_to_route_feedback_back() -> None:
    action = make_action("sms")
    callback = "https://ingest.example/v1/feedback/twilio"
    body = json.loads(webhook_body(action, None, callback))
    assert body["feedback"] == {
        "custom_args": {"omnicue_action_id": action.action_id,
                        "omnicue_customer_id": action.customer_id},
        "status_callback": f"{callback}?action_id={action.action_id}"
                           f"&customer_id={action.customer_id}",
    }
    settings = Settings(
        sender_transport="webhook", sender_url="http://p/{channel}", webhook_secret="k",
        sender_status_callback_url=callback,
    )  # fmt: skip
    transport = build_transport(settings, "sms")
    assert isinstance(transport, WebhookTransport)
    assert transport._status_callback == callback


def test_the_runtime_gives_the_webhook_transport_the_renderer() -> None:
    settings = Settings(
        sender_transport="webhook", sender_url="http://p/{channel}", webhook_secret="k",
        sender_opt_out_phone="080-123-4567",
    )  # fmt: skip
    transport = build_transport(settings, "kakao")
    assert isinstance(transport, WebhookTransport)


async def test_a_template_gone_since_start_fails_the_action_for_good() -> None:
    renderer = Renderer()
    transport = WebhookTransport(
        "http://127.0.0.1:9/x", "sms", secret="k", timeout=1, connections=1,
        render=renderer.render,
    )  # fmt: skip
    await transport.start()
    try:
        result = await transport.send(make_action("sms", template="no_such_template"))
    finally:
        await transport.close()
    assert result == Rejected("template_error", retryable=False)
