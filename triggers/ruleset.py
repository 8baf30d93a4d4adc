"""Rules compiled for evaluation: CEL conditions compiled once, rules indexed by event type."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from operator import attrgetter
from typing import Any

from pydantic import ValidationError

from schemas.rules import CancelOn, Policy, Rule, RulesError, RulesFile
from triggers.conditions import Condition, ConditionError
from triggers.guards import longest_window
from triggers.state import journey_slot


@dataclass(frozen=True)
class CompiledCancel:
    event: str
    when: Condition | None
    reason: str
    # When `when` requires `event.P == journey.key`: reads P from the event, so only
    # the journey with that key is checked.
    key_getter: Callable[[Any], Any] | None = None


@dataclass(frozen=True)
class CompiledRule:
    rule: Rule
    version: str
    when: Condition | None
    cancels: tuple[CompiledCancel, ...]
    step_conditions: tuple[Condition | None, ...]
    # Worked out from `rule` once, as the engine reads them on nearly every event.
    id: str
    # `journey_slot(id, key)` is `slot_prefix + key`, without the call.
    slot_prefix: str
    trigger_events: frozenset[str]
    restart_events: frozenset[str]
    # `trigger.key` split at its dots; None for one journey per customer.
    key_path: tuple[str, ...] | None
    # `key_path` as one attribute lookup; None for one journey per customer.
    key_getter: Callable[[Any], Any] | None
    # `trigger.repeat` as (count, within); None when one event starts the journey.
    repeat: tuple[int, timedelta] | None
    step_delays: tuple[timedelta, ...]
    max_event_age: timedelta | None
    # The rule as canonical JSON (what `version` hashes): stored in the state of every
    # customer with a journey of this version, so the journey keeps its steps even
    # where no worker has this version loaded any more.
    definition: str


@dataclass(frozen=True)
class RuleSet:
    rules: tuple[CompiledRule, ...]
    policy: Policy = field(default_factory=Policy)
    by_id: dict[str, CompiledRule] = field(default_factory=dict)
    # Every version still in use, so running journeys keep the rule they started with.
    by_version: dict[str, CompiledRule] = field(default_factory=dict)
    # Event type -> rules it may start or restart / may cancel: most events touch no
    # rule, and building a CEL context is the expensive part, so skip rules by type first.
    started_by: dict[str, tuple[CompiledRule, ...]] = field(default_factory=dict)
    cancelled_by: dict[str, tuple[CompiledRule, ...]] = field(default_factory=dict)
    # How far back the caps look: older sends are dropped from state.
    cap_horizon: timedelta = timedelta(days=1)
    # Rule ids removed by an update since this process loaded its rules: their
    # journeys end (`rule_removed`) on the customer's next input, not at their due time.
    removed: frozenset[str] = frozenset()

    # Versions compiled from customer state (see `stored_version`), by version.
    from_state: dict[str, CompiledRule] = field(default_factory=dict)

    def for_journey(
        self, rule_id: str, version: str, stored: dict[str, str] | None = None
    ) -> CompiledRule | None:
        """The rule version a journey started with: loaded, or compiled from the
        definition `stored` with the customer's state. None once the rule is removed,
        or when the version is nowhere to be found (`rule_version_missing`)."""
        if rule_id not in self.by_id:
            return None
        found = self.by_version.get(version)
        if found is not None:
            return found
        found = self.from_state.get(version)
        if found is None and stored is not None and version in stored:
            found = stored_version(stored[version], version)
            if found is not None:
                # Bounded by the versions customers' journeys still use.
                self.from_state[version] = found
        return found if found is not None and found.id == rule_id else None


def _compile(source: str | None, rule_id: str, where: str) -> Condition | None:
    if source is None:
        return None
    try:
        return Condition(source)
    except ConditionError as exc:
        raise RulesError(f"rule {rule_id!r} field {where}: {exc}") from None


def _compile_cancel(cancel: CancelOn, rule_id: str, index: int) -> CompiledCancel:
    when = _compile(cancel.when, rule_id, f"cancel_on.{index}.when")
    path = when.journey_key_path if when is not None else None
    return CompiledCancel(
        event=cancel.event,
        when=when,
        reason=cancel.reason or cancel.event,
        key_getter=attrgetter(".".join(path)) if path else None,
    )


def stored_version(definition: str, version: str) -> CompiledRule | None:
    """A rule version from its stored definition; None if it does not parse, compile
    or hash to `version` (a definition must never run under another version's name)."""
    try:
        rule = Rule.model_validate_json(definition)
        compiled = compile_rule(rule)
    except (ValidationError, RulesError):
        return None
    return compiled if compiled.version == version else None


def compile_rule(rule: Rule) -> CompiledRule:
    definition = rule.canonical_json()
    return CompiledRule(
        rule=rule,
        version=rule.version_of(definition),
        when=_compile(rule.trigger.when, rule.id, "trigger.when"),
        cancels=tuple(_compile_cancel(c, rule.id, i) for i, c in enumerate(rule.cancel_on)),
        step_conditions=tuple(
            _compile(step.when, rule.id, f"steps.{i}.when") for i, step in enumerate(rule.steps)
        ),
        id=rule.id,
        slot_prefix=journey_slot(rule.id, ""),
        trigger_events=frozenset(rule.trigger.events),
        restart_events=frozenset(rule.restart_events),
        key_path=None if rule.trigger.key is None else tuple(rule.trigger.key.split(".")),
        key_getter=None if rule.trigger.key is None else attrgetter(rule.trigger.key),
        repeat=None
        if rule.trigger.repeat is None
        else (rule.trigger.repeat.count, rule.trigger.repeat.within),
        step_delays=tuple(step.after for step in rule.steps),
        max_event_age=rule.max_event_age,
        definition=definition,
    )


def compile_rules(rules_file: RulesFile, previous: RuleSet | None = None) -> RuleSet:
    """Compile a rules file; with `previous`, keep its older versions of rules that remain."""
    compiled = [compile_rule(rule) for rule in rules_file.rules]
    started: dict[str, list[CompiledRule]] = defaultdict(list)
    cancelled: dict[str, list[CompiledRule]] = defaultdict(list)
    for item in compiled:
        for event_type in dict.fromkeys(item.rule.trigger.events + item.rule.restart_events):
            started[event_type].append(item)
        for event_type in dict.fromkeys(c.event for c in item.cancels):
            cancelled[event_type].append(item)
    by_id = {r.id: r for r in compiled}
    by_version: dict[str, CompiledRule] = {}
    if previous is not None:
        by_version.update((v, r) for v, r in previous.by_version.items() if r.id in by_id)
    by_version.update((r.version, r) for r in compiled)
    removed: frozenset[str] = frozenset()
    if previous is not None:
        removed = (previous.removed | previous.by_id.keys()) - by_id.keys()
    return RuleSet(
        rules=tuple(compiled),
        policy=rules_file.policy,
        by_id=by_id,
        by_version=by_version,
        started_by={k: tuple(v) for k, v in started.items()},
        cancelled_by={k: tuple(v) for k, v in cancelled.items()},
        cap_horizon=longest_window(rules_file.policy.caps, (r.rule.cap for r in compiled)),
        removed=removed,
    )
