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
