"""The HTTP ingest's handlers: auth, limits, per-message errors, acks, with an
in-memory publisher (the real process and broker are in tests/e2e/test_http_ingest.py)."""

from __future__ import annotations

import base64
import gzip
from collections.abc import AsyncIterator, Sequence
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from omnicue.ingest import BATCH_LIMIT, MESSAGE_LIMIT, Record, build_app


class MemoryPublisher:
    def __init__(self) -> None:
        self.records: list[Record] = []
        self.fail: Exception | None = None

    async def publish(self, records: Sequence[Record]) -> None:
        if self.fail is not None:
            raise self.fail
        self.records.extend(records)

    def events(self) -> list[dict[str, Any]]:
        return [orjson.loads(value) for _, value in self.records]


KEYS: dict[str, Any] = {"wk-web": "web", "wk-app": "app"}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}


def track(message_id: str = "m-1", **fields: Any) -> dict[str, Any]:
    return {
        "type": "track",
        "messageId": message_id,
        "timestamp": "2026-12-04T01:00:00Z",
        "userId": "c-1",
        "event": "Video Played",
        **fields,
    }


@pytest.fixture
def publisher() -> MemoryPublisher:
    return MemoryPublisher()


@pytest.fixture
async def client(publisher: MemoryPublisher) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(TestServer(build_app(KEYS, publisher))) as test_client:
        yield test_client


async def test_batch_is_mapped_keyed_and_acked(
    client: TestClient[Any, Any], publisher: MemoryPublisher
) -> None:
    batch = [
        track("m-1"),
        {
            **track("m-2"),
            "userId": None,
            "anonymousId": "a-9",
            "event": "Product Viewed",
            "properties": {"product_id": "p1"},
        },
    ]
    response = await client.post("/v1/batch", json={"batch": batch}, headers=auth("wk-app"))
    assert response.status == 200
    assert await response.json() == {"success": True, "accepted": 2, "rejected": 0}
    assert [key for key, _ in publisher.records] == [b"c-1", b"anon:a-9"]
    first, second = publisher.events()
    assert (first["type"], first["event_id"], first["channel"]) == ("custom", "m-1", "app")
    assert first["occurred_at"] == "2026-12-04T01:00:00Z"
    assert second["type"] == "product.viewed"


async def test_single_message_endpoints_take_their_type_from_the_path(
    client: TestClient[Any, Any], publisher: MemoryPublisher
) -> None:
    identify = {
        "messageId": "i-1",
        "userId": "c-1",
        "traits": {"email": "a@example.com"},
        "context": {"timezone": "Asia/Seoul"},
        "writeKey": "wk-web",
    }
    assert (await client.post("/v1/identify", json=identify, headers=auth("wk-web"))).status == 200
    page = {"messageId": "p-1", "anonymousId": "a-1", "name": "Pricing"}
    assert (await client.post("/v1/page", json=page, headers=auth("wk-web"))).status == 200
    alias = {"messageId": "al-1", "userId": "c-1", "previousId": "a-1"}
    assert (await client.post("/v1/alias", json=alias, headers=auth("wk-web"))).status == 200
    screen = {"messageId": "s-1", "userId": "c-1", "name": "Home"}
    assert (await client.post("/v1/screen", json=screen, headers=auth("wk-app"))).status == 200
    types = [(e["type"], e["channel"]) for e in publisher.events()]
    assert types == [("identify", "web"), ("custom", "web"), ("alias", "web"), ("custom", "app")]
    assert publisher.events()[0]["properties"]["traits"]["timezone"] == "Asia/Seoul"


@pytest.mark.parametrize(
    "header", [None, "Basic " + base64.b64encode(b"nope:").decode(), "Bearer wk-web", "Basic !!!"]
)
async def test_missing_or_unknown_write_key_is_401_and_nothing_is_published(
    client: TestClient[Any, Any], publisher: MemoryPublisher, header: str | None
) -> None:
    headers = {} if header is None else {"Authorization": header}
    response = await client.post("/v1/batch", json={"batch": [track()]}, headers=headers)
    assert response.status == 401
    assert (await response.json())["code"] == "unauthorized"
    assert publisher.records == []


async def test_malformed_messages_are_listed_and_the_others_accepted(
    client: TestClient[Any, Any], publisher: MemoryPublisher
) -> None:
    batch = [
        track("m-1"),
        track("m-2", event="Product Added", properties={"product_id": "p1", "price": 1}),
        {"type": "group", "messageId": "m-3"},
        "not an object",
        track("m-5"),
    ]
    response = await client.post("/v1/batch", json={"batch": batch}, headers=auth("wk-web"))
    assert response.status == 400
    body = await response.json()
    assert (body["success"], body["accepted"], body["rejected"]) == (False, 2, 3)
    assert [(e["index"], e["messageId"]) for e in body["errors"]] == [
        (1, "m-2"),
        (2, "m-3"),
        (3, None),
    ]
    assert "cart_id" in body["errors"][0]["message"]
    assert "accepted and published" in body["message"]
    assert [e["event_id"] for e in publisher.events()] == ["m-1", "m-5"]


async def test_limits_are_413(client: TestClient[Any, Any], publisher: MemoryPublisher) -> None:
    big = track("big", properties={"blob": "x" * MESSAGE_LIMIT})
    response = await client.post("/v1/track", json=big, headers=auth("wk-web"))
    assert response.status == 413
    # In a batch, only the oversized message is rejected.
    response = await client.post(
        "/v1/batch", json={"batch": [track("m-1"), big]}, headers=auth("wk-web")
    )
    assert response.status == 413
    body = await response.json()
    assert (body["accepted"], body["errors"][0]["code"]) == (1, "too_large")
    batch = [track(f"m-{i}", properties={"blob": "x" * 30_000}) for i in range(20)]
    assert len(orjson.dumps({"batch": batch})) > BATCH_LIMIT
    response = await client.post("/v1/batch", json={"batch": batch}, headers=auth("wk-web"))
    assert response.status == 413
    assert [e["event_id"] for e in publisher.events()] == ["m-1"]


async def test_gzip_bodies_and_batch_context(
    client: TestClient[Any, Any], publisher: MemoryPublisher
) -> None:
    body = {
        "batch": [{**track(), "type": "identify", "event": None}],
        "context": {"locale": "ko-KR"},
    }
    response = await client.post(
        "/v1/batch",
        data=gzip.compress(orjson.dumps(body)),
        headers={**auth("wk-web"), "Content-Encoding": "gzip", "Content-Type": "application/json"},
    )
    assert response.status == 200, await response.text()
    assert publisher.events()[0]["properties"]["traits"]["locale"] == "ko-KR"


async def test_native_events_one_or_an_array_with_the_key_channel(
    client: TestClient[Any, Any], publisher: MemoryPublisher
) -> None:
    event = {
        "event_id": "e-1",
        "type": "product.viewed",
        "occurred_at": "2026-12-04T01:00:00Z",
        "customer_id": "c-1",
        "properties": {"product_id": "p1"},
    }
    assert (await client.post("/v1/events", json=event, headers=auth("wk-app"))).status == 200
    response = await client.post(
        "/v1/events",
        json=[{**event, "event_id": "e-2", "channel": "store"}, {**event, "type": "nope"}],
        headers=auth("wk-app"),
    )
    assert response.status == 400
    assert (await response.json())["errors"][0]["index"] == 1
    assert [(e["event_id"], e["channel"]) for e in publisher.events()] == [
        ("e-1", "app"),
        ("e-2", "store"),
    ]


async def test_not_json_is_400_and_a_broker_failure_is_503(
    client: TestClient[Any, Any], publisher: MemoryPublisher
) -> None:
    response = await client.post("/v1/batch", data=b"{", headers=auth("wk-web"))
    assert (response.status, (await response.json())["code"]) == (400, "invalid_json")
    response = await client.post("/v1/batch", json={"nope": []}, headers=auth("wk-web"))
    assert response.status == 400
    publisher.fail = RuntimeError("broker down")
    response = await client.post("/v1/batch", json={"batch": [track()]}, headers=auth("wk-web"))
    assert response.status == 503
    assert "retry" in (await response.json())["message"]


def test_write_keys_setting_parses_pairs_and_names_a_bad_one() -> None:
    from pydantic import ValidationError

    from omnicue.settings import Settings

    settings = Settings(ingest_write_keys=" wk-web=web, wk-app=app,")
    assert settings.write_keys == {"wk-web": "web", "wk-app": "app"}
    # It dumps to the environment and back as it was written.
    assert Settings(**settings.model_dump()).write_keys == settings.write_keys
    for bad, words in [
        ("wk-web", "not a key=channel pair"),
        ("k=mail", "unknown channel"),
        ("k=web,k=app", "listed twice"),
    ]:
        with pytest.raises(ValidationError, match=words):
            Settings(ingest_write_keys=bad)
