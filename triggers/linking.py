"""Identity in the live pipeline: what each key does when profiles link.

`triggers.identity` resolves an event against the whole identity map at once,
which a replay holds in one dict. A live worker owns only some keys, so here the
same model runs as messages between keys on the per-customer input topic, each
key changing only its own state and its own `IdentityEntry` (both tables are
partitioned by that key):

- An event with a customer id goes to the customer's key. If it carries an
  anonymous id (or, an alias, a previous id) the customer does not hold yet, the
  customer asks that id's key (`LinkRequest`) and parks its inputs meanwhile.
- The anonymous id's key (`anon:<id>`) decides, as `triggers.identity` does:
  it links and sends its profile's whole state back (`Deliver`), or, already
  linked to another customer, becomes a shared device. A previous id that is a
  known customer retires that customer into the requester the same way.
- The customer absorbs what it was sent (`triggers.identity.absorb`: once, as
  the merged profile is remembered), then applies the parked inputs in order, the
  link event first. So everything the customer saw after the link, the engine
  saw after the merge, as in replay.
- An event with only an anonymous id goes to `anon:<id>`: applied to the
  anonymous profile there, or forwarded to the customer it is linked to.
- Email and phone hashes have keys of their own (`email:<hash>`), which hold
  their owner and answer a claim by another customer with `identity_conflict`.

Every step is idempotent, so an input processed twice (after a crash, before its
key's writes) sends the same messages again and changes nothing the second time.
Pure: no I/O and no clock; the stream shell (`streams.customers`) delivers the
messages and writes the entries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Literal, TypeAlias

from pydantic import AwareDatetime, BaseModel, Field, TypeAdapter

from schemas.decisions import Decision
from schemas.events import Alias, Event, Identify
from triggers.engine import EnginePolicy, Output, TimerFired, evolve, new_state
from triggers.identity import (
    ANONYMOUS_PREFIX,
    IdentifierKind,
    IdentityPolicy,
    absorb,
    anonymous_profile,
    hash_identifier,
    identity_decision,
    keep_identity_decisions,
    normalise,
    usable,
)
from triggers.ruleset import RuleSet
from triggers.state import CustomerState

# A customer remembers this many shared devices it is not the owner of (asking their
# key again after that costs a round trip, never a wrong answer).
MAX_FOREIGN = 100


class Parked(BaseModel):
    """An input of a customer waiting for its links to be answered."""

    event: Event | None = None
    timer_due_at: AwareDatetime | None = None
    # Its identity is settled (the link event itself, a forwarded event): apply it.
    resolved: bool = False


class IdentityEntry(BaseModel):
    """What one key holds of the identity map; one model for the three kinds of key."""

    # anon:<id>: the customer it is linked to, its profile generation (see
    # `triggers.identity.Device`), and whether it was seen with two customers.
    linked_to: str | None = None
    generation: int = 0
    shared: bool = False
    # A customer: its linked anonymous ids (oldest first), shared devices seen with
    # it, the email and phone hashes it owns, and the customer an alias merged it into.
    anonymous_ids: list[str] = Field(default_factory=list)
    foreign: list[str] = Field(default_factory=list)
    email: str | None = None
    phone: str | None = None
    retired_into: str | None = None
    # Links asked for and not answered yet, and the inputs waiting for them.
    pending: list[str] = Field(default_factory=list)
    parked: list[Parked] = Field(default_factory=list)
    # email:<hash> / phone:<hash>: the customer that owns it.
    owner: str | None = None


class LinkRequest(BaseModel):
    """To `anon:<id>` (or an alias's previous id): link yourself to `requester`."""

    kind: Literal["link_request"] = "link_request"
    requester: str
    request: str
    event_id: str
    # "anonymous_id": the key is a device; "previous_id": an alias's previous id,
    # a customer if it is known as one, else a device.
    identifier: Literal["anonymous_id", "previous_id"]


class Deliver(BaseModel):
    """The answer to a `LinkRequest`: profiles to absorb and ids to hold."""

    kind: Literal["deliver"] = "deliver"
    request: str
    event_id: str
    sources: list[CustomerState] = Field(default_factory=list)
    decisions: list[Decision] = Field(default_factory=list)
    attach: list[str] = Field(default_factory=list)
    foreign: str | None = None
    # A customer retired into the receiver by an alias: what it held.
    retired: str | None = None
    anonymous_ids: list[str] = Field(default_factory=list)
    email: str | None = None
    phone: str | None = None


class Forward(BaseModel):
    """An event for the receiving key's profile (a linked device's, a retired customer's)."""

    kind: Literal["forward"] = "forward"
    event: Event


class Retire(BaseModel):
    """To a later generation's anonymous profile: merge into `into`."""

    kind: Literal["retire"] = "retire"
    into: str
    request: str
    event_id: str
    attach: list[str]


class Unlink(BaseModel):
    """To a device dropped from its customer's bounded list: start a new profile."""

    kind: Literal["unlink"] = "unlink"
    customer: str


class Drop(BaseModel):
    """To a customer: this device is shared now, and no longer yours."""

    kind: Literal["drop"] = "drop"
    anonymous_id: str


class Repoint(BaseModel):
    """To a device whose customer an alias retired: you belong to `customer` now."""

    kind: Literal["repoint"] = "repoint"
    retired: str
    customer: str


class Claim(BaseModel):
    """To an email or phone key: `customer` has this identifier."""

    kind: Literal["claim"] = "claim"
    customer: str
    identifier: IdentifierKind
    event_id: str
    # False for an anonymous profile, which owns nothing but can still conflict.
    index: bool = True
    # An alias retired this owner into `customer`: move the ownership.
    transfer_from: str | None = None


class Claimed(BaseModel):
    """To a customer: you own this hash now."""

    kind: Literal["claimed"] = "claimed"
    hashed: str


class Release(BaseModel):
    """To an email or phone key: `customer` no longer has it."""

    kind: Literal["release"] = "release"
    customer: str


class Note(BaseModel):
    """To a profile: identity decisions made elsewhere about it."""

    kind: Literal["note"] = "note"
    decisions: list[Decision]


IdentityMessage: TypeAlias = Annotated[
    LinkRequest | Deliver | Forward | Retire | Unlink | Drop | Repoint | Claim | Claimed
    | Release | Note,
    Field(discriminator="kind"),
]
message_adapter: TypeAdapter[IdentityMessage] = TypeAdapter(IdentityMessage)
KeyInput: TypeAlias = Event | TimerFired | IdentityMessage


def encode_message(message: IdentityMessage) -> bytes:
    """The message as it travels on the per-customer topic (`kind` included)."""
    return message_adapter.dump_json(message, exclude_none=True)


def decode_message(raw: bytes | dict[str, object]) -> IdentityMessage:
    if isinstance(raw, dict):
        return message_adapter.validate_python(raw)
    return message_adapter.validate_json(raw)
MESSAGE_TYPES = (
    LinkRequest, Deliver, Forward, Retire, Unlink, Drop, Repoint, Claim, Claimed, Release, Note
)


def event_of(item: KeyInput) -> Event | None:
    """The item, if it is an event from a producer (not a timer or a message)."""
    if isinstance(item, (TimerFired, *MESSAGE_TYPES)):
        return None
    return item


@dataclass(slots=True)
class EngineInput:
    """An input for the engine at this key, with identity decisions that go before it
    (`item` None: only the decisions, made elsewhere)."""

    item: Event | TimerFired | None
    decisions: list[Decision] = field(default_factory=list)


@dataclass(slots=True)
class KeyStep:
    """What one input does at its key: the key's entry and state after the identity
    work, the engine inputs to apply to that state in order, and messages to send."""

    entry: IdentityEntry
    state: CustomerState | None
    # The state was replaced (a merge) or retired (None): write it even unchanged.
    state_changed: bool = False
    inputs: list[EngineInput] = field(default_factory=list)
    sends: list[tuple[str, IdentityMessage]] = field(default_factory=list)


def device_key(anonymous_id: str) -> str:
    return ANONYMOUS_PREFIX + anonymous_id


def is_device_key(key: str) -> bool:
    return key.startswith(ANONYMOUS_PREFIX) and "#" not in key


def route_key(event: Event, policy: IdentityPolicy) -> str:
    """The key the ingest sends an event to: its customer, else its device (a blocked
    customer id counts as none)."""
    customer = usable(event.customer_id, policy)
    if customer is not None:
        return customer
    anonymous = usable(event.anonymous_id, policy)
    if anonymous is not None:
        return device_key(anonymous)
    return event.customer_id or device_key(event.anonymous_id or "")


def step(
    key: str,
    entry: IdentityEntry | None,
    state: CustomerState | None,
    item: KeyInput,
    now: datetime,
    policy: IdentityPolicy,
) -> KeyStep:
    """One input at `key`, whose identity entry and profile state are given (None:
    none yet); neither is changed, the result holds the new ones."""
    run = KeyStep(entry.model_copy(deep=True) if entry is not None else IdentityEntry(), state)
    _Step(key, run, now, policy).handle(item)
    return run


@dataclass(slots=True)
class Processed:
    """One input at a key, identity and engine both: what the shell writes and sends."""

    entry: IdentityEntry
    state: CustomerState | None
    state_changed: bool
    outputs: list[Output]
    sends: list[tuple[str, IdentityMessage]]


def process(
    key: str,
    entry: IdentityEntry | None,
    state: CustomerState | None,
    item: KeyInput,
    now: datetime,
    policy: IdentityPolicy,
    rules: RuleSet,
    engine: EnginePolicy,
    horizon: datetime | None = None,
) -> Processed:
    """`step`, then the engine (`evolve`) on the inputs it lets through, each after the
    identity decisions that go before it. `state` is changed in place, as by `evolve`."""
    keyed = step(key, entry, state, item, now, policy)
    state = keyed.state
    outputs: list[Output] = []
    for engine_input in keyed.inputs:
        if state is None:
            state = new_state(key)
        target = engine_input.item
        if target is None:
            out = Output()
        else:
            # A timer input evaluates the steps due by its own due time. The timer task
            # sent it only once the partition's horizon had passed that time, and timer
            # inputs move no watermark: on a partition without new events, the
            # watermark's horizon alone would evaluate nothing, and the customer, still
            # due, be sent again at every tick (a livelock under load, when the worker
            # never catches up). None: everything due by `now`.
            due_by = horizon
            if isinstance(target, TimerFired) and horizon is not None:
                due_by = max(horizon, target.due_at)
            out = evolve(state, target, now, rules, engine, due_by)
        keep_identity_decisions(state, engine_input.decisions, out.decisions)
        outputs.append(out)
    return Processed(keyed.entry, state, keyed.state_changed, outputs, keyed.sends)


class _Step:
    def __init__(self, key: str, run: KeyStep, now: datetime, policy: IdentityPolicy) -> None:
        self.key, self.run, self.now, self.policy = key, run, now, policy

    @property
    def entry(self) -> IdentityEntry:
        return self.run.entry

    def send(self, key: str, message: IdentityMessage) -> None:
        self.run.sends.append((key, message))

    def handle(self, item: KeyInput) -> None:
        match item:
            case TimerFired():
                self.timer(item)
            case LinkRequest():
                self.link_request(item)
            case Deliver():
                self.deliver(item)
            case Forward():
                # Its ids are resolved again here: a retired customer's event may carry
                # an anonymous id the customer it became does not hold yet.
                self.event(item.event, resolved=False)
            case Retire():
                self.retire(item)
            case Unlink():
                if self.entry.linked_to == item.customer:
                    self.entry.linked_to = None
                    self.entry.generation += 1
            case Drop():
                self.entry.anonymous_ids = [
                    a for a in self.entry.anonymous_ids if a != item.anonymous_id
                ]
            case Repoint():
                if self.entry.linked_to == item.retired:
                    self.entry.linked_to = item.customer
            case Claim():
                self.claim(item)
            case Claimed():
                self.claimed(item.hashed)
            case Release():
                if self.entry.owner == item.customer:
                    self.entry.owner = None
            case Note():
                self.note(item)
            case _:
                self.event(item, resolved=False)

    # ------------------------------------------------------------------ inputs

    def timer(self, timer: TimerFired) -> None:
        entry = self.entry
        if entry.retired_into is not None or entry.linked_to is not None:
            return  # its journeys went with its state
        if entry.pending:
            entry.parked.append(Parked(timer_due_at=timer.due_at, resolved=True))
            return
        self.run.inputs.append(EngineInput(timer))

    def event(self, event: Event, resolved: bool) -> None:
        entry, key = self.entry, self.key
        if entry.retired_into is not None:
            self.send(entry.retired_into, Forward(event=event))
            return
        if is_device_key(key) and not resolved:
            self.device_event(event)
            return
        if entry.pending:
            entry.parked.append(Parked(event=event, resolved=resolved))
            return
        if not resolved and not key.startswith(ANONYMOUS_PREFIX):
            requests = self.links_needed(event)
            if requests:
                entry.pending.extend(request for request, _, _ in requests)
                entry.parked.append(Parked(event=event, resolved=True))
                for request, target, identifier in requests:
                    self.send(target, LinkRequest(
                        requester=key, request=request, event_id=event.event_id,
                        identifier=identifier,
                    ))  # fmt: skip
                return
        self.apply(event)

    def device_event(self, event: Event) -> None:
        """An event of an anonymous id with no customer id, at the device's key."""
        entry = self.entry
        if entry.linked_to is not None:
            self.send(entry.linked_to, Forward(event=event))
        elif entry.generation > 0:
            self.send(anonymous_profile(self.key[len(ANONYMOUS_PREFIX):], entry.generation),
                      Forward(event=event))  # fmt: skip
        else:
            self.apply(event)

    def links_needed(
        self, event: Event
    ) -> list[tuple[str, str, Literal["anonymous_id", "previous_id"]]]:
        """(request id, key to ask, identifier) for each id this customer does not hold."""
        entry, policy = self.entry, self.policy
        known = set(entry.anonymous_ids) | set(entry.foreign)
        requests: list[tuple[str, str, Literal["anonymous_id", "previous_id"]]] = []
        if isinstance(event, Alias):
            previous = usable(event.properties.previous_id, policy)
            # Always asked: held as an anonymous id, it may be a customer's id since.
            if previous is not None and previous != self.key:
                requests.append((f"{event.event_id}/previous_id", previous, "previous_id"))
        anonymous = usable(event.anonymous_id, policy)
        if anonymous is not None and anonymous not in known:
            requests.append(
                (f"{event.event_id}/anonymous_id", device_key(anonymous), "anonymous_id")
            )
        return requests

    def apply(self, event: Event) -> None:
        self.run.inputs.append(EngineInput(event))
        if isinstance(event, Identify):
            self.claim_traits(event)

    def claim_traits(self, event: Identify) -> None:
        traits = event.properties.traits
        known = not self.key.startswith(ANONYMOUS_PREFIX)
        kinds: tuple[tuple[IdentifierKind, str | None], ...] = (
            ("email", traits.email), ("phone", traits.phone),
        )  # fmt: skip
        for kind, raw in kinds:
            if raw is None or usable(raw, self.policy) is None:
                continue
            if normalise(kind, raw) in self.policy.blocked:
                continue
            hashed = hash_identifier(kind, raw, self.policy.salt)
            held = self.entry.email if kind == "email" else self.entry.phone
            if hashed != held:
                self.send(hashed, Claim(
                    customer=self.key, identifier=kind, event_id=event.event_id, index=known,
                ))  # fmt: skip

    # ------------------------------------------------------------------ links

    def link_request(self, request: LinkRequest) -> None:
        entry, key = self.entry, self.key
        requester = request.requester
        if request.identifier == "previous_id" and not is_device_key(key):
            if key == requester or entry.retired_into == requester:
                self.answer(request)
            elif entry.retired_into is not None:
                # Merged by an earlier alias: the customer it became is the one to merge.
                self.send(entry.retired_into, request)
            elif self.run.state is not None or entry.anonymous_ids or entry.email or entry.phone:
                self.retire_customer(request)
            else:
                # Not a customer anyone knows: an anonymous id, as `triggers.identity` has it.
                as_device = request.model_copy(update={"identifier": "anonymous_id"})
                self.send(device_key(key), as_device)
            return
        anonymous_id = key[len(ANONYMOUS_PREFIX):]
        if entry.linked_to == requester:
            self.answer(request)  # linked already: the request asked again
        elif entry.linked_to is not None:
            # A shared device: it belongs to neither from now on, and no history moves.
            other = entry.linked_to
            entry.linked_to, entry.shared = None, True
            entry.generation += 1
            decision = identity_decision(
                requester, "shared_device", "anonymous_id", other, self.now, request.event_id
            )
            self.send(other, Drop(anonymous_id=anonymous_id))
            self.answer(request, decisions=[decision], foreign=anonymous_id)
        elif entry.shared:
            self.answer(request, foreign=anonymous_id)
        else:
            entry.linked_to = requester
            profile = anonymous_profile(anonymous_id, entry.generation)
            if profile == key:
                sources = self.take_state()
                self.answer(request, sources=sources, attach=[anonymous_id])
            else:
                self.send(profile, Retire(
                    into=requester, request=request.request, event_id=request.event_id,
                    attach=[anonymous_id],
                ))  # fmt: skip

    def retire_customer(self, request: LinkRequest) -> None:
        """An alias: this known customer becomes the requester for good."""
        entry, requester = self.entry, request.requester
        held = entry.model_copy()
        for anonymous_id in held.anonymous_ids:
            self.send(device_key(anonymous_id), Repoint(retired=self.key, customer=requester))
        sources = self.take_state()
        for parked in held.parked:
            if parked.event is not None:
                self.send(requester, Forward(event=parked.event))
        self.run.entry = IdentityEntry(retired_into=requester)
        self.send(requester, Deliver(
            request=request.request, event_id=request.event_id, sources=sources,
            retired=self.key, anonymous_ids=held.anonymous_ids, email=held.email,
            phone=held.phone,
        ))  # fmt: skip

    def retire(self, request: Retire) -> None:
        self.send(request.into, Deliver(
            request=request.request, event_id=request.event_id, sources=self.take_state(),
            attach=request.attach,
        ))  # fmt: skip

    def take_state(self) -> list[CustomerState]:
        state = self.run.state
        self.run.state, self.run.state_changed = None, True
        return [state] if state is not None else []

    def answer(
        self,
        request: LinkRequest,
        *,
        sources: list[CustomerState] | None = None,
        decisions: list[Decision] | None = None,
        attach: list[str] | None = None,
        foreign: str | None = None,
    ) -> None:
        self.send(request.requester, Deliver(
            request=request.request, event_id=request.event_id, sources=sources or [],
            decisions=decisions or [], attach=attach or [], foreign=foreign,
        ))  # fmt: skip

    def deliver(self, delivered: Deliver) -> None:
        entry, run = self.entry, self.run
        if entry.retired_into is not None:
            self.send(entry.retired_into, delivered)
            return
        decisions = self.unrecorded(delivered.decisions)
        for source in delivered.sources:
            target = run.state if run.state is not None else new_state(self.key)
            merged, decision = absorb(source, target, self.now, self.policy, delivered.event_id)
            run.state, run.state_changed = merged, True
            if decision is not None:
                decisions.append(decision)
        if delivered.retired is not None:
            self.adopt(delivered)
        self.attach(delivered.attach + delivered.anonymous_ids)
        if delivered.foreign is not None and delivered.foreign not in entry.foreign:
            entry.foreign = [*entry.foreign, delivered.foreign][-MAX_FOREIGN:]
        if decisions:
            run.inputs.append(EngineInput(None, decisions))
        if delivered.request in entry.pending:
            entry.pending.remove(delivered.request)
            if not entry.pending:
                self.unpark()

    def adopt(self, delivered: Deliver) -> None:
        """A retired customer's email and phone move to this one."""
        assert delivered.retired is not None
        for kind, hashed in (("email", delivered.email), ("phone", delivered.phone)):
            if hashed is None:
                continue
            self.send(hashed, Claim(
                customer=self.key, identifier=kind, event_id=delivered.event_id,
                transfer_from=delivered.retired,
            ))  # fmt: skip

    def attach(self, anonymous_ids: list[str]) -> None:
        """Hold these ids, dropping the oldest beyond the policy's bound."""
        entry = self.entry
        ids = list(dict.fromkeys(entry.anonymous_ids + anonymous_ids))
        overflow = len(ids) - self.policy.max_anonymous_ids
        if overflow > 0:
            for dropped in ids[:overflow]:
                self.send(device_key(dropped), Unlink(customer=self.key))
            ids = ids[overflow:]
        entry.anonymous_ids = ids

    def unpark(self) -> None:
        parked, self.entry.parked = self.entry.parked, []
        for index, waiting in enumerate(parked):
            if self.entry.pending:
                self.entry.parked.extend(parked[index:])
                return
            if waiting.timer_due_at is not None:
                self.run.inputs.append(EngineInput(TimerFired(due_at=waiting.timer_due_at)))
            elif waiting.event is not None:
                self.event(waiting.event, resolved=waiting.resolved)

    # --------------------------------------------------------------- matching

    def claim(self, claim: Claim) -> None:
        entry = self.entry
        if claim.transfer_from is not None:
            if entry.owner in (None, claim.transfer_from):
                entry.owner = claim.customer
                self.send(claim.customer, Claimed(hashed=self.key))
            return
        if entry.owner is None:
            if claim.index:
                entry.owner = claim.customer
                self.send(claim.customer, Claimed(hashed=self.key))
        elif entry.owner == claim.customer:
            self.send(claim.customer, Claimed(hashed=self.key))
        else:
            # Never merged on a matching identifier: only a link or an alias merges.
            decision = identity_decision(
                claim.customer, "identity_conflict", claim.identifier, entry.owner, self.now,
                claim.event_id,
            )
            self.send(claim.customer, Note(decisions=[decision]))

    def claimed(self, hashed: str) -> None:
        entry = self.entry
        if entry.retired_into is not None:
            return
        previous = entry.email if hashed.startswith("email:") else entry.phone
        if previous == hashed:
            return
        if previous is not None:
            self.send(previous, Release(customer=self.key))
        if hashed.startswith("email:"):
            entry.email = hashed
        else:
            entry.phone = hashed

    def note(self, note: Note) -> None:
        entry = self.entry
        target = entry.retired_into or entry.linked_to
        if target is not None:
            self.send(target, note)
            return
        decisions = self.unrecorded(note.decisions)
        if decisions:
            self.run.inputs.append(EngineInput(None, decisions))

    def unrecorded(self, decisions: list[Decision]) -> list[Decision]:
        """Those not in the state yet: a message delivered twice records them once."""
        state = self.run.state
        if state is None:
            return decisions
        return [d for d in decisions if d not in state.recent_decisions]
