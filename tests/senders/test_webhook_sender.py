"""`omnicue send --transport webhook` as a real process, against a real broker and Redis
and a recording provider (a local aiohttp server, tests/senders/provider.py): retries,
Retry-After, failures, expiry, a Redis outage and a rate shared by two processes."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import redis

from omnicue.services import RedisServer, TansuBroker, free_port
from omnicue.settings import Settings
from omnicue.topics import create_topics
from schemas.events import MessageFeedback
from senders.lease import lease_key
from tests.senders.harness import feedback, make_action, metric, produce, webhook_sender
from tests.senders.provider import SECRET, RecordingProvider


def test_retries_never_block_other_customers_and_failures_are_reported(
    fresh_broker: TansuBroker, settings_factory: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = settings_factory(broker=fresh_broker.url)
    create_topics(settings)
    flaky, throttled, bad = make_action(), make_action(), make_action()
    fine = [make_action() for _ in range(5)]
    port = free_port()

    with RecordingProvider() as provider:
        provider.replies[flaky.action_id] = [(503, {}), (503, {})]
        provider.replies[throttled.action_id] = [(429, {"Retry-After": "1"})]
        provider.replies[bad.action_id] = [(400, {})]
        sender = webhook_sender(
            settings, "sms", provider.url, SECRET, tmp_path / "sender.log", port
        )
        with sender:
            sender.wait_for_line(r"^sender sms ready$", timeout=30)
            # Made now, so its 3 s to live run from here: always 503 until it expires.
            doomed = make_action(expires_in=timedelta(seconds=3))
            provider.replies[doomed.action_id] = [(503, {})] * 50
            produce(fresh_broker.bootstrap_server, [flaky, throttled, bad, doomed, *fine])
            sent = {flaky.action_id, throttled.action_id, *(a.action_id for a in fine)}
            provider.wait_delivered(sent)
            events = feedback(fresh_broker.bootstrap_server, settings.partitions, want=9)

            assert metric(port, "omnicue_sender_actions_total", channel="sms", outcome="sent") == 7
            for outcome in ("expired", "failed"):
                assert metric(port, "omnicue_sender_actions_total", channel="sms",
                              outcome=outcome) == 1  # fmt: skip
            assert metric(port, "omnicue_sender_failed_total", channel="sms",
                          reason="http_400") == 1  # fmt: skip
            assert metric(port, "omnicue_sender_failed_total", channel="sms",
                          reason="expired") == 1  # fmt: skip
            assert metric(port, "omnicue_sender_rate_limited_total", channel="sms") == 1
            assert metric(port, "omnicue_sender_retries_total", channel="sms") >= 4
            assert metric(port, "omnicue_sender_send_latency_seconds_count", channel="sms") == 7
            assert metric(port, "omnicue_sender_in_flight", channel="sms") == 0
            assert sender.stop() == 0, sender.log_tail()

    # Each customer's action on its own: the healthy ones did not wait for the flaky one.
    assert max(provider.delivered[a.action_id] for a in fine) < provider.delivered[flaky.action_id]
    assert provider.count(flaky.action_id) == 3
    assert provider.count(bad.action_id) == 1
    assert provider.count(doomed.action_id) >= 2
    # Retry-After: 1 was honoured (our own backoff would have retried within 0.5 s).
    first, second = (r.at for r in provider.requests if r.key == throttled.action_id)
    assert second - first >= 1.0
    assert all(r.signed and r.path == "/hooks/sms" for r in provider.requests)
    assert set(provider.delivered) == sent

    by_action: dict[str, list[tuple[str, str | None]]] = {}
    for event in events:
        assert isinstance(event, MessageFeedback)
        by_action.setdefault(event.properties.action_id, []).append(
            (event.type, event.properties.reason)
        )
    assert by_action == {
        **{action_id: [("message.sent", None)] for action_id in sent},
        bad.action_id: [("message.failed", "http_400")],
        doomed.action_id: [("message.failed", "expired")],
    }


def test_without_redis_nothing_is_sent_and_sending_resumes_when_it_is_back(
    fresh_broker: TansuBroker, settings_factory: Callable[..., Settings], tmp_path: Path
) -> None:
    with RedisServer(free_port(), log_path=tmp_path / "redis.log") as own_redis:
        settings = settings_factory(broker=fresh_broker.url, redis_url=own_redis.url)
        create_topics(settings)
        with RecordingProvider() as provider, webhook_sender(
            settings, "sms", provider.url, SECRET, tmp_path / "sender.log", free_port()
        ) as sender:
            sender.wait_for_line(r"^sender sms ready$", timeout=30)
            before = make_action()
            produce(fresh_broker.bootstrap_server, [before])
            provider.wait_delivered({before.action_id})

            own_redis.stop()
            during = [make_action() for _ in range(3)]
            produce(fresh_broker.bootstrap_server, during)
            sender.wait_for_line("Redis unavailable, not sending", timeout=20)
            time.sleep(2)
            # No lease, no send: not one request for them while Redis is down.
            assert provider.keys() == [before.action_id]

            own_redis.start()
            provider.wait_delivered({a.action_id for a in during}, timeout=30)
            sender.wait_for_line("Redis is back, sending again")
            assert sender.running, sender.log_tail()
            assert sender.stop() == 0, sender.log_tail()
    assert sorted(provider.keys()) == sorted([before.action_id, *(a.action_id for a in during)])


def test_two_processes_of_a_channel_share_its_rate(
    fresh_broker: TansuBroker, settings_factory: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = settings_factory(broker=fresh_broker.url)
    create_topics(settings)
    actions = [make_action("kakao") for _ in range(24)]
    with RecordingProvider() as provider:
        senders = [
            webhook_sender(
                settings, "kakao", provider.url, SECRET, tmp_path / f"sender-{i}.log",
                free_port(), "--rate", "6/s",
            )  # fmt: skip
            for i in range(2)
        ]
        for sender in senders:
            sender.start()
        try:
            for sender in senders:
                sender.wait_for_line(r"^sender kakao ready$", timeout=30)
            # Both in the group before the actions arrive (the second join rebalances).
            time.sleep(4)
            produce(fresh_broker.bootstrap_server, actions)
            provider.wait_delivered({a.action_id for a in actions}, timeout=40)
        finally:
            for sender in senders:
                sender.stop()
    times = sorted(r.at for r in provider.requests)
    # 24 sends at 6/s, whichever process made them: never more than the rate (plus the
    # bucket's one token) in any second, and about 4 s in all.
    assert max(sum(1 for t in times if start <= t < start + 1) for start in times) <= 7
    assert times[-1] - times[0] >= (24 - 1) / 6 - 0.3
    handled = [s.log_text().count("sender kakao assigned") for s in senders]
    assert all(handled), handled


def test_an_action_another_sender_holds_waits_for_it(
    fresh_broker: TansuBroker,
    settings_factory: Callable[..., Settings],
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    settings = settings_factory(broker=fresh_broker.url)
    create_topics(settings)
    client = redis.Redis.from_url(redis_server.url)
    orphaned, finished = make_action(), make_action()
    with RecordingProvider() as provider, webhook_sender(
        settings, "sms", provider.url, SECRET, tmp_path / "sender.log", free_port()
    ) as sender:
        sender.wait_for_line(r"^sender sms ready$", timeout=30)
        # Two leases of "another sender": one that dies (its lease lapses in 4 s), one
        # that finishes and marks its action sent while ours waits.
        client.set(lease_key(orphaned.action_id), b"sending:other", px=4000)
        client.set(lease_key(finished.action_id), b"sending:other", px=4000)
        leased_at = time.monotonic()
        produce(fresh_broker.bootstrap_server, [orphaned, finished])
        time.sleep(1.0)
        assert provider.keys() == []
        client.set(lease_key(finished.action_id), b"sent", ex=60)
        provider.wait_delivered({orphaned.action_id}, timeout=20)
        assert provider.delivered[orphaned.action_id] - leased_at >= 3.5
        sender.wait_for_line(f"duplicate action {finished.action_id}")
        assert sender.stop() == 0, sender.log_tail()
    assert provider.keys() == [orphaned.action_id]
