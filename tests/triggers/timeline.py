"""Drive one customer through time: events at their times, timers fired when due."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from schemas.actions import Action
from schemas.decisions import Decision
from schemas.events import Event
from triggers.engine import EnginePolicy, TimerFired, evolve, new_state
from triggers.ruleset import RuleSet
from triggers.state import CustomerState


@dataclass
class Timeline:
    rules: RuleSet
    policy: EnginePolicy = field(default_factory=EnginePolicy)
    state: CustomerState = field(default_factory=lambda: new_state("c1"))
    actions: list[Action] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)

    def advance(self, until: datetime) -> None:
        while (due := self.state.next_due()) is not None and due <= until:
            self._apply(TimerFired(due), due)

    def send(self, event: Event) -> None:
        """The event arrives at its own time (after due timers fire)."""
        self.advance(event.occurred_at)
        self._apply(event, event.occurred_at)

    def _apply(self, item: Event | TimerFired, now: datetime) -> None:
        out = evolve(self.state, item, now, self.rules, self.policy)
        self.actions += out.actions
        self.decisions += out.decisions

    def of(self, rule_id: str) -> tuple[list[Action], list[Decision]]:
        return (
            [a for a in self.actions if a.rule_id == rule_id],
            [d for d in self.decisions if d.rule_id == rule_id],
        )
