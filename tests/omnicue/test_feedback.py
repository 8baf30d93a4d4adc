"""Delivery feedback at the ingest: the generic form, the SendGrid Event Webhook and
Twilio's status callback, as real signed HTTP requests against the ingest's aiohttp app
(the publisher in memory), and the pure mapping beside them."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from omnicue.feedback import (
    feedback_event_id,
    load_sendgrid_key,
    sendgrid_event,
    status_callback_url,
    twilio_event,
    twilio_signature,
    verify_sendgrid,
)
from omnicue.ingest import ProviderFeedback, build_app
from omnicue.settings import Settings
from schemas.actions import Recipient
from schemas.events import MessageFeedback, event_from_dict
from tests.omnicue.test_ingest import KEYS, MemoryPublisher, auth

TOKEN = "twilio-auth-token"
PRIVATE = ec.generate_private_key(ec.SECP256R1())
PUBLIC_B64 = base64.b64encode(PRIVATE.public_key().public_bytes(
    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
)).decode()  # fmt: skip
ESP_KEYS: dict[str, Any] = {**KEYS, "wk-esp": "email"}


@pytest.fixture
def publisher() -> MemoryPublisher:
    return MemoryPublisher()


@pytest.fixture
async def client(publisher: MemoryPublisher) -> AsyncIterator[TestClient[Any, Any]]:
    providers = ProviderFeedback(sendgrid_key=load_sendgrid_key(PUBLIC_B64),
                                 twilio_auth_token=TOKEN)  # fmt: skip
    async with TestClient(TestServer(build_app(ESP_KEYS, publisher, providers))) as test_client:
        yield test_client


def generic(status: str = "opened", action_id: str = "act_1", **fields: Any) -> dict[str, Any]:
    return {"action_id": action_id, "customer_id": "c-1", "status": status,
            "occurred_at": "2026-12-04T01:00:00Z", **fields}


# ----------------------------------------------------------------- the generic form


async def test_generic_feedback_one_or_an_array_published_as_contract_events(
    client: TestClient[Any, Any], publisher: MemoryPublisher
) -> None:
    response = await client.post("/v1/feedback", json=generic(), headers=auth("wk-esp"))
    assert response.status == 200
    assert await response.json() == {"success": True, "accepted": 1, "rejected": 0}
    items = [generic("delivered"), generic("bounced", reason="550 5.1.1 no such user"),
             generic("complained", channel="email")]
    response = await client.post("/v1/feedback", json=items, headers=auth("wk-esp"))
    assert response.status == 200
    keys = [key for key, _ in publisher.records]
    assert keys == [b"c-1"] * 4
    events = [event_from_dict(e) for e in publisher.events()]
    assert all(isinstance(e, MessageFeedback) for e in events)
    assert [e.type for e in events] == ["message.opened", "message.delivered",
                                        "message.bounced", "message.complained"]
    assert [e.event_id for e in events] == [
        "fb-opened-act_1", "fb-delivered-act_1", "fb-bounced-act_1", "fb-complained-act_1"
    ]
    assert {e.channel for e in events} == {"email"}  # the write key's
    assert events[2].properties.reason == "550 5.1.1 no such user"


async def test_a_retried_callback_is_the_same_event(
    client: TestClient[Any, Any], publisher: MemoryPublisher
) -> None:
    for _ in range(2):
        response = await client.post("/v1/feedback", json=generic("clicked"),
                                     headers=auth("wk-esp"))
        assert response.status == 200
    first, second = publisher.records
    assert first == second
    assert feedback_event_id("act_1", "clicked") == "fb-clicked-act_1"


async def test_generic_feedback_needs_a_write_key(
    client: TestClient[Any, Any], publisher: MemoryPublisher
) -> None:
    response = await client.post("/v1/feedback", json=generic())
    assert response.status == 401
    response = await client.post("/v1/feedback", json=generic(), headers=auth("wk-nope"))
    assert response.status == 401
    assert publisher.records == []


async def test_malformed_feedback_is_listed_and_the_rest_published(
    client: TestClient[Any, Any], publisher: MemoryPublisher
) -> None:
    items = [
        generic(),
        generic("read"),
        generic("sent"),  # the senders' own to say
        {k: v for k, v in generic().items() if k != "customer_id"},
        generic(occurred_at="yesterday"),
        generic(extra=1),
    ]
    response = await client.post("/v1/feedback", json=items, headers=auth("wk-esp"))
    assert response.status == 400
    body = await response.json()
    assert (body["accepted"], body["rejected"]) == (1, 5)
    messages = [e["message"] for e in body["errors"]]
    assert "status: 'read' is not one of" in messages[0]
    assert "status: 'sent'" in messages[1]
    assert messages[2] == "customer_id: Field required"
    assert "occurred_at" in messages[3]
    assert messages[4] == "extra: Extra inputs are not permitted"
    assert len(publisher.records) == 1


async def test_a_broker_failure_is_503(
    client: TestClient[Any, Any], publisher: MemoryPublisher
) -> None:
    publisher.fail = RuntimeError("broker down")
    response = await client.post("/v1/feedback", json=generic(), headers=auth("wk-esp"))
    assert response.status == 503


# ------------------------------------------------------------------------- SendGrid


def sendgrid_post(events: list[dict[str, Any]], key: ec.EllipticCurvePrivateKey = PRIVATE,
                  timestamp: str = "1764810000") -> tuple[bytes, dict[str, str]]:
    body = orjson.dumps(events) + b"\r\n"
    signature = key.sign(timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    return body, {
        "Content-Type": "application/json",
        "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(signature).decode(),
        "X-Twilio-Email-Event-Webhook-Timestamp": timestamp,
    }


def sg(event: str, action_id: str = "act_1", **fields: Any) -> dict[str, Any]:
    return {"email": "kim@example.com", "timestamp": 1764810000, "event": event,
            "sg_event_id": f"sg-{event}", "sg_message_id": "sg-m1",
            "omnicue_action_id": action_id, "omnicue_customer_id": "c-1", **fields}


def test_sendgrids_own_test_vector_verifies() -> None:
    # From SendGrid's libraries' tests of the Signed Event Webhook.
    key = load_sendgrid_key(
        "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEEDr2LjtURuePQzplybdC+u4CwrqDqBaWjcMMsTbhdbcwHBcep"
        "xo7yAQGhHPTnlvFYPAZFceEu/1FwCM/QmGUhA=="
    )
    payload = b'{"category":"example_payload","event":"test_event","message_id":"message_id"}'
    signature = ("MEUCIQCtIHJeH93Y+qpYeWrySphQgpNGNr/U+UyUlBkU6n7RAwIgJTz2C+8a8xonZGi6BpSzoQsbVRa"
                 "mr2nlxFDWYNH2j/0=")
    assert verify_sendgrid(key, payload, signature, "1588788367")
    assert not verify_sendgrid(key, payload + b" ", signature, "1588788367")
    assert not verify_sendgrid(key, payload, signature, "1588788368")


async def test_sendgrid_events_signed_are_mapped_and_published(
    client: TestClient[Any, Any], publisher: MemoryPublisher
) -> None:
    events = [
        sg("processed"),
        sg("delivered", response="250 OK"),
        sg("open"),
        sg("click", url="https://shop.example/cart"),
        sg("bounce", "act_2", type="bounce", reason="550 5.1.1 unknown user"),
        sg("bounce", "act_3", type="blocked", reason="spam content"),
        sg("dropped", "act_4", reason="Bounced Address"),
        sg("deferred", "act_5", response="400 try again later"),
        sg("spamreport", "act_6"),
        sg("unsubscribe", "act_7"),
        sg("group_unsubscribe", "act_8", asm_group_id=1),
        {"email": "x@example.com", "timestamp": 1764810000, "event": "open"},  # not ours
    ]
    body, headers = sendgrid_post(events)
    response = await client.post("/v1/feedback/sendgrid", data=body, headers=headers)
    assert response.status == 200
    assert await response.json() == {"success": True, "accepted": 9, "skipped": 3, "rejected": 0}
    published = [event_from_dict(e) for e in publisher.events()]
    assert [(e.type, e.properties.action_id) for e in published] == [  # type: ignore[union-attr]
        ("message.delivered", "act_1"), ("message.opened", "act_1"), ("message.clicked", "act_1"),
        ("message.bounced", "act_2"), ("message.failed", "act_3"), ("message.failed", "act_4"),
        ("message.complained", "act_6"), ("message.unsubscribed", "act_7"),
        ("message.unsubscribed", "act_8"),
    ]
    assert {e.channel for e in published} == {"email"}
    assert {e.customer_id for e in published} == {"c-1"}
    assert published[0].occurred_at == datetime.fromtimestamp(1764810000, UTC)
    assert published[4].properties.reason == "blocked: spam content"  # type: ignore[union-attr]
    assert published[0].event_id == "fb-delivered-act_1"


async def test_sendgrid_with_a_bad_or_missing_signature_is_403_and_publishes_nothing(
    client: TestClient[Any, Any], publisher: MemoryPublisher
) -> None:
    body, headers = sendgrid_post([sg("open")], key=ec.generate_private_key(ec.SECP256R1()))
    response = await client.post("/v1/feedback/sendgrid", data=body, headers=headers)
    assert response.status == 403
    body, headers = sendgrid_post([sg("open")])
    tampered = body.replace(b"open", b"click")
    response = await client.post("/v1/feedback/sendgrid", data=tampered, headers=headers)
    assert response.status == 403
    response = await client.post("/v1/feedback/sendgrid", data=body)
    assert response.status == 403
    assert publisher.records == []


async def test_provider_endpoints_that_are_not_configured_are_404(
    publisher: MemoryPublisher,
) -> None:
    async with TestClient(TestServer(build_app(ESP_KEYS, publisher))) as client:
        body, headers = sendgrid_post([sg("open")])
        assert (await client.post("/v1/feedback/sendgrid", data=body, headers=headers)).status \
            == 404  # fmt: skip
        assert (await client.post("/v1/feedback/twilio", data={"MessageStatus": "sent"})).status \
            == 404  # fmt: skip
    assert publisher.records == []


def test_a_sendgrid_event_without_the_customer_is_rejected() -> None:
    item = sg("open")
    del item["omnicue_customer_id"]
    with pytest.raises(ValueError, match="omnicue_customer_id"):
        sendgrid_event(item)
    nested = {k: v for k, v in sg("open").items() if not k.startswith("omnicue_")}
    nested["unique_args"] = {"omnicue_action_id": "act_9", "omnicue_customer_id": "c-9"}
    mapped = sendgrid_event(nested).event
    assert mapped is not None and mapped["customer_id"] == "c-9"


# --------------------------------------------------------------------------- Twilio


def test_twilios_documented_example_signature() -> None:
    params = {"CallSid": "CA1234567890ABCDE", "Caller": "+12349013030", "Digits": "1234",
              "From": "+12349013030", "To": "+18005551212"}
    url = "https://mycompany.com/myapp.php?foo=1&bar=2"
    assert twilio_signature("12345", url, params.items()) == "0/KCTR6DLpKmkAf8muzZqo1nDgQ="


def twilio_form(status: str, error: str | None = None) -> dict[str, str]:
    form = {"AccountSid": "AC123", "MessageSid": "SM123", "SmsSid": "SM123",
            "MessageStatus": status, "SmsStatus": status, "From": "+15005550006",
            "To": "+821012345678", "ApiVersion": "2010-04-01"}
    if error is not None:
        form["ErrorCode"] = error
    return form


async def post_twilio(client: TestClient[Any, Any], form: dict[str, str],
                      token: str = TOKEN) -> Any:
    # Encoded as Twilio keeps it: the signature covers these exact bytes.
    path = "/v1/feedback/twilio?" + urlencode({"action_id": "act_1", "customer_id": "c 1/x"})
    url = str(client.make_url(path))
    signature = twilio_signature(token, url, form.items())
    return await client.post(path, data=form, headers={"X-Twilio-Signature": signature})


@pytest.mark.parametrize(
    ("status", "error", "expected", "reason"),
    [
        ("delivered", None, "message.delivered", None),
        ("sent", None, "message.sent", None),
        ("undelivered", "30005", "message.bounced", "twilio_undelivered_30005"),
        ("undelivered", "30007", "message.failed", "twilio_undelivered_30007"),
        ("failed", "30008", "message.failed", "twilio_failed_30008"),
    ],
)
async def test_twilio_status_callbacks_signed_are_mapped_and_published(
    client: TestClient[Any, Any], publisher: MemoryPublisher, status: str, error: str | None,
    expected: str, reason: str | None,
) -> None:
    response = await post_twilio(client, twilio_form(status, error))
    assert response.status == 200
    [published] = [event_from_dict(e) for e in publisher.events()]
    assert isinstance(published, MessageFeedback)
    assert (published.type, published.channel, published.customer_id) == (expected, "sms",
                                                                           "c 1/x")
    assert published.properties.action_id == "act_1"
    assert published.properties.reason == reason
    assert published.event_id == f"fb-{expected.removeprefix('message.')}-act_1"


async def test_twilio_pending_statuses_are_skipped(
    client: TestClient[Any, Any], publisher: MemoryPublisher
) -> None:
    response = await post_twilio(client, twilio_form("queued"))
    assert response.status == 200
    assert (await response.json())["skipped"] == 1
    assert publisher.records == []


async def test_twilio_with_a_bad_signature_is_403_and_publishes_nothing(
    client: TestClient[Any, Any], publisher: MemoryPublisher
) -> None:
    response = await post_twilio(client, twilio_form("delivered"), token="not-the-token")
    assert response.status == 403
    path = "/v1/feedback/twilio?action_id=act_1&customer_id=c1"
    response = await client.post(path, data=twilio_form("delivered"))
    assert response.status == 403
    assert publisher.records == []


async def test_twilio_signature_checks_the_public_url_behind_a_proxy(
    publisher: MemoryPublisher,
) -> None:
    providers = ProviderFeedback(twilio_auth_token=TOKEN,
                                 public_url="https://hooks.shop.example/ingest/")
    async with TestClient(TestServer(build_app(ESP_KEYS, publisher, providers))) as client:
        path = "/v1/feedback/twilio?action_id=act_1&customer_id=c1"
        form = twilio_form("delivered")
        public = "https://hooks.shop.example/ingest" + path
        headers = {"X-Twilio-Signature": twilio_signature(TOKEN, public, form.items())}
        response = await client.post(path, data=form, headers=headers)
        assert response.status == 200
        local = str(client.make_url(path))
        headers = {"X-Twilio-Signature": twilio_signature(TOKEN, local, form.items())}
        assert (await client.post(path, data=form, headers=headers)).status == 403
    assert len(publisher.records) == 1


def test_the_status_callback_url_carries_both_ids() -> None:
    url = status_callback_url("https://in.example/v1/feedback/twilio?src=x", "act_1", "c/1")
    assert url == "https://in.example/v1/feedback/twilio?src=x&action_id=act_1&customer_id=c%2F1"
    mapped = twilio_event({"MessageStatus": "delivered"},
                          {"action_id": "act_1", "customer_id": "c/1"}, datetime.now(UTC))
    assert mapped.event is not None and mapped.event["customer_id"] == "c/1"
    with pytest.raises(ValueError, match="status callback URL"):
        twilio_event({"MessageStatus": "delivered"}, {}, datetime.now(UTC))


def test_settings_check_the_sendgrid_key_at_start() -> None:
    settings = Settings(feedback_sendgrid_public_key=PUBLIC_B64,
                        feedback_twilio_auth_token=TOKEN)  # type: ignore[arg-type]
    providers = ProviderFeedback.from_settings(settings)
    assert providers.sendgrid_key is not None and providers.twilio_auth_token == TOKEN
    with pytest.raises(ValueError, match="SendGrid verification key"):
        Settings(feedback_sendgrid_public_key="not-a-key")


# ------------------------------------------------- the ids round-trip through providers


def test_the_ids_the_smtp_transport_sets_come_back_in_a_sendgrid_event() -> None:
    from email import message_from_bytes

    from senders.render import Renderer, RenderOptions
    from senders.smtp import build_email, email_bytes
    from tests.senders.harness import make_action

    action = make_action("email", recipient=Recipient(email="kim@example.com"),
                         category="transactional")
    renderer = Renderer(options=RenderOptions(unsubscribe_url="https://u/{action_id}"))
    raw = email_bytes(build_email(action, renderer.render(action), sender="S <s@shop.example>",
                                  now=datetime.now(UTC)))
    # SendGrid's SMTP relay reads the header and puts its unique args on every event.
    args = orjson.loads(message_from_bytes(raw)["X-SMTPAPI"])["unique_args"]
    mapped = sendgrid_event({"event": "open", "timestamp": 1764810000, **args}).event
    assert mapped is not None
    assert (mapped["customer_id"], mapped["properties"]["action_id"]) == (
        action.customer_id, action.action_id
    )


def test_the_status_callback_in_the_webhook_body_comes_back_from_twilio() -> None:
    from urllib.parse import parse_qsl, urlsplit

    from senders.transports import webhook_body
    from tests.senders.harness import make_action

    action = make_action("sms")
    body = orjson.loads(webhook_body(action, None, "https://in.example/v1/feedback/twilio"))
    # The provider adapter sends the SMS with this StatusCallback; Twilio calls it.
    callback = urlsplit(body["feedback"]["status_callback"])
    mapped = twilio_event({"MessageStatus": "delivered"}, dict(parse_qsl(callback.query)),
                          datetime.now(UTC)).event
    assert mapped is not None
    assert (mapped["customer_id"], mapped["properties"]["action_id"]) == (
        action.customer_id, action.action_id
    )


def test_the_engagement_half_life_is_a_setting_of_the_engine_policy() -> None:
    from datetime import timedelta

    assert Settings().engine_policy().engagement_half_life == timedelta(days=30)
    policy = Settings(engagement_half_life_days=7, consent_policy="opt_out").engine_policy()
    assert (policy.engagement_half_life, policy.consent_policy) == (timedelta(days=7), "opt_out")
