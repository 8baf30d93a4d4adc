"""The pure engine, driven with in-memory inputs and an explicit clock."""

from __future__ import annotations

from datetime import datetime, timedelta

from schemas.actions import Action
from schemas.decisions import Decision
from schemas.rules import rules_from_data
from tests.factories import (
    CART_RULE,
    T0,
    cart_add,
    cart_remove,
    consent,
    device,
    event,
    identify,
    minutes,
    order,
    ruleset,
)
from triggers.engine import EnginePolicy, Input, Result, TimerFired, decide
from triggers.ruleset import compile_rules
from triggers.state import CustomerState, MessageRecord

RULES = ruleset()
OPT_IN = EnginePolicy()


def run(
    inputs: list[tuple[Input, datetime]],
    policy: EnginePolicy = OPT_IN,
    state: CustomerState | None = None,
) -> tuple[CustomerState, list[Action], list[Decision]]:
    actions: list[Action] = []
    decisions: list[Decision] = []
    for item, now in inputs:
        result: Result = decide(state, item, now, RULES, policy, "c1")
        state = result.state
        actions += result.actions
        decisions += result.decisions
    assert state is not None
    return state, actions, decisions


def at(item: Input, minute: float = 0) -> tuple[Input, datetime]:
    return item, T0 + minutes(minute)


def tick(minute: float) -> tuple[Input, datetime]:
    return TimerFired(due_at=T0 + minutes(minute)), T0 + minutes(minute)


def test_abandoned_cart_with_push_token_and_consent_gets_a_push_at_30_minutes() -> None:
    state, actions, decisions = run(
        [at(identify()), at(device()), at(consent("push")), at(cart_add(price=12_000, quantity=2))]
    )
    assert actions == [] and state.next_due() == T0 + minutes(30)

    state, actions, decisions = run([tick(29.9)], state=state)
    assert actions == []
    state, actions, decisions = run([tick(30)], state=state)

    [action] = actions
    assert action.channel == "push" and action.step == 1
    assert action.template == "cart_reminder_1"
    assert action.recipient.push_token == "tok-1"
    assert action.payload == {
        "cart_id": "cart-1",
        "items": [{"product_id": "p-1", "quantity": 2, "price": 12_000.0}],
        "value": 24_000.0,
    }
    assert action.due_at == T0 + minutes(30)
    assert action.expires_at == T0 + minutes(30 + 24 * 60)
    assert [d.outcome for d in decisions] == ["fired"]
    assert state.next_due() == T0 + minutes(24 * 60)


def test_without_push_token_the_reminder_falls_back_to_email() -> None:
    _, actions, _ = run([at(identify()), at(consent("email")), at(cart_add()), tick(30)])
    [action] = actions
    assert action.channel == "email" and action.recipient.email == "kim@example.com"


def test_second_step_is_an_email_with_the_coupon() -> None:
    _, actions, _ = run(
        [at(identify()), at(consent("email")), at(cart_add()), tick(30), tick(24 * 60)]
    )
    assert [(a.step, a.channel) for a in actions] == [(1, "email"), (2, "email")]
    assert actions[1].payload["coupon"] == "CART10"
    assert actions[1].payload["cart_id"] == "cart-1"


def test_a_purchase_before_the_due_time_cancels_the_journey() -> None:
    state, actions, decisions = run(
        [at(identify()), at(consent("email")), at(cart_add()), at(order(), 10), tick(30)]
    )
    assert actions == []
    [cancelled] = decisions
    assert cancelled.outcome == "cancelled" and cancelled.reason == "purchased"
    assert state.journeys == {} and state.next_due() is None


def test_an_order_for_another_cart_does_not_cancel_this_cart() -> None:
    _, actions, decisions = run(
        [at(identify()), at(consent("email")), at(cart_add("A")), at(order("B"), 5), tick(30)]
    )
    assert [a.journey_key for a in actions] == ["A"]


def test_emptying_the_cart_cancels_the_journey() -> None:
    _, actions, decisions = run(
        [at(identify()), at(consent("email")), at(cart_add(quantity=2)),
         at(cart_remove(quantity=1), 1), tick(30)]
    )
    assert len(actions) == 1, "a cart that still has an item is still abandoned"

    _, actions, decisions = run(
        [at(identify()), at(consent("email")), at(cart_add(quantity=2)),
         at(cart_remove(quantity=2), 1), tick(30)]
    )
    assert actions == []
    assert [(d.outcome, d.reason) for d in decisions] == [("cancelled", "cart_emptied")]


def test_unreachable_customer_gets_a_suppressed_decision() -> None:
    _, actions, decisions = run([at(cart_add()), tick(30)])
    assert actions == []
    assert [(d.outcome, d.reason, d.step) for d in decisions] == [("suppressed", "unreachable", 1)]


def test_reachable_without_consent_is_suppressed_for_no_consent_under_opt_in() -> None:
    _, actions, decisions = run([at(identify()), at(device()), at(cart_add()), tick(30)])
    assert actions == []
    assert decisions[0].reason == "no_consent"


def test_opt_out_policy_assumes_consent_until_revoked() -> None:
    policy = EnginePolicy(consent_policy="opt_out")
    _, actions, _ = run([at(identify()), at(device()), at(cart_add()), tick(30)], policy)
    assert [a.channel for a in actions] == ["push"]
    _, actions, _ = run(
        [at(identify()), at(device()), at(consent("push", granted=False)), at(cart_add()),
         tick(30)],
        policy,
    )
    assert [a.channel for a in actions] == ["email"]


def test_a_bounced_email_is_unreachable() -> None:
    state, _, _ = run([at(identify()), at(consent("email"))])
    state.messages["act_x"] = MessageRecord(channel="email", at=T0)
    bounced = event("message.bounced", {"action_id": "act_x"}, channel="email")
    _, actions, decisions = run([at(bounced), at(cart_add()), tick(30)], state=state)
    assert actions == [] and decisions[0].reason == "unreachable"


def test_each_cart_add_restarts_the_clock() -> None:
    state, actions, _ = run(
        [
            at(identify()),
            at(consent("email")),
            at(cart_add()),
            at(cart_add("cart-1", "p-2", at=T0 + minutes(20)), 20),
            tick(30),
        ]
    )
    assert actions == [] and state.next_due() == T0 + minutes(50)
    _, actions, _ = run([tick(50)], state=state)
    assert len(actions) == 1 and len(actions[0].payload["items"]) == 2


def test_redelivered_events_are_applied_once() -> None:
    add = cart_add(quantity=1)
    state, _, _ = run([at(identify()), at(consent("email")), at(add), at(add), tick(30)])
    result = decide(state, add, T0 + minutes(31), RULES, EnginePolicy(), "c1")
    assert result.applied is False


def test_action_ids_are_deterministic_and_distinct_per_step() -> None:
    inputs = [at(identify()), at(consent("email")), at(cart_add(event_id="add-1")), tick(30),
              tick(24 * 60)]
    _, first, _ = run(inputs)
    _, again, _ = run(inputs)
    assert [a.action_id for a in first] == [a.action_id for a in again]
    assert len({a.action_id for a in first}) == 2


def test_a_duplicate_or_early_timer_does_nothing() -> None:
    state, _, _ = run([at(identify()), at(consent("email")), at(cart_add())])
    state, actions, decisions = run([tick(10), tick(30), tick(30), tick(31)], state=state)
    assert len(actions) == 1 and len(decisions) == 1


def test_decide_does_not_mutate_its_input_state() -> None:
    state, _, _ = run([at(identify()), at(consent("email")), at(cart_add())])
    before = state.model_dump()
    decide(state, TimerFired(T0 + minutes(30)), T0 + minutes(30), RULES, EnginePolicy(), "c1")
    assert state.model_dump() == before


def test_late_timer_fires_every_step_that_is_due_in_order() -> None:
    _, actions, decisions = run(
        [at(identify()), at(consent("email")), at(cart_add()), tick(24 * 60 + 10)]
    )
    assert [a.step for a in actions] == [1, 2]


def test_a_step_not_sendable_before_it_expires_is_dropped_as_expired() -> None:
    # Step 1 was due at 00:30 and expires 24h later; step 2 (due 24:00) is still fresh.
    _, actions, decisions = run(
        [at(identify()), at(consent("email")), at(cart_add()), tick(25 * 60)]
    )
    assert [a.step for a in actions] == [2]
    assert [(d.step, d.outcome, d.reason) for d in decisions] == [
        (1, "suppressed", "expired"), (2, "fired", None)
    ]


def test_transactional_rules_need_no_opt_in_but_respect_revocation() -> None:
    from tests.factories import ruleset as make

    confirm = {
        "id": "order_confirmation",
        "category": "transactional",
        "trigger": {"event": "order.completed"},
        "steps": [{"after": "0s", "channels": ["email"], "template": "order_confirmation"}],
    }
    rules = make(confirm)
    result = decide(None, identify(), T0, rules, EnginePolicy(), "c1")
    result = decide(result.state, order(), T0, rules, EnginePolicy(), "c1")
    assert [a.template for a in result.actions] == ["order_confirmation"]

    result = decide(None, identify(), T0, rules, EnginePolicy(), "c1")
    result = decide(
        result.state, consent("email", False, "transactional"), T0, rules, EnginePolicy(), "c1"
    )
    result = decide(result.state, order(), T0, rules, EnginePolicy(), "c1")
    assert result.actions == [] and result.decisions[0].reason == "no_consent"


def test_rule_removed_while_a_journey_is_pending_cancels_it() -> None:
    state, _, _ = run([at(identify()), at(consent("email")), at(cart_add())])
    empty = ruleset({**CART_RULE_OTHER})
    result = decide(state, TimerFired(T0 + minutes(30)), T0 + minutes(30), empty,
                    EnginePolicy(), "c1")
    assert result.actions == []
    assert [(d.outcome, d.reason) for d in result.decisions] == [("cancelled", "rule_removed")]


def test_a_rules_update_that_removes_a_rule_ends_its_journeys_on_the_next_input() -> None:
    state, _, _ = run([at(identify()), at(consent("email")), at(cart_add())])
    updated = compile_rules(
        rules_from_data({"version": 1, "rules": [CART_RULE_OTHER]}), previous=RULES
    )
    assert updated.removed == {"cart_abandonment"}
    # Five minutes in: long before the cart step is due.
    result = decide(state, event("product.viewed", {"product_id": "p"}), T0 + minutes(5),
                    updated, EnginePolicy(), "c1")
    assert result.state.journeys == {}
    assert [(d.outcome, d.reason, d.rule_id) for d in result.decisions] == [
        ("cancelled", "rule_removed", "cart_abandonment")
    ]
    # Applying the cart rule again makes it a current rule, no longer a removed one.
    again = compile_rules(rules_from_data({"version": 1, "rules": [CART_RULE]}), previous=updated)
    assert again.removed == {"other"}


CART_RULE_OTHER = {
    "id": "other",
    "category": "marketing",
    "trigger": {"event": "store.visited"},
    "steps": [{"after": "1h", "channels": ["sms"], "template": "x"}],
}


def test_a_new_cart_forgets_carts_untouched_for_30_days_unless_a_journey_is_keyed_by_them() -> None:
    long_rule = {
        "id": "cart_follow_up",
        "category": "marketing",
        "trigger": {"event": "cart.item_added", "key": "properties.cart_id",
                    "when": "event.properties.cart_id == 'cart-2'"},
        "steps": [{"after": "40d", "channels": ["email"], "template": "still_there"}],
    }
    rules = ruleset(CART_RULE, long_rule)
    day_1 = T0 + timedelta(days=1)
    later = T0 + timedelta(days=30, minutes=30)
    state = None
    for item, now in [
        at(cart_add("cart-1")),
        at(cart_add("cart-2")),
        (cart_add("cart-3", at=day_1), day_1),
        (cart_add("cart-4", at=later), later),
    ]:
        state = decide(state, item, now, rules, OPT_IN, "c1").state
    assert state is not None
    # cart-1: idle 30.5 days. cart-2: as idle, but its follow-up is due at 40 days and
    # will carry its lines. cart-3: changed 29.5 days ago.
    assert sorted(state.carts) == ["cart-2", "cart-3", "cart-4"]


def test_an_action_carries_the_customers_locale_and_timezone_for_its_sender() -> None:
    traits = {"email": "kim@example.com", "locale": "en-US", "timezone": "America/Chicago"}
    state, _, _ = run(
        [at(event("identify", {"traits": traits})), at(consent("email")), at(cart_add())]
    )
    _, [action], _ = run([tick(30)], state=state)
    assert (action.channel, action.locale, action.timezone) == (
        "email", "en-US", "America/Chicago"
    )
    # A customer who never said: the sender falls back to its defaults.
    state, _, _ = run([at(identify()), at(consent("email")), at(cart_add())])
    _, [action], _ = run([tick(30)], state=state)
    assert (action.locale, action.timezone) == (None, None)
