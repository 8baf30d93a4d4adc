"""The decision audit log: one record per evaluated journey step, and one per identity
event (a merge, a conflict, a shared device; `outcome` "identity").

It answers "why did (or didn't) this customer get that message?".
"""

from __future__ import annotations

from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict

from schemas.events import ActionChannel

Outcome = Literal["fired", "suppressed", "cancelled", "deferred", "held_out", "identity"]
# An identity decision has this `rule_id`, step 0, the identifier it is about
# ("anonymous_id", "customer_id", "email", "phone") as `journey_key`, and the other
# profile as `profile`; `reason` says what happened (see `triggers.identity`).
IDENTITY_RULE = "identity"


class ChannelEngagement(BaseModel):
    """How `channel: best` saw a channel when it chose: of the customer's remembered
    messages there that reached them, how many were engaged (opened or clicked), and
    the rate it ranked by (recent messages weigh more: a half-life of their age)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    channel: ActionChannel
    engaged: int
    messages: int
    rate: float


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
    # Identity decisions: the other profile (the one merged in, or the customer that
    # holds a conflicting email or phone).
    profile: str | None = None
    # A merge: how many of the merged profile's journeys went on in this one (a journey
    # of the same rule and key that this one had further along is not carried over).
    journeys_carried: int | None = None
    # A `fired` step with `channel: best`: the candidate channels as it ranked them,
    # best first (those without feedback keep the rule's order, after the others).
    engagement: list[ChannelEngagement] | None = None
