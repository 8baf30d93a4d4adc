"""Event time and catch-up per partition: when a worker may evaluate a due step.

A step due at `d` may be evaluated only once every input of its customer that
occurred before `d` has been applied. A caught-up worker knows that at once: it
has applied everything there is. A worker that is behind (after an outage, a
deploy, a rebalance, or under load) must not fire a cart reminder whose
`order.completed` is still waiting in its backlog. It goes by event time instead,
as Flink's and Kafka Streams' event-time timers do:

- a partition's watermark is the latest `occurred_at` applied from it;
- a step due at `d` may fire once the watermark has passed `d + lateness`, where
  `lateness` (`OMNICUE_ALLOWED_LATENESS`) bounds how far producers may be out of
  order; or once the worker has caught up with the partition, at both stages
  (`omnicue.events` forwarded, `omnicue.customer-inputs` applied).

Its horizon, the latest due time it may evaluate now, is therefore the wall clock
when caught up and `watermark - lateness` otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime, timedelta

import faust
from faust.types import TP

# The consumer's high watermark of a partition (the offset after its last record);
# None while unknown (no fetch answered yet).
Highwater = Callable[[TP], int | None]
# The partitions assigned to this worker.
Assignment = Callable[[], Iterable[TP]]
# The offset this worker's group has committed for a partition (the next to read).
Committed = Callable[[TP], int | None]


class Progress:
    def __init__(
        self,
        *,
        events_topic: str,
        inputs_topic: str,
        lateness: timedelta,
        highwater: Highwater,
        assignment: Assignment,
        committed: Committed,
    ) -> None:
        self.lateness = lateness
        self._events_topic = events_topic
        self._inputs_topic = inputs_topic
        self._highwater = highwater
        self._assignment = assignment
        self._committed = committed
        self._watermarks: dict[int, datetime] = {}
        # The offset after the last record processed, per topic partition.
        self._next: dict[TP, int] = {}

    def processed(self, tp: TP, offset: int) -> None:
        """Record that the record at `offset` has been fully handled."""
        if offset + 1 > self._next.get(tp, -1):
            self._next[tp] = offset + 1

    def handled(self, tp: TP) -> int:
        """The offset after the last record of `tp` handled (or committed) here."""
        return max(self._next.get(tp, 0), self._committed(tp) or 0)

    def observe(self, partition: int, occurred_at: datetime) -> None:
        """An input of `partition` that occurred at `occurred_at` is being applied."""
        current = self._watermarks.get(partition)
        if current is None or occurred_at > current:
            self._watermarks[partition] = occurred_at

    def watermark(self, partition: int) -> datetime | None:
        return self._watermarks.get(partition)

    def caught_up(self, partition: int) -> bool:
        """Everything in the partition has been handled, at both stages."""
        inputs = TP(self._inputs_topic, partition)
        if not self._handled_all(inputs):
            return False
        events = TP(self._events_topic, partition)
        # Co-partitioned topics are assigned together; where the events partition
        # belongs to another worker, that worker's lag is not ours to see.
        return events not in set(self._assignment()) or self._handled_all(events)

    def horizon(self, partition: int, now: datetime) -> datetime | None:
        """The latest due time that may be evaluated now; None: none yet."""
        if self.caught_up(partition):
            return now
        watermark = self._watermarks.get(partition)
        if watermark is None:
            return None
        return min(now, watermark - self.lateness)

    def forget(self, partitions: Iterable[TP]) -> None:
        """Partitions revoked: a later owner starts from what it sees itself."""
        for tp in partitions:
            self._next.pop(tp, None)
            if tp.topic == self._inputs_topic:
                self._watermarks.pop(tp.partition, None)

    def _handled_all(self, tp: TP) -> bool:
        highwater = self._highwater(tp)
        if highwater is None:
            return False
        return self.handled(tp) >= highwater


def consumer_progress(app: faust.App, events_topic: str, inputs_topic: str,
                      lateness: timedelta) -> Progress:
    """Progress read off the app's consumer."""

    def highwater(tp: TP) -> int | None:
        try:
            return app.consumer.highwater(tp)
        except Exception:  # noqa: BLE001 - not started, or the partition not fetched yet
            return None

    def committed(tp: TP) -> int | None:
        # faust keeps the group's committed offsets (the next offset to read) from
        # the assignment on; it has no public accessor for them.
        offsets: dict[TP, int | None] = getattr(app.consumer, "_committed_offset", {})
        return offsets.get(tp)

    def assignment() -> Iterable[TP]:
        try:
            return app.consumer.assignment()
        except Exception:  # noqa: BLE001 - not started yet
            return ()

    return Progress(
        events_topic=events_topic,
        inputs_topic=inputs_topic,
        lateness=lateness,
        highwater=highwater,
        assignment=assignment,
        committed=committed,
    )
