"""The live identity protocol (`triggers.linking`), key by key over an in-memory topic.

The property: for random logs of anonymous and known events, links, aliases and
shared devices, the keys acting on their own (`KeyedNetwork`) take exactly the
actions, and make the identity decisions, that replay takes with the whole identity
map in one place (`triggers.identity`, `Replayer`).
"""

from __future__ import annotations

from collections import Counter, deque
from datetime import timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.actions import Action
from schemas.decisions import Decision
from schemas.events import Event, event_from_dict
from tests.factories import T0, cart_add, event_dict, identify, minutes
from tests.triggers.keyed_network import KeyedNetwork
from tests.triggers.test_identity_property import PROPERTIES, RULES
from tests.triggers.test_identity_replay import RULES as CART_RULES
from tests.triggers.test_identity_replay import anonymous_then_known_order
from triggers.engine import EnginePolicy
from triggers.identity import IdentityPolicy, hash_identifier
from triggers.linking import IdentityEntry, process, route_key
from triggers.replay import Replayer

POLICY = EnginePolicy()
ANONYMOUS_IDS = ["a-1", "a-2"]
CUSTOMERS = ["c-9", "c-7"]
GAPS = st.sampled_from([1, 10, 40, 180, 1500]).map(lambda m: timedelta(minutes=m))
KINDS = [*PROPERTIES, "identify_other", "link", "alias_anonymous", "alias_customer", "view"]
WHO = st.tuples(
    st.sampled_from([None, *ANONYMOUS_IDS]), st.sampled_from([None, None, *CUSTOMERS])
)


def build(steps: list[tuple[timedelta, str, tuple[str | None, str | None]]]) -> list[Event]:
    events = []
    at = T0
    for n, (gap, kind, (anonymous, customer)) in enumerate(steps):
        at += gap
        if anonymous is None and customer is None:
            anonymous = "a-1"
        ids: dict[str, Any] = {"customer_id": customer, "anonymous_id": anonymous,
                               "event_id": f"e-{n}", "at": at}
        if kind == "link":
            data = event_dict("identify", {}, **{**ids, "customer_id": customer or "c-9",
                                                 "anonymous_id": anonymous or "a-1"})
        elif kind == "identify_other":
            data = event_dict("identify", {"traits": {"email": "lee@example.com"}}, **ids)
        elif kind.startswith("alias"):
            target = customer or "c-9"
            previous = (anonymous or "a-2") if kind == "alias_anonymous" else (
                "c-7" if target == "c-9" else "c-9")
            data = event_dict("alias", {"previous_id": previous},
                              **{**ids, "customer_id": target, "anonymous_id": None})
        else:
            type_, properties = PROPERTIES[kind]
            if kind == "order_k":
                properties = {**properties, "order_id": f"o-{n}"}
            data = event_dict(type_, properties, **ids)
        events.append(event_from_dict(data))
    return events


def replayed(log: list[Event], until_days: int = 3) -> tuple[list[Action], list[Decision]]:
    replayer = Replayer(RULES, POLICY)
    outputs = list(replayer.run(log, until=log[-1].occurred_at + timedelta(days=until_days)))
    return [a for o in outputs for a in o.actions], [d for o in outputs for d in o.decisions]


def keyed(log: list[Event], duplicate: bool = False, until_days: int = 3) -> KeyedNetwork:
    network = KeyedNetwork(RULES, POLICY, duplicate=duplicate)
    for event in log:
        network.publish(event)
    network.fire_until(log[-1].occurred_at + timedelta(days=until_days))
    return network


def identity_of(decisions: list[Decision]) -> Counter[tuple[str, str | None, str | None]]:
    return Counter((d.customer_id, d.reason, d.profile) for d in decisions
                   if d.outcome == "identity")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(GAPS, st.sampled_from(KINDS), WHO), min_size=1, max_size=14))
def test_keys_acting_alone_act_as_replay_with_the_whole_map(
    steps: list[tuple[timedelta, str, tuple[str | None, str | None]]],
) -> None:
    log = build(steps)
    actions, decisions = replayed(log)
    network = keyed(log)
    assert [a.model_dump() for a in network.actions] == [a.model_dump() for a in actions]
    assert identity_of(network.decisions) == identity_of(decisions)
    assert Counter(d.outcome for d in network.decisions) == Counter(d.outcome for d in decisions)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(GAPS, st.sampled_from(KINDS), WHO), min_size=1, max_size=10))
def test_every_message_delivered_twice_changes_nothing(
    steps: list[tuple[timedelta, str, tuple[str | None, str | None]]],
) -> None:
    log = build(steps)
    once, twice = keyed(log), keyed(log, duplicate=True)
    assert [a.model_dump() for a in twice.actions] == [a.model_dump() for a in once.actions]
    assert identity_of(twice.decisions) == identity_of(once.decisions)
    assert twice.states.keys() == once.states.keys()


def test_the_order_after_a_link_cancels_the_anonymous_cart_journey() -> None:
    network = KeyedNetwork(CART_RULES, POLICY)
    for event in anonymous_then_known_order():
        network.publish(event)
    network.fire_until(T0 + timedelta(days=2))
    assert [(a.rule_id, a.customer_id, a.channel) for a in network.actions] == [
        ("order_confirmation", "c-9", "push")
    ]
    assert "anon:a-1" not in network.states
    assert network.entries["anon:a-1"].linked_to == "c-9"
    assert network.entries["c-9"].anonymous_ids == ["a-1"]
    assert network.states["c-9"].merged_profiles == ["anon:a-1"]


def test_a_customer_parks_its_inputs_until_the_link_is_answered() -> None:
    """The order is published before the merge comes back: it waits for it."""
    network = KeyedNetwork(CART_RULES, POLICY)
    *before, link, buy = anonymous_then_known_order()
    for event in before:
        network.publish(event)
    # Deliver the link request's answer only after the order reached c-9.
    done = process("c-9", None, None, link, link.occurred_at, network.policy, CART_RULES, POLICY)
    assert done.outputs == [] and done.entry.pending == [f"{link.event_id}/anonymous_id"]
    [(target, request)] = done.sends
    assert target == "anon:a-1" and request.kind == "link_request"
    parked = process("c-9", done.entry, done.state, buy, buy.occurred_at, network.policy,
                     CART_RULES, POLICY)
    assert parked.outputs == [] and len(parked.entry.parked) == 2
    network.entries["c-9"] = parked.entry
    network._drain(deque([(target, request)]), buy.occurred_at)
    network.fire_until(T0 + timedelta(days=2))
    assert [(a.rule_id, a.customer_id) for a in network.actions] == [
        ("order_confirmation", "c-9")
    ]
    assert network.entries["c-9"].parked == [] and network.entries["c-9"].pending == []


def test_anonymous_events_after_the_link_are_forwarded_to_the_customer() -> None:
    network = KeyedNetwork(CART_RULES, POLICY)
    for event in anonymous_then_known_order()[:4]:
        network.publish(event)
    late = cart_add("L", customer_id=None, anonymous_id="a-1", at=T0 + minutes(6))
    assert route_key(late, network.policy) == "anon:a-1"
    network.publish(late)
    assert "L" in network.states["c-9"].carts and "anon:a-1" not in network.states
    assert network.delivered["forward"] == 1


def test_a_shared_device_starts_a_new_anonymous_profile_and_moves_no_history() -> None:
    network = KeyedNetwork(CART_RULES, POLICY)
    network.publish(cart_add("K", customer_id=None, anonymous_id="a-1", at=T0))
    network.publish(identify(None, customer_id="c-9", anonymous_id="a-1", at=T0 + minutes(1)))
    network.publish(identify(None, customer_id="c-7", anonymous_id="a-1", at=T0 + minutes(2)))
    network.publish(cart_add("J", customer_id=None, anonymous_id="a-1", at=T0 + minutes(3)))
    assert network.entries["anon:a-1"].shared and network.entries["anon:a-1"].generation == 1
    assert network.entries["c-9"].anonymous_ids == []
    assert network.entries["c-7"].foreign == ["a-1"]
    assert set(network.states["c-9"].carts) == {"K"} and network.states["c-7"].carts == {}
    assert set(network.states["anon:a-1#1"].carts) == {"J"}
    assert identity_of(network.decisions) == Counter({
        ("c-9", "identity_merged", "anon:a-1"): 1, ("c-7", "shared_device", "c-9"): 1,
    })


def test_an_alias_retires_the_previous_customer_and_forwards_its_later_events() -> None:
    network = KeyedNetwork(CART_RULES, POLICY)
    network.publish(cart_add("K", customer_id="c-7", at=T0))
    network.publish(identify(None, customer_id="c-7", anonymous_id="a-2", at=T0 + minutes(1)))
    alias = event_from_dict(event_dict("alias", {"previous_id": "c-7"}, customer_id="c-9",
                                       at=T0 + minutes(2)))
    network.publish(alias)
    network.publish(cart_add("J", customer_id="c-7", at=T0 + minutes(3)))
    network.publish(cart_add("M", customer_id=None, anonymous_id="a-2", at=T0 + minutes(4)))
    assert "c-7" not in network.states and network.entries["c-7"].retired_into == "c-9"
    assert set(network.states["c-9"].carts) == {"K", "J", "M"}
    assert network.entries["anon:a-2"].linked_to == "c-9"
    assert network.entries["c-9"].anonymous_ids == ["a-2"]


def test_an_email_of_another_customer_is_a_conflict_not_a_merge() -> None:
    network = KeyedNetwork(CART_RULES, POLICY)
    network.publish(identify("kim@example.com", customer_id="c-1", at=T0))
    network.publish(identify("Kim@Example.COM", customer_id="c-2", at=T0 + minutes(1)))
    hashed = hash_identifier("email", "kim@example.com", "")
    assert network.entries[hashed].owner == "c-1" and network.entries["c-1"].email == hashed
    assert network.entries.get("c-2", IdentityEntry()).email is None
    assert set(network.states) == {"c-1", "c-2"}
    [conflict] = [d for d in network.decisions if d.outcome == "identity"]
    assert (conflict.customer_id, conflict.reason, conflict.profile) == (
        "c-2", "identity_conflict", "c-1")
    assert network.states["c-2"].recent_decisions == [conflict]
    # No raw address in any key.
    assert not any("kim" in key.lower() for key in network.entries)


def test_a_customer_keeps_a_bounded_list_of_anonymous_ids() -> None:
    network = KeyedNetwork(CART_RULES, POLICY, policy=IdentityPolicy(max_anonymous_ids=2))
    for n in range(3):
        network.publish(identify(None, customer_id="c-9", anonymous_id=f"a-{n}",
                                 at=T0 + minutes(n)))
    assert network.entries["c-9"].anonymous_ids == ["a-1", "a-2"]
    assert network.entries["anon:a-0"].linked_to is None
    assert network.entries["anon:a-0"].generation == 1
    network.publish(cart_add("K", customer_id=None, anonymous_id="a-0", at=T0 + minutes(5)))
    assert set(network.states["anon:a-0#1"].carts) == {"K"}


def test_blocked_ids_route_like_no_id() -> None:
    policy = IdentityPolicy()
    event = cart_add("K", customer_id="unknown", anonymous_id="a-1", at=T0)
    assert route_key(event, policy) == "anon:a-1"
