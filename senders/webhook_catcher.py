"""A local webhook provider for the compose stack and `omnicue dev`: a real aiohttp
server that delivers nothing and writes every message it accepts as a JSON file.

It behaves as a provider that honours `Idempotency-Key` does: the first request
with a key is delivered (written to `<dir>/<channel>/<key>.json`), a repeat of
the key is acknowledged again and written nowhere, so the files are what the
customers would have got, once each. With a secret it checks `X-Omnicue-Signature`
and refuses a body signed with another key (401), as a provider would.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from aiohttp import web

from senders.transports import verify

log = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def catcher_app(directory: Path, secret: str | None = None) -> web.Application:
    """POST /{channel}: one message. GET /health: ok."""
    directory.mkdir(parents=True, exist_ok=True)
    counts = {"delivered": 0, "repeated": 0}

    async def deliver(request: web.Request) -> web.Response:
        body = await request.read()
        key = request.headers.get("Idempotency-Key")
        if not key:
            return web.json_response({"error": "Idempotency-Key header required"}, status=400)
        signature = request.headers.get("X-Omnicue-Signature")
        if secret is not None and not verify(body, secret, signature):
            return web.json_response({"error": "bad X-Omnicue-Signature"}, status=401)
        try:
            message = json.loads(body)
        except ValueError:
            return web.json_response({"error": "body is not JSON"}, status=400)
        channel = _UNSAFE.sub("_", request.match_info["channel"])
        path = directory / channel / f"{_UNSAFE.sub('_', key)}.json"
        if path.exists():
            counts["repeated"] += 1
            return web.json_response({"id": key, "repeated": True})
        path.parent.mkdir(exist_ok=True)
        partial = path.with_suffix(".part")
        partial.write_text(json.dumps(message, ensure_ascii=False, indent=2), encoding="utf-8")
        # Whole files only: a reader never sees half a message.
        os.replace(partial, path)
        counts["delivered"] += 1
        log.info("delivered %s message %s to %s", channel, key, path)
        return web.json_response({"id": key})

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", **counts})

    app = web.Application(client_max_size=1024 * 1024)
    app.router.add_post("/{channel}", deliver)
    app.router.add_get("/health", health)
    return app


def run_catcher(host: str, port: int, directory: Path, secret: str | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    log.info("webhook catcher on http://%s:%d/{channel}, writing to %s", host, port, directory)
    web.run_app(catcher_app(directory, secret), host=host, port=port, print=None)
