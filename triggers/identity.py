"""Identity: which profile an event belongs to, and how two profiles become one.

Pure: values in, values out, no I/O and no clock. The caller (replay today, the
stream shell later) owns an `IdentityMap`, asks `resolve` where an event goes,
writes the answer back with `record`, and folds the profiles it names into the
event's profile with `absorb` before the engine sees the event.

The model (README, "Identity: one customer across channels"):

- `customer_id` is authoritative; `anonymous_id` names a device or cookie. Both
  stay as they are. Email and phone only match, and only as salted SHA-256
  hashes of their normalised form: they never merge profiles by themselves.
- An event with both ids links them; so does an `alias` (`previous_id` -> the
  event's `customer_id`), the only way two known customers merge. A link merges
  the anonymous profile's whole state into the customer's, once.
- One anonymous id belongs to at most one customer. Seen with a second customer
  (a shared device), it stops being linked and its later anonymous events start
  a new anonymous profile; no history moves. A customer keeps at most
  `max_anonymous_ids` of them, the oldest dropped the same way.
- Blocked values (`unknown`, `0`, `test@example.com`, ...) never match anything.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Container, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from schemas.decisions import IDENTITY_RULE, Decision
from schemas.events import Alias, Event, Identify
from triggers.state import (
    RECENT_DECISIONS,
    RECENT_EVENT_IDS,
    Cart,
    CartLine,
    CustomerState,
    Engagement,
    Journey,
    merge_messages,
)

IdentifierKind = Literal["email", "phone"]

# Placeholders that SDKs, forms and test traffic send for "no value": matching on one
# would merge every visitor who sent it into one profile.
DEFAULT_BLOCKED = frozenset({
    "", "0", "-1", "null", "none", "nil", "undefined", "unknown", "anonymous", "n/a",
    "na", "test", "guest", "test@example.com", "noreply@example.com", "email@example.com",
})
ANONYMOUS_PREFIX = "anon:"
# Events that may change the identity map even without an anonymous id.
_IDENTITY_TYPES = frozenset({"identify", "alias"})
# Alias chains are followed this far at most: a guard, they are flattened as made.
_MAX_HOPS = 16


@dataclass(frozen=True, slots=True)
class IdentityPolicy:
    # Salt of the email and phone hashes: without it, a leaked index is a lookup
    # table away from the raw addresses.
    salt: str = ""
    blocked: frozenset[str] = DEFAULT_BLOCKED
    # An anonymous profile idle this long is dropped at its link, not merged (the
    # visitor of a month ago on this cookie need not be this customer).
    idle_window: timedelta = timedelta(days=30)
    max_anonymous_ids: int = 100


@dataclass(frozen=True, slots=True)
class Device:
    """What one anonymous id resolves to."""

    customer_id: str | None = None
    # Bumped whenever the id starts a new anonymous profile (a shared device, or
    # dropped from its customer's bounded list); 0 is the profile `anon:<id>`.
    generation: int = 0
    shared: bool = False


@dataclass(frozen=True, slots=True)
class Known:
    """What the map holds for one known customer."""

    # Linked anonymous ids, oldest first.
    anonymous_ids: tuple[str, ...] = ()
    # This customer's email and phone hashes in `IdentityMap.matching`.
    email: str | None = None
    phone: str | None = None


@dataclass(slots=True)
class IdentityMap:
    """Identifier -> profile. Changed only through `record`, by its owner."""

    devices: dict[str, Device] = field(default_factory=dict)
    customers: dict[str, Known] = field(default_factory=dict)
    # A customer id merged away by an alias -> the customer it became.
    aliases: dict[str, str] = field(default_factory=dict)
    # "email:<hash>" / "phone:<hash>" -> the customer that holds it.
    matching: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Resolution:
    """Where an event goes, which profiles merge into it, and the map's new entries."""

    profile: str
    # Profile keys to merge into `profile`, in order (each may have no state).
    merges: tuple[str, ...] = ()
    decisions: tuple[Decision, ...] = ()
    # Entries to write; None deletes.
    devices: Mapping[str, Device] = field(default_factory=dict)
    customers: Mapping[str, Known | None] = field(default_factory=dict)
    aliases: Mapping[str, str] = field(default_factory=dict)
    matching: Mapping[str, str | None] = field(default_factory=dict)


# ------------------------------------------------------------------ identifiers


def normalise(kind: IdentifierKind, value: str) -> str:
    """Email: trimmed, lower case. Phone: its digits, with the leading `+` kept (E.164
    without guessing a country code: "010-1234" and "+82 10 1234" stay different)."""
    value = value.strip()
    if kind == "email":
        return value.lower()
    digits = "".join(ch for ch in value if ch.isdigit())
    return f"+{digits}" if value.startswith("+") else digits


def hash_identifier(kind: IdentifierKind, value: str, salt: str) -> str:
    """The only form an email or phone takes in the identity map's keys."""
    digest = hashlib.sha256(f"{salt}\x1f{kind}\x1f{normalise(kind, value)}".encode())
    return f"{kind}:{digest.hexdigest()}"


def usable(value: str | None, policy: IdentityPolicy) -> str | None:
    """The value, unless it is missing or blocked (then it matches nothing)."""
    if value is None or value.strip().lower() in policy.blocked:
        return None
    return value


def anonymous_profile(anonymous_id: str, generation: int = 0) -> str:
    """The profile key of an anonymous id's events (as `customer_key` for generation 0)."""
    base = ANONYMOUS_PREFIX + anonymous_id
    return base if generation == 0 else f"{base}#{generation}"


def needs_resolution(identity: IdentityMap, event: Event) -> bool:
    """False when the event's profile is plainly its `customer_id` and it changes
    nothing in the map (the common case, answered without building a `Resolution`):
    no anonymous id, or one linked to that customer already."""
    if event.type in _IDENTITY_TYPES or identity.aliases:
        return True
    if event.customer_id is not None and event.customer_id.startswith(ANONYMOUS_PREFIX):
        return True  # feedback for an anonymous profile's message: it may be merged
    anonymous_id = event.anonymous_id
    if anonymous_id is None:
        return False
    device = identity.devices.get(anonymous_id)
    # A device linked to nobody (shared, or dropped from its customer's list) has a
    # later generation's profile for its anonymous events.
    return device is None or device.customer_id is None or device.customer_id != event.customer_id


def canonical(identity: IdentityMap, customer_id: str) -> str:
    """The customer an id resolves to after the aliases that merged it away."""
    aliases = identity.aliases
    for _ in range(_MAX_HOPS):
        target = aliases.get(customer_id)
        if target is None:
            break
        customer_id = target
    return customer_id


# ---------------------------------------------------------------------- resolve


class _Plan:
    """The writes and decisions of one `resolve`, reading through to the map."""

    def __init__(self, identity: IdentityMap, event: Event, now: datetime) -> None:
        self.identity = identity
        self.event = event
        self.now = now
        self.merges: list[str] = []
        self.decisions: list[Decision] = []
        self.devices: dict[str, Device] = {}
        self.customers: dict[str, Known | None] = {}
        self.aliases: dict[str, str] = {}
        self.matching: dict[str, str | None] = {}

    def device(self, anonymous_id: str) -> Device | None:
        if anonymous_id in self.devices:
            return self.devices[anonymous_id]
        return self.identity.devices.get(anonymous_id)

    def known(self, customer_id: str) -> Known:
        if customer_id in self.customers:
            return self.customers[customer_id] or Known()
        return self.identity.customers.get(customer_id) or Known()

    def owner(self, hashed: str) -> str | None:
        if hashed in self.matching:
            return self.matching[hashed]
        return self.identity.matching.get(hashed)

    def decide(self, customer: str, reason: str, identifier: str, other: str) -> None:
        self.decisions.append(
            identity_decision(customer, reason, identifier, other, self.now, self.event.event_id)
        )

    def resolution(self, profile: str) -> Resolution:
        return Resolution(
            profile=profile,
            merges=tuple(self.merges),
            decisions=tuple(self.decisions),
            devices=self.devices,
            customers=self.customers,
            aliases=self.aliases,
            matching=self.matching,
        )


def identity_decision(
    customer: str, reason: str, identifier: str, other: str, now: datetime, event_id: str | None
) -> Decision:
    return Decision(
        customer_id=customer,
        rule_id=IDENTITY_RULE,
        rule_version="",
        journey_key=identifier,
        step=0,
        outcome="identity",
        reason=reason,
        event_id=event_id,
        decided_at=now,
        profile=other,
    )


def resolve(
    identity: IdentityMap,
    event: Event,
    now: datetime,
    policy: IdentityPolicy,
    profiles: Container[str] = (),
) -> Resolution:
    """Where `event` goes and what it changes in the map; `identity` is left as it is.

    `profiles` holds the profile keys that have a state: an alias's `previous_id`
    found there (or in the map as a customer) is a known customer, else an
    anonymous id.
    """
    plan = _Plan(identity, event, now)
    customer = usable(event.customer_id, policy)
    anonymous = usable(event.anonymous_id, policy)
    if customer is not None and customer.startswith(ANONYMOUS_PREFIX) and "#" not in customer:
        # An anonymous profile's key as the customer id (feedback on a message sent to
        # it): that anonymous id's events, wherever they go now.
        anonymous = anonymous or customer[len(ANONYMOUS_PREFIX) :]
        customer = None
    if customer is not None:
        customer = canonical(identity, customer)
    if customer is not None:
        if isinstance(event, Alias):
            previous = usable(event.properties.previous_id, policy)
            if previous is not None:
                if previous in identity.customers or previous in identity.aliases or (
                    previous in profiles and not previous.startswith(ANONYMOUS_PREFIX)
                ):
                    _merge_customers(plan, canonical(identity, previous), customer, policy)
                else:
                    _link(plan, previous, customer, policy)
        if anonymous is not None:
            _link(plan, anonymous, customer, policy)
        profile = customer
    elif anonymous is not None:
        device = plan.device(anonymous)
        if device is None:
            profile = anonymous_profile(anonymous)
        elif device.customer_id is not None:
            profile = canonical(identity, device.customer_id)
        else:
            profile = anonymous_profile(anonymous, device.generation)
    else:
        # Only blocked ids: the event keeps its own key and matches nothing.
        profile = event.customer_id or anonymous_profile(event.anonymous_id or "")
    if isinstance(event, Identify):
        # Known: the profile is a customer's, also when a linked device's event led there.
        known = not profile.startswith(ANONYMOUS_PREFIX)
        _match_traits(plan, event, profile, known, policy)
    return plan.resolution(profile)


def _link(plan: _Plan, anonymous_id: str, customer: str, policy: IdentityPolicy) -> None:
    device = plan.device(anonymous_id)
    if device is not None and device.customer_id is not None:
        linked = canonical(plan.identity, device.customer_id)
        if linked == customer:
            return  # linked already: a later event, or the link redelivered
        # A shared device: it belongs to neither from now on, and no history moves.
        plan.devices[anonymous_id] = Device(None, device.generation + 1, shared=True)
        known = plan.known(linked)
        plan.customers[linked] = _without(known, anonymous_id)
        plan.decide(customer, "shared_device", "anonymous_id", linked)
        return
    if device is not None and device.shared:
        return  # recorded when it became shared; its events stay anonymous
    generation = device.generation if device is not None else 0
    plan.devices[anonymous_id] = Device(customer, generation)
    plan.merges.append(anonymous_profile(anonymous_id, generation))
    _attach(plan, customer, (anonymous_id,), policy)


def _attach(
    plan: _Plan, customer: str, anonymous_ids: tuple[str, ...], policy: IdentityPolicy
) -> None:
    """Add anonymous ids to a customer's list, dropping the oldest beyond the bound."""
    known = plan.known(customer)
    ids = tuple(dict.fromkeys(known.anonymous_ids + anonymous_ids))
    overflow = len(ids) - policy.max_anonymous_ids
    if overflow > 0:
        for dropped in ids[:overflow]:
            old = plan.device(dropped) or Device()
            # Its next anonymous events start a new profile: none of this customer's.
            plan.devices[dropped] = Device(None, old.generation + 1)
        ids = ids[overflow:]
    plan.customers[customer] = Known(ids, known.email, known.phone)


def _without(known: Known, anonymous_id: str) -> Known:
    ids = tuple(a for a in known.anonymous_ids if a != anonymous_id)
    return Known(ids, known.email, known.phone)


def _merge_customers(plan: _Plan, previous: str, customer: str, policy: IdentityPolicy) -> None:
    """An alias of two known customers: `previous` becomes `customer` for good."""
    if previous == customer:
        return
    plan.aliases[previous] = customer
    # Flattened: whatever pointed to `previous` points to `customer` now.
    for retired, target in plan.identity.aliases.items():
        if target == previous:
            plan.aliases[retired] = customer
    old = plan.known(previous)
    for anonymous_id in old.anonymous_ids:
        device = plan.device(anonymous_id) or Device()
        plan.devices[anonymous_id] = Device(customer, device.generation)
    plan.customers[previous] = None
    _attach(plan, customer, old.anonymous_ids, policy)
    known = plan.known(customer)
    email, phone = known.email, known.phone
    for hashed in (old.email, old.phone):
        if hashed is not None and plan.owner(hashed) == previous:
            plan.matching[hashed] = customer
            if hashed.startswith("email:") and email is None:
                email = hashed
            elif hashed.startswith("phone:") and phone is None:
                phone = hashed
    plan.customers[customer] = Known(known.anonymous_ids, email, phone)
    plan.merges.append(previous)


def _match_traits(
    plan: _Plan, event: Identify, profile: str, known: bool, policy: IdentityPolicy
) -> None:
    traits = event.properties.traits
    kinds: tuple[tuple[IdentifierKind, str | None], ...] = (
        ("email", traits.email),
        ("phone", traits.phone),
    )
    for kind, raw in kinds:
        if raw is None or normalise(kind, raw) in policy.blocked or usable(raw, policy) is None:
            continue
        hashed = hash_identifier(kind, raw, policy.salt)
        owner = plan.owner(hashed)
        if owner is not None:
            owner = canonical(plan.identity, owner)
            if owner != profile:
                # Never merged on a matching identifier: only a link or an alias merges.
                plan.decide(profile, "identity_conflict", kind, owner)
            continue
        if not known:
            continue  # an anonymous profile's address is not indexed: it owns nothing
        current = plan.known(profile)
        previous = current.email if kind == "email" else current.phone
        if previous is not None and plan.owner(previous) == profile:
            plan.matching[previous] = None  # the customer's old address is free again
        plan.matching[hashed] = profile
        if kind == "email":
            plan.customers[profile] = Known(current.anonymous_ids, hashed, current.phone)
        else:
            plan.customers[profile] = Known(current.anonymous_ids, current.email, hashed)


def record(identity: IdentityMap, resolution: Resolution) -> None:
    """Write a resolution's entries into the map (in place: its owner's copy)."""
    identity.devices.update(resolution.devices)
    for customer, known in resolution.customers.items():
        if known is None:
            identity.customers.pop(customer, None)
        else:
            identity.customers[customer] = known
    identity.aliases.update(resolution.aliases)
    for hashed, owner in resolution.matching.items():
        if owner is None:
            identity.matching.pop(hashed, None)
        else:
            identity.matching[hashed] = owner


def keep_identity_decisions(
    state: CustomerState, decisions: list[Decision], out: list[Decision]
) -> None:
    """Put identity decisions before what the engine decided for the same input
    (`out`), and keep them in the state for "why (not)?" as the engine keeps its
    own; a merge's decision is there already (`absorb`)."""
    if not decisions:
        return
    out[:0] = decisions
    state.recent_decisions.extend(d for d in decisions if d.reason != "identity_merged")
    del state.recent_decisions[:-RECENT_DECISIONS]


# ------------------------------------------------------------------------ merge


def last_seen(state: CustomerState) -> datetime | None:
    return max(state.last_activity.values(), default=None)


def is_idle(state: CustomerState, now: datetime, policy: IdentityPolicy) -> bool:
    seen = last_seen(state)
    return seen is not None and now - seen > policy.idle_window


def absorb(
    source: CustomerState | None,
    target: CustomerState,
    now: datetime,
    policy: IdentityPolicy,
    event_id: str | None = None,
) -> tuple[CustomerState, Decision | None]:
    """Fold `source` (a retired profile) into `target`: the merged state and the
    decision that records it. An idle anonymous profile is dropped instead, and a
    profile merged before changes nothing."""
    if source is None:
        return target, None
    if source.customer_id in target.merged_profiles:
        return target, None
    identifier = (
        "anonymous_id" if source.customer_id.startswith(ANONYMOUS_PREFIX) else "customer_id"
    )
    if identifier == "anonymous_id" and is_idle(source, now, policy):
        decision = identity_decision(
            target.customer_id, "anonymous_idle", identifier, source.customer_id, now, event_id
        )
        return target, decision
    merged = merge_profiles(source, target, policy.max_anonymous_ids)
    carried = sum(
        _source_wins(journey, target.journeys.get(slot))
        for slot, journey in source.journeys.items()
    )
    decision = identity_decision(
        target.customer_id, "identity_merged", identifier, source.customer_id, now, event_id
    ).model_copy(update={"journeys_carried": carried})
    merged.recent_decisions.append(decision)
    del merged.recent_decisions[:-RECENT_DECISIONS]
    return merged, decision


def merge_profiles(
    source: CustomerState, target: CustomerState, remembered: int = 100
) -> CustomerState:
    """One customer from two profiles: `target` (the known customer) keeps its id and
    wins on traits; everything that counts takes both histories. Neither input is
    changed. `remembered` bounds the list of merged profile keys."""
    if source.customer_id in target.merged_profiles:
        return target.model_copy(deep=True)
    a = source.model_copy(deep=True)
    b = target.model_copy(deep=True)
    email, bounced = (b.email, b.email_bounced) if b.email is not None else (
        a.email, a.email_bounced
    )
    merged = CustomerState(
        customer_id=b.customer_id,
        email=email,
        email_bounced=bounced,
        phone=b.phone if b.phone is not None else a.phone,
        timezone=b.timezone if b.timezone is not None else a.timezone,
        locale=b.locale if b.locale is not None else a.locale,
        traits={**a.traits, **b.traits},
        # The source's devices last: `recipient` pushes to the newest one, and the
        # device that just identified is the one in use.
        push_tokens={**{t: p for t, p in b.push_tokens.items() if t not in a.push_tokens},
                     **a.push_tokens},
        carts=_merge_carts(a.carts, b.carts),
        last_activity=_latest(a.last_activity, b.last_activity),
        order_count=a.order_count + b.order_count,
        revenue=round(a.revenue + b.revenue, 2),
        journeys=_merge_journeys(a, b),
        rule_versions={**a.rule_versions, **b.rule_versions},
        last_started=_latest(a.last_started, b.last_started),
        once_started=list(dict.fromkeys(b.once_started + a.once_started)),
        occurrences=_merge_occurrences(a.occurrences, b.occurrences),
        sent_log=list(heapq.merge(a.sent_log, b.sent_log, key=lambda r: r.at)),
        engagement=_merge_engagement(a.engagement, b.engagement),
        # Both profiles' messages, so feedback for one sent before the link is known.
        messages=merge_messages(a.messages, b.messages),
        # A bounced address blocks only while it is the current one.
        bounced={**a.bounced, **b.bounced},
        # The target's last: `remember_event` trims from the front.
        recent_event_ids=_recent_ids(a.recent_event_ids, b.recent_event_ids),
        recent_decisions=sorted(
            a.recent_decisions + b.recent_decisions, key=lambda d: d.decided_at
        )[-RECENT_DECISIONS:],
        merged_profiles=(b.merged_profiles + a.merged_profiles + [a.customer_id])[-remembered:],
        touches=sorted(a.touches + b.touches, key=lambda t: (t.at, t.action_id)),
    )
    merged.consents, merged.consented_at = _merge_consents(a, b)
    return merged


def _merge_consents(
    a: CustomerState, b: CustomerState
) -> tuple[dict[str, bool], dict[str, datetime]]:
    """Per channel and category, the more recent decision; without times, the target's."""
    consents = dict(b.consents)
    times = dict(b.consented_at)
    for slot, granted in a.consents.items():
        at = a.consented_at.get(slot)
        theirs = b.consented_at.get(slot)
        if slot not in b.consents or (at is not None and (theirs is None or at > theirs)):
            consents[slot] = granted
            if at is not None:
                times[slot] = at
    return consents, times


def _merge_carts(a: dict[str, Cart], b: dict[str, Cart]) -> dict[str, Cart]:
    """The union; a cart id in both gets the lines of both, the later update's first."""
    carts = {**a, **b}
    for cart_id in a.keys() & b.keys():
        older, newer = sorted((a[cart_id], b[cart_id]), key=lambda c: c.updated_at)
        lines: dict[str, CartLine] = {**older.lines, **newer.lines}
        carts[cart_id] = Cart(lines=lines, updated_at=newer.updated_at)
    return carts


def _latest(a: dict[str, datetime], b: dict[str, datetime]) -> dict[str, datetime]:
    merged = dict(b)
    for name, at in a.items():
        if name not in merged or at > merged[name]:
            merged[name] = at
    return merged


def _merge_journeys(a: CustomerState, b: CustomerState) -> dict[str, Journey]:
    """The union. A (rule, key) running in both is one journey: the one further along
    (the target's on a tie), so one cart never gets two reminders. A journey from the
    source keeps its origin, and so its action ids."""
    journeys = dict(b.journeys)
    for slot, journey in a.journeys.items():
        if journey.origin is None:
            journey.origin = a.customer_id
        if _source_wins(journey, journeys.get(slot)):
            journeys[slot] = journey
    return journeys


def _source_wins(theirs: Journey, mine: Journey | None) -> bool:
    """Whether the merged profile's journey replaces the target's of the same slot."""
    return mine is None or theirs.next_step > mine.next_step


def _merge_occurrences(
    a: dict[str, list[datetime]], b: dict[str, list[datetime]]
) -> dict[str, list[datetime]]:
    merged = {slot: sorted(a.get(slot, []) + b.get(slot, [])) for slot in a.keys() | b.keys()}
    # In the order of their last occurrence, as the engine keeps them (oldest first).
    return dict(sorted(merged.items(), key=lambda item: (item[1][-1], item[0])))


def _merge_engagement(
    a: dict[str, Engagement], b: dict[str, Engagement]
) -> dict[str, Engagement]:
    merged = {ch: Engagement(sent=e.sent, engaged=e.engaged) for ch, e in b.items()}
    for channel, engagement in a.items():
        mine = merged.setdefault(channel, Engagement())
        mine.sent += engagement.sent
        mine.engaged += engagement.engaged
    return merged


def _recent_ids(a: list[str], b: list[str]) -> list[str]:
    ids = list(dict.fromkeys(a + b))
    # Twice the usual bound: both profiles' redeliveries stay recognised until the
    # next event trims the list to its own bound.
    return ids[-2 * RECENT_EVENT_IDS:]
