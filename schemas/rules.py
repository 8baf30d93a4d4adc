"""The rules file contract (format version 1).

Rules are data: marketers edit YAML, Omnicue validates it with these models and
reports errors that name the rule and the field.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import time, timedelta
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    field_validator,
    model_validator,
)

from schemas.events import EVENT_TYPES, ActionChannel, Category

_DURATION = re.compile(r"^\s*(\d+)\s*([smhd])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: object) -> timedelta:
    """`30s`, `30m`, `24h`, `7d` (or a number of seconds) as a timedelta."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return timedelta(seconds=value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return timedelta(seconds=int(match.group(1)) * _UNIT_SECONDS[match.group(2)])
    raise ValueError(f"invalid duration {value!r}: use a number and a unit, like 30s, 30m, 24h, 7d")


def format_duration(value: timedelta) -> str:
    seconds = int(value.total_seconds())
    for unit in ("d", "h", "m"):
        size = _UNIT_SECONDS[unit]
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


Duration = Annotated[
    timedelta, BeforeValidator(parse_duration), PlainSerializer(format_duration, return_type=str)
]
EventType = Annotated[str, Field(min_length=1)]


def _known_event_type(value: str) -> str:
    if value not in EVENT_TYPES:
        raise ValueError(f"unknown event type {value!r}; known: {', '.join(EVENT_TYPES)}")
    return value


KnownEventType = Annotated[EventType, BeforeValidator(_known_event_type)]
# A Common Expression Language (CEL) expression over `event`, `customer` and `journey`.
Condition = Annotated[str, Field(min_length=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Repeat(_Strict):
    """Start only once the trigger happened `count` times for the key within `within`."""

    count: int = Field(ge=2)
    within: Duration


class Trigger(_Strict):
    event: KnownEventType | list[KnownEventType]
    when: Condition | None = None
    # A dotted path into the event (e.g. `properties.cart_id`): one journey per value.
    key: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
    # Counted in state, not in CEL: the counted events (views) are the busiest type.
    repeat: Repeat | None = None

    @property
    def events(self) -> tuple[str, ...]:
        return (self.event,) if isinstance(self.event, str) else tuple(self.event)


class CancelOn(_Strict):
    event: KnownEventType
    when: Condition | None = None
    # Plain-words reason recorded on the `cancelled` decision (default: the event type).
    reason: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"event": data} if isinstance(data, str) else data


class Step(_Strict):
    after: Duration
    # Preference order; with `channel: best`, the fallback order.
    channels: list[ActionChannel] = Field(min_length=1)
    # `best`: the reachable, consented channel with the highest engagement.
    channel: Literal["best"] | None = None
    template: str = Field(min_length=1)
    payload: dict[str, Any] = {}
    # Evaluated when the step is due; false gives a `suppressed` decision.
    when: Condition | None = None

    @field_validator("channels")
    @classmethod
    def _no_repeats(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("a channel is listed twice")
        return value


class Variant(_Strict):
    weight: float = Field(gt=0)
    template: str | None = Field(None, min_length=1)
    payload: dict[str, Any] = {}


class Cap(_Strict):
    limit: int = Field(ge=0)
    window: Duration = timedelta(hours=24)


class ConversionWindow(_Strict):
    """How long after entering a rule an order counts as the rule's conversion (lift)."""

    within: Duration = timedelta(days=7)


class Rule(_Strict):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$", max_length=64)
    description: str = ""
    category: Category
    # Wins when caps force a choice between steps due together.
    priority: int = 0
    trigger: Trigger
    cancel_on: list[CancelOn] = []
    # Events that restart the clock of a running journey (default: the trigger events).
    restart_on: list[KnownEventType] | None = None
    steps: list[Step] = Field(min_length=1)
    # Not again for the same customer within this long after the previous start.
    reentry: Duration | None = None
    # At most one journey per customer and key, ever (welcome series).
    once: bool = False
    # Trigger events older than this when they arrive are ignored (late offline data).
    max_event_age: Duration | None = None
    # Counted from a step's due time: an action not sendable by then is dropped.
    expires_after: Duration = timedelta(hours=24)
    holdout: float = Field(0.0, ge=0, lt=1)
    variants: dict[str, Variant] = {}
    # How many actions of this rule a customer may get per window.
    cap: Cap | None = None
    # Measurement only (`omnicue report`): None is the default window of 7 days.
    conversion: ConversionWindow | None = None

    @field_validator("steps")
    @classmethod
    def _steps_in_time_order(cls, steps: list[Step]) -> list[Step]:
        for earlier, later in zip(steps, steps[1:], strict=False):
            if later.after < earlier.after:
                raise ValueError("steps must be in order of `after` (each counted from the start)")
        return steps

    @property
    def restart_events(self) -> tuple[str, ...]:
        return self.trigger.events if self.restart_on is None else tuple(self.restart_on)

    @property
    def version(self) -> str:
        """A content hash: any change to the rule gives a new version."""
        return self.version_of(self.canonical_json())

    def canonical_json(self) -> str:
        """The rule as JSON with sorted keys: what its version hashes, and what a
        customer's state keeps of the versions its journeys run on."""
        data = self.model_dump(mode="json")
        if data["conversion"] is None:
            # Added after versions were in use: a rule that leaves it out keeps its version.
            del data["conversion"]
        return json.dumps(data, sort_keys=True)

    @staticmethod
    def version_of(canonical_json: str) -> str:
        return hashlib.sha256(canonical_json.encode()).hexdigest()[:12]


_CLOCK = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")


class QuietHours(_Strict):
    """A daily window in the customer's local time, e.g. 21:00-08:00 (may wrap midnight)."""

    start: time
    end: time

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, data: Any) -> Any:
        if isinstance(data, str):
            match = _CLOCK.match(data.strip())
            if not match:
                raise ValueError(f"quiet hours {data!r}: use HH:MM-HH:MM, like 21:00-08:00")
            h1, m1, h2, m2 = (int(g) for g in match.groups())
            return {"start": time(h1, m1), "end": time(h2, m2)}
        return data


class Caps(_Strict):
    """Marketing actions per customer: across channels, per channel, per named channel."""

    total: Cap = Cap(limit=3)
    per_channel: Cap = Cap(limit=1)
    channels: dict[ActionChannel, Cap] = {}


class Policy(_Strict):
    quiet_hours: QuietHours | None = QuietHours(start=time(21), end=time(8))
    caps: Caps = Caps()
    on_cap: Literal["drop", "defer"] = "drop"
    # A global control group, applied before rule holdouts.
    holdout: float = Field(0.0, ge=0, lt=1)
    # Cost of one message per channel (any currency, the orders' own), for the report's
    # cost and ROAS: e.g. {sms: 20, kakao: 8, email: 0.5, push: 0}.
    costs: dict[ActionChannel, Annotated[float, Field(ge=0, allow_inf_nan=False)]] = {}


class RulesFile(_Strict):
    version: Literal[1]
    policy: Policy = Policy()
    rules: list[Rule] = []

    @field_validator("rules")
    @classmethod
    def _unique_ids(cls, rules: list[Rule]) -> list[Rule]:
        seen: set[str] = set()
        for rule in rules:
            if rule.id in seen:
                raise ValueError(f"rule id {rule.id!r} is used twice")
            seen.add(rule.id)
        return rules


class RulesError(ValueError):
    """A rules file that cannot be used; the message names the rule and the field."""


def rules_from_data(data: Any, source: str = "rules file") -> RulesFile:
    """Validate parsed YAML/JSON, turning pydantic's paths into rule ids."""
    try:
        return RulesFile.model_validate(data)
    except ValidationError as exc:
        raise RulesError(_explain(exc, data, source)) from None


def _explain(exc: ValidationError, data: Any, source: str) -> str:
    lines = [f"{source}: {exc.error_count()} problem(s)"]
    raw_rules = data.get("rules") if isinstance(data, dict) else None
    for error in exc.errors():
        loc = list(error["loc"])
        where = ".".join(str(p) for p in loc) or "(top level)"
        if len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int):
            index = loc[1]
            rule_id = "?"
            if isinstance(raw_rules, list) and index < len(raw_rules):
                item = raw_rules[index]
                if isinstance(item, dict):
                    rule_id = str(item.get("id", "?"))
            field = ".".join(str(p) for p in loc[2:]) or "(rule)"
            where = f"rule {rule_id!r} (rules[{index}]) field {field}"
        lines.append(f"  {where}: {error['msg']}")
    return "\n".join(lines)
