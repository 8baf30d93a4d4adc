from __future__ import annotations

from tests.factories import T0, minutes
from triggers.schedule import TimerSchedule


def test_pops_only_due_customers_in_time_order() -> None:
    s = TimerSchedule()
    s.set_due(b"b", T0 + minutes(2), 0)
    s.set_due(b"a", T0 + minutes(1), 1)
    s.set_due(b"c", T0 + minutes(3), 0)
    assert s.pop_due(T0 + minutes(2)) == [(b"a", T0 + minutes(1), 1), (b"b", T0 + minutes(2), 0)]
    assert len(s) == 1


def test_rescheduling_replaces_the_old_due_time() -> None:
    s = TimerSchedule()
    s.set_due(b"a", T0 + minutes(1), 0)
    s.set_due(b"a", T0 + minutes(5), 0)
    assert s.pop_due(T0 + minutes(2)) == []
    assert s.pop_due(T0 + minutes(5)) == [(b"a", T0 + minutes(5), 0)]
    s.set_due(b"a", T0 + minutes(1), 0)
    s.set_due(b"a", None, 0)
    assert s.pop_due(T0 + minutes(10)) == [] and len(s) == 0


def test_dropping_revoked_partitions_forgets_their_customers() -> None:
    s = TimerSchedule()
    s.set_due(b"a", T0, 0)
    s.set_due(b"b", T0, 1)
    s.drop_partitions({0})
    assert [k for k, _, _ in s.pop_due(T0)] == [b"b"]


def test_heap_stays_bounded_under_constant_rescheduling() -> None:
    s = TimerSchedule()
    for i in range(20_000):
        s.set_due(b"a", T0 + minutes(i), 0)
    assert sum(len(heap) for heap in s._heaps.values()) <= 2 * len(s) + 1024
    assert s.pop_due(T0 + minutes(10**6)) == [(b"a", T0 + minutes(19_999), 0)]


def test_a_rebuild_keeps_what_was_scheduled_while_it_ran() -> None:
    """The rebuild scans the stored state while inputs are processed: a key written
    meanwhile keeps that write's due time (or its removal), whatever the scan reads
    for it before or after; keys it does not touch take the scanned due time."""
    s = TimerSchedule()
    s.set_due(b"gone", T0, 0)
    s.begin_rebuild()
    assert len(s) == 0, "a rebuild starts over"
    s.rebuild_due(b"read-before", T0 + minutes(1), 0)
    s.set_due(b"read-before", T0 + minutes(7), 0)  # the agent, after the scan read it
    s.set_due(b"read-after", T0 + minutes(8), 1)  # the agent, before the scan reads it
    s.rebuild_due(b"read-after", T0 + minutes(2), 1)
    s.set_due(b"ended", None, 0)  # the journey ended: unscheduled
    s.rebuild_due(b"ended", T0 + minutes(3), 0)
    s.rebuild_due(b"untouched", T0 + minutes(4), 1)
    s.end_rebuild()
    assert s.due_at(b"read-before") == T0 + minutes(7)
    assert s.due_at(b"read-after") == T0 + minutes(8)
    assert s.due_at(b"ended") is None and s.due_at(b"gone") is None
    assert s.due_at(b"untouched") == T0 + minutes(4)
    assert [k for k, _, _ in s.pop_due(T0 + minutes(10))] == [
        b"untouched", b"read-before", b"read-after"
    ]
    # Once it has ended, a scanned due time is an ordinary write again.
    s.set_due(b"a", T0, 0)
    s.rebuild_due(b"a", T0 + minutes(1), 0)
    assert s.due_at(b"a") == T0 + minutes(1)
