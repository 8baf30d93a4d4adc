"""Offline replay (backtest): the live engine driven by a recorded event log.

The clock is event time. The file order is the arrival order, and an event
arrives at the latest `occurred_at` seen so far: the clock never runs backwards,
as in production where a late event is processed "now". Before an event is
applied, every timer due up to its arrival fires, in time order (ties broken by
customer key), each with `now` = its due time; after the last event, timers fire
up to `until`. Each event goes to the profile `triggers.identity` resolves it to,
and a link first merges the anonymous profile into the customer's. With a
lateness L, a timer due at d fires only once the clock has passed d + L, as on
a live worker that is behind. Every customer's state
lives in a dict and is changed in place by `evolve`, the same function the
stream worker uses, so a backtest shows what production would have done with
these rules on this traffic.

Pure: no I/O and no wall clock, so the same input always gives the same outputs
in the same order.

Partitioned (`feed_at`): a replayer that sees only some customers' events is given
each event's arrival on the whole log's clock and its position in the log, and
tags every output with an `order` key. Sorting the outputs of all partitions by it
gives the order one replayer of the whole log would have written them in: an
event's output sits at its position; a timer firing sits before the first event
whose horizon reached its due time, in (due time, customer key) order, or, when
the partition only fires it after an event that made it due at once (a late event,
a step with no delay), right after that event.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from schemas.actions import Action
from schemas.decisions import Decision
from schemas.events import Event
from triggers.engine import EnginePolicy, Output, TimerFired, evolve, new_state
from triggers.identity import (
    IdentityMap,
    IdentityPolicy,
    absorb,
    keep_identity_decisions,
    needs_resolution,
    record,
    resolve,
)
from triggers.ruleset import RuleSet
from triggers.schedule import TimerSchedule
from triggers.state import CustomerState, UnknownAction

# The replay has a single "partition": TimerSchedule wants one per key.
_PARTITION = 0
_NEVER = datetime.max.replace(tzinfo=UTC)
# Datetimes have microsecond resolution: once no timer is due at t, all are >= t + 1us.
_TICK = timedelta(microseconds=1)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# An output's place in the whole log's order (see the module docstring): (time in
# microseconds, 0 for a timer due then | 1 at an event, line, sub-position, 0 for
# the event | 1 for a timer it made due at once, due time, customer key, sequence).
OrderKey = tuple[int, int, int, int, int, int, str, int]


def _micros(at: datetime) -> int:
    return (at - _EPOCH) // _TICK


@dataclass(frozen=True, slots=True)
class InvalidLine:
    """An input line that is not a valid event; counted, never fatal."""

    line: int
    error: str


@dataclass(frozen=True, slots=True)
class ReplayOutput:
    """What one engine step (an event or a timer firing) decided for one customer."""

    customer_key: str
    now: datetime
    input: Event | TimerFired
    actions: list[Action]
    decisions: list[Decision]
    # Set by a partitioned replay (`Replayer.feed_at`) only.
    order: OrderKey | None = None


def _action_counter() -> Counter[tuple[str, int, str]]:
    return Counter()


def _reason_counter() -> Counter[tuple[str, str]]:
    return Counter()


@dataclass
class ReplayStats:
    """Counters for the backtest summary, updated as the replay runs."""

    events: int = 0
    invalid: int = 0
    # Redelivered event ids the engine ignored (the same `event_id` seen again).
    duplicates: int = 0
    # Events whose `occurred_at` was behind the clock when they arrived.
    late: int = 0
    # Feedback events for actions this replay did not emit for that customer (e.g. a
    # production log's feedback under other rules): skipped, as the live worker
    # dead-letters them (`unknown_action`).
    unknown_actions: int = 0
    timers_fired: int = 0
    journeys_started: int = 0
    first_event_at: datetime | None = None
    last_arrival: datetime | None = None
    finished_at: datetime | None = None
    events_by_type: Counter[str] = field(default_factory=Counter)
    journeys_by_rule: Counter[str] = field(default_factory=Counter)
    # (rule_id, step, channel) -> actions
    actions: Counter[tuple[str, int, str]] = field(default_factory=_action_counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    # (outcome, reason) for every decision that carries a reason (all but most "fired").
    reasons: Counter[tuple[str, str]] = field(default_factory=_reason_counter)
    # "YYYY-MM-DDTHH:00Z" of the action's `created_at` -> actions
    actions_per_hour: Counter[str] = field(default_factory=Counter)
    # Profiles at the end (those merged into another, or dropped at a link, not counted).
    customers: int = 0
    # Profiles merged into another (anonymous ones at a link, customers by an alias);
    # their identity decisions are in `outcomes` and `reasons` under "identity".
    merges: int = 0

    @property
    def action_count(self) -> int:
        return sum(self.actions.values())

    def by_reason(self, outcome: str) -> Counter[str]:
        """E.g. `by_reason("suppressed")`: suppressions per reason."""
        return Counter({r: n for (o, r), n in self.reasons.items() if o == outcome})


class Replayer:
    """The replay's state: customers, their timers, the clock and the counters.

    `run` drives a whole log; `feed` and `finish` drive it one input at a time.
    """

    def __init__(
        self,
        rules: RuleSet,
        policy: EnginePolicy,
        lateness: timedelta = timedelta(0),
        identity_policy: IdentityPolicy | None = None,
    ) -> None:
        self.rules = rules
        self.policy = policy
        self.identity_policy = identity_policy or IdentityPolicy()
        self.identity = IdentityMap()
        # As live (`streams.progress`): a step due at d fires once the clock has passed
        # d + lateness, so events up to `lateness` out of order still come before it.
        self.lateness = lateness
        self.states: dict[str, CustomerState] = {}
        self.schedule = TimerSchedule()
        self.stats = ReplayStats()
        # The arrival clock: the latest `occurred_at` seen so far.
        self.clock: datetime | None = None
        # A lower bound of every scheduled due time, so that the common case (no
        # timer due yet) costs one comparison rather than a heap pop per event.
        self._low = _NEVER
        # Partitioned replay: the order key of the last event applied, and a counter
        # that keeps one customer's firings at one due time in order.
        self._ordered = False
        # (horizon, line, sub-position)
        self._last_event: tuple[datetime, int, int] | None = None
        self._sequence = 0

    # ------------------------------------------------------------------ driving

    def run(
        self, items: Iterable[Event | InvalidLine], until: datetime | None = None
    ) -> Iterator[ReplayOutput]:
        """Replay every item, then fire timers due up to `until` (default: the clock)."""
        outputs: list[ReplayOutput] = []
        step = self._step
        for item in items:
            step(item, outputs)
            if outputs:
                yield from outputs
                outputs.clear()
        yield from self.finish(until)

    def feed(self, item: Event | InvalidLine) -> list[ReplayOutput]:
        """Fire the timers due by the item's arrival, then apply it."""
        outputs: list[ReplayOutput] = []
        self._step(item, outputs)
        return outputs

    def feed_at(
        self, item: Event | InvalidLine, arrival: datetime, line: int, sub: int = 0
    ) -> list[ReplayOutput]:
        """As `feed`, for one partition of a log: `arrival` is the whole log's clock
        at this item (never behind the previous one), `line` and `sub` its position
        in the log; every output carries its `order` (see the module docstring)."""
        self._ordered = True
        outputs: list[ReplayOutput] = []
        self._step(item, outputs, arrival, (line, sub))
        return outputs

    def run_at(
        self, positioned: Iterable[tuple[Sequence[Event | InvalidLine], datetime, int]]
    ) -> Iterator[ReplayOutput]:
        """`feed_at` over a partition's lines: (the line's items, arrival, line number);
        a line's items are at sub-positions 0, 1, .... Then call `finish` with the
        whole log's last arrival (or later)."""
        self._ordered = True
        outputs: list[ReplayOutput] = []
        step = self._step
        for items, arrival, line in positioned:
            for sub, item in enumerate(items):
                step(item, outputs, arrival, (line, sub))
            if outputs:
                yield from outputs
                outputs.clear()

    def finish(self, until: datetime | None = None) -> list[ReplayOutput]:
        """Fire every timer due up to `until` (default: the last arrival)."""
        if until is not None and until.tzinfo is None:
            raise ValueError("until must be an aware datetime")
        horizon = until if until is not None else self.clock
        outputs: list[ReplayOutput] = []
        if horizon is not None:
            if self.clock is not None and horizon < self.clock:
                # Timers up to the clock have fired already; time cannot go back.
                horizon = self.clock
            self._fire_until(horizon, outputs)
            self.stats.finished_at = horizon
        return outputs

    # ---------------------------------------------------------------- internals

    def _fire_until(self, now: datetime, outputs: list[ReplayOutput]) -> None:
        # One at a time: a firing can schedule the same customer's next step before
        # other customers' due timers, and time order must hold across customers.
        pop_due = self.schedule.pop_partition
        while True:
            due = pop_due(_PARTITION, now, 1)
            if not due:
                break
            raw_key, due_at, _ = due[0]
            key = raw_key.decode()
            state = self.states.get(key)
            if state is None:
                continue  # merged into another profile since
            pending = state.next_due()
            if pending is None:
                continue
            if pending > due_at:
                # The step moved later since this entry was made (see `_reschedule`).
                self._reschedule(raw_key, state)
                continue
            timer = TimerFired(due_at=due_at)
            out = evolve(state, timer, due_at, self.rules, self.policy)
            self.stats.timers_fired += 1
            self._reschedule(raw_key, state)
            if out.actions or out.decisions:
                self._record(out)
                order = self._timer_order(due_at, key) if self._ordered else None
                outputs.append(
                    ReplayOutput(key, due_at, timer, out.actions, out.decisions, order)
                )
        self._low = now + _TICK

    def _timer_order(self, due_at: datetime, key: str) -> OrderKey:
        self._sequence += 1
        last = self._last_event
        due = _micros(due_at)
        if last is not None and due_at <= last[0]:
            # Made due at once by the last event (or a firing right after it): no
            # partition's earlier event can have fired it, so it goes right after.
            # (Defensive: `evolve` evaluates the steps due by its horizon itself, so
            # an event leaves none due behind it today.)
            return (_micros(last[0]), 1, last[1], last[2], 1, due, key, self._sequence)
        return (due, 0, 0, 0, 0, 0, key, self._sequence)

    def _step(
        self,
        item: Event | InvalidLine,
        outputs: list[ReplayOutput],
        arrival: datetime | None = None,
        position: tuple[int, int] = (0, 0),
    ) -> None:
        # The per-event path: kept in one function, as it runs once per input line.
        stats = self.stats
        if isinstance(item, InvalidLine):
            stats.invalid += 1
            return
        event = item
        occurred = event.occurred_at
        now = self.clock
        if arrival is not None:
            # Partitioned: the whole log's clock, which other partitions' events moved.
            if now is None:
                stats.first_event_at = arrival
            now = self.clock = arrival
            if occurred < now:
                stats.late += 1
        elif now is None:
            now = self.clock = stats.first_event_at = occurred
        elif occurred > now:
            now = self.clock = occurred
        elif occurred < now:
            stats.late += 1
        stats.last_arrival = now
        horizon: datetime | None = None
        if self.lateness:
            horizon = now - self.lateness
            if self._low <= horizon:
                self._fire_until(horizon, outputs)
        elif self._low <= now:
            self._fire_until(now, outputs)
        if self._ordered:
            self._last_event = (horizon or now, *position)

        stats.events += 1
        stats.events_by_type[event.type] += 1
        identity_decisions: list[Decision] = []
        if needs_resolution(self.identity, event):
            key, state, identity_decisions = self._resolve(event, now)
        else:
            key = event.customer_id or ""  # not None: an event has one of the two ids
            found = self.states.get(key)
            if found is None:
                found = self.states[key] = new_state(key)
                stats.customers += 1
            state = found
        try:
            out = evolve(state, event, now, self.rules, self.policy, horizon)
        except UnknownAction:
            # Raised before the engine changed anything: the event is skipped.
            stats.unknown_actions += 1
            out = Output(applied=True)
        keep_identity_decisions(state, identity_decisions, out.decisions)
        if not out.applied:
            stats.duplicates += 1
        elif out.started:
            stats.journeys_started += len(out.started)
            stats.journeys_by_rule.update(out.started)
        if out.started or out.decisions or out.earlier_due:
            self._reschedule(key.encode(), state)
        # Otherwise no journey started, advanced or ended, and due times stayed or
        # moved later: the entry already scheduled is early enough (`_fire_until`
        # looks again when it comes up).
        if out.decisions:
            self._record(out)
            order: OrderKey | None = None
            if self._ordered:
                line, sub = position
                order = (_micros(horizon or now), 1, line, sub, 0, 0, "", 0)
            outputs.append(ReplayOutput(key, now, event, out.actions, out.decisions, order))

    def _resolve(self, event: Event, now: datetime) -> tuple[str, CustomerState, list[Decision]]:
        """The event's profile after identity resolution, with the profiles it links
        merged in (once: a redelivered link finds them linked already)."""
        resolution = resolve(self.identity, event, now, self.identity_policy, self.states)
        key = resolution.profile
        state = self.states.get(key)
        if state is not None and event.event_id in state.recent_event_ids:
            return key, state, []  # a redelivery: the engine ignores it, and so do we
        record(self.identity, resolution)
        decisions = list(resolution.decisions)
        if state is None:
            state = new_state(key)
            self.stats.customers += 1
        for source_key in resolution.merges:
            if source_key == key:
                continue
            source = self.states.pop(source_key, None)
            if source is None:
                continue
            # Merged or dropped, it is no customer of its own any more.
            self.stats.customers -= 1
            raw_source = source_key.encode()
            if self.schedule.due_at(raw_source) is not None:
                self.schedule.set_due(raw_source, None, _PARTITION)
            state, decision = absorb(source, state, now, self.identity_policy, event.event_id)
            if decision is not None:
                decisions.append(decision)
                self.stats.merges += decision.reason == "identity_merged"
        self.states[key] = state
        return key, state, decisions

    def _reschedule(self, raw_key: bytes, state: CustomerState) -> None:
        due = state.next_due()
        scheduled = self.schedule.due_at(raw_key)
        if due is None:
            if scheduled is not None:
                self.schedule.set_due(raw_key, None, _PARTITION)
            return
        # A due time that only moved later keeps its earlier entry, checked again when
        # it comes up: rules restarted by every event (win-back) would otherwise push
        # a heap entry per event.
        if scheduled is None or due < scheduled:
            self.schedule.set_due(raw_key, due, _PARTITION)
            if due < self._low:
                self._low = due

    def _record(self, out: Output) -> None:
        stats = self.stats
        for action in out.actions:
            stats.actions[(action.rule_id, action.step, action.channel)] += 1
            stats.actions_per_hour[hour_bucket(action.created_at)] += 1
        for decision in out.decisions:
            stats.outcomes[decision.outcome] += 1
            if decision.reason is not None:
                stats.reasons[(decision.outcome, decision.reason)] += 1


def replay(
    events: Iterable[Event | InvalidLine],
    rules: RuleSet,
    policy: EnginePolicy,
    until: datetime | None = None,
) -> Iterator[ReplayOutput]:
    """Replay a log through the engine; see `Replayer` for the counters."""
    return Replayer(rules, policy).run(events, until)


def hour_bucket(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:00Z")
