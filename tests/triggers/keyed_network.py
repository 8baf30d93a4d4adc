"""An in-memory stand-in for the per-customer topic: `triggers.linking` run key by key.

Every key has its own state and identity entry; messages go through a FIFO queue,
encoded and decoded as on the topic, and are delivered until none is left (a worker
that keeps up). Timers fire as in replay: one at a time, in (due time, key) order.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from datetime import datetime

from schemas.actions import Action
from schemas.decisions import Decision
from schemas.events import Event, event_adapter
from triggers.engine import EnginePolicy, TimerFired
from triggers.identity import IdentityPolicy
from triggers.linking import (
    IdentityEntry,
    KeyInput,
    decode_message,
    encode_message,
    process,
    route_key,
)
from triggers.ruleset import RuleSet
from triggers.state import CustomerState


@dataclass
class KeyedNetwork:
    rules: RuleSet
    engine: EnginePolicy
    policy: IdentityPolicy = field(default_factory=IdentityPolicy)
    states: dict[str, CustomerState] = field(default_factory=dict)
    entries: dict[str, IdentityEntry] = field(default_factory=dict)
    actions: list[Action] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    # Messages delivered, by kind.
    delivered: dict[str, int] = field(default_factory=dict)
    # Set to deliver every message twice (a redelivery after a crash).
    duplicate: bool = False

    def publish(self, event: Event) -> None:
        self.fire_until(event.occurred_at)
        encoded = event_adapter.validate_json(event_adapter.dump_json(event))
        self._drain(deque([(route_key(encoded, self.policy), encoded)]), event.occurred_at)

    def fire_until(self, until: datetime) -> None:
        while True:
            due = [(s.next_due(), key) for key, s in self.states.items() if s.next_due()]
            if not due:
                return
            at, key = min(due)  # type: ignore[type-var]
            if at is None or at > until:
                return
            self._drain(deque([(key, TimerFired(due_at=at))]), at)

    def _drain(self, queue: deque[tuple[str, KeyInput]], now: datetime) -> None:
        while queue:
            key, item = queue.popleft()
            done = process(
                key, self.entries.get(key), self.states.get(key), item, now, self.policy,
                self.rules, self.engine,
            )  # fmt: skip
            self.entries[key] = IdentityEntry.model_validate_json(done.entry.model_dump_json())
            if done.state is None:
                self.states.pop(key, None)
            else:
                self.states[key] = CustomerState.model_validate_json(done.state.model_dump_json())
            for out in done.outputs:
                self.actions += out.actions
                self.decisions += out.decisions
            for target, message in done.sends:
                self.delivered[message.kind] = self.delivered.get(message.kind, 0) + 1
                decoded = decode_message(encode_message(message))
                queue.append((target, decoded))
                if self.duplicate:
                    queue.append((target, decoded))
