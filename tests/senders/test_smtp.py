"""The smtp transport against a real SMTP server (aiosmtpd) on localhost."""

from __future__ import annotations

import email
import email.policy
import json
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from omnicue.services import free_port
from omnicue.settings import Settings
from schemas.actions import Action, Recipient
from senders.advertising import Advertiser
from senders.render import Renderer, RenderOptions
from senders.runtime import build_transport
from senders.smtp import SmtpTransport, build_email, email_bytes, parse_smtp_url
from senders.transports import Accepted, Rejected

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
SENDER = "Shop <news@shop.example>"
RENDERER = Renderer(
    options=RenderOptions(
        advertiser=Advertiser("Shop", opt_out_phone="080-123-4567"),
        unsubscribe_url="https://shop.example/unsubscribe/{action_id}",
    )
)


def _action(to: str = "kim@example.com", action_id: str = "act_1", **over: Any) -> Action:
    values: dict[str, Any] = {
        "action_id": action_id, "rule_id": "cart_abandonment", "rule_version": "1",
        "step": 2, "customer_id": "c1", "journey_key": "cart-9", "channel": "email",
        "category": "marketing", "template": "cart_reminder_2",
        "recipient": Recipient(email=to),
        "payload": {"cart_id": "cart-9", "items": [], "value": 12000.0, "coupon": "CART10"},
        "created_at": NOW, "due_at": NOW, "expires_at": NOW + timedelta(hours=1),
        "trigger_event_id": "e1", "trigger_occurred_at": NOW,
    }  # fmt: skip
    values.update(over)
    return Action(**values)


@dataclass
class Mailbox:
    """An aiosmtpd handler: keeps what it accepts; some addresses get a set reply."""

    received: list[tuple[Envelope, EmailMessage]] = field(default_factory=list)
    replies: dict[str, str] = field(default_factory=dict)

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        if address in self.replies:
            return self.replies[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        parsed = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        self.received.append((envelope, parsed))
        return "250 Message accepted for delivery"


@pytest.fixture
def mailbox() -> Iterator[tuple[Mailbox, int]]:
    handler = Mailbox()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield handler, port
    finally:
        controller.stop()


async def test_an_email_is_multipart_text_and_html_with_the_rfc_8058_headers(
    mailbox: tuple[Mailbox, int],
) -> None:
    box, port = mailbox
    transport = SmtpTransport(f"smtp://127.0.0.1:{port}", RENDERER, sender=SENDER)
    assert await transport.send(_action()) == Accepted()
    [(envelope, message)] = box.received
    assert envelope.mail_from == "news@shop.example"
    assert envelope.rcpt_tos == ["kim@example.com"]
    assert message["Message-ID"] == "<act_1@shop.example>"
    assert message["X-Omnicue-Action-Id"] == "act_1"
    # SendGrid's SMTP API unique args: its Event Webhook echoes them (omnicue/feedback.py).
    assert json.loads(message["X-SMTPAPI"]) == {
        "unique_args": {"omnicue_action_id": "act_1", "omnicue_customer_id": "c1"}
    }
    assert message["From"] == "Shop <news@shop.example>"
    assert message["To"] == "kim@example.com"
    assert message["Subject"] == "(광고) 장바구니 상품, 쿠폰으로 더 가볍게"
    assert message["List-Unsubscribe"] == "<https://shop.example/unsubscribe/act_1>"
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert message["Date"] is not None
    assert message.get_content_type() == "multipart/alternative"
    text = message.get_body(preferencelist=("plain",))
    html = message.get_body(preferencelist=("html",))
    assert text is not None and html is not None
    assert isinstance(text, EmailMessage) and isinstance(html, EmailMessage)
    assert "CART10" in text.get_content() and "수신거부" in text.get_content()
    assert 'href="https://shop.example/unsubscribe/act_1"' in html.get_content()


async def test_a_resent_action_keeps_its_message_id(mailbox: tuple[Mailbox, int]) -> None:
    box, port = mailbox
    transport = SmtpTransport(f"smtp://127.0.0.1:{port}", RENDERER, sender=SENDER)
    for _ in range(2):
        assert isinstance(await transport.send(_action(action_id="act_again")), Accepted)
    assert [m["Message-ID"] for _, m in box.received] == ["<act_again@shop.example>"] * 2


async def test_4xx_replies_are_retryable_and_5xx_permanent(mailbox: tuple[Mailbox, int]) -> None:
    box, port = mailbox
    box.replies["later@example.com"] = "451 4.7.1 Greylisted, try again later"
    box.replies["nobody@example.com"] = "550 5.1.1 No such user"
    transport = SmtpTransport(f"smtp://127.0.0.1:{port}", RENDERER, sender=SENDER)
    assert await transport.send(_action("later@example.com")) == Rejected(
        "smtp_451", retryable=True
    )
    assert await transport.send(_action("nobody@example.com")) == Rejected(
        "smtp_550", retryable=False
    )
    assert box.received == []


async def test_no_server_is_a_retryable_connection_error() -> None:
    transport = SmtpTransport(f"smtp://127.0.0.1:{free_port()}", RENDERER, sender=SENDER, timeout=2)
    result = await transport.send(_action())
    assert isinstance(result, Rejected) and result.retryable
    assert result.reason == "connection_error"


async def test_no_address_and_no_template_fail_for_good(mailbox: tuple[Mailbox, int]) -> None:
    _, port = mailbox
    transport = SmtpTransport(f"smtp://127.0.0.1:{port}", RENDERER, sender=SENDER)
    no_address = _action().model_copy(update={"recipient": Recipient()})
    assert await transport.send(no_address) == Rejected("no_email_address", retryable=False)
    gone = _action(template="not_a_template")
    assert await transport.send(gone) == Rejected("template_error", retryable=False)


def _self_signed(directory: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_starttls_and_auth(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    logins: list[bytes] = []

    def authenticate(
        server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        ok = isinstance(data, LoginPassword) and data.password == b"hunter2"
        if ok:
            logins.append(data.login)
        # handled=False: aiosmtpd replies (235, or 535 on a wrong password) itself.
        return AuthResult(success=ok, handled=False)

    box = Mailbox()
    port = free_port()
    controller = Controller(
        box, hostname="127.0.0.1", port=port, tls_context=context, require_starttls=True,
        authenticator=authenticate, auth_required=True,
    )  # fmt: skip
    controller.start()
    try:
        url = f"smtp://127.0.0.1:{port}"
        secure = SmtpTransport(
            url, RENDERER, sender=SENDER, starttls=True, username="shop",
            password="hunter2", ca_file=cert,
        )  # fmt: skip
        assert await secure.send(_action()) == Accepted()
        assert logins == [b"shop"] and len(box.received) == 1
        wrong = SmtpTransport(
            url, RENDERER, sender=SENDER, starttls=True, username="shop",
            password="wrong", ca_file=cert,
        )  # fmt: skip
        assert await wrong.send(_action()) == Rejected("smtp_535", retryable=False)
        # The server insists on STARTTLS: without it, MAIL is refused (530) for good.
        plain = SmtpTransport(url, RENDERER, sender=SENDER)
        assert await plain.send(_action()) == Rejected("smtp_530", retryable=False)
        # An unknown CA is not trusted.
        untrusted = SmtpTransport(url, RENDERER, sender=SENDER, starttls=True)
        result = await untrusted.send(_action())
        assert isinstance(result, Rejected) and result.reason == "connection_error"
        assert len(box.received) == 1
    finally:
        controller.stop()


def test_urls_and_settings_that_cannot_work_fail_at_construction() -> None:
    assert parse_smtp_url("smtp://mail.example").port == 25
    assert parse_smtp_url("smtps://mail.example").port == 465
    assert parse_smtp_url("smtp://127.0.0.1:2525").port == 2525
    for bad in ("http://x", "smtp://", "smtp://u:p@host:25", "smtp://host:port"):
        with pytest.raises(ValueError):
            parse_smtp_url(bad)
    with pytest.raises(ValueError, match="STARTTLS"):
        SmtpTransport("smtps://h", RENDERER, sender=SENDER, starttls=True)
    with pytest.raises(ValueError, match="both"):
        SmtpTransport("smtp://h", RENDERER, sender=SENDER, username="u")
    with pytest.raises(ValueError, match="not an email address"):
        SmtpTransport("smtp://h", RENDERER, sender="Shop")


def _parsed(action: Action) -> EmailMessage:
    raw = email_bytes(build_email(action, RENDERER.render(action), sender=SENDER, now=NOW))
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def test_a_transactional_email_has_no_label_but_the_same_headers() -> None:
    message = _parsed(_action(template="order_confirmation", category="transactional"))
    assert message["Subject"] == "주문이 접수되었습니다 (cart-9)"
    assert message["Date"] == "Sun, 01 Mar 2026 12:00:00 +0000"
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


def test_a_long_korean_subject_keeps_its_spaces_and_headers_stay_within_limits(
    tmp_path: Path,
) -> None:
    # Python's newer email policy drops the space where it folds such a subject.
    subject = "장바구니 상품, 쿠폰으로 더 가볍게 " * 6
    (tmp_path / "ko").mkdir()
    (tmp_path / "ko" / "welcome.txt").write_text(
        f"{{% block subject %}}{subject}{{% endblock %}}{{% block text %}}t{{% endblock %}}",
        "utf-8",
    )
    renderer = Renderer(tmp_path, RENDERER.options)
    action = _action(template="welcome", action_id="act_" + "9" * 32)
    raw = email_bytes(build_email(action, renderer.render(action), sender=SENDER, now=NOW))
    head = raw.split(b"\r\n\r\n", 1)[0].decode("ascii")
    assert all(len(line) <= 998 for line in head.split("\r\n"))
    words = [w for w in head.split() if w.startswith("=?")]
    assert len(words) > 1 and all(len(w) <= 76 for w in words)  # RFC 2047's limit
    assert f"List-Unsubscribe: <https://shop.example/unsubscribe/{action.action_id}>" in head
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert parsed["Subject"] == f"(광고) {subject.strip()}"


def test_the_runtime_builds_the_smtp_transport_or_says_what_is_missing() -> None:
    url = "https://shop.example/u/{action_id}"
    smtp = Settings(
        sender_transport="smtp", sender_url="smtp://127.0.0.1:2525", sender_unsubscribe_url=url
    )
    assert isinstance(build_transport(smtp, "email"), SmtpTransport)
    with pytest.raises(ValueError, match="needs --url smtp://"):
        build_transport(Settings(sender_transport="smtp", sender_unsubscribe_url=url), "email")
    with pytest.raises(ValueError, match="OMNICUE_SENDER_UNSUBSCRIBE_URL"):
        build_transport(Settings(sender_transport="smtp", sender_url="smtp://h"), "email")
