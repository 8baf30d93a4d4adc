"""`omnicue replay`: backtest rules on a recorded event log, offline.

The readers turn a file into events (the JSONL contract, Segment-spec JSONL through
the HTTP ingest's mapping, or the public REES46 e-commerce CSV); `triggers.replay`
drives the live engine over them in event time; this module writes the actions and
decisions as JSONL, in the same JSON as the stream worker sends them, and
summarises the run.
"""

from __future__ import annotations

import csv
import gc
import io
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, Literal, TextIO, cast

import orjson
from pydantic import ValidationError

from omnicue.rules import load_rules
from omnicue.settings import Settings
from schemas.events import (
    CartItemAdded,
    CartItemRemoved,
    Channel,
    ConsentUpdated,
    Event,
    Identify,
    OrderCompleted,
    ProductViewed,
    ProductViewedProperties,
    describe_validation_error,
    event_adapter,
)
from triggers.replay import InvalidLine, Replayer, ReplayStats

Format = Literal["jsonl", "rees46", "segment"]
# What every reader of event logs takes (`omnicue report` too).
FORMATS: tuple[Format, ...] = ("jsonl", "rees46")
# `omnicue replay` also reads Segment messages (`read_segment`).
REPLAY_FORMATS: tuple[Format, ...] = (*FORMATS, "segment")

REES46_COLUMNS = (
    "event_time",
    "event_type",
    "product_id",
    "category_id",
    "category_code",
    "brand",
    "price",
    "user_id",
    "user_session",
)
# Only the first invalid lines are printed; all of them are counted in the summary.
MAX_REPORTED_INVALID = 100
# How many input lines between two looks at the clock for the progress bar.
_PROGRESS_EVERY = 2048
# Distinct product rows whose validated view properties are kept for reuse.
_VIEWED_CACHE_SIZE = 65_536
# `ProductViewed.model_validate` without its Python wrapper: this runs for most rows.
_validate_viewed = ProductViewed.__pydantic_validator__.validate_python

OnInvalid = Callable[[InvalidLine], None]


class ReplayInputError(ValueError):
    """The input cannot be replayed at all (as opposed to a few invalid lines)."""


def format_for(path: Path) -> Format:
    """The default format of a file: REES46 for `.csv` (also `.csv.gz`, `.csv.zst`),
    else the JSONL contract."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSED_SUFFIXES:
        suffixes.pop()
    return "rees46" if suffixes and suffixes[-1] == ".csv" else "jsonl"


_COMPRESSED_SUFFIXES = (".gz", ".zst", ".zstd")
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


@contextmanager
def open_events(path: Path) -> Iterator[tuple[IO[bytes], Callable[[], int]]]:
    """An event log as a stream of its (decompressed) bytes, and where in the file
    reading is (for a progress bar). gzip and zstd are recognised by their magic
    bytes and decompressed as read: the file is never loaded whole."""
    with open(path, "rb") as raw:
        magic = raw.read(4)
        raw.seek(0)
        if magic.startswith(_GZIP_MAGIC):
            import gzip

            with gzip.GzipFile(fileobj=raw, mode="rb") as unzipped:
                yield cast("IO[bytes]", unzipped), raw.tell
        elif magic == _ZSTD_MAGIC:
            import zstandard

            reader = zstandard.ZstdDecompressor().stream_reader(raw, closefd=False)
            with io.BufferedReader(reader, buffer_size=1 << 20) as unzstd:
                yield unzstd, raw.tell
        else:
            yield raw, raw.tell


# --------------------------------------------------------------------------- readers


def read_jsonl(
    stream: IO[bytes],
    on_invalid: OnInvalid | None = None,
    on_line: Callable[[], None] | None = None,
) -> Iterator[Event | InvalidLine]:
    """Events of the JSON Lines contract, one per line; blank lines are skipped."""
    validate = event_adapter.validate_json
    for number, line in enumerate(stream, 1):
        if on_line is not None and number % _PROGRESS_EVERY == 0:
            on_line()
        if not line.strip():
            continue
        try:
            yield validate(line)
        except ValidationError as exc:
            invalid = InvalidLine(number, describe_validation_error(exc))
            if on_invalid is not None:
                on_invalid(invalid)
            yield invalid


def read_segment(
    stream: IO[bytes],
    channel: Channel = "web",
    on_invalid: OnInvalid | None = None,
    on_line: Callable[[], None] | None = None,
) -> Iterator[Event | InvalidLine]:
    """Segment messages, one per line (an export, or what a client sent), mapped as
    `omnicue ingest` maps them (`omnicue.segment`). `channel` stands for the write
    key's; a message without `timestamp` or `originalTimestamp` takes its
    `receivedAt`, and one without any of them is invalid."""
    from omnicue.segment import MappingError, map_message

    for number, line in enumerate(stream, 1):
        if on_line is not None and number % _PROGRESS_EVERY == 0:
            on_line()
        if not line.strip():
            continue
        try:
            message = orjson.loads(line)
            if type(message) is not dict:
                raise MappingError("a message must be a JSON object")
            received = message.get("receivedAt")
            if "timestamp" not in message and "originalTimestamp" not in message:
                if not isinstance(received, str):
                    raise MappingError("timestamp: required (or originalTimestamp, receivedAt)")
                message = {**message, "timestamp": received}
            # The time stands in only where the message has none, which is ruled out.
            mapped = map_message(message, channel, datetime.min.replace(tzinfo=UTC))
            events = [event_adapter.validate_python(event) for event in mapped]
        except (orjson.JSONDecodeError, MappingError, ValidationError) as exc:
            error = (
                describe_validation_error(exc) if isinstance(exc, ValidationError) else str(exc)
            )
            invalid = InvalidLine(number, error)
            if on_invalid is not None:
                on_invalid(invalid)
            yield invalid
            continue
        yield from events


class Rees46Reader:
    """The REES46 "eCommerce behavior data from multi category store" CSV as events.

    view -> product.viewed, cart -> cart.item_added, remove_from_cart ->
    cart.item_removed, purchase -> order.completed. The session is the cart: the
    data set has no cart id, and a session is what a cart lives in on the site.
    Event ids come from line numbers, order ids from session, product and time,
    so reading the same file twice gives the same events.

    The data set has no contact points, so every reminder would be suppressed as
    "unreachable". With `synthetic_contacts`, each user's first row is preceded by
    an `identify` (email `<user_id>@rees46.invalid`) and an email marketing
    consent, to see what the rules would send to a reachable audience.
    """

    def __init__(
        self,
        stream: IO[bytes],
        *,
        synthetic_contacts: bool = False,
        on_invalid: OnInvalid | None = None,
        on_line: Callable[[], None] | None = None,
    ) -> None:
        self.stream = stream
        self._synthetic = synthetic_contacts
        self._on_invalid = on_invalid
        self._on_line = on_line
        self.rows = 0
        self.synthesized = 0
        self._known_users: set[str] = set()
        # The file is sorted by time, so consecutive rows mostly share a timestamp.
        self._last_time = ""
        self._last_parsed = datetime.min.replace(tzinfo=UTC)
        # Views are most rows, and popular products recur: a product row's properties
        # are validated once, then the (frozen, so shareable) model is reused.
        self._viewed: dict[tuple[str, ...], ProductViewedProperties] = {}

    def __iter__(self) -> Iterator[Event | InvalidLine]:
        # Bytes decoded here rather than by open(): an undecodable byte becomes one
        # odd field (and an invalid line), not an exception that ends the replay.
        text = io.TextIOWrapper(self.stream, encoding="utf-8-sig", errors="replace", newline="")
        try:
            yield from self._rows(csv.reader(text))
        finally:
            # Closing is the caller's: a collected wrapper would close the stream.
            text.detach()

    @staticmethod
    def check_header(header: list[str] | None) -> None:
        if header is not None and tuple(h.strip() for h in header) != REES46_COLUMNS:
            # Not one bad line but the wrong file: every row would be misread.
            raise ReplayInputError(
                f"not a REES46 CSV: expected the header {','.join(REES46_COLUMNS)}"
            )

    def row_items(self, row: list[str], line: int) -> list[Event | InvalidLine]:
        """One non-blank row's event (after its synthetic contacts), or why not."""
        value = row[0]
        try:
            occurred = self._last_parsed if value == self._last_time else self._time(value)
            event = self._event(row, line, occurred)
        except (ValidationError, ValueError) as exc:
            return [self._invalid(line, describe_validation_error(exc))]
        if self._synthetic and event.customer_id not in self._known_users:
            self._known_users.add(event.customer_id or "")
            return [*self._contacts(event, line), event]
        return [event]

    def _rows(self, reader: Any) -> Iterator[Event | InvalidLine]:
        header = next(reader, None)
        if header is None:
            return
        self.check_header(header)
        on_line = self._on_line
        synthetic = self._synthetic
        known = self._known_users
        parse_time = self._time

        def time_of(value: str) -> datetime:
            # Rows are in time order: most share the previous row's timestamp.
            return self._last_parsed if value == self._last_time else parse_time(value)

        for row in reader:
            self.rows += 1
            line = reader.line_num
            if on_line is not None and self.rows % _PROGRESS_EVERY == 0:
                on_line()
            if not row:
                continue  # a blank line
            try:
                event = self._event(row, line, time_of(row[0]))
            except (ValidationError, ValueError) as exc:
                yield self._invalid(line, describe_validation_error(exc))
                continue
            if synthetic and event.customer_id not in known:
                known.add(event.customer_id or "")
                yield from self._contacts(event, line)
            yield event

    def _invalid(self, line: int, error: str) -> InvalidLine:
        invalid = InvalidLine(line, error)
        if self._on_invalid is not None:
            self._on_invalid(invalid)
        return invalid

    def _time(self, value: str) -> datetime:
        # REES46 writes "2019-10-01 00:00:00 UTC".
        text = value[:-4] + "+00:00" if value.endswith(" UTC") else value
        try:
            parsed = parse_timestamp(text)
        except ValueError as exc:
            raise ValueError(f"event_time: {exc}") from None
        self._last_time, self._last_parsed = value, parsed
        return parsed

    def _event(self, row: list[str], line: int, occurred_at: datetime) -> Event:
        if len(row) != len(REES46_COLUMNS):
            raise ValueError(f"expected {len(REES46_COLUMNS)} columns, got {len(row)}")
        event_time, kind, product_id, category_id, category_code, brand, price, user, session = row
        envelope: dict[str, Any] = {
            "event_id": f"rees46-{line}",
            "occurred_at": occurred_at,
            "channel": "web",
            "customer_id": user,
        }
        # Validated per concrete type: cheaper than the discriminated union, same checks.
        if kind == "view":
            envelope["type"] = "product.viewed"
            fields = (product_id, price, category_code, category_id, brand)
            cached = self._viewed.get(fields)
            if cached is not None:
                envelope["properties"] = cached
                return _validate_viewed(envelope)  # type: ignore[no-any-return]
            viewed: dict[str, Any] = {
                "product_id": product_id,
                "price": price or None,
                "category": category_code or None,
                "category_id": category_id,
            }
            if brand:
                viewed["brand"] = brand
            envelope["properties"] = viewed
            event: ProductViewed = _validate_viewed(envelope)
            if len(self._viewed) >= _VIEWED_CACHE_SIZE:
                self._viewed.clear()
            self._viewed[fields] = event.properties
            return event
        if kind == "cart":
            envelope["type"] = "cart.item_added"
            envelope["properties"] = {
                "cart_id": session,
                "product_id": product_id,
                "quantity": 1,
                "price": price,
            }
            return CartItemAdded.model_validate(envelope)
        if kind == "remove_from_cart":
            envelope["type"] = "cart.item_removed"
            envelope["properties"] = {"cart_id": session, "product_id": product_id, "quantity": 1}
            return CartItemRemoved.model_validate(envelope)
        if kind == "purchase":
            # The data set has no order id: one purchase row is one order line.
            stamp = "".join(c for c in event_time if c.isdigit())
            envelope["type"] = "order.completed"
            envelope["properties"] = {
                "order_id": f"{session or user}:{product_id}:{stamp}",
                "cart_id": session or None,
                "value": price,
                "currency": "USD",
                "items": [{"product_id": product_id, "quantity": 1, "price": price}],
            }
            return OrderCompleted.model_validate(envelope)
        raise ValueError(f"event_type: unknown REES46 event type {kind!r}")

    def _contacts(self, event: Event, line: int) -> Iterator[Event]:
        user = event.customer_id
        base: dict[str, Any] = {
            "occurred_at": event.occurred_at,
            "channel": "web",
            "customer_id": user,
        }
        self.synthesized += 2
        yield Identify.model_validate(
            base
            | {
                "event_id": f"rees46-{line}-identify",
                "type": "identify",
                "properties": {"traits": {"email": f"{user}@rees46.invalid"}},
            }
        )
        yield ConsentUpdated.model_validate(
            base
            | {
                "event_id": f"rees46-{line}-consent",
                "type": "consent.updated",
                "properties": {"channel": "email", "category": "marketing", "granted": True},
            }
        )


# --------------------------------------------------------------------------- console


class _Console:
    """stderr: invalid lines (the first ones) and the progress bar, kept apart."""

    def __init__(self, name: str, stream: TextIO, total_bytes: int, progress: bool) -> None:
        self._name = name
        self._stream = stream
        self._total = total_bytes
        self._progress = progress
        self._tty = stream.isatty()
        # A terminal redraws in place; a log file gets a line now and then.
        self._interval = 0.25 if self._tty else 2.0
        self._started = time.monotonic()
        self._last = 0.0
        self._bar_shown = False
        self._lines = 0
        self.reported = 0
        self.position: Callable[[], int] = lambda: 0

    def invalid(self, line: InvalidLine) -> None:
        self.reported += 1
        if self.reported > MAX_REPORTED_INVALID:
            return
        self._clear_bar()
        print(f"{self._name}:{line.line}: {line.error}", file=self._stream)

    def tick(self) -> None:
        """Called every `_PROGRESS_EVERY` input lines."""
        self._lines += _PROGRESS_EVERY
        if not self._progress:
            return
        now = time.monotonic()
        if now - self._last < self._interval:
            return
        self._last = now
        self._draw(self.position(), now)

    def done(self, lines: int) -> None:
        self._lines = lines
        if self.reported > MAX_REPORTED_INVALID:
            self._clear_bar()
            hidden = self.reported - MAX_REPORTED_INVALID
            print(f"{self._name}: ... {hidden} more invalid line(s) not shown", file=self._stream)
        if self._progress:
            self._draw(self._total, time.monotonic())
            if self._tty:
                self._stream.write("\n")
            self._bar_shown = False
        self._stream.flush()

    def _draw(self, position: int, now: float) -> None:
        total = max(self._total, 1)
        share = min(position / total, 1.0)
        width = 30
        filled = int(share * width)
        elapsed = now - self._started
        mib = 1024 * 1024
        rate = self._lines / elapsed if elapsed > 0 else 0.0
        text = (
            f"[{'#' * filled}{'.' * (width - filled)}] {share * 100:5.1f}% "
            f"{position / mib:,.1f}/{self._total / mib:,.1f} MiB, "
            f"{self._lines:,} lines, {rate:,.0f} lines/s, {elapsed:,.0f}s"
        )
        if self._tty:
            self._stream.write(f"\r{text}")
            self._bar_shown = True
        else:
            self._stream.write(f"{text}\n")
        self._stream.flush()

    def _clear_bar(self) -> None:
        if self._bar_shown:
            self._stream.write("\r" + " " * 80 + "\r")
            self._bar_shown = False


# --------------------------------------------------------------------------- running


@dataclass
class ReplaySummary:
    source: str
    fmt: Format
    stats: ReplayStats
    elapsed: float
    actions_path: Path
    decisions_path: Path | None = None
    # REES46 only: contact events made up by `synthetic_contacts`.
    synthesized: int = 0
    # Processes the partitions were replayed in (`omnicue.partitioned`), and the
    # largest peak resident set among them (KiB; 0 if not measured).
    workers: int = 1
    peak_rss_kib: int = 0
    worker_cpu_seconds: tuple[float, ...] = ()

    @property
    def events_per_second(self) -> float:
        return self.stats.events / self.elapsed if self.elapsed > 0 else 0.0

    def render(self) -> str:
        s = self.stats
        synthetic = f" (incl. {self.synthesized:,} synthetic)" if self.synthesized else ""
        workers = f", {self.workers} workers" if self.workers > 1 else ""
        if self.peak_rss_kib:
            workers += f", peak RSS {self.peak_rss_kib / 1024:,.0f} MiB per worker"
        lines = [
            f"replayed {self.source} ({self.fmt}{workers}) in {self.elapsed:,.2f}s: "
            f"{self.events_per_second:,.0f} events/s",
            f"events read:       {s.events:,}{synthetic}",
            f"invalid lines:     {s.invalid:,}",
            f"customers:         {s.customers:,}",
        ]
        if s.events_by_type:
            lines.insert(2, "  by type:        " + _inline(s.events_by_type)[2:-1])
        if s.first_event_at is not None and s.last_arrival is not None:
            lines.append(
                f"event time:        {_iso(s.first_event_at)} .. {_iso(s.last_arrival)}"
                + (f", timers until {_iso(s.finished_at)}" if s.finished_at else "")
            )
        if s.late or s.duplicates:
            lines.append(f"late events:       {s.late:,}; duplicates ignored: {s.duplicates:,}")
        if s.unknown_actions:
            # The live worker dead-letters these (`unknown_action`).
            lines.append(f"unknown actions:   {s.unknown_actions:,} feedback events skipped (for "
                         "actions this replay did not emit)")
        lines.append(f"journeys started:  {s.journeys_started:,}" + _inline(s.journeys_by_rule))
        lines.append(f"timers fired:      {s.timers_fired:,}")
        lines.append(f"decisions:         {sum(s.outcomes.values()):,}" + _inline(s.outcomes))
        lines.append(f"actions:           {s.action_count:,} -> {self.actions_path}")
        for (rule, step, channel), count in sorted(s.actions.items()):
            lines.append(f"  {rule} step {step} {channel}: {count:,}")
        suppressed = s.by_reason("suppressed")
        lines.append(f"suppressions:      {sum(suppressed.values()):,}")
        for reason, count in sorted(suppressed.items()):
            lines.append(f"  {reason}: {count:,}")
        for outcome in sorted({o for o, _ in s.reasons} - {"suppressed"}):
            reasons = s.by_reason(outcome)
            lines.append(f"{outcome + ':':<19}{sum(reasons.values()):,}" + _inline(reasons))
        if s.actions_per_hour:
            lines.append("actions per hour (UTC):")
            for hour, count in sorted(s.actions_per_hour.items()):
                lines.append(f"  {hour}: {count:,}")
        if self.decisions_path is not None:
            lines.append(f"decisions written to {self.decisions_path}")
        return "\n".join(lines)


@contextmanager
def gc_tuned() -> Iterator[None]:
    """Collect garbage less often while replaying.

    A replay piles up long-lived objects (every customer's state) and makes little
    cyclic garbage; with the default thresholds the collector rescans that growing
    heap again and again, ~18% of a replay's time. Raising the thresholds keeps the
    young generation collected but leaves the old ones mostly alone.
    """
    previous = gc.get_threshold()
    gc.set_threshold(100_000, 50, 1000)
    try:
        yield
    finally:
        gc.set_threshold(*previous)


def run_replay(
    events_path: Path,
    out: Path,
    decisions_path: Path | None,
    rules_path: Path | None,
    until: datetime | None,
    fmt: Format,
    progress: bool,
    settings: Settings,
    *,
    synthetic_contacts: bool = False,
    segment_channel: Channel = "web",
    stderr: TextIO | None = None,
) -> ReplaySummary:
    """Replay `events_path` through the engine; write actions (and decisions) as JSONL.

    Raises `RulesError` for bad rules, `ReplayInputError` for a file that is not in
    the format, and `OSError` when a file cannot be read or written; invalid lines
    are reported on stderr and counted, never fatal.
    """
    if fmt not in REPLAY_FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(REPLAY_FORMATS)}")
    err = stderr if stderr is not None else sys.stderr
    rules = load_rules(rules_path)
    policy = settings.engine_policy()
    started = time.perf_counter()
    with ExitStack() as files:
        files.enter_context(gc_tuned())
        raw, position = files.enter_context(open_events(events_path))
        actions_file = files.enter_context(open(out, "w", encoding="utf-8", newline="\n"))
        decisions_file = (
            files.enter_context(open(decisions_path, "w", encoding="utf-8", newline="\n"))
            if decisions_path is not None
            else None
        )
        console = _Console(str(events_path), err, events_path.stat().st_size, progress)
        console.position = position
        rees46: Rees46Reader | None = None
        if fmt == "rees46":
            rees46 = Rees46Reader(
                raw,
                synthetic_contacts=synthetic_contacts,
                on_invalid=console.invalid,
                on_line=console.tick,
            )
            items: Iterator[Event | InvalidLine] = iter(rees46)
        elif fmt == "segment":
            items = read_segment(
                raw, segment_channel, on_invalid=console.invalid, on_line=console.tick
            )
        else:
            items = read_jsonl(raw, on_invalid=console.invalid, on_line=console.tick)
        # The live workers' lateness, so that a backtest agrees with them when behind.
        replayer = Replayer(
            rules, policy, timedelta(seconds=settings.allowed_lateness),
            identity_policy=settings.identity_policy(),
        )  # fmt: skip
        write_action = actions_file.write
        for output in replayer.run(items, until):
            for action in output.actions:
                write_action(action.model_dump_json() + "\n")
            if decisions_file is not None:
                for decision in output.decisions:
                    # The same JSON as the worker's decisions topic.
                    decisions_file.write(decision.model_dump_json(exclude_none=True) + "\n")
        stats = replayer.stats
        console.done(rees46.rows if rees46 is not None else stats.events + stats.invalid)
    return ReplaySummary(
        source=str(events_path),
        fmt=fmt,
        stats=replayer.stats,
        elapsed=time.perf_counter() - started,
        actions_path=out,
        decisions_path=decisions_path,
        synthesized=rees46.synthesized if rees46 is not None else 0,
    )


def parse_timestamp(value: str) -> datetime:
    """An RFC 3339 timestamp with an offset, as an aware UTC datetime."""
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"not an RFC 3339 timestamp: {value!r}") from None
    if parsed.tzinfo is None:
        raise ValueError(f"timestamp {value!r} needs an offset, e.g. {value}Z")
    return parsed.astimezone(UTC)


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _inline(counts: Counter[str]) -> str:
    if not counts:
        return ""
    return " (" + ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items())) + ")"
