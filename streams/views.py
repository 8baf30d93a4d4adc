"""HTTP views on every worker's web port."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from faust.web import Request, Response, View

from omnicue.metrics import CONTENT_TYPE
from triggers.explain import explanation
from triggers.identity import ANONYMOUS_PREFIX
from triggers.linking import IdentityEntry, device_key
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

    suffix = path.split("{customer_id}", 1)[1]

    class CustomerView(View):
        # faust types table_route for plain view functions; methods work the same.
        @p.app.table_route(table=p.customers, match_info="customer_id")  # type: ignore[arg-type]
        async def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
            customer_id: str = request.match_info["customer_id"]
            raw = p.customers.get(customer_id.encode())
            if raw is None:
                resolved = resolved_elsewhere(p, customer_id)
                if resolved is not None:
                    # To the profile this id resolves to, which another worker may own.
                    location = f"/customers/{quote(resolved, safe='')}{suffix}"
                    return self.json(
                        {"resolved_to": resolved}, status=307, headers={"Location": location}
                    )
                return self.json({"error": f"no state for customer {customer_id!r}"}, status=404)
            return self.json(body(CustomerState.model_validate_json(raw)))

    CustomerView.__name__ = CustomerView.__qualname__ = name
    p.app.page(path)(CustomerView)


def resolved_elsewhere(p: Pipeline, key: str) -> str | None:
    """The profile an id without state of its own resolves to: the customer a linked
    anonymous id or a retired customer became, or, for an id that is nobody's
    customer id, its anonymous profile (`anon:<id>`)."""
    raw = p.identities.get(key.encode())
    if raw is not None:
        entry = IdentityEntry.model_validate_json(raw)
        target = entry.linked_to or entry.retired_into
        if target is not None:
            return target
    if not key.startswith(ANONYMOUS_PREFIX) and raw is None:
        return device_key(key)
    return None
