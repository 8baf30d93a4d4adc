"""Which customers need the timer when: min-heaps with lazy deletion.

Holding one entry per customer with a pending step, a tick costs O(k log n) for k
due customers instead of scanning every customer. Entries are replaced, not
removed: `set_due` pushes a new heap entry and `pop_due` skips ones that are stale.
"""

from __future__ import annotations

import heapq
from datetime import datetime


class TimerSchedule:
    """One heap per partition: a partition's timers wait for that partition's horizon
    (see `streams.progress`), so a partition that is behind holds back only its own."""

    def __init__(self) -> None:
        self._heaps: dict[int, list[tuple[datetime, bytes]]] = {}
        self._due: dict[bytes, datetime] = {}
        self._partition: dict[bytes, int] = {}
        # While a rebuild is under way: the keys scheduled by `set_due` since it began.
        self._written: set[bytes] | None = None

    def __len__(self) -> int:
        return len(self._due)

    def due_at(self, key: bytes) -> datetime | None:
        return self._due.get(key)

    def partitions(self) -> list[int]:
        return [p for p, heap in self._heaps.items() if heap]

    def set_due(self, key: bytes, due_at: datetime | None, partition: int) -> None:
        """Schedule `key` at `due_at`, or unschedule it with None."""
        if self._written is not None:
            self._written.add(key)
        self._set(key, due_at, partition)

    def begin_rebuild(self) -> None:
        """Start over from a scan of the stored state that runs while inputs are
        processed: the scan adds what it reads with `rebuild_due`, and a key scheduled
        with `set_due` meanwhile keeps that due time, which is newer than the stored
        one the scan may still read (or have read) for it."""
        self.clear()
        self._written = set()

    def rebuild_due(self, key: bytes, due_at: datetime | None, partition: int) -> None:
        """The due time the rebuild's scan read for `key`, unless it was scheduled since."""
        if self._written is None or key not in self._written:
            self._set(key, due_at, partition)

    def end_rebuild(self) -> None:
        self._written = None

    def _set(self, key: bytes, due_at: datetime | None, partition: int) -> None:
        if due_at is None:
            self._due.pop(key, None)
            self._partition.pop(key, None)
            return
        if self._due.get(key) == due_at and self._partition.get(key) == partition:
            return
        self._due[key] = due_at
        self._partition[key] = partition
        heap = self._heaps.get(partition)
        if heap is None:
            heap = self._heaps[partition] = []
        heapq.heappush(heap, (due_at, key))
        # Replaced entries stay in the heap until popped; compact when they dominate.
        if len(heap) > 2 * len(self._due) + 1024:
            self._compact()

    def pop_due(self, now: datetime, limit: int = 10_000) -> list[tuple[bytes, datetime, int]]:
        """Remove and return up to `limit` (key, due_at, partition) with due_at <= now,
        across partitions, in due order."""
        out: list[tuple[bytes, datetime, int]] = []
        while len(out) < limit:
            ready = [(h[0][0], p) for p, h in self._heaps.items() if h and h[0][0] <= now]
            if not ready:
                break
            due_at, partition = min(ready)
            out += self.pop_partition(partition, due_at, 1)
        return out

    def pop_partition(
        self, partition: int, horizon: datetime, limit: int = 10_000
    ) -> list[tuple[bytes, datetime, int]]:
        """Remove and return up to `limit` of the partition's entries due by `horizon`."""
        heap = self._heaps.get(partition)
        out: list[tuple[bytes, datetime, int]] = []
        while heap and heap[0][0] <= horizon and len(out) < limit:
            due_at, key = heapq.heappop(heap)
            if self._due.get(key) != due_at or self._partition.get(key) != partition:
                continue
            del self._due[key]
            del self._partition[key]
            out.append((key, due_at, partition))
        return out

    def drop_partitions(self, partitions: set[int]) -> None:
        """Forget customers of partitions this worker no longer owns."""
        for key in [k for k, p in self._partition.items() if p in partitions]:
            del self._due[key]
            del self._partition[key]
        for partition in partitions:
            self._heaps.pop(partition, None)

    def clear(self) -> None:
        self._heaps.clear()
        self._due.clear()
        self._partition.clear()

    def _compact(self) -> None:
        heaps: dict[int, list[tuple[datetime, bytes]]] = {}
        for key, due in self._due.items():
            heaps.setdefault(self._partition[key], []).append((due, key))
        for heap in heaps.values():
            heapq.heapify(heap)
        self._heaps = heaps
