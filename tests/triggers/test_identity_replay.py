"""Identity in replay: the reproduced defect of issue 11 and the replay's merges."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from schemas.events import Event
from tests.factories import (
    CART_RULE,
    T0,
    cart_add,
    consent,
    device,
    identify,
    minutes,
    order,
    ruleset,
)
from triggers.engine import EnginePolicy
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
