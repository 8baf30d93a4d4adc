"""The funnel per channel and per rule: sent, delivered, opened, clicked, converted.

`converted` counts the attributed conversions whose last touch is on that channel
(or of that rule), and `revenue` their value; cost is messages x the channel's
cost per message, and ROAS revenue / cost.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping

from measure.attribution import Attributed
from measure.touches import Touch
from schemas.report import Funnel


def funnel(
    touches: Iterable[Touch],
    attributed: Iterable[Attributed],
    key: Callable[[Touch], str],
    costs: Mapping[str, float] | None = None,
) -> dict[str, Funnel]:
    """key (a touch's channel, or its rule) -> funnel."""
    costs = costs or {}
    counts: dict[str, list[int]] = defaultdict(lambda: [0] * 5)
    cost: dict[str, float] = defaultdict(float)
    for touch in touches:
        row = counts[key(touch)]
        row[0] += 1
        row[1] += touch.delivered
        row[2] += touch.opened
        row[3] += touch.clicked
        row[4] += touch.unsubscribed
        cost[key(touch)] += costs.get(touch.channel, 0.0)
    converted: dict[str, int] = defaultdict(int)
    revenue: dict[str, float] = defaultdict(float)
    for item in attributed:
        if item.touches:
            last = key(item.touches[-1])
            converted[last] += 1
            revenue[last] += item.conversion.value
    result = {}
    for name in sorted(counts):
        sent, delivered, opened, clicked, unsubscribed = counts[name]
        result[name] = Funnel(
            sent=sent,
            delivered=delivered,
            opened=opened,
            clicked=clicked,
            converted=converted[name],
            revenue=revenue[name],
            revenue_per_message=revenue[name] / sent if sent else None,
            unsubscribed=unsubscribed,
            unsubscribe_rate=unsubscribed / sent if sent else None,
            cost=cost[name],
            roas=revenue[name] / cost[name] if cost[name] > 0 else None,
        )
    return result


def by_channel(touch: Touch) -> str:
    return touch.channel


def by_rule(touch: Touch) -> str:
    return touch.rule_id
