"""`omnicue ingest` as a real process, fed by Segment's own Python library
(segment-analytics-python, pointed at it with `host=`), read back by consuming
`omnicue.events`: on Tansu and on Apache Kafka."""

from __future__ import annotations

import base64
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
from segment.analytics import Client
from segment.analytics.request import APIError

from omnicue.ingest import MESSAGE_LIMIT
from omnicue.services import ManagedProcess, free_port
from omnicue.settings import Settings
from schemas.topics import EVENTS
from tests.e2e.harness import TopicReader, settings_env

pytestmark = pytest.mark.e2e

KEYS = "wk-web=web,wk-app=app"


@pytest.fixture(scope="module")
def ingest_settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(ingest_port=free_port(), ingest_write_keys=KEYS)


@pytest.fixture(scope="module")
def ingest_url(ingest_settings: Settings, run_dir: Any) -> Iterator[str]:
    process = ManagedProcess(
        [sys.executable, "-m", "omnicue.cli", "ingest"],
        log_path=run_dir / "ingest.log",
        env=settings_env(ingest_settings),
        name="ingest",
    ).start()
    try:
        process.wait_for_line("ingest http://", timeout=60)
        yield f"http://127.0.0.1:{ingest_settings.ingest_port}"
    finally:
        process.stop()


@pytest.fixture(scope="module")
def reader(ingest_settings: Settings) -> Iterator[TopicReader]:
    topic_reader = TopicReader(ingest_settings.bootstrap_servers[0], [EVENTS])
    yield topic_reader
    topic_reader.close()


def events_of(reader: TopicReader, customer_key: str, count: int) -> list[dict[str, Any]]:
    def enough(_: Any) -> bool:
        return len(reader.of(EVENTS, customer_key)) >= count

    reader.wait_for(enough, timeout=30)
    return list(reader.of(EVENTS, customer_key))


def basic(key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}


def test_the_segment_library_s_messages_arrive_mapped(ingest_url: str, reader: TopicReader) -> None:
    errors: list[Any] = []
    client = Client(
        write_key="wk-app",
        host=ingest_url,
        gzip=True,
        on_error=lambda exc, batch: errors.append(exc),
        max_retries=1,
        upload_interval=0.1,
    )
    user = f"c-{uuid.uuid4().hex[:8]}"
    context = {
        "timezone": "Asia/Seoul",
        "locale": "ko-KR",
        "device": {"token": "tok-1", "type": "ios"},
    }
    sent = [
        client.identify(user, {"email": f"{user}@example.com"}, context=context),
        client.track(user, "Product Added", {"cart_id": "k1", "product_id": "p1", "price": 12.5}),
        client.track(
            user,
            "Order Completed",
            {"order_id": "o1", "cart_id": "k1", "total": 12.5, "currency": "KRW"},
        ),
        client.track(
            user, "consent.updated", {"channel": "push", "category": "marketing", "granted": True}
        ),
        client.track(user, "Video Played", {"title": "Intro"}),
        client.page(user, name="Pricing", properties={"path": "/pricing"}),
        client.screen(user, name="Home"),
        client.alias("anon-1", user),
    ]
    client.flush()
    assert errors == []
    message_ids = [message["messageId"] for _, message in sent]
    events = events_of(reader, user, 9)
    assert len(events) == 9
    by_id = {event["event_id"]: event for event in events}
    # messageId is event_id: a retried message is a duplicate the pipeline drops.
    assert set(message_ids) <= set(by_id)
    assert {event["channel"] for event in events} == {"app"}
    types = [by_id[message_id]["type"] for message_id in message_ids]
    assert types == [
        "identify",
        "cart.item_added",
        "order.completed",
        "consent.updated",
        "custom",
        "custom",
        "custom",
        "alias",
    ]
    identify = by_id[message_ids[0]]
    assert identify["properties"]["traits"]["timezone"] == "Asia/Seoul"
    registration = by_id[f"{message_ids[0]}:device"]
    assert registration["properties"] == {"push_token": "tok-1", "platform": "ios"}
    order = by_id[message_ids[2]]["properties"]
    assert (order["cart_id"], order["value"], order["currency"]) == ("k1", 12.5, "KRW")
    assert by_id[message_ids[4]]["properties"] == {"event": "Video Played", "title": "Intro"}
    assert by_id[message_ids[7]]["properties"] == {"previous_id": "anon-1"}


def test_an_unknown_write_key_is_401_and_nothing_is_published(
    ingest_url: str, reader: TopicReader
) -> None:
    client = Client(write_key="nope", host=ingest_url, sync_mode=True, max_retries=0)
    user = f"c-{uuid.uuid4().hex[:8]}"
    with pytest.raises(APIError) as raised:
        client.track(user, "Video Played")
    assert raised.value.status == 401
    response = requests.post(f"{ingest_url}/v1/batch", json={"batch": []}, timeout=10)
    assert response.status_code == 401
    # A message that follows, with a good key, arrives alone.
    good = Client(write_key="wk-web", host=ingest_url, sync_mode=True, max_retries=0)
    good.track(user, "Video Paused")
    events = events_of(reader, user, 1)
    reader.settle(1)
    assert [event["properties"]["event"] for event in reader.of(EVENTS, user)] == ["Video Paused"]
    assert events[0]["channel"] == "web"


def test_malformed_messages_are_400_with_the_rest_accepted_and_limits_413(
    ingest_url: str, reader: TopicReader
) -> None:
    user = f"c-{uuid.uuid4().hex[:8]}"

    def track(message_id: str, **fields: Any) -> dict[str, Any]:
        return {
            "type": "track",
            "messageId": message_id,
            "userId": user,
            "timestamp": "2026-12-04T01:00:00Z",
            "event": "Video Played",
            **fields,
        }

    batch = [
        track("m-1"),
        track("m-2", event="Product Added", properties={"product_id": "p1", "price": 1}),
        track("m-3", properties={"blob": "x" * MESSAGE_LIMIT}),
        track("m-4"),
    ]
    response = requests.post(
        f"{ingest_url}/v1/batch", json={"batch": batch}, headers=basic("wk-web"), timeout=10
    )
    assert response.status_code == 413  # one message was too large, one malformed
    body = response.json()
    assert body["accepted"] == 2
    assert [(e["messageId"], e["code"]) for e in body["errors"]] == [
        ("m-2", "invalid"),
        ("m-3", "too_large"),
    ]
    assert "cart_id" in body["errors"][0]["message"]
    response = requests.post(
        f"{ingest_url}/v1/batch",
        json={"batch": [track("m-5"), {"type": "group"}]},
        headers=basic("wk-web"),
        timeout=10,
    )
    assert response.status_code == 400
    assert response.json()["accepted"] == 1
    response = requests.post(
        f"{ingest_url}/v1/track",
        json=track("m-6", properties={"blob": "x" * MESSAGE_LIMIT}),
        headers=basic("wk-web"),
        timeout=10,
    )
    assert response.status_code == 413
    events_of(reader, user, 3)
    reader.settle(1)
    assert sorted(e["event_id"] for e in reader.of(EVENTS, user)) == ["m-1", "m-4", "m-5"]
