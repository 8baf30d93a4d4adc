"""Local table state is a cache of the changelog, as in Kafka Streams.

A rocksdb partition remembers the offset of the last changelog record it applied.
If that offset is past the changelog's last offset, the broker lost or truncated
the changelog (a fresh broker under an old data directory, a recreated topic):
the local partition holds state the changelog no longer has. Faust raises
`ConsistencyError` in recovery then, which stops the worker at every start, and
keeps the stale partition silently when either offset happens to be 0. Instead
the partition's directory is deleted and recovery restores it from the changelog.
"""

from __future__ import annotations

import gc
import logging
import shutil
from collections import Counter
from contextlib import suppress
from pathlib import Path

from faust.stores.rocksdb import Store as RocksDBStore
from faust.tables import TableManager
from faust.tables.base import Collection
from faust.tables.recovery import Recovery
from faust.types import TP
from faust.types.transports import ConsumerT

log = logging.getLogger(__name__)


def discard_partition(store: RocksDBStore, partition: int) -> Path:
    """Delete one partition's rocksdb directory and open an empty one in its place."""
    path = store.partition_path(partition).absolute()
    db = store._dbs.pop(partition, None)
    if db is not None:
        # RocksDB refuses a second open of a path this process still holds, and
        # faust never closes its handles; rocksdict's Rdict can, python-rocksdb's
        # DB is closed when collected.
        close = getattr(db, "close", None)
        if close is not None:
            close()
        del db
        gc.collect()
    # Maps keys to partitions, some of them the discarded one.
    store._key_index.clear()
    with suppress(FileNotFoundError):
        shutil.rmtree(path)
    store._db_for_partition(partition)
    return path


class StateCacheRecovery(Recovery):
    """Faust's recovery, first discarding local partitions ahead of their changelog."""

    async def _build_offsets(
        self, consumer: ConsumerT, tps: set[TP], destination: Counter[TP], title: str
    ) -> None:
        # `destination` holds the offsets recovery resumes from: the ones persisted
        # in the local store, or those it applied in an earlier round.
        if destination is self.active_offsets:
            # Just built from the broker, and what faust's consistency check uses.
            last_offsets: dict[TP, int] = dict(self.active_highwaters)
        else:
            # Standby end offsets are only read after seeking; read them now.
            ends = await consumer.highwaters(*tps)
            last_offsets = {tp: end - 1 for tp, end in ends.items() if end is not None}
        for tp in tps:
            offset, last = destination.get(tp), last_offsets.get(tp)
            if offset is None or last is None or offset <= last:
                continue
            table = self.tp_to_table[tp]
            if not isinstance(table, Collection) or not isinstance(table.data, RocksDBStore):
                continue  # Only rocksdb persists offsets; anything else faust reports.
            path = discard_partition(table.data, tp.partition)
            log.warning(
                "discarding local state of %s partition %d in %s: it applied changelog "
                "offset %d but the changelog's last offset is %d (the broker lost or "
                "truncated it); restoring from the changelog",
                tp.topic, tp.partition, path, offset, last,
            )  # fmt: skip
            # Recovery then starts at the changelog's earliest offset.
            destination[tp] = None  # type: ignore[assignment]
        await super()._build_offsets(consumer, tps, destination, title)


class StateCacheTableManager(TableManager):
    """Faust's table manager, recovering with `StateCacheRecovery`."""

    @property
    def recovery(self) -> Recovery:
        if self._recovery is None:
            self._recovery = StateCacheRecovery(self.app, self, beacon=self.beacon, loop=self.loop)
        return self._recovery
