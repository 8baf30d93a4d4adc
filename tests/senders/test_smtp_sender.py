"""`omnicue send --transport smtp` as a real process: a real broker and Redis, and a
real SMTP server (aiosmtpd) as the provider."""

from __future__ import annotations

import email
import email.policy
import subprocess
import sys
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from omnicue.services import ManagedProcess, TansuBroker, free_port
from omnicue.settings import Settings
from omnicue.topics import create_topics
from schemas.actions import Recipient
from schemas.events import MessageFeedback
from tests.senders.harness import REPO_ROOT, feedback, make_action, produce, sender_env


class Inbox:
    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        if address.startswith("gone@"):
            return "550 5.1.1 No such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        parsed = email.message_from_bytes(
            envelope.original_content or b"", policy=email.policy.default
        )
        assert isinstance(parsed, EmailMessage)
        self.messages.append(parsed)
        return "250 OK"


def test_the_smtp_sender_delivers_rendered_email_and_reports_bounces_at_once(
    fresh_broker: TansuBroker, settings_factory: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = settings_factory(broker=fresh_broker.url)
    create_topics(settings)
    inbox = Inbox()
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    korean = make_action("email", recipient=Recipient(email="kim@example.com"),
                         payload={"value": 12000.0})  # fmt: skip
    american = make_action(
        "email", recipient=Recipient(email="amy@example.com"),
        locale="en-US", timezone="America/Chicago",
    )  # fmt: skip
    bounced = make_action("email", recipient=Recipient(email="gone@example.com"))
    env = sender_env(
        settings,
        OMNICUE_SENDER_METRICS_PORT=str(free_port()),
        OMNICUE_SENDER_UNSUBSCRIBE_URL="https://shop.example/u/{action_id}",
        OMNICUE_SENDER_EMAIL_FROM="Shop <news@shop.example>",
        OMNICUE_SENDER_BRAND="Shop",
    )
    sender = ManagedProcess(
        [sys.executable, "-m", "omnicue.cli", "send", "--channel", "email",
         "--transport", "smtp", "--url", f"smtp://127.0.0.1:{port}"],
        env=env, cwd=REPO_ROOT, log_path=tmp_path / "sender.log", name="sender-email",
    )  # fmt: skip
    try:
        with sender:
            sender.wait_for_line(r"^sender email ready$", timeout=30)
            produce(fresh_broker.bootstrap_server, [korean, american, bounced])
            events = feedback(fresh_broker.bootstrap_server, settings.partitions, want=3)
            assert sender.stop() == 0, sender.log_tail()
    finally:
        controller.stop()

    outcomes = {
        e.properties.action_id: (e.type, e.properties.reason)
        for e in events
        if isinstance(e, MessageFeedback)
    }
    assert outcomes == {
        korean.action_id: ("message.sent", None),
        american.action_id: ("message.sent", None),
        bounced.action_id: ("message.failed", "smtp_550"),
    }
    by_id = {m["Message-ID"]: m for m in inbox.messages}
    assert set(by_id) == {f"<{korean.action_id}@shop.example>",
                          f"<{american.action_id}@shop.example>"}  # fmt: skip
    ko = by_id[f"<{korean.action_id}@shop.example>"]
    assert ko["Subject"] == "(광고) 장바구니에 담아 두신 상품이 기다리고 있어요"
    assert ko["List-Unsubscribe"] == f"<https://shop.example/u/{korean.action_id}>"
    assert ko["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    en = by_id[f"<{american.action_id}@shop.example>"]
    assert en["Subject"] == "Your cart is waiting for you"
    body = en.get_body(preferencelist=("plain",))
    assert isinstance(body, EmailMessage) and "(광고)" not in body.get_content()


def test_a_missing_template_stops_the_sender_at_start(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    text = (REPO_ROOT / "omnicue" / "rulesets" / "demo.yaml").read_text(encoding="utf-8")
    rules.write_text(text.replace("template: cart_reminder_2", "template: vip_offer"), "utf-8")
    env = sender_env(Settings(), OMNICUE_RULES=str(rules),
                     OMNICUE_SENDER_UNSUBSCRIBE_URL="https://s.example/u")  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "omnicue.cli", "send", "--channel", "email", "--transport",
         "smtp", "--url", "smtp://127.0.0.1:9"],
        env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert "omnicue send: templates: ko/vip_offer.txt is missing" in result.stderr
    assert "en/vip_offer.txt is missing" in result.stderr
    assert "Traceback" not in result.stderr
    overrides = tmp_path / "none"
    result = subprocess.run(
        [sys.executable, "-m", "omnicue.cli", "send", "--channel", "sms", "--templates",
         str(overrides), "--transport", "webhook", "--url", "http://127.0.0.1:9"],
        env={**env, "OMNICUE_WEBHOOK_SECRET": "k"}, cwd=REPO_ROOT, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert f"templates directory {overrides} does not exist" in result.stderr
