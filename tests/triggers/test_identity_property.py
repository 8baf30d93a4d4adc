"""The identity invariant (hypothesis): after a link, replay acts as if every event had
carried the resolved customer id from the start.

One person, anonymous id `a-1` and customer id `c-9`. Before the first link the log
has anonymous events and known events that touch only the email channel (so the
anonymous profile and the one-profile counterfactual act alike before the link:
before it, no engine can know they are one person). The link is an identify with
both ids or an alias; after it, events carry either id or both, and links repeat.
The actions from the link on must be the counterfactual's, with one difference by
design: a journey started anonymously keeps the action ids it started with.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.actions import Action, make_action_id
from schemas.events import Event, event_from_dict
from tests.factories import T0, event_dict, ruleset
from triggers.engine import EnginePolicy
from triggers.replay import Replayer, ReplayOutput

CART_PUSH = {
    "id": "cart_push",
    "category": "marketing",
    "trigger": {"event": "cart.item_added", "key": "properties.cart_id"},
    "cancel_on": [
        {"event": "order.completed", "when": "event.properties.cart_id == journey.key",
         "reason": "purchased"},
        {"event": "cart.item_removed",
         "when": "event.properties.cart_id == journey.key && !(journey.key in customer.carts)",
         "reason": "cart_emptied"},
    ],
    "steps": [
        {"after": "30m", "channels": ["push"], "template": "cart_1"},
        {"after": "24h", "channels": ["push"], "template": "cart_2"},
    ],
}
BROWSE_PUSH = {
    "id": "browse_push",
    "category": "marketing",
    "trigger": {"event": "product.viewed", "key": "properties.product_id",
                "repeat": {"count": 3, "within": "24h"}},
    "reentry": "2d",
    "steps": [{"after": "1h", "channels": ["push"], "template": "browse"}],
}
CONFIRMATION = {
    "id": "confirmation",
    "category": "transactional",
    "trigger": {"event": "order.completed", "key": "properties.order_id"},
    "steps": [{"after": "0s", "channels": ["push", "email"], "template": "confirmation"}],
}
# Caps tight enough to bind, so that the merged send history matters.
RULES = ruleset(CART_PUSH, BROWSE_PUSH, CONFIRMATION, policy={
    "quiet_hours": None, "caps": {"per_channel": {"limit": 2, "window": "24h"}},
})
POLICY = EnginePolicy()
ANONYMOUS, CUSTOMER = "a-1", "c-9"

PROPERTIES: dict[str, tuple[str, dict[str, Any]]] = {
    "device": ("device.registered", {"push_token": "tok-1", "platform": "ios"}),
    "device_2": ("device.registered", {"push_token": "tok-2", "platform": "android"}),
    "push_yes": ("consent.updated", {"channel": "push", "category": "marketing",
                                     "granted": True}),
    "push_no": ("consent.updated", {"channel": "push", "category": "marketing",
                                    "granted": False}),
    "email_yes": ("consent.updated", {"channel": "email", "category": "marketing",
                                      "granted": True}),
    "add_k": ("cart.item_added", {"cart_id": "K", "product_id": "p", "price": 9.0}),
    "add_j": ("cart.item_added", {"cart_id": "J", "product_id": "q", "price": 4.0}),
    "remove_k": ("cart.item_removed", {"cart_id": "K", "product_id": "p"}),
    "view": ("product.viewed", {"product_id": "p"}),
    "order_k": ("order.completed", {"order_id": "o", "cart_id": "K", "value": 9.0,
                                    "currency": "KRW"}),
    "identify": ("identify", {"traits": {"email": "kim@example.com"}}),
}
# Views weigh more: a repeat count needs three of them close together.
ANONYMOUS_BEFORE = [k for k in PROPERTIES if k not in ("identify", "email_yes")] + ["view"] * 3
KNOWN_BEFORE = ["identify", "email_yes"]
LINKS = ["link_identify", "alias"]
GAPS = st.sampled_from([1, 10, 40, 180, 1500]).map(lambda m: timedelta(minutes=m))

Step = tuple[timedelta, str, str]  # gap, kind, who: "anon" | "known" | "both"


def before_link() -> st.SearchStrategy[Step]:
    return st.one_of(
        st.tuples(GAPS, st.sampled_from(ANONYMOUS_BEFORE), st.just("anon")),
        st.tuples(GAPS, st.sampled_from(KNOWN_BEFORE), st.just("known")),
    )


def after_link() -> st.SearchStrategy[Step]:
    kinds = st.sampled_from([*PROPERTIES, *LINKS, "view", "view"])
    return st.tuples(GAPS, kinds, st.sampled_from(["anon", "known", "both"]))


def build(steps: list[Step]) -> list[Event]:
    """Events at strictly increasing times (ties would make arrival order matter)."""
    events = []
    at = T0
    for n, (gap, kind, who) in enumerate(steps):
        at += gap
        ids: dict[str, Any] = {
            "customer_id": CUSTOMER if who in ("known", "both") else None,
            "event_id": f"e-{n}",
            "at": at,
        }
        if who in ("anon", "both"):
            ids["anonymous_id"] = ANONYMOUS
        if kind == "link_identify":
            data = event_dict("identify", {}, **{**ids, "customer_id": CUSTOMER,
                                                 "anonymous_id": ANONYMOUS})
        elif kind == "alias":
            data = event_dict("alias", {"previous_id": ANONYMOUS},
                              **{**ids, "customer_id": CUSTOMER, "anonymous_id": None})
        else:
            type_, properties = PROPERTIES[kind]
            if kind == "order_k":
                properties = {**properties, "order_id": f"o-{n}"}
            data = event_dict(type_, properties, **ids)
        events.append(event_from_dict(data))
    return events


def as_customer(event: Event) -> Event:
    """The same event carrying the resolved customer id from the start."""
    return event.model_copy(update={"customer_id": CUSTOMER, "anonymous_id": None})


def actions_from(log: list[Event], first: int) -> list[Action]:
    """The actions the replay takes from `log[first]` on (timers due by then fired)."""
    replayer = Replayer(RULES, POLICY)
    for event in log[:first]:
        replayer.feed(event)
    replayer.finish(log[first].occurred_at)
    outputs: list[ReplayOutput] = []
    for event in log[first:]:
        outputs += replayer.feed(event)
    outputs += replayer.finish(log[-1].occurred_at + timedelta(days=3))
    return [a for o in outputs for a in o.actions]


def comparable(action: Action) -> dict[str, Any]:
    return action.model_dump(exclude={"action_id"})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(before_link(), max_size=8),
    st.tuples(GAPS, st.sampled_from(LINKS), st.just("both")),
    st.lists(after_link(), max_size=8),
)
def test_after_a_link_the_actions_are_those_of_one_profile_from_the_start(
    before: list[Step], link: Step, after: list[Step]
) -> None:
    log = build([*before, link, *after])
    first = len(before)
    live = actions_from(log, first)
    counterfactual = actions_from([as_customer(e) for e in log], first)
    assert [comparable(a) for a in live] == [comparable(a) for a in counterfactual]
    anonymous_starts = {e.event_id for e in log[:first] if e.customer_id is None}
    for mine, theirs in zip(live, counterfactual, strict=True):
        assert mine.customer_id == CUSTOMER
        expected = theirs.action_id
        for started in anonymous_starts:
            if theirs.action_id == make_action_id(mine.rule_id, CUSTOMER, started, mine.step):
                # Started anonymously: the id the anonymous profile would have given it.
                expected = make_action_id(mine.rule_id, "anon:a-1", started, mine.step)
        assert mine.action_id == expected
