"""`decide`: (state, input, now) -> (new state, actions, decisions, next timer).

Inputs are events and timer firings. A timer firing carries no decision of its
own: it only means "time has passed", and every step whose due time is <= now is
evaluated. That makes a duplicate or stale timer harmless, so timers can be
delivered at least once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from schemas.actions import Action, make_action_id
from schemas.decisions import Decision
from schemas.events import ActionChannel, Event, event_adapter
from triggers.channels import ConsentPolicy, choose_channel, recipient
from triggers.ruleset import CompiledRule, RuleSet
from triggers.state import CustomerState, Journey, apply_event, journey_slot, remember_event

DEFAULT_JOURNEY_KEY = "customer"
_ACTION_CHANNELS: tuple[ActionChannel, ...] = ("push", "email", "sms", "kakao")


@dataclass(frozen=True)
class EnginePolicy:
    consent_policy: ConsentPolicy = "opt_in"
    default_timezone: str = "Asia/Seoul"


@dataclass(frozen=True)
class TimerFired:
    """Time has reached `due_at` for this customer."""

    due_at: datetime


Input = Event | TimerFired


@dataclass
class Output:
    actions: list[Action] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    # False when the event was already applied (redelivered after a crash).
    applied: bool = True


@dataclass
class Result:
    state: CustomerState
    actions: list[Action]
    decisions: list[Decision]
    applied: bool

    @property
    def next_due(self) -> datetime | None:
        return self.state.next_due()


def new_state(customer_key: str) -> CustomerState:
    return CustomerState(customer_id=customer_key)


def decide(
    state: CustomerState | None,
    item: Input,
    now: datetime,
    rules: RuleSet,
    policy: EnginePolicy,
    customer_key: str,
) -> Result:
    """The pure form: the given state is left untouched."""
    working = new_state(customer_key) if state is None else state.model_copy(deep=True)
    out = evolve(working, item, now, rules, policy)
    return Result(working, out.actions, out.decisions, out.applied)


def evolve(
    state: CustomerState, item: Input, now: datetime, rules: RuleSet, policy: EnginePolicy
) -> Output:
    """Like `decide`, but changes `state` in place: for callers that own a private copy
    (the stream shell and replay deserialize one per customer per batch)."""
    out = Output()
    if isinstance(item, TimerFired):
        _run_due_steps(state, now, rules, policy, out)
        return out

    event = item
    if not remember_event(state, event.event_id):
        out.applied = False
        return out
    apply_event(state, event)
    context = _LazyContext(state, event)
    _cancel_journeys(state, event, context, rules, out, now)
    _start_journeys(state, event, context, rules, now)
    _run_due_steps(state, now, rules, policy, out)
    return out


class _LazyContext:
    """CEL variables, built only when a condition is actually evaluated."""

    def __init__(self, state: CustomerState, event: Event) -> None:
        self._state = state
        self._event = event
        self._event_view: dict[str, Any] | None = None

    def event_view(self) -> dict[str, Any]:
        if self._event_view is None:
            self._event_view = event_adapter.dump_python(self._event, mode="json")
        return self._event_view

    def build(self, journey: Journey | None) -> Callable[[], dict[str, Any]]:
        def make() -> dict[str, Any]:
            return {
                "event": self.event_view(),
                "customer": customer_view(self._state),
                "journey": journey_view(journey),
            }

        return make


def customer_view(state: CustomerState) -> dict[str, Any]:
    """What rules can see of a customer."""
    return {
        "id": state.customer_id,
        "email": state.email,
        "phone": state.phone,
        "timezone": state.timezone,
        "locale": state.locale,
        "traits": state.traits,
        "consents": state.consents,
        "reachable": {ch: recipient(state, ch) is not None for ch in _ACTION_CHANNELS},
        "push_tokens": len(state.push_tokens),
        "order_count": state.order_count,
        "revenue": state.revenue,
        "carts": {
            cart_id: {"item_count": cart.item_count, "value": cart.value}
            for cart_id, cart in state.carts.items()
        },
        "last_activity": {ch: ts.isoformat() for ch, ts in state.last_activity.items()},
    }


def journey_view(journey: Journey | None) -> dict[str, Any]:
    if journey is None:
        return {}
    return {
        "id": journey.journey_id,
        "rule_id": journey.rule_id,
        "key": journey.key,
        "step": journey.next_step,
        "started_at": journey.started_at.isoformat(),
    }


def journey_key(rule: CompiledRule, event: Event) -> str | None:
    """The instance key from the rule's `trigger.key` path; None when the event lacks it."""
    path = rule.rule.trigger.key
    if path is None:
        return DEFAULT_JOURNEY_KEY
    value: Any = event
    for part in path.split("."):
        if isinstance(value, dict):
            value = value.get(part)
        else:
            value = getattr(value, part, None)
        if value is None:
            return None
    return str(value)


def _cancel_journeys(
    state: CustomerState,
    event: Event,
    context: _LazyContext,
    rules: RuleSet,
    out: Output,
    now: datetime,
) -> None:
    for rule in rules.cancelled_by.get(event.type, ()):
        for slot, journey in list(state.journeys.items()):
            if journey.rule_id != rule.id:
                continue
            for cancel in rule.cancels:
                if cancel.event != event.type:
                    continue
                if cancel.when is not None and not cancel.when.holds(context.build(journey)):
                    continue
                del state.journeys[slot]
                out.decisions.append(
                    Decision(
                        customer_id=state.customer_id,
                        rule_id=rule.id,
                        rule_version=journey.rule_version,
                        journey_key=journey.key,
                        step=journey.next_step,
                        outcome="cancelled",
                        reason=cancel.reason,
                        event_id=event.event_id,
                        decided_at=now,
                    )
                )
                break


def _start_journeys(
    state: CustomerState, event: Event, context: _LazyContext, rules: RuleSet, now: datetime
) -> None:
    # A producer clock ahead of ours must not push steps into the future.
    anchor = min(event.occurred_at, now)
    for rule in rules.triggered_by.get(event.type, ()):
        key = journey_key(rule, event)
        if key is None:
            continue
        slot = journey_slot(rule.id, key)
        journey = state.journeys.get(slot)
        if rule.when is not None and not rule.when.holds(context.build(journey)):
            continue
        if journey is not None:
            # Restart the clock; steps already evaluated are not repeated. A late
            # event never moves the clock backwards.
            if anchor > journey.started_at:
                journey.started_at = anchor
                journey.due_at = anchor + rule.rule.steps[journey.next_step - 1].after
            journey.trigger_event_id = event.event_id
            journey.trigger_occurred_at = event.occurred_at
            continue
        state.journeys[slot] = Journey(
            rule_id=rule.id,
            rule_version=rule.version,
            key=key,
            journey_id=event.event_id,
            started_at=anchor,
            next_step=1,
            due_at=anchor + rule.rule.steps[0].after,
            trigger_event_id=event.event_id,
            trigger_occurred_at=event.occurred_at,
        )


def _run_due_steps(
    state: CustomerState, now: datetime, rules: RuleSet, policy: EnginePolicy, out: Output
) -> None:
    while True:
        due = [(j.due_at, slot) for slot, j in state.journeys.items() if j.due_at <= now]
        if not due:
            return
        _, slot = min(due)
        _evaluate_step(state, slot, now, rules, policy, out)


def _evaluate_step(
    state: CustomerState,
    slot: str,
    now: datetime,
    rules: RuleSet,
    policy: EnginePolicy,
    out: Output,
) -> None:
    journey = state.journeys[slot]
    compiled = rules.by_id.get(journey.rule_id)
    if compiled is None:
        # The rule is gone: nothing can be evaluated for this journey any more.
        del state.journeys[slot]
        out.decisions.append(
            _decision(state, journey, now, outcome="cancelled", reason="rule_removed")
        )
        return
    rule = compiled.rule
    step = rule.steps[journey.next_step - 1]
    choice = choose_channel(state, step.channels, rule.category, policy.consent_policy)
    if isinstance(choice, str):
        out.decisions.append(_decision(state, journey, now, outcome="suppressed", reason=choice))
    else:
        channel, to = choice
        action_id = make_action_id(
            rule.id, state.customer_id, journey.journey_id, journey.next_step
        )
        payload: dict[str, Any] = {}
        cart = state.carts.get(journey.key)
        if cart is not None:
            payload.update(cart.as_payload(journey.key))
        payload.update(step.payload)
        out.actions.append(
            Action(
                action_id=action_id,
                rule_id=rule.id,
                rule_version=journey.rule_version,
                step=journey.next_step,
                customer_id=state.customer_id,
                journey_key=journey.key,
                channel=channel,
                category=rule.category,
                template=step.template,
                variant=None,
                recipient=to,
                payload=payload,
                created_at=now,
                due_at=journey.due_at,
                expires_at=journey.due_at + rule.expires_after,
                trigger_event_id=journey.trigger_event_id,
                trigger_occurred_at=journey.trigger_occurred_at,
            )
        )
        out.decisions.append(
            _decision(
                state, journey, now, outcome="fired", channel=channel, action_id=action_id
            )
        )
    if journey.next_step >= len(rule.steps):
        del state.journeys[slot]
        return
    journey.next_step += 1
    journey.due_at = journey.started_at + rule.steps[journey.next_step - 1].after


def _decision(
    state: CustomerState, journey: Journey, now: datetime, **fields: Any
) -> Decision:
    return Decision(
        customer_id=state.customer_id,
        rule_id=journey.rule_id,
        rule_version=journey.rule_version,
        journey_key=journey.key,
        step=journey.next_step,
        decided_at=now,
        event_id=journey.trigger_event_id,
        **fields,
    )
