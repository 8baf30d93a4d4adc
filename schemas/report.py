"""The measurement report contract (`omnicue report --json`, issue 13).

The keys every report has are the ones of the issue's shape: conversions and
revenue, attribution per model and channel, lift per rule with a holdout (and
`_global`), the funnel per channel, and the top paths. The rest (the funnel's
money columns, the funnel per rule, cart KPIs, lift per variant, the settings used
and the daily series for the charts) is added beside them, never in their place.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

MODELS = ("last_touch", "first_touch", "linear", "time_decay", "position_based", "data_driven")
# The key of the global control group's lift, beside the rule ids.
GLOBAL_LIFT = "_global"


class _Report(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Credit(_Report):
    """A channel's share of the attributed conversions and revenue under one model."""

    conversions: float
    revenue: float


class Group(_Report):
    customers: int
    converted: int
    # Sum of the converted customers' order values within the window.
    revenue: float = 0.0


class Comparison(_Report):
    """Treatment against control. The numbers are null when a group has no customer."""

    treatment: Group
    control: Group
    abs_lift: float | None
    ci95: tuple[float, float] | None
    # Null when the control's conversion rate is 0 (or it has no customer).
    relative_lift: float | None
    incremental_revenue: float | None


class Lift(Comparison):
    # Per variant of the rule, each against the rule's whole control.
    variants: dict[str, Comparison] = {}


class Funnel(_Report):
    sent: int
    delivered: int
    opened: int
    clicked: int
    converted: int
    # Revenue of the conversions counted in `converted` (last touch).
    revenue: float = 0.0
    revenue_per_message: float | None = None
    unsubscribed: int = 0
    unsubscribe_rate: float | None = None
    cost: float = 0.0
    # Revenue / cost; null when the cost is 0.
    roas: float | None = None


class PathCount(_Report):
    path: list[str]
    conversions: int


class CartGroup(_Report):
    carts: int
    abandoned: int
    recovered: int
    abandonment_rate: float | None
    recovery_rate: float | None


class Carts(_Report):
    """Carts with items: abandoned when no order came within the cart rule's first delay;
    recovered when an abandoned cart was ordered later. Split by whether the cart's
    journey was reminded or held out."""

    rule_id: str | None
    delay_seconds: float
    all: CartGroup
    reminded: CartGroup
    held_out: CartGroup


class Settings(_Report):
    lookback_seconds: float
    half_life_seconds: float
    first_event_at: str | None = None
    last_event_at: str | None = None


class DayCount(_Report):
    day: str
    actions: int
    conversions: int
    attributed_conversions: int
    revenue: float


class Report(_Report):
    conversions: int
    attributed_conversions: int
    revenue: float
    attributed_revenue: float
    # model -> channel -> credit; the models are `MODELS`.
    attribution: dict[str, dict[str, Credit]]
    # rule id (or `_global`) -> lift; only rules with a holdout.
    lift: dict[str, Lift]
    funnel: dict[str, Funnel]
    paths: list[PathCount]
    funnel_by_rule: dict[str, Funnel] = {}
    carts: Carts | None = None
    daily: list[DayCount] = Field(default_factory=list)
    settings: Settings | None = None
