"""The most frequent channel sequences before a conversion, e.g.
`push -> email -> order@store`."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from measure.attribution import Attributed
from schemas.report import PathCount

DEFAULT_TOP = 20


def path_of(item: Attributed) -> tuple[str, ...]:
    """The channels of the conversion's touches in order, then `order@<its channel>`."""
    return (*(t.channel for t in item.touches), f"order@{item.conversion.channel}")


def top_paths(attributed: Iterable[Attributed], top: int = DEFAULT_TOP) -> list[PathCount]:
    """Attributed conversions' paths by count, most frequent first (ties by path)."""
    counts = Counter(path_of(item) for item in attributed if item.touches)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    return [PathCount(path=list(path), conversions=n) for path, n in ranked]
