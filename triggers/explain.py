"""Decisions and journeys in plain words: "why did (or didn't) this customer get it?"."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import TypeAdapter

from schemas.decisions import ChannelEngagement, Decision
from schemas.rules import format_duration
from triggers.ruleset import RuleSet
from triggers.state import CustomerState, Journey, split_slot

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


def _stamp(at: datetime) -> str:
    return at.strftime("%Y-%m-%d %H:%M:%S UTC")


def describe(decision: Decision) -> str:
    what = f"{decision.rule_id} step {decision.step} ({decision.journey_key})"
    when = _stamp(decision.decided_at)
    reason = REASONS.get(decision.reason or "", decision.reason or "")
    match decision.outcome:
        case "fired":
            sent = f"{when}  {what}: sent on {decision.channel} as {decision.action_id}"
            if decision.engagement:
                ranking = describe_ranking(decision.engagement)
                sent += f", the best channel by engagement ({ranking})"
            return sent
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
        case "identity":
            return f"{when}  {describe_identity(decision)}"
    return f"{when}  {what}: {decision.outcome}"


def describe_ranking(ranking: list[ChannelEngagement]) -> str:
    """How `channel: best` saw its candidates, best first: "email: 3 of 4 recent
    messages engaged; push: 0 of 5". A rate that the half-life weighting moved away
    from the plain share is given too, and so are channels without feedback."""
    parts = []
    named = False
    for seen in ranking:
        if seen.messages == 0:
            parts.append(f"{seen.channel}: no feedback yet")
            continue
        noun = "" if named else " recent messages engaged"
        named = True
        text = f"{seen.channel}: {seen.engaged} of {seen.messages}{noun}"
        if abs(seen.rate - seen.engaged / seen.messages) >= 0.005:
            text += f" ({seen.rate:.0%} weighted to recent ones)"
        parts.append(text)
    return "; ".join(parts)


def describe_identity(decision: Decision) -> str:
    """An identity decision (triggers/identity.py) in words."""
    other = decision.profile or "?"
    by = f" by event {decision.event_id}" if decision.event_id else ""
    kind = "anonymous profile" if decision.journey_key == "anonymous_id" else "profile"
    match decision.reason:
        case "identity_merged":
            carried = decision.journeys_carried
            journeys = "" if carried is None else (
                f"; {carried} journey{'' if carried == 1 else 's'} carried over"
            )
            return f"{kind} {other} merged into this customer{by}{journeys}"
        case "anonymous_idle":
            return f"{kind} {other} was idle too long to merge: dropped{by}"
        case "identity_conflict":
            return (
                f"the {decision.journey_key} already belongs to customer {other}: not merged "
                f"(known customers merge only by an alias){by}"
            )
        case "shared_device":
            return (
                f"anonymous id shared with customer {other}: its later events start a new "
                f"anonymous profile{by}"
            )
    return f"identity: {decision.reason} ({decision.journey_key}, {other}){by}"


def describe_journey(journey: Journey) -> str:
    return (
        f"{journey.rule_id} ({journey.key}): step {journey.next_step} due "
        f"{_stamp(journey.due_at)}, started {_stamp(journey.started_at)} by event "
        f"{journey.trigger_event_id}"
    )


def held_back(state: CustomerState, rules: RuleSet, now: datetime) -> list[dict[str, Any]]:
    """What keeps rules from starting for this customer, which no decision shows (a
    `reentry` suppression only once a start is tried): repeat counts still short of
    their count, `once` rules that have run, and reentry windows still open."""
    found: list[dict[str, Any]] = []
    reentry_until: dict[str, datetime] = {}
    for rule_id, started_at in state.last_started.items():
        rule = rules.by_id.get(rule_id)
        reentry = rule.rule.reentry if rule is not None else None
        if reentry is None or now - started_at >= reentry:
            continue
        until = reentry_until[rule_id] = started_at + reentry
        found.append({
            "rule_id": rule_id,
            "reason": "reentry",
            "until": until.isoformat(),
            "text": f"{rule_id}: started {_stamp(started_at)}, so not again before "
            f"{_stamp(until)} (reentry {format_duration(reentry)})",
        })
    for slot, seen in state.occurrences.items():
        rule_id, key = split_slot(slot)
        rule = rules.by_id.get(rule_id)
        if rule is None or rule.repeat is None:
            continue
        count, within = rule.repeat
        recent = [at for at in seen if at > now - within]
        if not recent:
            continue
        events = " or ".join(sorted(rule.trigger_events)) + " events"
        more = f"{count - len(recent)} more by {_stamp(recent[0] + within)}"
        held = reentry_until.get(rule.id)
        outlook = (
            f"{more} would start it" if held is None
            else f"{more} would reach it, but reentry holds the rule back until {_stamp(held)}"
        )
        found.append({
            "rule_id": rule.id,
            "key": key,
            "reason": "counting",
            "count": len(recent),
            "needed": count,
            "text": f"{rule.id} ({key}): {len(recent)} of the {count} {events} it needs "
            f"within {format_duration(within)}; {outlook}",
        })
    for slot in state.once_started:
        rule_id, key = split_slot(slot)
        rule = rules.by_id.get(rule_id)
        if rule is None or not rule.rule.once or slot in state.journeys:
            continue
        found.append({
            "rule_id": rule.id,
            "key": key,
            "reason": "once",
            "text": f"{rule.id} ({key}): runs once, and has run",
        })
    return found


def explanation(state: CustomerState, rules: RuleSet, now: datetime) -> dict[str, Any]:
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
        "held_back": held_back(state, rules, now),
    }
