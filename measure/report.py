"""The whole report from touches, conversions, decisions and cart changes."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from measure.attribution import (
    DEFAULT_HALF_LIFE,
    DEFAULT_LOOKBACK,
    Attributed,
    TouchIndex,
    all_models,
    attribute,
)
from measure.carts import cart_kpis, cart_outcomes
from measure.funnel import by_channel, by_rule, funnel
from measure.lift import (
    DEFAULT_WINDOW,
    GLOBAL_GROUP,
    OrderIndex,
    entries,
    global_entries,
    lift,
    rule_lifts,
)
from measure.paths import DEFAULT_TOP, top_paths
from measure.touches import Conversion, Touch
from schemas.decisions import Decision
from schemas.events import CartItemAdded, CartItemRemoved
from schemas.report import GLOBAL_LIFT, Credit, DayCount, Lift, Report, Settings


@dataclass(frozen=True)
class ReportConfig:
    """What the rules file (and the command line) say about measuring."""

    lookback: timedelta = DEFAULT_LOOKBACK
    half_life: timedelta = DEFAULT_HALF_LIFE
    # Rules with a holdout: they get a lift (so does any rule seen holding out).
    holdout_rules: frozenset[str] = frozenset()
    # Whether the policy has a global control group (also true when one is seen).
    global_holdout: bool = False
    # rule id -> conversion window; other rules get 7 days.
    windows: Mapping[str, timedelta] = field(default_factory=dict)
    # Transactional rules never hold out: they are left out of `_global`.
    transactional_rules: frozenset[str] = frozenset()
    costs: Mapping[str, float] = field(default_factory=dict)
    # The cart rule (triggered by `cart.item_added`) and its first step's delay.
    cart_rule: str | None = None
    cart_delay: timedelta = timedelta(minutes=30)
    # (rule id, customer id) -> the rule's variant for that customer.
    variant_of: Callable[[str, str], str | None] | None = None
    top_paths: int = DEFAULT_TOP


def build_report(
    touches: Sequence[Touch],
    conversions: Sequence[Conversion],
    decisions: Sequence[Decision],
    cart_changes: Sequence[CartItemAdded | CartItemRemoved] = (),
    config: ReportConfig = ReportConfig(),
    resolve: Callable[[str], str] = str,
) -> Report:
    index = TouchIndex(touches)
    attributed = attribute(conversions, index, config.lookback)
    with_touches = [a for a in attributed if a.touches]
    models = all_models(attributed, index, config.lookback, config.half_life)
    # Every model lists the same channels (0 where it credits none), so they line up.
    channels = sorted({channel for by in models.values() for channel in by})
    orders = OrderIndex(conversions)
    return Report(
        conversions=len(conversions),
        attributed_conversions=len(with_touches),
        revenue=sum(c.value for c in conversions),
        attributed_revenue=sum(a.conversion.value for a in with_touches),
        attribution={
            model: {
                ch: Credit(conversions=by.get(ch, (0.0, 0.0))[0], revenue=by.get(ch, (0.0, 0.0))[1])
                for ch in channels
            }
            for model, by in models.items()
        },
        lift=lifts(decisions, orders, config, resolve),
        funnel=funnel(touches, attributed, by_channel, config.costs),
        funnel_by_rule=funnel(touches, attributed, by_rule, config.costs),
        paths=top_paths(attributed, config.top_paths),
        carts=(
            cart_kpis(
                cart_outcomes(cart_changes, conversions, config.cart_delay, resolve),
                decisions,
                config.cart_rule,
                config.cart_delay,
                resolve,
            )
            if config.cart_rule is not None
            else None
        ),
        daily=daily(touches, conversions, attributed),
        settings=settings(config, touches, conversions),
    )


def lifts(
    decisions: Sequence[Decision],
    orders: OrderIndex,
    config: ReportConfig,
    resolve: Callable[[str], str] = str,
) -> dict[str, Lift]:
    """Per rule with a holdout, then `_global` when there is a global control group."""
    all_entries = entries(decisions, resolve)
    holdout_rules = set(config.holdout_rules) | {
        e.group.removeprefix("rule:")
        for e in all_entries
        if e.group is not None and e.group.startswith("rule:")
    }
    result = rule_lifts(all_entries, orders, holdout_rules, config.windows, config.variant_of)
    globally = {e.customer_id for e in all_entries if e.group == GLOBAL_GROUP}
    if config.global_holdout or globally:
        marketing = [e for e in all_entries if e.rule_id not in config.transactional_rules]
        result[GLOBAL_LIFT] = lift(global_entries(marketing, globally), orders, DEFAULT_WINDOW)
    return result


def day_of(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%d")


def daily(
    touches: Sequence[Touch], conversions: Sequence[Conversion], attributed: Sequence[Attributed]
) -> list[DayCount]:
    """Actions, conversions (all and attributed) and revenue per UTC day."""
    actions = Counter(day_of(t.at) for t in touches)
    converted = Counter(day_of(c.at) for c in conversions)
    with_touches = Counter(day_of(a.conversion.at) for a in attributed if a.touches)
    revenue: dict[str, float] = defaultdict(float)
    for conversion in conversions:
        revenue[day_of(conversion.at)] += conversion.value
    return [
        DayCount(
            day=day,
            actions=actions[day],
            conversions=converted[day],
            attributed_conversions=with_touches[day],
            revenue=float(revenue[day]),
        )
        for day in sorted(set(actions) | set(converted))
    ]


def settings(
    config: ReportConfig, touches: Sequence[Touch], conversions: Sequence[Conversion]
) -> Settings:
    times = [t.at for t in touches] + [c.at for c in conversions]
    return Settings(
        lookback_seconds=config.lookback.total_seconds(),
        half_life_seconds=config.half_life.total_seconds(),
        first_event_at=_iso(min(times)) if times else None,
        last_event_at=_iso(max(times)) if times else None,
    )


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")
