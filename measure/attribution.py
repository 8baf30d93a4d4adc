"""Lookback windows and the six attribution models of issue 13 §1.

A conversion's touches are its customer's touches with `at` in
`[conversion.at - lookback, conversion.at)`, in time order (ties by action id).
Every model but `data_driven` gives each conversion credits summing to 1 over its
touches; revenue credit is credit x value. `data_driven` works on the whole period:
the Markov removal effect of each channel, normalised over attributed conversions.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from measure.touches import Conversion, Touch
from schemas.report import MODELS

DEFAULT_LOOKBACK = timedelta(days=7)
# As in Google Ads' time-decay model.
DEFAULT_HALF_LIFE = timedelta(days=7)
# Markov chain states besides the channels.
START, CONVERSION, NULL = "(start)", "(conversion)", "(null)"


@dataclass(frozen=True, slots=True)
class Attributed:
    """A conversion and the touches in its lookback (empty: unattributed)."""

    conversion: Conversion
    touches: tuple[Touch, ...]


class TouchIndex:
    """Each customer's touches in time order, for lookback queries."""

    def __init__(self, touches: Iterable[Touch]) -> None:
        by_customer: dict[str, list[Touch]] = defaultdict(list)
        for touch in touches:
            by_customer[touch.customer_id].append(touch)
        self._touches = {c: sorted(ts, key=lambda t: t.order_key) for c, ts in by_customer.items()}
        self._times = {c: [t.at for t in ts] for c, ts in self._touches.items()}

    def within(self, customer_id: str, start: datetime, end: datetime) -> tuple[Touch, ...]:
        """The customer's touches with `start <= at < end`."""
        times = self._times.get(customer_id)
        if not times:
            return ()
        lo = bisect.bisect_left(times, start)
        hi = bisect.bisect_left(times, end)
        return tuple(self._touches[customer_id][lo:hi])

    def of(self, customer_id: str) -> Sequence[Touch]:
        return self._touches.get(customer_id, ())

    @property
    def customers(self) -> Iterable[str]:
        return self._touches.keys()


def attribute(
    conversions: Iterable[Conversion], index: TouchIndex, lookback: timedelta = DEFAULT_LOOKBACK
) -> list[Attributed]:
    return [Attributed(c, index.within(c.customer_id, c.at - lookback, c.at)) for c in conversions]


def attribute_one(
    conversion: Conversion, touches: Iterable[Touch], lookback: timedelta = DEFAULT_LOOKBACK
) -> Attributed:
    """One conversion with its touches in the lookback, from its customer's touches
    (the live shell's: those in customer state), exactly as `attribute` finds them."""
    return attribute([conversion], TouchIndex(touches), lookback)[0]


# ------------------------------------------------------------- per-conversion models


def last_touch(n: int) -> list[float]:
    return [0.0] * (n - 1) + [1.0]


def first_touch(n: int) -> list[float]:
    return [1.0] + [0.0] * (n - 1)


def linear(n: int) -> list[float]:
    return [1.0 / n] * n


def position_based(n: int) -> list[float]:
    """1; 1/2 each; or 0.4 first, 0.4 last and 0.2 split evenly over the middle."""
    if n == 1:
        return [1.0]
    if n == 2:
        return [0.5, 0.5]
    middle = 0.2 / (n - 2)
    return [0.4] + [middle] * (n - 2) + [0.4]


def time_decay(ages: Sequence[timedelta], half_life: timedelta = DEFAULT_HALF_LIFE) -> list[float]:
    """Weight 2^(-age / half_life), normalised; `age` is touch to conversion."""
    weights = [2.0 ** (-(age / half_life)) for age in ages]
    total = sum(weights)
    return [w / total for w in weights]


def credits(
    model: str, touches: Sequence[Touch], at: datetime, half_life: timedelta
) -> list[float]:
    """One conversion's credit per touch (in order) under a per-conversion model."""
    n = len(touches)
    if n == 0:
        return []
    if model == "time_decay":
        return time_decay([at - t.at for t in touches], half_life)
    by_count: Mapping[str, Callable[[int], list[float]]] = {
        "last_touch": last_touch,
        "first_touch": first_touch,
        "linear": linear,
        "position_based": position_based,
    }
    return by_count[model](n)


# The models that credit each conversion on its own (all but `data_driven`, which needs
# the whole period): the live attribution records carry these.
PER_CONVERSION_MODELS = tuple(m for m in MODELS if m != "data_driven")

ChannelCredit = dict[str, tuple[float, float]]


def credit_by_channel(
    attributed: Iterable[Attributed], model: str, half_life: timedelta = DEFAULT_HALF_LIFE
) -> ChannelCredit:
    """channel -> (conversions, revenue) credited under a per-conversion model."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for item in attributed:
        value = item.conversion.value
        for touch, credit in zip(
            item.touches, credits(model, item.touches, item.conversion.at, half_life), strict=True
        ):
            totals[touch.channel][0] += credit
            totals[touch.channel][1] += credit * value
    return {channel: (c, r) for channel, (c, r) in totals.items()}


# --------------------------------------------------------------------- data-driven


def null_paths(
    index: TouchIndex, attributed: Iterable[Attributed], lookback: timedelta
) -> list[list[str]]:
    """Channel paths that ended without a conversion: each customer's touches in no
    conversion's lookback, split where two are more than a lookback apart."""
    used = {t.action_id for item in attributed for t in item.touches}
    paths: list[list[str]] = []
    for customer in sorted(index.customers):
        current: list[str] = []
        previous: datetime | None = None
        for touch in index.of(customer):
            if touch.action_id in used:
                continue
            if previous is not None and touch.at - previous > lookback and current:
                paths.append(current)
                current = []
            current.append(touch.channel)
            previous = touch.at
        if current:
            paths.append(current)
    return paths


def transition_counts(
    converted: Iterable[Sequence[str]], unconverted: Iterable[Sequence[str]]
) -> dict[str, dict[str, int]]:
    """First-order transitions of start -> channels -> conversion (or null)."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for paths, end in ((converted, CONVERSION), (unconverted, NULL)):
        for path in paths:
            states = [START, *path, end]
            for a, b in zip(states, states[1:], strict=False):
                counts[a][b] += 1
    return {a: dict(bs) for a, bs in counts.items()}


def conversion_probability(
    counts: Mapping[str, Mapping[str, int]], removed: str | None = None
) -> float:
    """P(reaching conversion from start); a removed channel leads to null instead.

    Absorption probabilities x_s = P(s -> conversion) + sum_t P(s -> t) x_t over the
    transient states, solved by Gauss-Jordan elimination (a handful of channels).
    """
    transient = sorted(s for s in counts if s != removed)
    position = {s: i for i, s in enumerate(transient)}
    size = len(transient)
    # Rows of (I - Q | R).
    matrix = [[0.0] * (size + 1) for _ in range(size)]
    for s in transient:
        row = matrix[position[s]]
        row[position[s]] += 1.0
        outgoing = counts[s]
        total = sum(outgoing.values())
        for target, count in outgoing.items():
            p = count / total
            if target == CONVERSION:
                row[size] += p
            elif target in position:
                row[position[target]] -= p
            # NULL, the removed channel, and states with no outgoing counts absorb
            # to nothing.
    for col in range(size):
        pivot = max(range(col, size), key=lambda r: abs(matrix[r][col]))
        matrix[col], matrix[pivot] = matrix[pivot], matrix[col]
        lead = matrix[col][col]
        if lead == 0.0:
            continue
        matrix[col] = [v / lead for v in matrix[col]]
        for r in range(size):
            if r != col and matrix[r][col] != 0.0:
                factor = matrix[r][col]
                matrix[r] = [a - factor * b for a, b in zip(matrix[r], matrix[col], strict=True)]
    if START not in position:
        return 0.0
    return matrix[position[START]][size]


def removal_effects(counts: Mapping[str, Mapping[str, int]]) -> dict[str, float]:
    """channel -> 1 - P(conversion without it) / P(conversion)."""
    channels = sorted(s for s in counts if s != START)
    base = conversion_probability(counts)
    if base <= 0.0:
        return dict.fromkeys(channels, 0.0)
    return {c: max(0.0, 1.0 - conversion_probability(counts, c) / base) for c in channels}


def data_driven(
    attributed: Sequence[Attributed], index: TouchIndex, lookback: timedelta = DEFAULT_LOOKBACK
) -> ChannelCredit:
    """channel -> (conversions, revenue): removal effects normalised to shares of the
    attributed conversions and revenue of the period."""
    with_touches = [a for a in attributed if a.touches]
    converted = [[t.channel for t in a.touches] for a in with_touches]
    counts = transition_counts(converted, null_paths(index, with_touches, lookback))
    effects = removal_effects(counts)
    total_effect = sum(effects.values())
    conversions = float(len(with_touches))
    revenue = sum(a.conversion.value for a in with_touches)
    if total_effect <= 0.0:
        return {}
    return {
        c: (conversions * e / total_effect, revenue * e / total_effect) for c, e in effects.items()
    }


def all_models(
    attributed: Sequence[Attributed],
    index: TouchIndex,
    lookback: timedelta = DEFAULT_LOOKBACK,
    half_life: timedelta = DEFAULT_HALF_LIFE,
) -> dict[str, ChannelCredit]:
    """model -> channel -> (conversions, revenue), for every model of `MODELS`."""
    result = {
        model: credit_by_channel(attributed, model, half_life) for model in PER_CONVERSION_MODELS
    }
    result["data_driven"] = data_driven(attributed, index, lookback)
    return {model: result[model] for model in MODELS}
