"""The decision audit log: one record per evaluated journey step.

It answers "why did (or didn't) this customer get that message?".
"""

from __future__ import annotations

from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict

from schemas.events import ActionChannel

Outcome = Literal["fired", "suppressed", "cancelled", "deferred", "held_out"]


class Decision(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    customer_id: str
    rule_id: str
    rule_version: str
    journey_key: str
    step: int
    outcome: Outcome
    reason: str | None = None
    channel: ActionChannel | None = None
    action_id: str | None = None
    event_id: str | None = None
    decided_at: AwareDatetime
    until: AwareDatetime | None = None
    group: str | None = None
