"""`decide`: (state, input, now) -> (new state, actions, decisions, next timer).

Inputs are events and timer firings. A timer firing carries no decision of its
own: it only means "time has passed", and every step whose due time is <= now is
evaluated. That makes a duplicate or stale timer harmless, so timers can be
delivered at least once.

A due step is checked in this order, and the first check that stops it names the
decision: expiry, holdouts, the step's condition, quiet hours, reachability and
consent, frequency caps. Only then does it fire.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from schemas.actions import Action, Recipient, make_action_id
from schemas.decisions import ChannelEngagement, Decision
from schemas.events import ActionChannel, Event, MessageFeedback, OrderCompleted, event_adapter
from schemas.report import GLOBAL_LIFT
from triggers.channels import ConsentPolicy, candidates, recipient
from triggers.guards import cap_free_at, in_holdout, pick_variant, quiet_until
from triggers.ruleset import CompiledCancel, CompiledRule, RuleSet
from triggers.state import (
    RECENT_DECISIONS,
    CustomerState,
    Journey,
    SentRecord,
    TouchRecord,
    apply_event,
    check_feedback,
    engagement_rates,
    record_message,
    record_touch,
    remember_event,
    split_slot,
)

DEFAULT_JOURNEY_KEY = "customer"
# A step whose evaluation raised is tried again after 1 minute, then 2, 4, ... up to
# an hour: a deterministic error would otherwise repeat on every timer tick.
STEP_RETRY_FIRST = timedelta(minutes=1)
STEP_RETRY_MAX = timedelta(hours=1)
_ACTION_CHANNELS: tuple[ActionChannel, ...] = ("push", "email", "sms", "kakao")
# Attribution's lookback (`measure.attribution.DEFAULT_LOOKBACK`, `omnicue report
# --lookback`): how long customer state keeps emitted actions as touches.
DEFAULT_TOUCH_LOOKBACK = timedelta(days=7)


@dataclass(frozen=True)
class EnginePolicy:
    consent_policy: ConsentPolicy = "opt_in"
    default_timezone: str = "Asia/Seoul"
    # `channel: best`: a message's weight in its channel's engagement rate halves with
    # every half-life of its age (`triggers.state.engagement_rates`).
    engagement_half_life: timedelta = timedelta(days=30)
    # Touches are kept this long for the attribution records (`CustomerState.touches`).
    touch_lookback: timedelta = DEFAULT_TOUCH_LOOKBACK


@dataclass(frozen=True)
class TimerFired:
    """Time has reached `due_at` for this customer."""

    due_at: datetime


Input = Event | TimerFired


@dataclass(frozen=True, slots=True)
class EntryAt:
    """A customer's latest entry into a rule with a holdout (or into any marketing
    rule, as `_global` when there is a global control group), for holdout lift."""

    # A rule id, or `_global` (`schemas.report.GLOBAL_LIFT`).
    rule_id: str
    at: datetime
    held_out: bool
    # The rule's `conversion.within`; None: the report's default window.
    within: timedelta | None = None


@dataclass(frozen=True, slots=True)
class Converted:
    """An `order.completed` applied (a conversion): what the stream shell needs to
    write its attribution record (`streams.conversions`)."""

    event: OrderCompleted
    # The customer the order was applied to (resolved: the state's key).
    customer_id: str
    # The customer's touches once the order was applied (copies), oldest first.
    touches: tuple[TouchRecord, ...]
    # The customer's entries before the order (one that the order starts is not
    # converted by it).
    entries: tuple[EntryAt, ...]


@dataclass(slots=True)
class Output:
    actions: list[Action] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    # Rule ids of the journeys this input started (a restart is not a start).
    started: list[str] = field(default_factory=list)
    # A restart moved a deferred step's due time earlier (with no decision to show it).
    earlier_due: bool = False
    # False when the event was already applied (redelivered after a crash).
    applied: bool = True
    # For each of `actions`, the step's effective due time: its due time, or the
    # later time a deferral (quiet hours, a cap) moved it to.
    effective_due: list[datetime] = field(default_factory=list)
    # (rule id, error) for each step evaluation that raised; the step retries later.
    step_errors: list[tuple[str, str]] = field(default_factory=list)
    # Holdout entries of the journeys this input started: (rule id or `_global`,
    # held out).
    entered: list[tuple[str, bool]] = field(default_factory=list)
    # The input was a conversion (an order applied): its attribution inputs.
    conversion: Converted | None = None


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
    state: CustomerState,
    item: Input,
    now: datetime,
    rules: RuleSet,
    policy: EnginePolicy,
    horizon: datetime | None = None,
) -> Output:
    """Like `decide`, but changes `state` in place: for callers that own a private copy
    (the stream shell and replay deserialize one per customer per batch).

    Steps due up to `horizon` (default `now`) are evaluated, at `now`. A worker that
    is behind passes an earlier horizon: a step may be evaluated only once every
    input that occurred before its due time has been applied (see `streams.progress`).
    """
    if type(item) is MessageFeedback:
        # Before anything changes: an unknown action raises `UnknownAction` (which the
        # stream shell dead-letters) and leaves the state as it was.
        check_feedback(state, item)
    out = Output()
    journeys_before = len(state.journeys) if state.rule_versions else 0
    if rules.removed and state.journeys:
        _end_removed_rules(state, rules, now, out)
    due_by = now if horizon is None or horizon > now else horizon
    if isinstance(item, TimerFired):
        _run_due_steps(state, now, due_by, rules, policy, out)
    elif not remember_event(state, item.event_id):
        out.applied = False
        return out
    else:
        entries = _entries_of(state, rules) if type(item) is OrderCompleted else None
        apply_event(state, item)
        context = _LazyContext(state, item)
        if item.type in rules.cancelled_by:
            _cancel_journeys(state, item, context, rules, out, now)
        if item.type in rules.started_by:
            _start_journeys(state, item, context, rules, out, now)
        _run_due_steps(state, now, due_by, rules, policy, out)
        if entries is not None:
            assert type(item) is OrderCompleted
            out.conversion = Converted(
                event=item,
                customer_id=state.customer_id,
                touches=tuple(t.copy() for t in state.touches),
                entries=entries,
            )
    if state.sent_log:
        prune(state, rules, now)
    if state.rule_versions and len(state.journeys) < journeys_before:
        # Only an input that ended journeys can leave a stored version unused (one
        # that ends one and starts another may leave it until the next one ends).
        _forget_unused_versions(state)
    if out.decisions:
        state.recent_decisions.extend(out.decisions)
        del state.recent_decisions[:-RECENT_DECISIONS]
    return out


class _LazyContext:
    """CEL variables, built only when a condition is actually evaluated."""

    __slots__ = ("_state", "_event", "_event_view", "_customer_view")

    def __init__(self, state: CustomerState, event: Event | None) -> None:
        self._state = state
        self._event = event
        self._event_view: dict[str, Any] | None = None
        # Built once per input: conditions may read the customer, never change it.
        self._customer_view: dict[str, Any] | None = None

    def event_view(self) -> dict[str, Any]:
        if self._event is None:
            return {}
        if self._event_view is None:
            self._event_view = event_adapter.dump_python(self._event, mode="json")
        return self._event_view

    def build(
        self, journey: Journey | dict[str, Any] | None
    ) -> Callable[[frozenset[str]], dict[str, Any]]:
        """The variables a condition uses, built when it asks for them."""

        def make(variables: frozenset[str]) -> dict[str, Any]:
            context: dict[str, Any] = {}
            if "event" in variables:
                context["event"] = self.event_view()
            if "customer" in variables:
                if self._customer_view is None:
                    self._customer_view = customer_view(self._state)
                context["customer"] = self._customer_view
            if "journey" in variables:
                context["journey"] = journey if isinstance(journey, dict) else journey_view(journey)
            return context

        return make


def lifecycle(state: CustomerState) -> str:
    if state.order_count == 0:
        return "prospect"
    return "customer" if state.order_count == 1 else "repeat"


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
        "lifecycle": lifecycle(state),
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
        "variant": journey.variant,
    }


def journey_key(rule: CompiledRule, event: Event) -> str | None:
    """The instance key from a keyed rule's `trigger.key` path; None when the event lacks
    it. (A rule without `trigger.key` has one journey per customer: DEFAULT_JOURNEY_KEY.)"""
    getter, path = rule.key_getter, rule.key_path
    assert getter is not None and path is not None, f"rule {rule.id} has no trigger.key"
    try:
        # Typed fields and extras (pydantic exposes them as attributes) in one call.
        value = getter(event)
    except AttributeError:
        value = _walk(path, event)
    return None if value is None else str(value)


def _walk(path: tuple[str, ...], event: Event) -> Any:
    """The slow way along a key path, through dicts too (e.g. identify traits)."""
    value: Any = event
    for part in path:
        if isinstance(value, dict):
            value = value.get(part)
        else:
            value = getattr(value, part, None)
        if value is None:
            return None
    return value


def _end_removed_rules(state: CustomerState, rules: RuleSet, now: datetime, out: Output) -> None:
    for slot, journey in list(state.journeys.items()):
        if journey.rule_id in rules.removed:
            del state.journeys[slot]
            out.decisions.append(
                _decision(state, journey, now, outcome="cancelled", reason="rule_removed")
            )


def _cancel_journeys(
    state: CustomerState,
    event: Event,
    context: _LazyContext,
    rules: RuleSet,
    out: Output,
    now: datetime,
) -> None:
    for rule in rules.cancelled_by.get(event.type, ()):
        cancels = [c for c in rule.cancels if c.event == event.type]
        keys = _cancellable_keys(cancels, event)
        prefix = rule.slot_prefix
        for slot, journey in list(state.journeys.items()):
            if journey.rule_id != rule.id or (keys is not None and journey.key not in keys):
                continue
            for cancel in cancels:
                if cancel.when is not None and not cancel.when.holds(context.build(journey)):
                    continue
                del state.journeys[slot]
                out.decisions.append(
                    _decision(state, journey, now, outcome="cancelled", reason=cancel.reason,
                              event_id=event.event_id)
                )
                break
        if rule.repeat is not None:
            # A cancelling event also resets a repeat count ("3 views with no cart add");
            # conditions see the counted key as `journey.key`.
            if keys is None:
                counted = [s for s in state.occurrences if s.startswith(prefix)]
            else:
                counted = [prefix + k for k in keys if prefix + k in state.occurrences]
            for slot in counted:
                counting = {"rule_id": rule.id, "key": split_slot(slot)[1]}
                if any(c.when is None or c.when.holds(context.build(counting)) for c in cancels):
                    del state.occurrences[slot]


def _cancellable_keys(cancels: list[CompiledCancel], event: Event) -> set[str] | None:
    """The only journey keys these cancels can match; None when any may match all.

    A cancel whose condition requires `event.P == journey.key` can only match the
    journey keyed by the event's (string) value at P; the condition is still
    evaluated on it.
    """
    keys: set[str] = set()
    for cancel in cancels:
        if cancel.key_getter is None:
            return None
        try:
            value = cancel.key_getter(event)
        except AttributeError:
            continue  # no such field: CEL errors, and the condition cannot hold
        if type(value) is str:
            keys.add(value)
    return keys


def _forget_unused_versions(state: CustomerState) -> None:
    """Keep the definitions of the versions that journeys run on, and no others."""
    stored = state.rule_versions
    in_use = {journey.rule_version for journey in state.journeys.values()}
    if not stored.keys() <= in_use:
        for version in [v for v in stored if v not in in_use]:
            del stored[version]


def rule_of(rules: RuleSet, state: CustomerState, journey: Journey) -> CompiledRule | None:
    """The rule version `journey` runs on (see `RuleSet.for_journey`)."""
    return rules.for_journey(journey.rule_id, journey.rule_version, state.rule_versions)


def _start_journeys(
    state: CustomerState,
    event: Event,
    context: _LazyContext,
    rules: RuleSet,
    out: Output,
    now: datetime,
) -> None:
    # A producer clock ahead of ours must not push steps into the future.
    occurred_at = event.occurred_at
    anchor = occurred_at if occurred_at < now else now
    event_type = event.type
    journeys = state.journeys
    for rule in rules.started_by.get(event_type, ()):
        key = DEFAULT_JOURNEY_KEY if rule.key_getter is None else journey_key(rule, event)
        if key is None:
            continue
        slot = rule.slot_prefix + key
        journey = journeys.get(slot)
        if journey is not None:
            if event_type in rule.restart_events and _restart(
                journey, rule, rules, anchor, event, state.rule_versions
            ):
                out.earlier_due = True
            continue
        if event_type not in rule.trigger_events:
            continue
        max_age = rule.max_event_age
        if max_age is not None and rule.repeat is not None and now - occurred_at > max_age:
            continue  # a stale event does not count toward the repeat either
        if rule.repeat is not None and not _repeated_enough(
            state.occurrences, rules, slot, *rule.repeat, anchor
        ):
            continue
        definition = rule.rule
        if definition.once and slot in state.once_started:
            continue
        if rule.when is not None and not rule.when.holds(context.build(None)):
            continue
        blocked = _start_blocked(state, rule, event, now)
        if blocked is not None:
            # Count afresh: not one more `reentry` decision for every further view.
            state.occurrences.pop(slot, None)
            out.decisions.append(
                Decision(
                    customer_id=state.customer_id,
                    rule_id=rule.id,
                    rule_version=rule.version,
                    journey_key=key,
                    step=1,
                    outcome="suppressed",
                    reason=blocked,
                    event_id=event.event_id,
                    decided_at=now,
                )
            )
            continue
        state.occurrences.pop(slot, None)
        state.last_started[rule.id] = anchor
        state.rule_versions.setdefault(rule.version, rule.definition)
        out.started.append(rule.id)
        out.entered.extend(holdout_entries(rules, rule, state.customer_id))
        if definition.once:
            state.once_started.append(slot)
        due = anchor + rule.step_delays[0]
        state.journeys[slot] = Journey(
            rule_id=rule.id,
            rule_version=rule.version,
            key=key,
            journey_id=event.event_id,
            started_at=anchor,
            due_at=due,
            step_due_at=due,
            variant=pick_variant(rule.id, definition.variants, state.customer_id),
            trigger_event_id=event.event_id,
            trigger_occurred_at=event.occurred_at,
        )


def _restart(
    journey: Journey,
    current: CompiledRule,
    rules: RuleSet,
    anchor: datetime,
    event: Event,
    stored: dict[str, str],
) -> bool:
    """Restart the clock; steps already evaluated are not repeated, and a late event
    never moves the clock backwards. True when the step is now due earlier than it
    was (it had been deferred). `current` is the rule's loaded version."""
    if anchor <= journey.started_at:
        return False
    if journey.rule_version == current.version:
        rule = current
    else:
        started_with = rules.for_journey(journey.rule_id, journey.rule_version, stored)
        if started_with is None:
            return False
        rule = started_with
    previous_due = journey.due_at
    journey.started_at = anchor
    journey.step_due_at = anchor + rule.step_delays[journey.next_step - 1]
    journey.due_at = journey.step_due_at
    journey.trigger_event_id = event.event_id
    journey.trigger_occurred_at = event.occurred_at
    return journey.due_at < previous_due


def _repeated_enough(
    occurrences: dict[str, list[datetime]],
    rules: RuleSet,
    slot: str,
    count: int,
    within: timedelta,
    at: datetime,
) -> bool:
    # Taken out and put back at the end: the counts stay in the order of their last
    # occurrence, so the ones that can no longer count are at the front.
    previous = occurrences.pop(slot, None)
    if previous is None:
        _forget_stale_counts(occurrences, rules, at)
        seen = [at]
    else:
        # `cutoff.__lt__` keeps the occurrences after the cutoff, without a Python frame.
        seen = list(filter((at - within).__lt__, previous))
        seen.append(at)
    occurrences[slot] = seen[-count:]
    return len(seen) >= count


def _forget_stale_counts(
    occurrences: dict[str, list[datetime]], rules: RuleSet, at: datetime
) -> None:
    """Drop the oldest counts while their last occurrence is outside their rule's
    window (or their rule no longer counts): one count per key ever seen, such as
    every product a customer viewed, would otherwise stay in the state for good.

    A count moved out of order (by a late event, or a rule with a longer window in
    front of it) is dropped later: when counted, old occurrences are filtered anyway.
    """
    while occurrences:
        slot = next(iter(occurrences))
        rule = rules.by_id.get(split_slot(slot)[0])
        if rule is not None and rule.repeat is not None:
            if occurrences[slot][-1] > at - rule.repeat[1]:
                return
        del occurrences[slot]


def _start_blocked(
    state: CustomerState, rule: CompiledRule, event: Event, now: datetime
) -> str | None:
    definition = rule.rule
    max_age = rule.max_event_age
    if max_age is not None and now - event.occurred_at > max_age:
        return "stale_event"
    if definition.reentry is not None:
        last = state.last_started.get(rule.id)
        if last is not None and min(event.occurred_at, now) - last < definition.reentry:
            return "reentry"
    return None


def _run_due_steps(
    state: CustomerState,
    now: datetime,
    due_by: datetime,
    rules: RuleSet,
    policy: EnginePolicy,
    out: Output,
) -> None:
    # One at a time, highest priority first: each firing counts against the caps
    # the next one is checked with. A deferred step moves its due time past now.
    journeys = state.journeys
    for journey in journeys.values():
        if journey.due_at <= due_by:
            break
    else:
        return  # the common case: nothing due
    while True:
        due = [
            (-_priority(rules, state, j), j.due_at, slot)
            for slot, j in journeys.items()
            if j.due_at <= due_by
        ]
        if not due:
            return
        _, _, slot = min(due) if len(due) > 1 else due[0]
        _evaluate_step_safely(state, slot, now, rules, policy, out)


def _priority(rules: RuleSet, state: CustomerState, journey: Journey) -> int:
    rule = rule_of(rules, state, journey)
    return rule.rule.priority if rule is not None else 0


def _evaluate_step_safely(
    state: CustomerState,
    slot: str,
    now: datetime,
    rules: RuleSet,
    policy: EnginePolicy,
    out: Output,
) -> None:
    """`_evaluate_step`, undone if it raises: the step then retries after a backoff.

    A failing step must neither fail the input that woke it (the customer's later
    inputs would all be dead-lettered) nor stay due in the past (every timer tick
    would run it again).
    """
    journey = state.journeys[slot]
    before = copy.copy(journey)
    sent, actions, decisions = len(state.sent_log), len(out.actions), len(out.decisions)
    messages = dict(state.messages)
    touches = list(state.touches)
    try:
        _evaluate_step(state, slot, now, rules, policy, out)
    except Exception as exc:  # noqa: BLE001 - isolating one step is the point
        del state.sent_log[sent:], out.actions[actions:], out.effective_due[actions:]
        state.messages = messages
        state.touches = touches
        del out.decisions[decisions:]
        before.failures += 1
        before.due_at = now + min(STEP_RETRY_FIRST * 2 ** (before.failures - 1), STEP_RETRY_MAX)
        state.journeys[slot] = before
        out.step_errors.append((before.rule_id, f"{type(exc).__name__}: {exc}"))
        out.decisions.append(
            _decision(state, before, now, outcome="deferred", reason="step_error",
                      until=before.due_at)
        )


def _evaluate_step(
    state: CustomerState,
    slot: str,
    now: datetime,
    rules: RuleSet,
    policy: EnginePolicy,
    out: Output,
) -> None:
    journey = state.journeys[slot]
    compiled = rule_of(rules, state, journey)
    if compiled is None:
        # Nothing can be evaluated for this journey any more: its rule is gone, or
        # (from a state written before versions were stored) its version is.
        del state.journeys[slot]
        missing = "rule_removed" if journey.rule_id not in rules.by_id else "rule_version_missing"
        out.decisions.append(_decision(state, journey, now, outcome="cancelled", reason=missing))
        return
    rule = compiled.rule
    step = rule.steps[journey.next_step - 1]
    expires_at = journey.step_due_at + rule.expires_after
    marketing = rule.category == "marketing"

    def suppress(reason: str) -> None:
        out.decisions.append(_decision(state, journey, now, outcome="suppressed", reason=reason))
        _advance(state, slot, journey, compiled)

    def defer(until: datetime, reason: str) -> None:
        journey.due_at = until
        out.decisions.append(
            _decision(state, journey, now, outcome="deferred", reason=reason, until=until)
        )

    if now > expires_at:
        return suppress("expired")
    if marketing:
        group = _holdout_group(rules, compiled, state.customer_id)
        if group is not None:
            out.decisions.append(
                _decision(state, journey, now, outcome="held_out", reason="holdout", group=group)
            )
            return _advance(state, slot, journey, compiled)
    condition = compiled.step_conditions[journey.next_step - 1]
    if condition is not None and not condition.holds(_LazyContext(state, None).build(journey)):
        return suppress("condition_false")
    if marketing and rules.policy.quiet_hours is not None:
        timezone = state.timezone or policy.default_timezone
        until = quiet_until(rules.policy.quiet_hours, now, timezone)
        if until is not None:
            if until > expires_at:
                return suppress("quiet_hours_expired")
            return defer(until, "quiet_hours")

    options = candidates(state, step.channels, rule.category, policy.consent_policy)
    if isinstance(options, str):
        return suppress(options)
    ranking: list[ChannelEngagement] | None = None
    if step.channel == "best":
        options, ranking = _by_engagement(state, options, policy.engagement_half_life)
    if marketing:
        free_times = []
        allowed = []
        for channel, to in options:
            free_at = cap_free_at(
                state.sent_log, channel, rule.id, rules.policy.caps, rule.cap, now
            )
            if free_at is None:
                allowed.append((channel, to))
            else:
                free_times.append(free_at)
        if not allowed:
            until = min(free_times)
            if rules.policy.on_cap == "defer" and until <= expires_at:
                return defer(until, "frequency_cap")
            return suppress("frequency_cap")
        options = allowed
    channel, to = options[0]
    _fire(state, journey, compiled, channel, to, now, out, ranking, policy.touch_lookback)
    _advance(state, slot, journey, compiled)


def holdout_entries(rules: RuleSet, rule: CompiledRule, customer_id: str) -> list[tuple[str, bool]]:
    """What a start of `rule` enters for holdout lift: (rule id or `_global`, held out).

    As in the report's lift: a marketing rule with a holdout, unless the customer is in
    the global control group (who is `_global`'s control instead); and `_global` for
    every marketing rule when the policy has a global control group. The group is the
    one the step's holdout check will find (`_holdout_group` is deterministic).
    """
    if rule.rule.category != "marketing":
        return []
    group = _holdout_group(rules, rule, customer_id)
    entered = []
    if rules.policy.holdout > 0:
        entered.append((GLOBAL_LIFT, group == "global"))
    if rule.rule.holdout > 0 and group != "global":
        entered.append((rule.id, group is not None))
    return entered


def _entries_of(state: CustomerState, rules: RuleSet) -> tuple[EntryAt, ...]:
    """The customer's latest entry per rule with a holdout (and `_global`: the latest
    start of any marketing rule), from `last_started`."""
    found: list[EntryAt] = []
    latest_global: EntryAt | None = None
    for rule_id, at in state.last_started.items():
        rule = rules.by_id.get(rule_id)
        if rule is None:
            continue
        conversion = rule.rule.conversion
        for label, held_out in holdout_entries(rules, rule, state.customer_id):
            if label == GLOBAL_LIFT:
                if latest_global is None or at > latest_global.at:
                    latest_global = EntryAt(GLOBAL_LIFT, at, held_out)
            else:
                within = conversion.within if conversion is not None else None
                found.append(EntryAt(label, at, held_out, within))
    if latest_global is not None:
        found.append(latest_global)
    return tuple(found)


def _holdout_group(rules: RuleSet, rule: CompiledRule, customer_id: str) -> str | None:
    if in_holdout(rules.policy.holdout, "global", customer_id):
        return "global"
    if in_holdout(rule.rule.holdout, rule.id, customer_id):
        return f"rule:{rule.id}"
    return None


def _by_engagement(
    state: CustomerState, options: list[tuple[ActionChannel, Recipient]], half_life: timedelta
) -> tuple[list[tuple[ActionChannel, Recipient]], list[ChannelEngagement]]:
    """The options by time-weighted engagement rate, and the ranking as the decision
    records it. Stable: channels without feedback keep the rule's listed order."""
    rates = engagement_rates(state, half_life)

    def rate(option: tuple[ActionChannel, Recipient]) -> float:
        found = rates.get(option[0])
        return -found.rate if found is not None else 0.0

    ranked = sorted(options, key=rate)
    ranking = []
    for channel, _ in ranked:
        found = rates.get(channel)
        ranking.append(ChannelEngagement(
            channel=channel,
            engaged=found.engaged if found else 0,
            messages=found.messages if found else 0,
            rate=round(found.rate, 4) if found else 0.0,
        ))  # fmt: skip
    return ranked, ranking


def _fire(
    state: CustomerState,
    journey: Journey,
    compiled: CompiledRule,
    channel: ActionChannel,
    to: Recipient,
    now: datetime,
    out: Output,
    ranking: list[ChannelEngagement] | None = None,
    lookback: timedelta = DEFAULT_TOUCH_LOOKBACK,
) -> None:
    rule = compiled.rule
    step = rule.steps[journey.next_step - 1]
    variant = rule.variants.get(journey.variant) if journey.variant else None
    payload: dict[str, Any] = {}
    cart = state.carts.get(journey.key)
    if cart is not None:
        payload.update(cart.as_payload(journey.key))
    payload.update(step.payload)
    if variant is not None:
        payload.update(variant.payload)
    # A journey merged in from an anonymous profile keeps the action ids it started with.
    origin = journey.origin or state.customer_id
    action_id = make_action_id(rule.id, origin, journey.journey_id, journey.next_step)
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
            template=variant.template if variant and variant.template else step.template,
            variant=journey.variant,
            recipient=to,
            payload=payload,
            created_at=now,
            due_at=journey.step_due_at,
            expires_at=journey.step_due_at + rule.expires_after,
            trigger_event_id=journey.trigger_event_id,
            trigger_occurred_at=journey.trigger_occurred_at,
            locale=state.locale,
            timezone=state.timezone,
        )
    )
    out.effective_due.append(journey.due_at)
    out.decisions.append(
        _decision(state, journey, now, outcome="fired", channel=channel, action_id=action_id,
                  engagement=ranking)
    )
    # Feedback events are checked against these (`UnknownAction`), transactional too.
    record_message(state, action_id, channel, now, to.email or to.phone or to.push_token)
    # Every action is a touch, transactional too (`measure.touches`).
    record_touch(state, action_id, channel, rule.id, now, journey.variant, lookback)
    if rule.category == "marketing":
        state.sent_log.append(SentRecord(at=now, channel=channel, rule_id=rule.id))


def _advance(state: CustomerState, slot: str, journey: Journey, compiled: CompiledRule) -> None:
    delays = compiled.step_delays
    if journey.next_step >= len(delays):
        del state.journeys[slot]
        return
    journey.next_step += 1
    journey.failures = 0
    journey.step_due_at = journey.started_at + delays[journey.next_step - 1]
    journey.due_at = journey.step_due_at


def _decision(state: CustomerState, journey: Journey, now: datetime, **fields: Any) -> Decision:
    fields.setdefault("event_id", journey.trigger_event_id)
    return Decision(
        customer_id=state.customer_id,
        rule_id=journey.rule_id,
        rule_version=journey.rule_version,
        journey_key=journey.key,
        step=journey.next_step,
        decided_at=now,
        **fields,
    )


def prune(state: CustomerState, rules: RuleSet, now: datetime) -> None:
    """Drop what no rule can look at any more, keeping state small."""
    horizon = now - rules.cap_horizon
    if state.sent_log and state.sent_log[0].at <= horizon:
        state.sent_log = [r for r in state.sent_log if r.at > horizon]
