"""Delivery feedback in customer state: which actions it may name, and what it changes
(reachability, consent, engagement and with it `channel: best`)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from schemas.actions import Action
from schemas.events import Event
from tests.factories import T0, consent, device, event, identify, minutes, ruleset
from tests.triggers.timeline import Timeline
from triggers.channels import recipient
from triggers.engine import EnginePolicy, evolve
from triggers.explain import describe
from triggers.replay import Replayer
from triggers.state import (
    RECENT_MESSAGES,
    CustomerState,
    MessageRecord,
    UnknownAction,
    engagement_rates,
    merge_messages,
)

# One journey per viewed product, its one step at once on the best of push and email.
NUDGE: dict[str, Any] = {
    "id": "nudge",
    "category": "marketing",
    "trigger": {"event": "product.viewed", "key": "properties.product_id"},
    "steps": [{"after": "1m", "channels": ["push", "email"], "channel": "best",
               "template": "browse_reminder"}],
}
RULES = ruleset(NUDGE, policy={"quiet_hours": None, "caps": {
    "total": {"limit": 1000}, "per_channel": {"limit": 1000}}})


def customer() -> Timeline:
    t = Timeline(RULES)
    for e in (identify(at=T0), device(at=T0), consent("push", at=T0), consent("email", at=T0)):
        t.send(e)
    return t


def view(t: Timeline, product: str, minute: float) -> Action:
    """A view, then its nudge one minute later: the action it fired."""
    before = len(t.actions)
    t.send(event("product.viewed", {"product_id": product}, at=T0 + minutes(minute)))
    t.advance(T0 + minutes(minute + 1))
    [action] = t.actions[before:]
    return action


def feedback(kind: str, action: Action, minute: float, **kw: Any) -> Event:
    return event(f"message.{kind}", {"action_id": action.action_id}, channel=action.channel,
                 at=T0 + minutes(minute), **kw)


def snapshot(state: CustomerState) -> str:
    return state.model_dump_json()


def test_feedback_for_an_action_never_emitted_raises_unknown_action_and_changes_nothing() -> None:
    t = customer()
    view(t, "p-1", 0)
    before = snapshot(t.state)
    stray = event("message.opened", {"action_id": "act_never"}, channel="push", at=T0 + minutes(5))
    with pytest.raises(UnknownAction) as raised:
        evolve(t.state, stray, T0 + minutes(5), RULES, EnginePolicy())
    assert isinstance(raised.value, ValueError) and type(raised.value).__name__ == "UnknownAction"
    assert "act_never" in str(raised.value)
    assert snapshot(t.state) == before


def test_emitted_actions_are_remembered_per_channel_within_the_bound() -> None:
    t = customer()
    actions = [view(t, f"p-{i}", 2 * i) for i in range(RECENT_MESSAGES + 3)]
    assert all(a.channel == "push" for a in actions)
    assert list(t.state.messages) == [a.action_id for a in actions[3:]]
    # Feedback for one of the forgotten ones is unknown; for a remembered one it is not.
    with pytest.raises(UnknownAction):
        evolve(t.state, feedback("opened", actions[0], 500), T0 + minutes(500), RULES,
               EnginePolicy())
    t.send(feedback("opened", actions[3], 500))


def test_open_and_click_count_one_message_as_engaged_once() -> None:
    t = customer()
    push = view(t, "p-1", 0)
    for kind in ("sent", "delivered", "opened", "clicked", "opened"):
        t.send(feedback(kind, push, 10))
    t.send(feedback("clicked", push, 11, event_id="retry-1"))
    t.send(feedback("clicked", push, 11, event_id="retry-1"))  # a retried callback
    [rate] = engagement_rates(t.state, timedelta(days=30)).values()
    assert (rate.engaged, rate.messages, rate.rate) == (1, 1, 1.0)
    lifetime = t.state.engagement["push"]
    assert (lifetime.sent, lifetime.engaged, lifetime.rate) == (1, 1, 1.0)


def test_an_open_before_the_sent_event_still_counts_the_message_once() -> None:
    t = customer()
    push = view(t, "p-1", 0)
    t.send(feedback("opened", push, 5))
    t.send(feedback("sent", push, 6))
    lifetime = t.state.engagement["push"]
    assert (lifetime.sent, lifetime.engaged) == (1, 1)


def test_failed_messages_do_not_count_against_engagement() -> None:
    t = customer()
    first, second = view(t, "p-1", 0), view(t, "p-2", 2)
    t.send(feedback("sent", first, 5))
    t.send(feedback("opened", first, 6))
    t.send(feedback("failed", second, 6))
    [rate] = engagement_rates(t.state, timedelta(days=30)).values()
    assert (rate.engaged, rate.messages) == (1, 1)


def test_a_hard_bounce_makes_the_address_unreachable_and_a_new_address_reachable() -> None:
    t = Timeline(RULES)
    for e in (identify(at=T0), consent("email", at=T0)):
        t.send(e)
    email = view(t, "p-1", 0)
    assert email.channel == "email"
    t.send(feedback("bounced", email, 5))
    assert recipient(t.state, "email") is None
    t.send(event("product.viewed", {"product_id": "p-2"}, at=T0 + minutes(10)))
    t.advance(T0 + minutes(12))
    assert t.actions == [email]
    assert t.decisions[-1].reason == "unreachable"

    t.send(identify("kim.new@example.com", at=T0 + minutes(20)))
    assert recipient(t.state, "email") is not None
    new = view(t, "p-3", 30)
    assert new.recipient.email == "kim.new@example.com"
    # A late bounce of the old address does not touch the new one.
    old_again = event("message.bounced", {"action_id": email.action_id}, channel="email",
                      at=T0 + minutes(40), event_id="late-bounce")
    t.send(old_again)
    assert recipient(t.state, "email") is not None


def test_a_bounced_phone_is_unreachable_until_the_customer_gives_another() -> None:
    state = CustomerState(customer_id="c1", phone="+82 10 1111 2222")
    state.consents["sms:marketing"] = True
    state.messages["act_sms"] = MessageRecord(channel="sms", at=T0)
    rules = ruleset()
    evolve(state, event("message.bounced", {"action_id": "act_sms"}, channel="sms"), T0, rules,
           EnginePolicy())
    assert recipient(state, "sms") is None
    # Kakao has bounces of its own: the SMS network's verdict is not its.
    assert recipient(state, "kakao") is not None
    evolve(state, identify(None, phone="+82 10 3333 4444"), T0, rules, EnginePolicy())
    assert recipient(state, "sms") is not None


@pytest.mark.parametrize("kind", ["complained", "unsubscribed"])
def test_a_complaint_or_unsubscribe_revokes_marketing_consent_on_that_channel(kind: str) -> None:
    t = customer()
    push = view(t, "p-1", 0)
    t.send(feedback(kind, push, 5))
    assert t.state.consents["push:marketing"] is False
    assert t.state.consents["email:marketing"] is True
    assert view(t, "p-2", 10).channel == "email"
    # A consent given again later stands; an old revocation arriving late does not undo it.
    t.send(consent("push", at=T0 + minutes(20)))
    late = event(f"message.{kind}", {"action_id": push.action_id}, channel="push",
                 at=T0 + minutes(6), event_id="late")
    evolve(t.state, late, T0 + minutes(21), RULES, EnginePolicy())
    assert t.state.consents["push:marketing"] is True


def _history(*records: tuple[str, float, bool]) -> CustomerState:
    """A state that was sent these (channel, days after T0, engaged) messages."""
    state = CustomerState(customer_id="c1", email="kim@example.com", push_tokens={"tok": "ios"},
                          consents={"push:marketing": True, "email:marketing": True})
    for i, (channel, days, engaged) in enumerate(records):
        state.messages[f"act_{i}"] = MessageRecord(
            channel=channel, at=T0 + timedelta(days=days), sent=True, engaged=engaged
        )
    return state


def _best(state: CustomerState, policy: EnginePolicy, at_days: float = 200) -> Action:
    now = T0 + timedelta(days=at_days)
    evolve(state, event("product.viewed", {"product_id": "x"}, at=now), now, RULES, policy)
    out = evolve(state, event("product.viewed", {"product_id": "y"}, at=now + minutes(2)),
                 now + minutes(2), RULES, policy)
    [action] = out.actions
    return action


def test_engagement_decays_with_a_half_life_so_best_follows_recent_behaviour() -> None:
    # Email: engaged with all 6 messages half a year ago, none of the 3 recent ones.
    # Push: 2 of 4 recent ones.
    records = [("email", d, True) for d in range(6)] + [("email", 180 + d, False)
                                                       for d in range(3)]
    records += [("push", 180 + d, d % 2 == 0) for d in range(4)]
    rates = engagement_rates(_history(*records), timedelta(days=30))
    assert (rates["email"].engaged, rates["email"].messages) == (6, 9)
    assert rates["email"].rate < 0.05 < 0.4 < rates["push"].rate
    assert abs(rates["push"].rate - 0.5) < 0.05
    assert _best(_history(*records), EnginePolicy()).channel == "push"
    # Without decay (an endless half-life), the old opens would win it for email.
    endless = EnginePolicy(engagement_half_life=timedelta(days=100_000))
    assert _best(_history(*records), endless).channel == "email"


def test_decay_depends_on_event_times_not_on_when_the_decision_is_made() -> None:
    records = [("email", 0, True), ("email", 40, False), ("push", 10, False), ("push", 41, True)]
    rates = engagement_rates(_history(*records), timedelta(days=30))
    early, late = _history(*records), _history(*records)
    first, second = _best(early, EnginePolicy(), 42), _best(late, EnginePolicy(), 4000)
    assert first.channel == second.channel == "push"
    assert rates["push"].rate > rates["email"].rate


def test_explain_says_why_best_picked_the_channel() -> None:
    records = [("email", 100, d < 3) for d in range(4)] + [("push", 100, False) for _ in range(5)]
    state = _history(*records)
    action = _best(state, EnginePolicy())
    assert action.channel == "email"
    fired = [d for d in state.recent_decisions if d.outcome == "fired"][-1]
    assert fired.engagement is not None
    assert [(e.channel, e.engaged, e.messages) for e in fired.engagement] == [
        ("email", 3, 4), ("push", 0, 5)
    ]
    text = describe(fired)
    assert "sent on email" in text
    assert "email: 3 of 4 recent messages engaged; push: 0 of 5" in text


def test_explain_names_channels_without_feedback() -> None:
    state = _history(("email", 100, True))
    _best(state, EnginePolicy())
    fired = [d for d in state.recent_decisions if d.outcome == "fired"][-1]
    assert "email: 1 of 1 recent messages engaged; push: no feedback yet" in describe(fired)


def test_states_stored_before_feedback_records_still_load_and_work() -> None:
    # The JSON of a state written by the previous version: lifetime counts that could
    # exceed one per message, no `messages`, a fired decision in the recent ones.
    stored = {
        "customer_id": "c1",
        "email": "kim@example.com",
        "consents": {"email:marketing": True},
        "engagement": {"email": {"sent": 2, "engaged": 3}},
        "recent_decisions": [{
            "customer_id": "c1", "rule_id": "nudge", "rule_version": "v", "journey_key": "p",
            "step": 1, "outcome": "fired", "channel": "email", "action_id": "act_old",
            "decided_at": T0.isoformat(),
        }],
    }
    state = CustomerState.model_validate(stored)
    assert state.messages == {} and state.bounced == {}
    assert state.engagement["email"].rate == 1.0
    rate = engagement_rates(state, timedelta(days=30))["email"]
    assert (rate.engaged, rate.messages, rate.rate) == (2, 2, 1.0)
    # Feedback for an action its recent decisions show is known.
    evolve(state, event("message.opened", {"action_id": "act_old"}, channel="email"), T0, RULES,
           EnginePolicy())
    assert state.messages["act_old"].engaged


def test_merge_messages_unions_both_profiles_within_the_bound() -> None:
    a = {"act_1": MessageRecord(channel="email", at=T0, sent=True)}
    b = {
        "act_1": MessageRecord(channel="email", at=T0, engaged=True),
        "act_2": MessageRecord(channel="push", at=T0 + minutes(1)),
    }
    merged = merge_messages(a, b)
    assert list(merged) == ["act_1", "act_2"]
    assert merged["act_1"].sent and merged["act_1"].engaged
    many = {f"act_{i}": MessageRecord(channel="sms", at=T0 + minutes(i))
            for i in range(RECENT_MESSAGES + 5)}
    assert list(merge_messages(many, {})) == [f"act_{i}" for i in range(5, RECENT_MESSAGES + 5)]


def test_replay_takes_feedback_events_and_counts_unknown_actions() -> None:
    replayer = Replayer(RULES, EnginePolicy())
    setup = [identify(at=T0), device(at=T0), consent("push", at=T0), consent("email", at=T0)]
    outputs = list(replayer.run([*setup, event("product.viewed", {"product_id": "p"},
                                                 at=T0)], until=T0 + minutes(5)))
    [action] = [a for o in outputs for a in o.actions]
    later = [
        feedback("sent", action, 10),
        feedback("opened", action, 11),
        event("message.clicked", {"action_id": "act_unknown"}, channel="push",
              at=T0 + minutes(12)),
        feedback("unsubscribed", action, 13),
    ]
    list(replayer.run(later))
    assert replayer.stats.unknown_actions == 1
    state = replayer.states["c1"]
    assert state.messages[action.action_id].engaged
    assert state.consents["push:marketing"] is False


def test_the_explain_view_words_the_best_choice() -> None:
    from triggers.explain import explanation

    records = [("email", 100, d < 3) for d in range(4)] + [("push", 100, False) for _ in range(5)]
    state = _history(*records)
    _best(state, EnginePolicy())
    [fired] = [d for d in explanation(state, RULES, T0)["decisions"] if d["outcome"] == "fired"]
    assert fired["engagement"][0] == {"channel": "email", "engaged": 3, "messages": 4,
                                      "rate": 0.75}
    assert fired["text"].endswith(
        "the best channel by engagement (email: 3 of 4 recent messages engaged; push: 0 of 5)"
    )
