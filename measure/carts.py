"""Cart KPIs: abandonment and recovery, split by reminded and held out.

A cart (customer, cart id) counts once it has items. Its clock is its last item
add before its first order: abandoned when it still has items and no order came
within the cart rule's first delay after that add; recovered when an abandoned
cart was ordered later. It is reminded when the cart rule fired for it, held out
when the rule held it out.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from measure.touches import Conversion
from schemas.decisions import Decision
from schemas.events import CartItemAdded, CartItemRemoved, customer_key
from schemas.report import CartGroup, Carts


@dataclass(frozen=True, slots=True)
class CartOutcome:
    customer_id: str
    cart_id: str
    abandoned: bool
    recovered: bool


def cart_outcomes(
    changes: Iterable[CartItemAdded | CartItemRemoved],
    conversions: Iterable[Conversion],
    delay: timedelta,
    resolve: Callable[[str], str] = str,
) -> list[CartOutcome]:
    """Every cart with items, abandoned or not, recovered or not (sorted)."""
    by_cart: dict[tuple[str, str], list[CartItemAdded | CartItemRemoved]] = defaultdict(list)
    for change in changes:
        by_cart[(resolve(customer_key(change)), change.properties.cart_id)].append(change)
    orders: dict[tuple[str, str], list[datetime]] = defaultdict(list)
    for conversion in conversions:
        if conversion.cart_id is not None:
            orders[(conversion.customer_id, conversion.cart_id)].append(conversion.at)
    outcomes = []
    for key in sorted(by_cart):
        history = sorted(by_cart[key], key=lambda e: e.occurred_at)
        adds = [e.occurred_at for e in history if isinstance(e, CartItemAdded)]
        if not adds:
            continue
        ordered = sorted(t for t in orders.get(key, ()) if t >= adds[0])
        first_order = ordered[0] if ordered else None
        last_add = max(t for t in adds if first_order is None or t <= first_order)
        deadline = last_add + delay
        cutoff = deadline if first_order is None else min(deadline, first_order)
        quantity: dict[str, int] = defaultdict(int)
        for change in history:
            if change.occurred_at > cutoff:
                break
            product = change.properties.product_id
            if isinstance(change, CartItemAdded):
                quantity[product] += change.properties.quantity
            else:
                quantity[product] = max(0, quantity[product] - change.properties.quantity)
        if sum(quantity.values()) <= 0:
            continue  # emptied before its deadline: not a cart with items
        abandoned = first_order is None or first_order > deadline
        outcomes.append(
            CartOutcome(key[0], key[1], abandoned, abandoned and first_order is not None)
        )
    return outcomes


def cart_group(outcomes: Iterable[CartOutcome]) -> CartGroup:
    items = list(outcomes)
    abandoned = sum(o.abandoned for o in items)
    recovered = sum(o.recovered for o in items)
    return CartGroup(
        carts=len(items),
        abandoned=abandoned,
        recovered=recovered,
        abandonment_rate=abandoned / len(items) if items else None,
        recovery_rate=recovered / abandoned if abandoned else None,
    )


def cart_kpis(
    outcomes: Iterable[CartOutcome],
    decisions: Iterable[Decision],
    rule_id: str | None,
    delay: timedelta,
    resolve: Callable[[str], str] = str,
) -> Carts:
    """All carts, and those the cart rule reminded or held out (by journey key)."""
    items = list(outcomes)
    reminded: set[tuple[str, str]] = set()
    held_out: set[tuple[str, str]] = set()
    for decision in decisions:
        if decision.rule_id != rule_id:
            continue
        key = (resolve(decision.customer_id), decision.journey_key)
        if decision.outcome == "fired":
            reminded.add(key)
        elif decision.outcome == "held_out":
            held_out.add(key)
    return Carts(
        rule_id=rule_id,
        delay_seconds=delay.total_seconds(),
        all=cart_group(items),
        reminded=cart_group(o for o in items if (o.customer_id, o.cart_id) in reminded),
        held_out=cart_group(o for o in items if (o.customer_id, o.cart_id) in held_out),
    )
