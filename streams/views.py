"""HTTP views on every worker's web port."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from faust.web import Request, Response, View

from omnicue.metrics import CONTENT_TYPE

if TYPE_CHECKING:
    from streams.app import Pipeline


def register_views(p: Pipeline) -> None:
    async def metrics(web: View, request: Request) -> Response:
        return web.bytes(p.metrics.exposition(), content_type=CONTENT_TYPE)

    p.app.page("/metrics")(metrics)

    async def health(web: View, request: Request) -> Response:
        body: dict[str, Any] = {"status": "ok", "timers_pending": len(p.schedule)}
        return web.json(body)

    p.app.page("/health")(health)
