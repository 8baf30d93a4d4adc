"""The dev mail catcher: a real SMTP server writing what it gets as .eml files."""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime, timedelta
from pathlib import Path

from schemas.actions import Recipient
from senders.mail_catcher import MailCatcher
from senders.render import Renderer, RenderOptions
from senders.smtp import SmtpTransport
from senders.transports import Accepted
from tests.senders.harness import make_action


async def test_emails_sent_to_the_catcher_land_as_eml_files(tmp_path: Path) -> None:
    renderer = Renderer(options=RenderOptions(unsubscribe_url="https://u.example/{action_id}"))
    with MailCatcher(tmp_path / "mail") as catcher:
        transport = SmtpTransport(catcher.url, renderer, sender="Shop <news@shop.example>")
        actions = [
            make_action("email", recipient=Recipient(email=f"c{i}@example.com"),
                        expires_in=timedelta(hours=1))
            for i in range(3)
        ]  # fmt: skip
        for action in actions:
            assert await transport.send(action) == Accepted()
        files = catcher.files()
        assert catcher.caught == 3
    assert len(files) == 3
    assert not list((tmp_path / "mail").glob("*.partial"))
    for path, action in zip(files, actions, strict=True):
        assert path.name.startswith(f"email-{datetime.now(UTC):%Y%m%d}")
        assert path.name.endswith(f"-{action.action_id}.eml")
        parsed = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        assert parsed["Message-ID"] == f"<{action.action_id}@shop.example>"
        assert parsed["Subject"] == "(광고) 장바구니에 담아 두신 상품이 기다리고 있어요"
