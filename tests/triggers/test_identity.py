"""Identity resolution and profile merges (`triggers.identity`), on in-memory values."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from schemas.actions import make_action_id
from schemas.events import Event
from tests.factories import (
    CART_RULE,
    T0,
    cart_add,
    consent,
    device,
    event,
    identify,
    minutes,
    order,
    ruleset,
)
from triggers.engine import EnginePolicy, TimerFired, evolve, new_state
from triggers.identity import (
    IdentityMap,
    IdentityPolicy,
    Resolution,
    absorb,
    anonymous_profile,
    hash_identifier,
    merge_profiles,
    needs_resolution,
    record,
    resolve,
)
from triggers.state import CustomerState

POLICY = IdentityPolicy(salt="pepper")
ENGINE = EnginePolicy()
ANON: dict[str, Any] = {"customer_id": None, "anonymous_id": "a-1"}


def step(identity: IdentityMap, ev: Event, profiles: tuple[str, ...] = (),
         policy: IdentityPolicy = POLICY) -> Resolution:
    """Resolve one event and record it, as the replay does."""
    resolution = resolve(identity, ev, ev.occurred_at, policy, profiles)
    record(identity, resolution)
    return resolution


def reasons(resolution: Resolution) -> list[tuple[str | None, str, str | None]]:
    return [(d.reason, d.customer_id, d.profile) for d in resolution.decisions]


def alias(previous: str, customer: str, at: datetime = T0) -> Event:
    return event("alias", {"previous_id": previous}, customer_id=customer, at=at)


def profile_of(events: list[Event], key: str, rules: Any = None) -> CustomerState:
    """One profile's state after the events, timers fired as they come due."""
    rules = rules or ruleset()
    state = new_state(key)
    for ev in events:
        while (due := state.next_due()) is not None and due <= ev.occurred_at:
            evolve(state, TimerFired(due), due, rules, ENGINE)
        evolve(state, ev, ev.occurred_at, rules, ENGINE)
    return state


# ------------------------------------------------------------------ identifiers


def test_emails_hash_the_same_whatever_their_case_and_spaces() -> None:
    assert hash_identifier("email", " Kim@Example.COM ", "s") == hash_identifier(
        "email", "kim@example.com", "s"
    )


def test_phones_hash_by_their_digits_and_plus() -> None:
    same = {hash_identifier("phone", p, "s") for p in ("+82 10-1234-5678", "+821012345678")}
    assert len(same) == 1
    assert hash_identifier("phone", "010-1234-5678", "s") not in same


def test_hashes_are_salted_and_never_hold_the_value() -> None:
    hashed = hash_identifier("email", "kim@example.com", "s1")
    assert hashed != hash_identifier("email", "kim@example.com", "s2")
    assert hashed.startswith("email:") and "kim" not in hashed


def test_the_map_keys_emails_and_phones_only_by_hash() -> None:
    identity = IdentityMap()
    step(identity, identify("Kim@example.com", phone="+82 10 1234 5678", customer_id="c-1"))
    assert set(identity.matching) == {
        hash_identifier("email", "kim@example.com", "pepper"),
        hash_identifier("phone", "+821012345678", "pepper"),
    }
    assert "kim" not in repr(identity).lower()


# ------------------------------------------------------------------------ links


def test_an_event_with_both_ids_links_them_and_merges_the_anonymous_profile_once() -> None:
    identity = IdentityMap()
    first = step(identity, identify(customer_id="c-9", anonymous_id="a-1"))
    assert first.profile == "c-9" and first.merges == ("anon:a-1",)
    assert identity.customers["c-9"].anonymous_ids == ("a-1",)
    again = step(identity, order("K", customer_id="c-9", anonymous_id="a-1"))
    assert again.merges == ()
    # From then on the device's anonymous events are the customer's.
    assert step(identity, cart_add("K", **ANON)).profile == "c-9"


def test_events_without_an_anonymous_id_need_no_resolution() -> None:
    identity = IdentityMap()
    assert not needs_resolution(identity, order("K", customer_id="c-9"))
    assert needs_resolution(identity, cart_add("K", **ANON))
    assert needs_resolution(identity, identify(customer_id="c-9"))
    both = order("K", customer_id="c-9", anonymous_id="a-1")
    assert needs_resolution(identity, both)
    step(identity, both)
    # Linked already: the same answer as `resolve`, without it.
    assert not needs_resolution(identity, order("K", customer_id="c-9", anonymous_id="a-1"))
    assert resolve(identity, both, T0, POLICY) == Resolution("c-9")
    assert needs_resolution(identity, cart_add("K", **ANON))
    step(identity, alias("c-1", "c-2"), profiles=("c-1",))
    assert needs_resolution(identity, order("K", customer_id="c-9"))


def test_an_alias_links_an_anonymous_id() -> None:
    identity = IdentityMap()
    resolution = step(identity, alias("a-1", "c-9"))
    assert (resolution.profile, resolution.merges) == ("c-9", ("anon:a-1",))
    assert step(identity, cart_add(**ANON)).profile == "c-9"


def test_an_alias_merges_two_known_customers_and_the_old_id_resolves_to_the_new() -> None:
    identity = IdentityMap()
    step(identity, identify("kim@example.com", customer_id="c-old", anonymous_id="a-1"))
    resolution = step(identity, alias("c-old", "c-new"), profiles=("c-old",))
    assert (resolution.profile, resolution.merges) == ("c-new", ("c-old",))
    assert step(identity, order(customer_id="c-old")).profile == "c-new"
    assert step(identity, cart_add(**ANON)).profile == "c-new"
    # The email it held is the new customer's: no conflict when c-new uses it.
    assert reasons(step(identity, identify("kim@example.com", customer_id="c-new"))) == []
    # Chains stay flat: a second alias moves both old ids.
    step(identity, alias("c-new", "c-newest"), profiles=("c-new",))
    assert step(identity, order(customer_id="c-old")).profile == "c-newest"


def test_an_email_of_another_customer_is_a_conflict_not_a_merge() -> None:
    identity = IdentityMap()
    step(identity, identify("kim@example.com", customer_id="c-1"))
    conflict = step(identity, identify("KIM@Example.com", customer_id="c-2"))
    assert conflict.merges == ()
    assert reasons(conflict) == [("identity_conflict", "c-2", "c-1")]
    assert conflict.decisions[0].journey_key == "email"
    # An anonymous profile's email matches nothing automatically either.
    assert reasons(step(identity, identify("kim@example.com", **ANON))) == [
        ("identity_conflict", "anon:a-1", "c-1")
    ]


def test_a_customer_who_changes_email_frees_the_old_one() -> None:
    identity = IdentityMap()
    step(identity, identify("old@example.com", customer_id="c-1"))
    step(identity, identify("new@example.com", customer_id="c-1"))
    assert reasons(step(identity, identify("old@example.com", customer_id="c-2"))) == []
    assert reasons(step(identity, identify("new@example.com", customer_id="c-2"))) == [
        ("identity_conflict", "c-2", "c-1")
    ]


def test_a_shared_device_starts_a_new_anonymous_profile_and_moves_nothing() -> None:
    identity = IdentityMap()
    step(identity, identify(None, customer_id="c-1", anonymous_id="a-1"))
    shared = step(identity, identify(None, customer_id="c-2", anonymous_id="a-1"))
    assert (shared.profile, shared.merges) == ("c-2", ())
    assert reasons(shared) == [("shared_device", "c-2", "c-1")]
    assert identity.customers["c-1"].anonymous_ids == ()
    later = step(identity, cart_add(**ANON))
    assert later.profile == anonymous_profile("a-1", 1) == "anon:a-1#1"
    # Recorded once: the device belongs to no one now, whoever logs in on it.
    assert step(identity, identify(None, customer_id="c-1", anonymous_id="a-1")).decisions == ()
    assert step(identity, cart_add(**ANON)).profile == "anon:a-1#1"


def test_a_customer_keeps_a_bounded_number_of_anonymous_ids_oldest_dropped() -> None:
    identity = IdentityMap()
    policy = IdentityPolicy(max_anonymous_ids=2)
    for anonymous_id in ("a-1", "a-2", "a-3"):
        step(identity, identify(customer_id="c-1", anonymous_id=anonymous_id), policy=policy)
    assert identity.customers["c-1"].anonymous_ids == ("a-2", "a-3")
    dropped = step(identity, cart_add(customer_id=None, anonymous_id="a-1"), policy=policy)
    assert dropped.profile == "anon:a-1#1"
    assert step(identity, cart_add(customer_id=None, anonymous_id="a-3")).profile == "c-1"


def test_blocked_values_never_match() -> None:
    identity = IdentityMap()
    placeholder = step(identity, identify(None, customer_id="c-1", anonymous_id="unknown"))
    assert (placeholder.profile, placeholder.merges) == ("c-1", ())
    assert identity.devices == {}
    # A blocked customer id is no customer: the event stays with its device.
    assert step(identity, cart_add(customer_id="null", anonymous_id="a-1")).profile == "anon:a-1"
    assert step(identity, identify("test@example.com", customer_id="c-1")).decisions == ()
    assert step(identity, identify("TEST@example.com", customer_id="c-2")).decisions == ()
    assert identity.matching == {}
    assert step(identity, alias("0", "c-1")).merges == ()


# ------------------------------------------------------------------------ merge


def test_known_traits_win_unless_missing() -> None:
    anonymous = profile_of([
        event("identify", {"traits": {"email": "a@example.com", "timezone": "Asia/Tokyo",
                                      "plan": "free", "color": "red"}}, **ANON),
    ], "anon:a-1")
    known = profile_of([
        event("identify", {"traits": {"email": "k@example.com", "plan": "gold"}},
              customer_id="c-9"),
    ], "c-9")
    merged = merge_profiles(anonymous, known)
    assert merged.customer_id == "c-9"
    assert (merged.email, merged.timezone) == ("k@example.com", "Asia/Tokyo")
    assert merged.traits == {"plan": "gold", "color": "red"}
    # Neither input changed.
    assert known.timezone is None and anonymous.customer_id == "anon:a-1"


def test_the_most_recent_consent_per_channel_and_category_wins() -> None:
    anonymous = profile_of([
        consent("push", True, at=T0 + minutes(5), **ANON),
        consent("email", True, at=T0, **ANON),
        consent("sms", False, category="transactional", at=T0, **ANON),
    ], "anon:a-1")
    known = profile_of([
        consent("push", False, at=T0, customer_id="c-9"),
        consent("email", False, at=T0 + minutes(5), customer_id="c-9"),
    ], "c-9")
    merged = merge_profiles(anonymous, known)
    assert merged.consents == {
        "push:marketing": True, "email:marketing": False, "sms:transactional": False,
    }
    assert merged.consented_at["push:marketing"] == T0 + minutes(5)


def test_carts_devices_counters_and_repeat_counts_take_the_union() -> None:
    anonymous = profile_of([
        device("tok-a", **ANON),
        cart_add("K", "p-1", at=T0, **ANON),
        cart_add("S", "p-1", at=T0, **ANON),
        order(None, value=5.0, at=T0, **ANON),
    ], "anon:a-1")
    anonymous.occurrences["views|p-1"] = [T0, T0 + minutes(2)]
    known = profile_of([
        device("tok-k", customer_id="c-9"),
        cart_add("S", "p-2", at=T0 + minutes(1), customer_id="c-9"),
        order(None, value=7.5, at=T0, customer_id="c-9"),
    ], "c-9")
    known.occurrences["views|p-1"] = [T0 + minutes(1)]
    anonymous.last_started = {"views": T0 + minutes(3), "cart": T0}
    known.last_started = {"cart": T0 + minutes(1)}
    anonymous.once_started, known.once_started = ["welcome|customer"], ["vip|customer"]
    merged = merge_profiles(anonymous, known)
    assert set(merged.carts) == {"K", "S"}
    assert set(merged.carts["S"].lines) == {"p-1", "p-2"}
    assert (merged.order_count, merged.revenue) == (2, 12.5)
    # The identifying device is the newest: push goes to it.
    assert list(merged.push_tokens) == ["tok-k", "tok-a"]
    assert merged.occurrences["views|p-1"] == [T0, T0 + minutes(1), T0 + minutes(2)]
    # Reentry and `once` see both profiles' starts.
    assert merged.last_started == {"views": T0 + minutes(3), "cart": T0 + minutes(1)}
    assert sorted(merged.once_started) == ["vip|customer", "welcome|customer"]


def test_the_same_journey_in_both_profiles_collapses_into_one() -> None:
    rules = ruleset(CART_RULE)
    anonymous = profile_of([cart_add("K", at=T0, **ANON)], "anon:a-1", rules)
    known = profile_of([cart_add("K", at=T0 + minutes(1), customer_id="c-9")], "c-9", rules)
    merged = merge_profiles(anonymous, known)
    assert list(merged.journeys) == ["cart_abandonment|K"]
    actions = []
    while (due := merged.next_due()) is not None:
        actions += evolve(merged, TimerFired(due), due, rules, ENGINE).actions
    # No device or email anywhere: the point is one journey, so at most one reminder
    # per step; here each is suppressed once.
    decisions = [d for d in merged.recent_decisions if d.rule_id == "cart_abandonment"]
    assert [(d.step, d.outcome) for d in decisions] == [(1, "suppressed"), (2, "suppressed")]
    assert actions == []


def test_caps_count_both_histories() -> None:
    # One marketing push a day at most: the anonymous profile used it.
    rules = ruleset(CART_RULE, policy={"quiet_hours": None,
                                       "caps": {"per_channel": {"limit": 1, "window": "24h"}}})
    reachable = [device("tok-a", at=T0, **ANON), consent("push", at=T0, **ANON)]
    anonymous = profile_of([*reachable, cart_add("K", at=T0, **ANON),
                            event("store.visited", {"store_id": "s"}, at=T0 + minutes(31),
                                  **ANON)], "anon:a-1", rules)
    assert [r.channel for r in anonymous.sent_log] == ["push"]
    known = profile_of([cart_add("J", at=T0 + minutes(10), customer_id="c-9")], "c-9", rules)
    merged = merge_profiles(anonymous, known)
    out = evolve(merged, TimerFired(T0 + minutes(40)), T0 + minutes(40), rules, ENGINE)
    assert out.actions == []
    assert [(d.journey_key, d.reason) for d in out.decisions] == [("J", "frequency_cap")]


def test_a_journey_started_anonymously_keeps_its_action_ids_after_the_merge() -> None:
    rules = ruleset(CART_RULE)
    reachable = [device("tok-a", at=T0, **ANON), consent("push", at=T0, **ANON),
                 consent("email", at=T0, **ANON)]
    started = cart_add("K", at=T0, **ANON)
    anonymous = profile_of([*reachable, started], "anon:a-1", rules)
    merged = merge_profiles(anonymous, new_state("c-9"))
    merged.email = "k@example.com"
    fired = []
    while (due := merged.next_due()) is not None:
        fired += evolve(merged, TimerFired(due), due, rules, ENGINE).actions
    assert [(a.step, a.customer_id) for a in fired] == [(1, "c-9"), (2, "c-9")]
    assert [a.action_id for a in fired] == [
        make_action_id("cart_abandonment", "anon:a-1", started.event_id, n) for n in (1, 2)
    ]
    # Had it not merged, the anonymous profile would have sent step 1 with that id.
    alone = anonymous.model_copy(deep=True)
    first = evolve(alone, TimerFired(T0 + minutes(30)), T0 + minutes(30), rules, ENGINE)
    assert [a.action_id for a in first.actions] == [fired[0].action_id]


def test_an_idle_anonymous_profile_is_dropped_not_merged() -> None:
    anonymous = profile_of([cart_add("K", at=T0, **ANON)], "anon:a-1")
    known = new_state("c-9")
    late = T0 + timedelta(days=31)
    state, decision = absorb(anonymous, known, late, POLICY, "ev-link")
    assert state is known and state.carts == {}
    assert decision is not None and decision.reason == "anonymous_idle"
    fresh, merged = absorb(anonymous, known, T0 + timedelta(days=29), POLICY, "ev-link")
    assert merged is not None and merged.reason == "identity_merged"
    assert set(fresh.carts) == {"K"}


def test_merging_the_same_profile_again_changes_nothing() -> None:
    anonymous = profile_of([order(None, value=5.0, **ANON), cart_add("K", **ANON)], "anon:a-1")
    once, decision = absorb(anonymous, new_state("c-9"), T0, POLICY, "ev-link")
    assert decision is not None
    assert decision.profile == "anon:a-1" and decision.outcome == "identity"
    twice, again = absorb(anonymous, once, T0, POLICY, "ev-link")
    assert again is None and twice is once
    assert merge_profiles(anonymous, once) == once
    assert once.order_count == 1 and once.merged_profiles == ["anon:a-1"]


def test_resolve_leaves_the_map_as_it_is() -> None:
    identity = IdentityMap()
    step(identity, identify("kim@example.com", customer_id="c-1", anonymous_id="a-1"))
    before = repr(identity)
    resolution = resolve(identity, identify("lee@example.com", customer_id="c-2",
                                            anonymous_id="a-1"), T0, POLICY)
    assert resolution.decisions and repr(identity) == before
