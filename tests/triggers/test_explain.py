"""`omnicue explain`'s plain words, from a customer's state and the rules."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tests.factories import event, identify, minutes, ruleset
from tests.triggers.test_catalog import MORNING, RULES, customer, view
from triggers.explain import describe, explanation, held_back
from triggers.identity import identity_decision


def test_a_repeat_count_short_of_its_count_says_how_many_more_and_by_when() -> None:
    t = customer()
    t.send(view("p-1", MORNING))
    t.send(view("p-1", MORNING + minutes(10)))
    now = MORNING + minutes(20)
    [counting] = [h for h in held_back(t.state, RULES, now) if h["reason"] == "counting"]
    assert counting["text"] == (
        "browse_abandonment (p-1): 2 of the 3 product.viewed events it needs within 1d; "
        "1 more by 2026-03-03 01:00:00 UTC would start it"
    )
    # A day later those views no longer count, and nothing is said of them.
    assert not [h for h in held_back(t.state, RULES, now + timedelta(days=1))
                if h["reason"] == "counting"]


def test_a_rule_that_started_is_held_back_by_reentry_then_free_again() -> None:
    t = customer()
    for i in range(3):
        t.send(view("p-1", MORNING + minutes(i)))
    t.advance(MORNING + timedelta(hours=2))
    now = MORNING + timedelta(days=1)
    [reentry] = [h for h in held_back(t.state, RULES, now) if h["reason"] == "reentry"]
    assert reentry["text"] == (
        "browse_abandonment: started 2026-03-02 01:02:00 UTC, so not again before "
        "2026-03-09 01:02:00 UTC (reentry 7d)"
    )
    # Two views of another product now count toward a start that reentry blocks.
    t.send(view("p-2", now))
    t.send(view("p-2", now + minutes(1)))
    counted = held_back(t.state, RULES, now + minutes(2))
    [counting] = [h for h in counted if h["reason"] == "counting"]
    assert counting["text"].endswith(
        "1 more by 2026-03-04 01:00:00 UTC would reach it, but reentry holds the rule back "
        "until 2026-03-09 01:02:00 UTC"
    )
    later = MORNING + timedelta(days=8)
    assert not [h for h in held_back(t.state, RULES, later) if h["reason"] == "reentry"]


def test_a_once_rule_that_ran_says_so_and_the_explanation_carries_it() -> None:
    t = customer(push=False)
    t.advance(MORNING + timedelta(days=8))
    t.send(identify(at=MORNING + timedelta(days=8)))
    body = explanation(t.state, RULES, MORNING + timedelta(days=8))
    assert {"rule_id": "welcome_series", "key": "customer", "reason": "once",
            "text": "welcome_series (customer): runs once, and has run"} in body["held_back"]
    assert any("welcome_series step 1 (customer): sent on email as act_" in d["text"]
               for d in body["decisions"])


def test_nothing_is_held_back_for_a_rule_that_is_gone() -> None:
    t = customer()
    t.send(view("p-1", MORNING))
    t.send(event("store.visited", {"store_id": "s1"}, channel="store", at=MORNING))
    assert held_back(t.state, ruleset(), MORNING + minutes(1)) == []


def test_identity_decisions_say_which_profile_merged_and_why_not() -> None:
    at = datetime(2026, 3, 2, 10, 15, tzinfo=UTC)
    merged = identity_decision("c-9", "identity_merged", "anonymous_id", "anon:a-17", at, "e-33")
    assert describe(merged) == (
        "2026-03-02 10:15:00 UTC  anonymous profile anon:a-17 merged into this customer "
        "by event e-33"
    )
    carried = merged.model_copy(update={"journeys_carried": 1})
    assert describe(carried).endswith("by event e-33; 1 journey carried over")
    conflict = identity_decision("c-9", "identity_conflict", "email", "c-4", at, "e-34")
    assert "the email already belongs to customer c-4: not merged" in describe(conflict)
    shared = identity_decision("c-9", "shared_device", "anonymous_id", "c-2", at, None)
    assert "new anonymous profile" in describe(shared)
