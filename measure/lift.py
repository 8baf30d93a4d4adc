"""Holdout lift: treatment against control, per rule and for the global control group.

A customer enters a rule at its first step decision (fired, suppressed, deferred or
held_out); held-out customers are the control, the rest the treatment. A customer
converted when they have an order in `(entry, entry + within]`: strictly after
the entry, so that the order that started a journey (a post-purchase rule whose
first step is due at once) is not its own conversion.
"""

from __future__ import annotations

import bisect
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from measure.touches import Conversion
from schemas.decisions import Decision
from schemas.report import Comparison, Group, Lift

DEFAULT_WINDOW = timedelta(days=7)
STEP_OUTCOMES = frozenset({"fired", "suppressed", "deferred", "held_out"})
# The two-sided 95% normal quantile.
Z95 = 1.959963984540054
GLOBAL_GROUP = "global"


@dataclass(frozen=True, slots=True)
class Entry:
    customer_id: str
    rule_id: str
    at: datetime
    held_out: bool
    # The engine's holdout group of a held-out entry: "global" or "rule:<id>".
    group: str | None = None


def entries(decisions: Iterable[Decision], resolve: Callable[[str], str] = str) -> list[Entry]:
    """Each (rule, customer)'s first step decision, as an entry (sorted).

    The entry is held out when any of the pair's decisions is: the engine checks a
    step's expiry before the holdout, so a held-out customer's first decision can be
    an `expired` suppression.
    """
    first: dict[tuple[str, str], datetime] = {}
    held_out: dict[tuple[str, str], str | None] = {}
    for decision in decisions:
        if decision.outcome not in STEP_OUTCOMES:
            continue
        key = (decision.rule_id, resolve(decision.customer_id))
        seen = first.get(key)
        if seen is None or decision.decided_at < seen:
            first[key] = decision.decided_at
        if decision.outcome == "held_out" and key not in held_out:
            held_out[key] = decision.group
    return [
        Entry(
            customer_id=customer,
            rule_id=rule,
            at=at,
            held_out=(rule, customer) in held_out,
            group=held_out.get((rule, customer)),
        )
        for (rule, customer), at in sorted(first.items())
    ]


def global_entries(rule_entries: Iterable[Entry], globally_held_out: Iterable[str]) -> list[Entry]:
    """Each customer's first entry into any of `rule_entries` (pass the marketing rules'),
    held out when the customer is in the global control group."""
    control = set(globally_held_out)
    first: dict[str, Entry] = {}
    for entry in rule_entries:
        seen = first.get(entry.customer_id)
        if seen is None or entry.at < seen.at:
            first[entry.customer_id] = entry
    return [
        Entry(c, "_global", e.at, c in control, GLOBAL_GROUP if c in control else None)
        for c, e in sorted(first.items())
    ]


class OrderIndex:
    """Each customer's orders in time order, for conversion-window queries."""

    def __init__(self, conversions: Iterable[Conversion]) -> None:
        by_customer: dict[str, list[Conversion]] = defaultdict(list)
        for conversion in conversions:
            by_customer[conversion.customer_id].append(conversion)
        self._orders = {c: sorted(cs, key=lambda x: x.at) for c, cs in by_customer.items()}
        self._times = {c: [x.at for x in cs] for c, cs in self._orders.items()}

    def after(self, customer_id: str, start: datetime, within: timedelta) -> Sequence[Conversion]:
        """Orders with `start < at <= start + within`."""
        times = self._times.get(customer_id)
        if not times:
            return ()
        lo = bisect.bisect_right(times, start)
        hi = bisect.bisect_right(times, start + within)
        return self._orders[customer_id][lo:hi]


def group_of(entries_: Iterable[Entry], orders: OrderIndex, within: timedelta) -> Group:
    customers = converted = 0
    revenue = 0.0
    for entry in entries_:
        customers += 1
        found = orders.after(entry.customer_id, entry.at, within)
        if found:
            converted += 1
            revenue += sum(c.value for c in found)
    return Group(customers=customers, converted=converted, revenue=revenue)


def wilson_interval(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion."""
    if trials == 0:
        return (0.0, 1.0)
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def newcombe_interval(k1: int, n1: int, k2: int, n2: int, z: float = Z95) -> tuple[float, float]:
    """Newcombe's hybrid score interval (his method 10) of p1 - p2, from the two
    groups' Wilson intervals."""
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson_interval(k1, n1, z)
    l2, u2 = wilson_interval(k2, n2, z)
    d = p1 - p2
    lower = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    upper = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return (lower, upper)


def compare(treatment: Group, control: Group) -> Comparison:
    """Absolute lift with its 95% interval, relative lift, incremental revenue."""
    if treatment.customers == 0 or control.customers == 0:
        return Comparison(
            treatment=treatment,
            control=control,
            abs_lift=None,
            ci95=None,
            relative_lift=None,
            incremental_revenue=None,
        )
    t_rate = treatment.converted / treatment.customers
    c_rate = control.converted / control.customers
    per_customer = treatment.revenue / treatment.customers - control.revenue / control.customers
    return Comparison(
        treatment=treatment,
        control=control,
        abs_lift=t_rate - c_rate,
        ci95=newcombe_interval(
            treatment.converted, treatment.customers, control.converted, control.customers
        ),
        relative_lift=(t_rate - c_rate) / c_rate if c_rate > 0 else None,
        incremental_revenue=per_customer * treatment.customers,
    )


def lift(
    rule_entries: Sequence[Entry],
    orders: OrderIndex,
    within: timedelta = DEFAULT_WINDOW,
    variant_of: Callable[[str], str | None] | None = None,
) -> Lift:
    """One rule's lift (pass only its entries); with `variant_of` (customer -> the
    rule's variant), the same per variant against the whole control."""
    treated = [e for e in rule_entries if not e.held_out]
    control = group_of((e for e in rule_entries if e.held_out), orders, within)
    overall = compare(group_of(treated, orders, within), control)
    variants: dict[str, Comparison] = {}
    if variant_of is not None:
        by_variant: dict[str, list[Entry]] = defaultdict(list)
        for entry in treated:
            name = variant_of(entry.customer_id)
            if name is not None:
                by_variant[name].append(entry)
        variants = {
            name: compare(group_of(group, orders, within), control)
            for name, group in sorted(by_variant.items())
        }
    return Lift(**overall.model_dump(), variants=variants)


def rule_lifts(
    all_entries: Sequence[Entry],
    orders: OrderIndex,
    rules: Iterable[str],
    windows: Mapping[str, timedelta] | None = None,
    variant_of: Callable[[str, str], str | None] | None = None,
) -> dict[str, Lift]:
    """rule id -> lift for `rules` (those with a holdout).

    Customers in the global control group are left out: they get no marketing at all,
    so they are `_global`'s control, not a rule's.
    """
    windows = windows or {}
    in_global = {e.customer_id for e in all_entries if e.group == GLOBAL_GROUP}
    by_rule: dict[str, list[Entry]] = defaultdict(list)
    for entry in all_entries:
        if entry.customer_id not in in_global:
            by_rule[entry.rule_id].append(entry)
    result = {}
    for rule in sorted(set(rules)):

        def variant(customer: str, rule: str = rule) -> str | None:
            return variant_of(rule, customer) if variant_of is not None else None

        result[rule] = lift(
            by_rule.get(rule, []),
            orders,
            windows.get(rule, DEFAULT_WINDOW),
            variant if variant_of is not None else None,
        )
    return result
