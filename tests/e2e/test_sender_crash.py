"""A webhook sender SIGKILLed mid-delivery, on Tansu and Apache Kafka with a real Redis.

The recording provider (a local aiohttp server honouring Idempotency-Key, as Knock
and Novu do) kills the sender from inside a request:

- just after its 200 went out, before the sender recorded it: the restarted sender
  sends that action again with the same key, so the provider sees the key at most
  twice and delivers it once;
- before accepting it: the restarted sender still delivers it, once its dead
  predecessor's lease has lapsed.

Every action is delivered exactly once from the provider's side, and every key is
seen at most twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from omnicue.services import free_port
from omnicue.settings import Settings
from schemas.events import MessageFeedback
from tests.senders.harness import feedback, make_action, produce, webhook_sender
from tests.senders.provider import SECRET, Crash, RecordingProvider

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize(("crash", "channel"), [("after", "email"), ("before", "push")])
def test_a_sender_killed_mid_delivery_delivers_everything_once(
    make_settings: Callable[..., Settings], run_dir: Path, crash: Crash, channel: str
) -> None:
    settings = make_settings()
    bootstrap = settings.bootstrap_servers[0]
    actions = [make_action(channel) for _ in range(20)]
    target = actions[7]
    keys = {a.action_id for a in actions}

    with RecordingProvider() as provider:
        sender = webhook_sender(
            settings, channel, provider.url, SECRET, run_dir / f"sender-{crash}.log",
            free_port(),
        )  # fmt: skip
        provider.crash[target.action_id] = (crash, sender.kill)
        try:
            sender.start()
            sender.wait_for_line(rf"^sender {channel} ready$", timeout=60)
            produce(bootstrap, actions)
            sender.wait(timeout=60)  # the provider kills it at the target's request
            killed_at = time.monotonic()
            seen_before_restart = provider.count(target.action_id)

            sender.start()
            sender.wait_for_line(rf"^sender {channel} ready$", timeout=60)
            provider.wait_delivered(keys, timeout=90)
            assert sender.stop() == 0, sender.log_tail()
        finally:
            sender.stop()

    assert seen_before_restart == 1
    counts = {key: provider.count(key) for key in keys}
    assert max(counts.values()) <= 2, counts
    # The killed request was retried, by the restarted sender, after the dead one's
    # lease lapsed (3 s), with the same key.
    assert counts[target.action_id] == 2, counts
    retried = [r.at for r in provider.requests if r.key == target.action_id][1]
    assert retried - killed_at >= 2.0
    assert set(provider.delivered) == keys
    assert all(r.signed for r in provider.requests)

    # Every action reported sent, none failed (`message.sent` may repeat, same event id).
    events = feedback(bootstrap, settings.partitions, want=len(keys))
    sent = {
        e.properties.action_id
        for e in events
        if isinstance(e, MessageFeedback) and e.type == "message.sent"
    }
    assert keys <= sent
    assert not [e for e in events if e.type == "message.failed"]


def test_a_retry_waiting_when_its_sender_dies_is_not_lost(
    make_settings: Callable[..., Settings], run_dir: Path
) -> None:
    settings = make_settings()
    bootstrap = settings.bootstrap_servers[0]
    target, *others = [make_action("sms") for _ in range(5)]
    keys = {target.action_id, *(a.action_id for a in others)}

    with RecordingProvider() as provider:
        # 503 with a long Retry-After: the action sits on the retry topic, its retry not
        # due for 5 s, when the sender is killed.
        provider.replies[target.action_id] = [(503, {"Retry-After": "5"})]
        sender = webhook_sender(
            settings, "sms", provider.url, SECRET, run_dir / "sender-retrying.log", free_port()
        )
        try:
            sender.start()
            sender.wait_for_line(r"^sender sms ready$", timeout=60)
            produce(bootstrap, [target, *others])
            sender.wait_for_line(rf"action {target.action_id}: http_503, attempt 2", timeout=30)
            provider.wait_delivered({a.action_id for a in others})
            sender.kill()
            sender.wait(timeout=10)
            assert target.action_id not in provider.delivered

            sender.start()
            sender.wait_for_line(r"^sender sms ready$", timeout=60)
            provider.wait_delivered(keys, timeout=90)
            assert sender.stop() == 0, sender.log_tail()
        finally:
            sender.stop()

    assert provider.count(target.action_id) == 2
    assert max(provider.count(key) for key in keys) <= 2
    first, second = (r.at for r in provider.requests if r.key == target.action_id)
    assert second - first >= 5.0
