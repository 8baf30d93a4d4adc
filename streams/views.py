"""HTTP views on every worker's web port."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from faust.web import Request, Response, View

from omnicue.metrics import CONTENT_TYPE
from triggers.explain import explanation
from triggers.profile import customer_profile
from triggers.state import CustomerState

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

    register_customer_view(
        p,
        "/customers/{customer_id}/decisions",
        "CustomerDecisions",
        lambda state: explanation(state, p.rules, p.clock()),
    )
    register_customer_view(p, "/customers/{customer_id}", "CustomerProfile", customer_profile)


def register_customer_view(
    p: Pipeline, path: str, name: str, body: Callable[[CustomerState], dict[str, Any]]
) -> None:
    """GET `path`: `body` of one customer's state, answered by the worker that owns the
    customer (faust forwards the request there), 404 where there is none."""

    class CustomerView(View):
        # faust types table_route for plain view functions; methods work the same.
        @p.app.table_route(table=p.customers, match_info="customer_id")  # type: ignore[arg-type]
        async def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
            customer_id: str = request.match_info["customer_id"]
            raw = p.customers.get(customer_id.encode())
            if raw is None:
                return self.json({"error": f"no state for customer {customer_id!r}"}, status=404)
            return self.json(body(CustomerState.model_validate_json(raw)))

    CustomerView.__name__ = CustomerView.__qualname__ = name
    p.app.page(path)(CustomerView)
