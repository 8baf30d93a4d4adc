"""Attribution records (`omnicue.conversions`, keyed by customer): one per conversion.

The customer agent writes one when it applies an `order.completed`, with the
customer's touches in the lookback and each one's credit under every model that
credits a conversion on its own (`last_touch`, `first_touch`, `linear`,
`time_decay`, `position_based`; `data_driven` needs the whole period, so only
`omnicue report` has it). The credits are computed by `measure/`, the same functions
as the report's, so summing these records per model and channel gives the report's
attribution of the same log.
"""

from __future__ import annotations

from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict

LIVE_MODELS = ("last_touch", "first_touch", "linear", "time_decay", "position_based")
HoldoutGroup = Literal["treatment", "control"]


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TouchCredit(_Record):
    """One touch in the conversion's lookback and its credit under one model."""

    action_id: str
    rule_id: str
    channel: str
    # The action's `created_at`.
    at: AwareDatetime
    variant: str | None = None
    # Credit (the touches of a model sum to 1) and credit x the order's value.
    conversions: float
    revenue: float


class HoldoutConversion(_Record):
    """A rule (or `_global`) whose conversion window after the customer's last entry
    holds this conversion, and the customer's group there."""

    rule_id: str
    group: HoldoutGroup


class ConversionRecord(_Record):
    # The order's event id: a redelivered order (after a crash) gives the same record.
    conversion_id: str
    # The resolved customer (the key of the state the order was applied to).
    customer_id: str
    occurred_at: AwareDatetime
    value: float
    # Where the order happened (web, app, store, pos, callcenter).
    channel: str
    cart_id: str | None = None
    lookback_seconds: float
    half_life_seconds: float
    # False when no touch is in the lookback: then every model's list is empty.
    attributed: bool
    # model (`LIVE_MODELS`) -> the touches in the lookback, oldest first (ties by
    # action id), with their credit.
    credits: dict[str, list[TouchCredit]]
    holdout: list[HoldoutConversion] = []
