"""The runtime's pure parts, its settings and its command-line errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from omnicue.settings import Settings
from schemas.events import MessageFeedback
from senders.runtime import PartitionOffsets, build_transport, feedback_event
from senders.transports import ConsoleTransport, WebhookTransport
from tests.senders.harness import REPO_ROOT, make_action


def test_a_partition_commits_up_to_its_oldest_unfinished_record() -> None:
    offsets = PartitionOffsets()
    assert offsets.committable() is None
    for offset in (10, 11, 12, 13):
        offsets.read(offset)

    offsets.finish(11)
    offsets.finish(13)
    # 10 is still sending (or waiting for its retry time): nothing past it is committed.
    assert offsets.committable() == 10
    offsets.committed = 10
    assert offsets.committable() is None
    offsets.finish(10)
    assert offsets.committable() == 12
    offsets.finish(12)
    assert offsets.committable() == 14


def test_feedback_events_are_deterministic_and_valid() -> None:
    action = make_action()
    sent = feedback_event(action, action.created_at)
    failed = feedback_event(action, action.created_at, failed="http_400")

    assert isinstance(sent, MessageFeedback) and isinstance(failed, MessageFeedback)
    assert (sent.type, sent.event_id) == ("message.sent", f"fb-sent-{action.action_id}")
    assert (failed.type, failed.event_id) == ("message.failed", f"fb-failed-{action.action_id}")
    assert (failed.properties.action_id, failed.properties.reason) == (action.action_id, "http_400")
    assert sent.properties.reason is None


def test_sender_settings() -> None:
    settings = Settings(
        sender_transport="webhook", sender_url="http://p/{channel}", sender_rate="50/s",
        webhook_secret="hush-7f3a",
    )  # fmt: skip
    assert settings.sender_rate == 50.0
    assert "hush-7f3a" not in repr(settings)
    assert isinstance(build_transport(settings, "sms"), WebhookTransport)
    assert isinstance(build_transport(Settings(), "sms"), ConsoleTransport)
    with pytest.raises(ValidationError, match="longer than sender_timeout"):
        Settings(sender_timeout=30, sender_lease_ttl=10)
    with pytest.raises(ValueError, match="needs --url"):
        build_transport(Settings(sender_transport="webhook"), "sms")
    with pytest.raises(ValueError, match="OMNICUE_WEBHOOK_SECRET"):
        build_transport(Settings(sender_transport="webhook", sender_url="http://p"), "sms")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--transport", "webhook"], "the webhook transport needs --url"),
        (["--transport", "webhook", "--url", "http://127.0.0.1:9/{channel}"],
         "the webhook transport needs OMNICUE_WEBHOOK_SECRET"),
        (["--transport", "pigeon"], "sender_transport"),
        (["--rate", "fast"], "sender_rate"),
    ],
)  # fmt: skip
def test_cli_rejects_bad_sender_options_at_start(args: list[str], message: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNICUE_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    result = subprocess.run(
        [sys.executable, "-m", "omnicue.cli", "send", "--channel", "sms", *args],
        env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_empty_sender_variables_mean_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    # What docker-compose passes for `${OMNICUE_SENDER_RATE:-}` and friends.
    for name in ("OMNICUE_SENDER_RATE", "OMNICUE_SENDER_URL", "OMNICUE_WEBHOOK_SECRET"):
        monkeypatch.setenv(name, "")
    settings = Settings()
    assert settings.sender_rate is None
    assert isinstance(build_transport(settings, "push"), ConsoleTransport)
