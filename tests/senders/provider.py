"""A recording webhook provider for the sender tests: a real aiohttp server in a thread.

It behaves like a provider that honours `Idempotency-Key`: every request is recorded,
but a key it already accepted is acknowledged again without a second delivery. Tests
script replies per action id (status and headers) and can SIGKILL the sender from
inside a request, before the provider accepts it or just after its 200 went out.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from aiohttp import web

from omnicue.services import free_port
from senders.transports import verify

SECRET = "test-webhook-secret"
Crash = Literal["before", "after"]


@dataclass
class Request:
    key: str
    path: str
    at: float
    status: int
    signed: bool


@dataclass
class RecordingProvider:
    secret: str = SECRET
    port: int = field(default_factory=free_port)
    requests: list[Request] = field(default_factory=list)
    # The provider's view: each key delivered once, however often it was posted.
    delivered: dict[str, float] = field(default_factory=dict)
    replies: dict[str, list[tuple[int, dict[str, str]]]] = field(default_factory=dict)
    default: tuple[int, dict[str, str]] = (200, {})
    crash: dict[str, tuple[Crash, Callable[[], None]]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/{{channel}}"

    def keys(self) -> list[str]:
        with self._lock:
            return [r.key for r in self.requests]

    def count(self, key: str) -> int:
        return self.keys().count(key)

    def wait_delivered(self, keys: set[str], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not keys <= set(self.delivered):
            missing = keys - set(self.delivered)
            assert time.monotonic() < deadline, f"not delivered: {sorted(missing)}"
            time.sleep(0.05)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        key = request.headers.get("Idempotency-Key", "")
        signed = verify(body, self.secret, request.headers.get("X-Omnicue-Signature"))
        with self._lock:
            script = self.replies.get(key)
            status, headers = script.pop(0) if script else self.default
            crash = self.crash.pop(key, None)
            if crash is not None and crash[0] == "before":
                # The sender dies mid-call; the provider never accepts this request.
                status = 503
            self.requests.append(Request(key, request.path, time.monotonic(), status, signed))
            if 200 <= status < 300 and signed:
                self.delivered.setdefault(key, time.monotonic())
        if crash is not None and crash[0] == "before":
            crash[1]()
            return web.Response(status=503)
        response = web.Response(status=status if signed else 401, headers=headers, text="{}")
        if crash is not None:
            # "after": the 200 is on the wire before the sender dies, so the provider
            # has accepted what the sender never got to record.
            await response.prepare(request)
            await response.write_eof()
            crash[1]()
        return response

    def __enter__(self) -> RecordingProvider:
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        async def serve() -> None:
            app = web.Application()
            app.router.add_post("/hooks/{channel}", self._handle)
            self._runner = web.AppRunner(app)
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
            ready.set()

        def run() -> None:
            self._loop.run_until_complete(serve())
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="provider", daemon=True)
        self._thread.start()
        assert ready.wait(10), "provider did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
