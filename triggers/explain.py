"""Decisions and journeys in plain words: "why did (or didn't) this customer get it?"."""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter

from schemas.decisions import Decision
from triggers.state import CustomerState, Journey

REASONS = {
    "unreachable": "no contact point on any of the step's channels (no push token, no "
    "deliverable email, no phone)",
    "no_consent": "reachable, but without marketing consent on those channels",
    "quiet_hours": "inside the customer's quiet hours",
    "quiet_hours_expired": "quiet hours would have delayed it past its expiry",
    "frequency_cap": "the customer already got as many messages as the caps allow",
    "reentry": "the customer started this rule too recently to start it again",
    "stale_event": "the trigger event arrived too late to act on",
    "expired": "it could not be sent before it expired",
    "condition_false": "the step's condition was not met",
    "holdout": "the customer is in a control group",
    "rule_removed": "the rule was removed",
    "purchased": "the customer purchased",
    "cart_emptied": "the cart was emptied",
    "refunded": "the order was refunded",
    "added_to_cart": "the product was added to the cart",
}

# A journey is a plain dataclass (see `triggers.state`): pydantic dumps it through this.
_journey_adapter = TypeAdapter(Journey)


def describe(decision: Decision) -> str:
    what = f"{decision.rule_id} step {decision.step} ({decision.journey_key})"
    when = decision.decided_at.strftime("%Y-%m-%d %H:%M:%S UTC")
    reason = REASONS.get(decision.reason or "", decision.reason or "")
    match decision.outcome:
        case "fired":
            return f"{when}  {what}: sent on {decision.channel} as {decision.action_id}"
        case "suppressed":
            return f"{when}  {what}: not sent, {reason}"
        case "deferred":
            until = decision.until.strftime("%Y-%m-%d %H:%M UTC") if decision.until else "?"
            return f"{when}  {what}: waiting until {until}, {reason}"
        case "held_out":
            group = decision.group
            return f"{when}  {what}: not sent, the customer is in the {group} control group"
        case "cancelled":
            by = f" (event {decision.event_id})" if decision.event_id else ""
            return f"{when}  {what}: journey ended, {reason}{by}"
    return f"{when}  {what}: {decision.outcome}"


def describe_journey(journey: Journey) -> str:
    due = journey.due_at.strftime("%Y-%m-%d %H:%M:%S UTC")
    return (
        f"{journey.rule_id} ({journey.key}): step {journey.next_step} due {due}, started "
        f"{journey.started_at.strftime('%Y-%m-%d %H:%M:%S UTC')} by event "
        f"{journey.trigger_event_id}"
    )


def explanation(state: CustomerState) -> dict[str, Any]:
    """The JSON body of GET /customers/{id}/decisions."""
    return {
        "customer_id": state.customer_id,
        "journeys": [
            {
                **_journey_adapter.dump_python(journey, mode="json"),
                "text": describe_journey(journey),
            }
            for journey in state.journeys.values()
        ],
        "decisions": [
            {**d.model_dump(mode="json", exclude_none=True), "text": describe(d)}
            for d in reversed(state.recent_decisions)
        ],
    }
