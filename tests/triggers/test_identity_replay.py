"""Identity in replay: the reproduced defect of issue 11 and the replay's merges."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from schemas.actions import make_action_id
from schemas.events import Event, event_from_dict
from tests.factories import (
    CART_RULE,
    T0,
    cart_add,
    consent,
    device,
    event_dict,
    identify,
    minutes,
    order,
    ruleset,
)
from tests.triggers.keyed_network import KeyedNetwork
from triggers.engine import EnginePolicy
from triggers.identity import IdentityPolicy
from triggers.replay import Replayer, ReplayOutput

ORDER_CONFIRMATION = {
    "id": "order_confirmation",
    "category": "transactional",
    "trigger": {"event": "order.completed", "key": "properties.order_id"},
    "steps": [{"after": "0s", "channels": ["push", "email"], "template": "order_confirmation"}],
}
RULES = ruleset(CART_RULE, ORDER_CONFIRMATION)
POLICY = EnginePolicy()


def replay_log(log: list[Event], until_after: timedelta = timedelta(days=2)) -> list[ReplayOutput]:
    replayer = Replayer(RULES, POLICY)
    return list(replayer.run(log, until=log[-1].occurred_at + until_after))


def anonymous_then_known_order() -> list[Event]:
    """The defect's log: an anonymous visitor registers a push device, consents and
    adds cart K, then identifies as c-9 (the link) and orders cart K as c-9."""
    anon: dict[str, Any] = {"customer_id": None, "anonymous_id": "a-1"}
    return [
        device("tok-a1", at=T0, **anon),
        consent("push", at=T0, **anon),
        cart_add("K", at=T0 + minutes(1), **anon),
        identify("kim@example.com", customer_id="c-9", anonymous_id="a-1", at=T0 + minutes(5)),
        order("K", customer_id="c-9", at=T0 + minutes(10)),
    ]


def test_a_cart_bought_after_identifying_gets_no_abandonment_push() -> None:
    outputs = replay_log(anonymous_then_known_order())
    actions = [a for o in outputs for a in o.actions]
    # Before identity stitching: the confirmation went to c-9 by email, and 20
    # minutes later a cart reminder was pushed to `anon:a-1` for cart K, bought.
    assert [(a.rule_id, a.customer_id, a.channel) for a in actions] == [
        ("order_confirmation", "c-9", "push")
    ]
    assert actions[0].recipient.push_token == "tok-a1"
    cancelled = [
        d for o in outputs for d in o.decisions
        if d.rule_id == "cart_abandonment" and d.outcome == "cancelled"
    ]
    assert [(d.customer_id, d.journey_key, d.reason) for d in cancelled] == [
        ("c-9", "K", "purchased")
    ]


def test_a_redelivered_link_merges_once() -> None:
    log = anonymous_then_known_order()
    link = log[3]
    replayer = Replayer(RULES, POLICY)
    outputs = list(replayer.run([*log[:4], link, link, log[4]], until=T0 + timedelta(days=2)))
    assert replayer.stats.merges == 1 and replayer.stats.duplicates == 2
    assert replayer.stats.customers == 1
    assert "anon:a-1" not in replayer.states
    merged = replayer.states["c-9"]
    assert merged.merged_profiles == ["anon:a-1"] and merged.order_count == 1
    identity = [d for o in outputs for d in o.decisions if d.outcome == "identity"]
    assert [(d.reason, d.customer_id, d.profile) for d in identity] == [
        ("identity_merged", "c-9", "anon:a-1")
    ]
    # The cart journey started anonymously goes on in the customer's profile.
    assert identity[0].journeys_carried == 1
    assert replayer.stats.reasons[("identity", "identity_merged")] == 1


def test_a_journey_started_anonymously_keeps_its_action_ids_across_the_link() -> None:
    anon: dict[str, Any] = {"customer_id": None, "anonymous_id": "a-1"}
    added = cart_add("K", at=T0, **anon)
    log = [
        device("tok-a1", at=T0, **anon),
        consent("push", at=T0, **anon),
        consent("email", at=T0, **anon),
        added,
        # Step 1 (30 min) goes out anonymously, then the visitor identifies.
        identify("kim@example.com", customer_id="c-9", anonymous_id="a-1", at=T0 + minutes(45)),
    ]
    actions = [a for o in replay_log(log) for a in o.actions]
    assert [(a.step, a.customer_id, a.channel) for a in actions] == [
        (1, "anon:a-1", "push"), (2, "c-9", "email")
    ]
    assert [a.action_id for a in actions] == [
        make_action_id("cart_abandonment", "anon:a-1", added.event_id, step) for step in (1, 2)
    ]


def test_an_anonymous_profile_idle_past_the_window_is_not_merged() -> None:
    log = anonymous_then_known_order()
    late = [e.model_copy(update={"occurred_at": e.occurred_at + timedelta(days=40)})
            for e in log[3:]]
    policy = IdentityPolicy(idle_window=timedelta(days=30))
    replayer = Replayer(RULES, POLICY, identity_policy=policy)
    outputs = list(replayer.run([*log[:3], *late]))
    assert "anon:a-1" not in replayer.states and replayer.states["c-9"].carts == {}
    reasons = [d.reason for o in outputs for d in o.decisions if d.outcome == "identity"]
    assert reasons == ["anonymous_idle"]
    # Its journey is dropped with it: no reminder for the old cart, to anyone.
    assert [a.rule_id for o in outputs for a in o.actions] == [
        "cart_abandonment", "order_confirmation"
    ]


def test_a_conflicting_email_is_a_decision_and_a_count_not_a_merge() -> None:
    log = [
        identify("kim@example.com", customer_id="c-1", at=T0),
        identify("Kim@Example.com", customer_id="c-2", at=T0 + minutes(1)),
    ]
    replayer = Replayer(RULES, POLICY)
    outputs = list(replayer.run(log))
    assert set(replayer.states) == {"c-1", "c-2"} and replayer.stats.merges == 0
    assert replayer.stats.reasons[("identity", "identity_conflict")] == 1
    [decision] = [d for o in outputs for d in o.decisions]
    assert (decision.customer_id, decision.profile, decision.journey_key) == ("c-2", "c-1", "email")
    assert replayer.states["c-2"].recent_decisions == [decision]


def test_a_shared_devices_later_anonymous_events_go_to_its_new_anonymous_profile() -> None:
    """Found by the keyed identity property: replay put them in a profile keyed ""."""
    anon: dict[str, Any] = {"customer_id": None, "anonymous_id": "a-1"}
    log = [
        identify(None, customer_id="c-9", anonymous_id="a-1", at=T0),
        identify(None, customer_id="c-7", anonymous_id="a-1", at=T0 + minutes(1)),
        cart_add("K", at=T0 + minutes(2), **anon),
    ]
    replayer = Replayer(RULES, POLICY)
    list(replayer.run(log))
    assert set(replayer.states) == {"c-9", "c-7", "anon:a-1#1"}
    assert set(replayer.states["anon:a-1#1"].carts) == {"K"}


def anonymous_push_then_link() -> tuple[list[Event], Event]:
    """Step 1 of a cart journey is pushed to `anon:a-1`; then a-1 signs in as c-9; the
    open of that push comes back addressed to the anonymous profile (the action's)."""
    anon: dict[str, Any] = {"customer_id": None, "anonymous_id": "a-1"}
    log = [
        device("tok-a1", at=T0, **anon),
        consent("push", at=T0, **anon),
        cart_add("K", at=T0, **anon),
        identify("kim@example.com", customer_id="c-9", anonymous_id="a-1", at=T0 + minutes(45)),
    ]
    pushed = make_action_id("cart_abandonment", "anon:a-1", log[2].event_id, 1)
    opened = event_from_dict(event_dict(
        "message.opened", {"action_id": pushed}, customer_id="anon:a-1", channel="push",
        at=T0 + minutes(50),
    ))  # fmt: skip
    return log, opened


def test_feedback_on_a_message_sent_before_the_link_reaches_the_customer() -> None:
    log, opened = anonymous_push_then_link()
    replayer = Replayer(RULES, POLICY)
    list(replayer.run([*log, opened]))
    assert replayer.stats.unknown_actions == 0
    assert set(replayer.states) == {"c-9"}
    assert replayer.states["c-9"].engagement["push"].engaged == 1
    network = KeyedNetwork(RULES, POLICY)
    for event in [*log, opened]:
        network.publish(event)
    assert network.states["c-9"].engagement["push"].engaged == 1
    assert network.delivered["forward"] == 1
