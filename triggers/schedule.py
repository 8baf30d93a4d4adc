"""Which customers need the timer when: a min-heap with lazy deletion.

Holding one entry per customer with a pending step, a tick costs O(k log n) for k
due customers instead of scanning every customer. Entries are replaced, not
removed: `set_due` pushes a new heap entry and `pop_due` skips ones that are stale.
"""

from __future__ import annotations

import heapq
from datetime import datetime


class TimerSchedule:
    def __init__(self) -> None:
        self._heap: list[tuple[datetime, bytes]] = []
        self._due: dict[bytes, datetime] = {}
        self._partition: dict[bytes, int] = {}

    def __len__(self) -> int:
        return len(self._due)

    def due_at(self, key: bytes) -> datetime | None:
        return self._due.get(key)

    def set_due(self, key: bytes, due_at: datetime | None, partition: int) -> None:
        """Schedule `key` at `due_at`, or unschedule it with None."""
        if due_at is None:
            self._due.pop(key, None)
            self._partition.pop(key, None)
            return
        if self._due.get(key) == due_at:
            return
        self._due[key] = due_at
        self._partition[key] = partition
        heapq.heappush(self._heap, (due_at, key))
        # Replaced entries stay in the heap until popped; compact when they dominate.
        if len(self._heap) > 2 * len(self._due) + 1024:
            self._heap = [(due, k) for k, due in self._due.items()]
            heapq.heapify(self._heap)

    def pop_due(self, now: datetime, limit: int = 10_000) -> list[tuple[bytes, datetime, int]]:
        """Remove and return up to `limit` (key, due_at, partition) with due_at <= now."""
        out: list[tuple[bytes, datetime, int]] = []
        while self._heap and self._heap[0][0] <= now and len(out) < limit:
            due_at, key = heapq.heappop(self._heap)
            if self._due.get(key) != due_at:
                continue
            del self._due[key]
            out.append((key, due_at, self._partition.pop(key)))
        return out

    def drop_partitions(self, partitions: set[int]) -> None:
        """Forget customers of partitions this worker no longer owns."""
        for key in [k for k, p in self._partition.items() if p in partitions]:
            del self._due[key]
            del self._partition[key]

    def clear(self) -> None:
        self._heap.clear()
        self._due.clear()
        self._partition.clear()
