"""Rules compiled for evaluation: CEL conditions compiled once, rules indexed by event type."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from schemas.rules import CancelOn, Rule, RulesError, RulesFile
from triggers.conditions import Condition, ConditionError


@dataclass(frozen=True)
class CompiledCancel:
    event: str
    when: Condition | None
    reason: str


@dataclass(frozen=True)
class CompiledRule:
    rule: Rule
    version: str
    when: Condition | None
    cancels: tuple[CompiledCancel, ...]

    @property
    def id(self) -> str:
        return self.rule.id


@dataclass(frozen=True)
class RuleSet:
    rules: tuple[CompiledRule, ...]
    by_id: dict[str, CompiledRule] = field(default_factory=dict)
    # Event type -> rules it triggers / may cancel: most events touch no rule, and
    # building a CEL context is the expensive part, so skip rules by type first.
    triggered_by: dict[str, tuple[CompiledRule, ...]] = field(default_factory=dict)
    cancelled_by: dict[str, tuple[CompiledRule, ...]] = field(default_factory=dict)


def _compile(source: str | None, rule_id: str, where: str) -> Condition | None:
    if source is None:
        return None
    try:
        return Condition(source)
    except ConditionError as exc:
        raise RulesError(f"rule {rule_id!r} field {where}: {exc}") from None


def _compile_cancel(cancel: CancelOn, rule_id: str, index: int) -> CompiledCancel:
    return CompiledCancel(
        event=cancel.event,
        when=_compile(cancel.when, rule_id, f"cancel_on.{index}.when"),
        reason=cancel.reason or cancel.event,
    )


def compile_rules(rules_file: RulesFile) -> RuleSet:
    compiled = []
    triggered: dict[str, list[CompiledRule]] = defaultdict(list)
    cancelled: dict[str, list[CompiledRule]] = defaultdict(list)
    for rule in rules_file.rules:
        item = CompiledRule(
            rule=rule,
            version=rule.version,
            when=_compile(rule.trigger.when, rule.id, "trigger.when"),
            cancels=tuple(_compile_cancel(c, rule.id, i) for i, c in enumerate(rule.cancel_on)),
        )
        compiled.append(item)
        for event_type in rule.trigger.events:
            triggered[event_type].append(item)
        for event_type in {c.event for c in item.cancels}:
            cancelled[event_type].append(item)
    return RuleSet(
        rules=tuple(compiled),
        by_id={r.id: r for r in compiled},
        triggered_by={k: tuple(v) for k, v in triggered.items()},
        cancelled_by={k: tuple(v) for k, v in cancelled.items()},
    )
