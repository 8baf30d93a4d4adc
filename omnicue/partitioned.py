"""Partitioned, parallel replay: `omnicue replay --workers N`, `--partition i/N`,
`omnicue replay merge`.

Customers are independent, so a log splits into the live pipeline's partitions
(Kafka's murmur2 of the customer key, `OMNICUE_PARTITIONS` of them) and each
partition replays on its own. Every worker streams the whole file, cheaply: it
reads each line's identifiers and time, but validates and replays only the lines
of its own partitions. So no process is a bottleneck that parses for the others,
and a worker's memory holds its customers' state, not the input.

Two things make the partitions' outputs merge into exactly what one replayer of
the whole log writes, for any number of workers:

- The clock. Every worker sees every line's time, so each event arrives at the
  whole log's clock (the latest event time so far, over every line whose time
  can be read), and timers fire at the due times one replayer would fire them.
- Identity. The events of an anonymous id that a later event links to a customer
  must replay in that customer's partition. A pre-pass over the log (JSONL and
  Segment; REES46 rows carry one id each and need none) joins every identifier
  that an event names together with another (customer and anonymous id, an
  alias's previous id, an identify's hashed email or phone) into one group, with
  a union-find over those identifiers only: its memory is bounded by the linked
  identities, and events with a single identifier cost nothing. A group is routed
  by its customer (an alias's target first, else the first customer seen); a
  group without a customer by `anon:<id>`, the live key. Whatever the identity
  map does inside a group (merges, shared devices, conflicts) then happens inside
  one partition.

Each output line of a partition carries its place in the whole log's order
(`triggers.replay.OrderKey`); merging is a streaming k-way merge on it.
"""

from __future__ import annotations

import csv
import heapq
import io
import itertools
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, TextIO

import orjson
from pydantic import ValidationError

from omnicue.replay import (
    MAX_REPORTED_INVALID,
    REPLAY_FORMATS,
    Format,
    Rees46Reader,
    ReplayInputError,
    ReplaySummary,
    gc_tuned,
    open_events,
    parse_timestamp,
)
from omnicue.rules import load_rules
from omnicue.settings import Settings
from schemas.events import Channel, Event, describe_validation_error, event_adapter
from triggers.identity import (
    ANONYMOUS_PREFIX,
    IdentityPolicy,
    hash_identifier,
    normalise,
    usable,
)
from triggers.partitioner import partition_for
from triggers.replay import InvalidLine, Replayer, ReplayOutput, ReplayStats

# Lines between two progress updates of a worker.
_PROGRESS_EVERY = 4096
# Customer keys whose partition a worker remembers (every partition's customers).
_ROUTE_CACHE_SIZE = 1 << 20
_MIN = datetime.min.replace(tzinfo=UTC)


@dataclass(frozen=True)
class PartitionSpec:
    """Which partitions one replayer owns, of how many."""

    owned: frozenset[int]
    count: int

    @classmethod
    def parse(cls, text: str) -> PartitionSpec:
        """`i/N`: partition i of N."""
        index, sep, count = text.partition("/")
        try:
            i, n = int(index), int(count)
        except ValueError:
            raise ValueError(f"expected i/N (e.g. 3/8), not {text!r}") from None
        if not sep or n < 1 or not 0 <= i < n:
            raise ValueError(f"expected i/N with 0 <= i < N, not {text!r}")
        return cls(frozenset({i}), n)

    @property
    def label(self) -> str:
        return "+".join(str(p) for p in sorted(self.owned)) + f"-of-{self.count}"


# ------------------------------------------------------------------------ identity


class IdentityGroups:
    """Union-find over identifiers that events name together (see the module doc).

    Nodes: a customer id as it is, `anon:<id>`, `email:<hash>`, `phone:<hash>`.
    """

    def __init__(self, policy: IdentityPolicy | None = None) -> None:
        self.policy = policy or IdentityPolicy()
        self._parent: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._parent)

    def find(self, node: str) -> str:
        parent = self._parent
        root = node
        while (up := parent.get(root, root)) != root:
            root = up
        while node != root:  # path compression
            parent[node], node = root, parent[node]
        return root

    def union(self, keep: str, other: str) -> None:
        """One group; its root is `keep`'s unless only `other`'s is a customer."""
        a, b = self.find(keep), self.find(other)
        if a == b:
            return
        if a.startswith(ANONYMOUS_PREFIX) and not b.startswith(ANONYMOUS_PREFIX):
            a, b = b, a
        self._parent[b] = a
        self._parent.setdefault(a, a)

    def add(self, event: dict[str, Any]) -> None:
        """Join the identifiers one event names (an event dict, unvalidated)."""
        nodes = self.nodes(event)
        for node in nodes[1:]:
            self.union(nodes[0], node)

    def nodes(self, event: dict[str, Any]) -> list[str]:
        policy = self.policy
        nodes: list[str] = []
        customer = _text(event.get("customer_id"))
        if usable(customer, policy) is not None:
            nodes.append(customer or "")
        kind = event.get("type")
        properties = event.get("properties")
        if kind == "alias" and isinstance(properties, dict):
            previous = _text(properties.get("previous_id"))
            if usable(previous, policy) is not None:
                # A customer id or an anonymous id: `resolve` decides which, later.
                nodes += [previous or "", ANONYMOUS_PREFIX + (previous or "")]
        anonymous = _text(event.get("anonymous_id"))
        if usable(anonymous, policy) is not None:
            nodes.append(ANONYMOUS_PREFIX + (anonymous or ""))
        if kind == "identify" and isinstance(properties, dict):
            traits = properties.get("traits")
            if isinstance(traits, dict):
                for field_kind in ("email", "phone"):
                    raw = _text(traits.get(field_kind))
                    if raw is None or usable(raw, policy) is None:
                        continue
                    if normalise(field_kind, raw) in policy.blocked:
                        continue
                    nodes.append(hash_identifier(field_kind, raw, policy.salt))
        return nodes

    def route_key(self, event: dict[str, Any]) -> str:
        """The key an event's group is partitioned by."""
        customer = _text(event.get("customer_id"))
        if customer is not None and usable(customer, self.policy) is not None:
            return self.find(customer) if self._parent else customer
        anonymous = _text(event.get("anonymous_id"))
        if anonymous is not None and usable(anonymous, self.policy) is not None:
            node = ANONYMOUS_PREFIX + anonymous
            return self.find(node) if self._parent else node
        # Only blocked ids: the event keeps its own key (as `resolve` does).
        return customer if customer is not None else ANONYMOUS_PREFIX + (anonymous or "")


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


# ------------------------------------------------------------------------- reading


# One line's items (sub-positions 0, 1, ...), the whole log's clock at the line,
# and the line number: what `Replayer.run_at` takes.
Routed = tuple[list[Event | InvalidLine], datetime, int]


class _Clock:
    """The whole log's arrival clock over every line whose time can be read."""

    __slots__ = ("now", "_text")

    def __init__(self) -> None:
        self.now: datetime | None = None
        self._text = ""

    def see(self, value: Any) -> datetime | None:
        if type(value) is not str:
            return self.now
        if value != self._text:
            try:
                at = parse_timestamp(value[:-4] + "+00:00" if value.endswith(" UTC") else value)
            except ValueError:
                return self.now
            self._text = value
            if self.now is None or at > self.now:
                self.now = at
        return self.now


def _dict_lines(
    stream: IO[bytes], fmt: Format, channel: Channel
) -> Iterator[tuple[int, bytes, list[dict[str, Any]] | str]]:
    """(line number, line, its event dicts or an error) for JSONL and Segment."""
    from omnicue.segment import MappingError, map_message

    for number, line in enumerate(stream, 1):
        if not line.strip():
            continue
        try:
            message = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            yield number, line, str(exc)
            continue
        if type(message) is not dict:
            yield number, line, "a message must be a JSON object"
            continue
        if fmt == "jsonl":
            yield number, line, [message]
            continue
        if "timestamp" not in message and "originalTimestamp" not in message:
            received = message.get("receivedAt")
            if not isinstance(received, str):
                yield number, line, "timestamp: required (or originalTimestamp, receivedAt)"
                continue
            message = {**message, "timestamp": received}
        try:
            yield number, line, map_message(message, channel, _MIN)
        except MappingError as exc:
            yield number, line, str(exc)


def identity_prepass(
    path: Path, fmt: Format, channel: Channel = "web", policy: IdentityPolicy | None = None
) -> IdentityGroups:
    """Read the log once for its identity links (streaming; nothing for REES46)."""
    groups = IdentityGroups(policy)
    if fmt == "rees46":
        return groups
    with open_events(path) as (stream, _):
        for _, _, events in _dict_lines(stream, fmt, channel):
            if isinstance(events, str):
                continue
            for event in events:
                if "anonymous_id" in event or event.get("type") in ("alias", "identify"):
                    groups.add(event)
    return groups


class _Router:
    def __init__(self, spec: PartitionSpec, groups: IdentityGroups) -> None:
        self.spec = spec
        self.groups = groups
        # Key -> owned? Bounded by the customers seen, as their states are.
        self.cache: dict[str, bool] = {}
        # The same for keys as bytes (REES46 rows are routed before they are decoded).
        self.bytes_cache: dict[bytes, bool] = {}

    def owns_bytes(self, key: bytes) -> bool:
        mine = self.bytes_cache.get(key)
        if mine is None:
            if len(self.bytes_cache) >= _ROUTE_CACHE_SIZE:
                self.bytes_cache.clear()
            mine = self.bytes_cache[key] = partition_for(key, self.spec.count) in self.spec.owned
        return mine

    def owns(self, key: str) -> bool:
        mine = self.cache.get(key)
        if mine is None:
            if len(self.cache) >= _ROUTE_CACHE_SIZE:
                # Other partitions' customers too: bounded, murmur2 again after this.
                self.cache.clear()
            mine = self.cache[key] = (
                partition_for(key.encode(), self.spec.count) in self.spec.owned
            )
        return mine


def route_dicts(
    stream: IO[bytes],
    fmt: Format,
    router: _Router,
    clock: _Clock,
    channel: Channel,
    on_line: Callable[[int], None],
) -> Iterator[Routed]:
    """A JSONL or Segment log's items of the owned partitions."""
    owns = router.owns
    route_key = router.groups.route_key
    # A line that is no event at all is partition 0's to report.
    owns_unroutable = 0 in router.spec.owned
    for number, line, events in _dict_lines(stream, fmt, channel):
        if number % _PROGRESS_EVERY == 0:
            on_line(number)
        if isinstance(events, str):
            if owns_unroutable:
                yield [InvalidLine(number, events)], clock.now or _MIN, number
            continue
        # A Segment message maps to one event, or to several of one person.
        arrival = _MIN
        for event in events:
            arrival = clock.see(event.get("occurred_at")) or _MIN
        if not owns(route_key(events[0])):
            continue
        items: list[Event | InvalidLine] = []
        for event in events:
            try:
                items.append(
                    event_adapter.validate_json(line)
                    if fmt == "jsonl"
                    else event_adapter.validate_python(event)
                )
            except ValidationError as exc:
                items.append(InvalidLine(number, describe_validation_error(exc)))
        yield items, arrival, number


def route_rees46(
    reader: Rees46Reader, router: _Router, clock: _Clock, on_line: Callable[[int], None]
) -> Iterator[Routed]:
    """A REES46 CSV's items of the owned partitions: one user id per row, no links.

    Every worker reads every row, so a row of another partition costs only a split
    of its bytes: the time (for the clock) and the user id (for the partition). A
    row of this partition is decoded and read as `csv` reads it; a row with quotes
    goes through `csv` itself, with the lines after it while a quoted field spans
    lines. Line numbers are physical lines, as `csv.reader`'s `line_num`: the same
    event ids as the single-process reader (a file with old-Mac `\r` line ends is
    read through `csv` as a whole)."""
    stream = reader.stream
    first = stream.readline()
    header = first.decode("utf-8-sig", errors="replace")
    if b"\r" in first.rstrip(b"\r\n") or (first.endswith(b"\r") and not first.endswith(b"\n")):
        yield from _route_rees46_csv(reader, router, clock, on_line, header)
        return
    reader.check_header(next(csv.reader([header]), None) if header.strip() else None)
    # The per-row path of every worker, for every row: inlined.
    mine = router.bytes_cache
    owns = router.owns_bytes
    row_items = reader.row_items
    see = clock.see
    last_time = b""
    arrival = _MIN
    number = 1
    lines = iter(stream)
    for line in lines:
        number += 1
        if number % _PROGRESS_EVERY == 0:
            reader.rows = number - 1
            on_line(number - 1)
        if b'"' in line:
            # Quoted fields: csv's reading, over as many lines as the quotes span.
            text = line.decode("utf-8", errors="replace")
            while text.count('"') % 2:
                more = next(lines, None)
                if more is None:
                    break
                number += 1
                text += more.decode("utf-8", errors="replace")
            row = next(csv.reader(io.StringIO(text, newline="")), [])
            if not row:
                continue
            if row[0].encode() != last_time:
                last_time = row[0].encode()
                arrival = see(row[0]) or _MIN
            user = row[7].encode() if len(row) == 9 else b""
            if mine.get(user) or (user not in mine and owns(user)):
                yield row_items(row, number), arrival, number
            continue
        parts = line.rstrip(b"\r\n").split(b",")
        if len(parts) == 1 and not parts[0]:
            continue  # a blank line
        if parts[0] != last_time:
            last_time = parts[0]
            arrival = see(last_time.decode("utf-8", errors="replace")) or _MIN
        user = parts[7] if len(parts) == 9 else b""
        owned = mine.get(user)
        if owned is None:
            owned = owns(user)
        if owned:
            row = line.decode("utf-8", errors="replace").rstrip("\r\n").split(",")
            yield row_items(row, number), arrival, number
    reader.rows = number - 1


def _route_rees46_csv(
    reader: Rees46Reader,
    router: _Router,
    clock: _Clock,
    on_line: Callable[[int], None],
    header: str,
) -> Iterator[Routed]:
    text = io.TextIOWrapper(reader.stream, encoding="utf-8", errors="replace", newline="")
    try:
        rows = csv.reader(itertools.chain([header], text))
        reader.check_header(next(rows, None))
        arrival = _MIN
        for row in rows:
            reader.rows += 1
            if not row:
                continue
            arrival = clock.see(row[0]) or _MIN
            if router.owns_bytes(row[7].encode() if len(row) == 9 else b""):
                yield reader.row_items(row, rows.line_num), arrival, rows.line_num
    finally:
        text.detach()


# ------------------------------------------------------------------------- workers


@dataclass
class PartitionResult:
    stats: ReplayStats
    lines: int
    synthesized: int
    # This process's peak resident set (VmHWM), KiB, and its CPU time so far.
    peak_rss_kib: int = 0
    cpu_seconds: float = 0.0


def peak_rss_kib() -> int:
    """This process's peak resident set size in KiB (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def replay_partition(
    events_path: Path,
    fmt: Format,
    spec: PartitionSpec,
    groups: IdentityGroups,
    out_dir: Path,
    rules_path: Path | None,
    until: datetime | None,
    settings: Settings,
    *,
    write_decisions: bool = True,
    synthetic_contacts: bool = False,
    segment_channel: Channel = "web",
    progress: Callable[[int, int], None] = lambda position, lines: None,
    stderr: TextIO | None = None,
) -> PartitionResult:
    """Replay the owned partitions; write `<label>.actions`, `.decisions` (each line
    `order-key<TAB>json`) and `.stats.json` into `out_dir`."""
    err = stderr if stderr is not None else sys.stderr
    rules = load_rules(rules_path)
    replayer = Replayer(
        rules, settings.engine_policy(), timedelta(seconds=settings.allowed_lateness),
        identity_policy=settings.identity_policy(),
    )  # fmt: skip
    router = _Router(spec, groups)
    clock = _Clock()
    reported = 0
    label = spec.label
    out_dir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as files:
        files.enter_context(gc_tuned())
        stream, position = files.enter_context(open_events(events_path))
        actions = files.enter_context(open(out_dir / f"{label}.actions", "wb"))
        decisions = (
            files.enter_context(open(out_dir / f"{label}.decisions", "wb"))
            if write_decisions
            else None
        )

        def on_line(lines: int) -> None:
            progress(position(), lines)

        rees46: Rees46Reader | None = None
        if fmt == "rees46":
            rees46 = Rees46Reader(stream, synthetic_contacts=synthetic_contacts)
            routed = route_rees46(rees46, router, clock, on_line)
        else:
            routed = route_dicts(stream, fmt, router, clock, segment_channel, on_line)
        def checked(lines: Iterator[Routed]) -> Iterator[Routed]:
            """The lines, with their invalid items reported (the owner's to report)."""
            nonlocal reported
            for line in lines:
                items = line[0]
                if len(items) == 1 and type(items[0]) is not InvalidLine:
                    yield line  # the common case, one valid event
                    continue
                for item in items:
                    if isinstance(item, InvalidLine):
                        reported += 1
                        if reported <= MAX_REPORTED_INVALID:
                            print(f"{events_path}:{item.line}: {item.error}", file=err)
                yield line

        for output in replayer.run_at(checked(routed)):
            _write(output, actions, decisions)
        # Every line has been read: the clock is the whole log's last arrival.
        for output in replayer.finish(until if until is not None else clock.now):
            _write(output, actions, decisions)
        lines = rees46.rows if rees46 is not None else 0
        progress(position(), lines)
    if reported > MAX_REPORTED_INVALID:
        hidden = reported - MAX_REPORTED_INVALID
        print(f"{events_path}: ... {hidden} more invalid line(s) not shown", file=err)
    result = PartitionResult(
        replayer.stats,
        lines,
        rees46.synthesized if rees46 is not None else 0,
        peak_rss_kib(),
        time.process_time(),
    )
    (out_dir / f"{label}.stats.json").write_bytes(
        orjson.dumps({
            "partitions": sorted(spec.owned),
            "count": spec.count,
            "synthesized": result.synthesized,
            "peak_rss_kib": result.peak_rss_kib,
            "cpu_seconds": result.cpu_seconds,
            "stats": stats_to_json(result.stats),
        })
    )
    return result


def _write(output: ReplayOutput, actions: IO[bytes], decisions: IO[bytes] | None) -> None:
    order = orjson.dumps(output.order) + b"\t"
    for action in output.actions:
        actions.write(order + action.model_dump_json().encode() + b"\n")
    if decisions is not None:
        for decision in output.decisions:
            # The same JSON as the worker's decisions topic.
            decisions.write(order + decision.model_dump_json(exclude_none=True).encode() + b"\n")


# ----------------------------------------------------------------------- the stats


def stats_to_json(stats: ReplayStats) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for f in fields(stats):
        value = getattr(stats, f.name)
        if isinstance(value, Counter):
            data[f.name] = [[list(k) if isinstance(k, tuple) else k, n] for k, n in value.items()]
        elif isinstance(value, datetime):
            data[f.name] = value.isoformat()
        else:
            data[f.name] = value
    return data


def stats_from_json(data: dict[str, Any]) -> ReplayStats:
    stats = ReplayStats()
    for f in fields(stats):
        value = data.get(f.name)
        current = getattr(stats, f.name)
        if isinstance(current, Counter):
            setattr(stats, f.name, Counter(
                {(tuple(k) if isinstance(k, list) else k): n for k, n in value or []}
            ))
        elif f.name in ("first_event_at", "last_arrival", "finished_at"):
            setattr(stats, f.name, datetime.fromisoformat(value) if value else None)
        else:
            setattr(stats, f.name, value)
    return stats


def merge_stats(parts: Iterable[ReplayStats]) -> ReplayStats:
    """The counters of disjoint partitions of one log, as one replay would count."""
    total = ReplayStats()
    for part in parts:
        for f in fields(total):
            mine, theirs = getattr(total, f.name), getattr(part, f.name)
            if isinstance(mine, Counter):
                mine.update(theirs)
            elif f.name == "first_event_at":
                if theirs is not None and (mine is None or theirs < mine):
                    total.first_event_at = theirs
            elif f.name in ("last_arrival", "finished_at"):
                if theirs is not None and (mine is None or theirs > mine):
                    setattr(total, f.name, theirs)
            else:
                setattr(total, f.name, mine + theirs)
    return total


# ------------------------------------------------------------------------- merging


def merge_outputs(parts: list[Path], out: Path) -> int:
    """K-way merge of partition output files by their order keys (streaming)."""
    with ExitStack() as files:
        streams = [files.enter_context(open(p, "rb")) for p in parts]
        target = files.enter_context(open(out, "wb"))
        written = 0

        def keyed(stream: IO[bytes]) -> Iterator[tuple[list[Any], bytes]]:
            loads = orjson.loads
            for line in stream:
                tab = line.index(b"\t")
                yield loads(line[:tab]), line[tab + 1 :]

        for _, payload in heapq.merge(*(keyed(s) for s in streams), key=lambda kv: kv[0]):
            target.write(payload)
            written += 1
    return written


def find_parts(directories: Iterable[Path]) -> tuple[list[Path], list[Path], list[Path]]:
    """The stats, actions and decisions files of a complete set of partitions."""
    stats = sorted(p for d in directories for p in d.glob("*.stats.json"))
    if not stats:
        raise ReplayInputError("no partition outputs (*.stats.json) found")
    counts: set[int] = set()
    owned: list[int] = []
    for path in stats:
        data = orjson.loads(path.read_bytes())
        counts.add(data["count"])
        owned += data["partitions"]
    if len(counts) != 1:
        raise ReplayInputError(f"partitions of different counts: {sorted(counts)}")
    count = counts.pop()
    if sorted(owned) != list(range(count)):
        missing = sorted(set(range(count)) - set(owned))
        twice = sorted(p for p, n in Counter(owned).items() if n > 1)
        raise ReplayInputError(
            f"not one output per partition of {count}: missing {missing}, twice {twice}"
        )
    actions = [p.with_name(p.name.removesuffix(".stats.json") + ".actions") for p in stats]
    decisions = [p.with_name(p.name.removesuffix(".stats.json") + ".decisions") for p in stats]
    return stats, actions, decisions


@dataclass(frozen=True)
class Merged:
    stats: ReplayStats
    synthesized: int
    # The largest peak resident set of the partitions' processes, KiB.
    peak_rss_kib: int
    # Each partition process's CPU time (of those that recorded it).
    cpu_seconds: tuple[float, ...] = ()


def merge_partitions(
    directories: Iterable[Path], out: Path, decisions_path: Path | None
) -> Merged:
    """`omnicue replay merge`: the partitions' outputs as one replay's files."""
    stats_files, actions, decisions = find_parts(list(directories))
    merge_outputs(actions, out)
    if decisions_path is not None:
        if not all(p.exists() for p in decisions):
            raise ReplayInputError("some partitions were replayed without decisions")
        merge_outputs(decisions, decisions_path)
    datas = [orjson.loads(p.read_bytes()) for p in stats_files]
    stats = merge_stats(stats_from_json(d["stats"]) for d in datas)
    return Merged(
        stats,
        sum(d["synthesized"] for d in datas),
        max(d.get("peak_rss_kib", 0) for d in datas),
        tuple(d["cpu_seconds"] for d in datas if "cpu_seconds" in d),
    )


# ------------------------------------------------------------------------ parallel


class _Progress:
    """One bar for all workers: the slowest worker's share of the file, and an ETA."""

    def __init__(self, stream: TextIO, total: int, workers: int) -> None:
        self.stream = stream
        self.total = max(total, 1)
        self.positions = _context().Array("q", workers, lock=False)
        self.started = time.monotonic()
        self.tty = stream.isatty()

    def draw(self, final: bool = False) -> None:
        position = self.total if final else min(self.positions)
        share = min(position / self.total, 1.0)
        elapsed = time.monotonic() - self.started
        eta = elapsed * (1 - share) / share if share > 0 else 0.0
        width = 30
        filled = int(share * width)
        mib = 1024 * 1024
        text = (
            f"[{'#' * filled}{'.' * (width - filled)}] {share * 100:5.1f}% "
            f"{position / mib:,.1f}/{self.total / mib:,.1f} MiB, "
            f"{len(self.positions)} worker(s), {elapsed:,.0f}s, ETA {eta:,.0f}s"
        )
        self.stream.write(f"\r{text}" if self.tty else f"{text}\n")
        if final and self.tty:
            self.stream.write("\n")
        self.stream.flush()


def run_partitioned(
    events_path: Path,
    out: Path,
    decisions_path: Path | None,
    rules_path: Path | None,
    until: datetime | None,
    fmt: Format,
    progress: bool,
    settings: Settings,
    *,
    workers: int,
    synthetic_contacts: bool = False,
    segment_channel: Channel = "web",
    stderr: TextIO | None = None,
) -> ReplaySummary:
    """`omnicue replay --workers N`: the partitions in N processes, merged."""
    if fmt not in REPLAY_FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(REPLAY_FORMATS)}")
    if workers < 1:
        raise ValueError("workers must be at least 1")
    err = stderr if stderr is not None else sys.stderr
    load_rules(rules_path)  # bad rules fail here, once, not in every worker
    if fmt == "rees46":
        # So does a file that is not REES46 at all.
        with open_events(events_path) as (stream, _):
            first = stream.readline().decode("utf-8-sig", errors="replace")
        Rees46Reader.check_header(next(csv.reader([first]), None) if first.strip() else None)
    started = time.perf_counter()
    groups = identity_prepass(events_path, fmt, segment_channel, settings.identity_policy())
    count = settings.partitions
    specs = [
        PartitionSpec(frozenset(p for p in range(count) if p % workers == w), count)
        for w in range(min(workers, count))
    ]
    with open(events_path, "rb") as raw:
        total = os.fstat(raw.fileno()).st_size
    bar = _Progress(err, total, len(specs))
    tmp = Path(tempfile.mkdtemp(prefix="omnicue-replay-", dir=out.parent))
    try:
        context = _context()
        processes = []
        for index, spec in enumerate(specs):
            process = context.Process(
                target=_worker,
                args=(events_path, fmt, spec, groups, tmp, rules_path, until, settings,
                      decisions_path is not None, synthetic_contacts, segment_channel,
                      bar.positions, index),
                name=f"omnicue-replay-{spec.label}",
            )  # fmt: skip
            process.start()
            processes.append(process)
        while any(p.is_alive() for p in processes):
            if progress:
                bar.draw()
            for p in processes:
                p.join(timeout=0.25 if bar.tty else 2.0)
                if p.is_alive():
                    break
        failed = [p.name for p in processes if p.exitcode != 0]
        if failed:
            raise ReplayInputError(f"replay worker(s) failed: {', '.join(failed)}")
        if progress:
            bar.draw(final=True)
        merged = merge_partitions([tmp], out, decisions_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ReplaySummary(
        source=str(events_path),
        fmt=fmt,
        stats=merged.stats,
        elapsed=time.perf_counter() - started,
        actions_path=out,
        decisions_path=decisions_path,
        synthesized=merged.synthesized,
        workers=len(specs),
        peak_rss_kib=merged.peak_rss_kib,
        worker_cpu_seconds=merged.cpu_seconds,
    )


def _worker(
    events_path: Path,
    fmt: Format,
    spec: PartitionSpec,
    groups: IdentityGroups,
    out_dir: Path,
    rules_path: Path | None,
    until: datetime | None,
    settings: Settings,
    write_decisions: bool,
    synthetic_contacts: bool,
    segment_channel: Channel,
    positions: Any,
    index: int,
) -> None:
    def report(position: int, lines: int) -> None:
        positions[index] = position

    replay_partition(
        events_path, fmt, spec, groups, out_dir, rules_path, until, settings,
        write_decisions=write_decisions, synthetic_contacts=synthetic_contacts,
        segment_channel=segment_channel, progress=report,
    )  # fmt: skip


def _context() -> Any:
    """Workers start from a fork server with this module imported: as cheap as a
    fork, without forking a caller's threads (a test runner's, a CLI's)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["omnicue.partitioned"])
    return context
