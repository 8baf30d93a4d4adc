"""Shared parts of the timer and recovery benchmarks (`bench.timers`, `bench.recovery`).

Both need a worker holding state for a million customers. Pushing a million events
through the pipeline would take longer than the measurement itself (the pipeline
applies about 2,000 events/s on this machine), so the state is written where the
worker would have written it: straight to the customers table's changelog topic,
one record per customer, before the worker starts. The worker then recovers it
like any state it wrote itself. Each record is a `CustomerState` built by the
engine from an `identify` and a `cart.item_added` event, with one journey of the
benchmark's timer rule, serialized exactly as the worker writes it
(`model_dump_json(exclude_defaults=True)`), and put on the partition the worker's
own producer would pick (murmur2 of the key, `streams.topics.partition_for`).

The rest are the measurements both benchmarks take: actions read back by
consuming, the worker's memory and CPU from /proc, the times of the lines in its log.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from kafka.admin import KafkaAdminClient
from kafka.errors import TopicAlreadyExistsError, for_code

from bench.pipeline import REPO, child_env, cpu_seconds, machine_cpu_seconds, machine_info
from omnicue.rules import parse_rules_text
from omnicue.services import ManagedProcess, ServiceError
from omnicue.settings import Settings
from schemas.events import parse_event
from schemas.topics import CUSTOMER_INPUTS
from streams.tables import CUSTOMERS_TABLE
from streams.topics import partition_for
from triggers.engine import EnginePolicy, TimerFired, decide
from triggers.ruleset import RuleSet, compile_rules
from triggers.state import CustomerState, journey_slot

TIMER_RULE = "bench_timer"
PROBE_RULE = "bench_probe"
CANARY_RULE = "bench_canary"
# The seeded journeys' step: counted from the cart add, like a cart reminder.
TIMER_AFTER = timedelta(minutes=10)
# A canary's step (recovery bench): short, so its due time can be put just after a kill.
CANARY_AFTER = timedelta(seconds=20)

# All transactional: reachability (the email in state) is enough, no consent events,
# no quiet hours or caps, so every due step yields exactly one email action.
RULES_YAML = f"""\
version: 1
rules:
  - id: {TIMER_RULE}
    description: One email per cart, {int(TIMER_AFTER.total_seconds())} s after the add.
    category: transactional
    trigger:
      event: cart.item_added
      key: properties.cart_id
    steps:
      - after: {int(TIMER_AFTER.total_seconds())}s
        channels: [email]
        template: bench_timer
  - id: {PROBE_RULE}
    description: An immediate email per view, to see when a worker processes events.
    category: transactional
    trigger:
      event: product.viewed
      key: properties.product_id
    steps:
      - after: 0s
        channels: [email]
        template: bench_probe
  - id: {CANARY_RULE}
    description: An email shortly after a checkout, to see when timers fire again.
    category: transactional
    trigger:
      event: checkout.started
      key: properties.cart_id
    steps:
      - after: {int(CANARY_AFTER.total_seconds())}s
        channels: [email]
        template: bench_canary
"""

T = TypeVar("T")
_LOG_TIME = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})\]")


def bench_rules() -> RuleSet:
    return compile_rules(parse_rules_text(RULES_YAML))


def changelog_topic(app_id: str) -> str:
    """faust's name for a table's changelog: `<app id>-<table>-changelog`."""
    return f"{app_id}-{CUSTOMERS_TABLE}-changelog"


def customer_key(index: int) -> bytes:
    return f"seed-{index:07d}".encode()


def event(kind: str, customer: str, event_id: str, at: datetime, **props: Any) -> bytes:
    """A contract-valid event, as producers publish it."""
    return orjson.dumps(
        {
            "event_id": event_id,
            "type": kind,
            "occurred_at": at.isoformat(),
            "channel": "web",
            "customer_id": customer,
            "properties": props,
        }
    )


def identify(customer: str, event_id: str, at: datetime) -> bytes:
    traits = {"email": f"{customer}@example.com", "timezone": "Asia/Seoul", "locale": "ko-KR"}
    return event("identify", customer, event_id, at, traits=traits)


def cart_add(customer: str, event_id: str, at: datetime, cart_id: str) -> bytes:
    return event(
        "cart.item_added", customer, event_id, at,
        cart_id=cart_id, product_id="sku-00042", quantity=1, price=19.9,
    )  # fmt: skip


class StateFactory:
    """Customer states with one pending `bench_timer` journey, as the worker stores them.

    One template is built by the engine from real events; each customer's state is
    that template with its own ids and times, serialized by pydantic like the worker
    does. `check()` proves a sample round-trips and fires exactly one email.
    """

    CART = "cart-1"

    def __init__(self, rules: RuleSet) -> None:
        self.rules = rules
        at = datetime(2026, 1, 1, tzinfo=UTC)
        state: CustomerState | None = None
        customer = customer_key(0).decode()
        for raw in (identify(customer, "t-i", at), cart_add(customer, "t-c", at, self.CART)):
            state = decide(state, parse_event(raw), at, rules, EnginePolicy(), customer).state
        assert state is not None
        self._state = state
        self._slot = journey_slot(TIMER_RULE, self.CART)
        self._journey = state.journeys[self._slot]
        self._cart = state.carts[self.CART]

    def state(self, index: int, due_at: datetime) -> tuple[bytes, bytes]:
        """(key, value) of customer `index`, its step due at `due_at`."""
        key = customer_key(index)
        customer = key.decode()
        started = due_at - TIMER_AFTER
        state, journey = self._state, self._journey
        state.customer_id = customer
        state.email = f"{customer}@example.com"
        state.last_activity = {"web": started}
        state.last_started = {TIMER_RULE: started}
        state.recent_event_ids = [f"{customer}-i", f"{customer}-c"]
        self._cart.updated_at = started
        journey.journey_id = journey.trigger_event_id = f"{customer}-c"
        journey.started_at = journey.trigger_occurred_at = started
        journey.due_at = journey.step_due_at = due_at
        return key, state.model_dump_json(exclude_defaults=True).encode()

    def check(self, index: int, due_at: datetime) -> int:
        """Assert that the stored form round-trips and fires one email at its due
        time and nothing before; returns its size in bytes."""
        key, raw = self.state(index, due_at)
        state = CustomerState.model_validate_json(raw)
        assert state.model_dump_json(exclude_defaults=True).encode() == raw
        assert state.next_due() == due_at
        policy, customer = EnginePolicy(), key.decode()
        early = decide(state, TimerFired(due_at=due_at), due_at - timedelta(seconds=1),
                       self.rules, policy, customer)  # fmt: skip
        assert early.actions == []
        fired = decide(state, TimerFired(due_at=due_at), due_at, self.rules, policy, customer)
        assert [(a.channel, a.rule_id, a.due_at) for a in fired.actions] == [
            ("email", TIMER_RULE, due_at)
        ]
        assert fired.next_due is None  # one step: the journey is over
        return len(raw)


# -- kafka ----------------------------------------------------------------------------


def create_changelog(settings: Settings) -> str:
    """The customers table's changelog, as faust declares it (compacted, one partition
    per OMNICUE_PARTITIONS), created before the worker so the bench can fill it."""
    name = changelog_topic(settings.app_id)
    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap_servers,
                             client_id="bench-admin", request_timeout_ms=30_000)  # fmt: skip
    try:
        spec = {
            "num_partitions": settings.partitions,
            "replication_factor": 1,
            "configs": {"cleanup.policy": "compact"},
        }
        response = admin.create_topics({name: spec}, raise_errors=False, wait_for_metadata=True)
        for result in response["topics"]:
            error = for_code(result["error_code"])
            if result["error_code"] != 0 and error is not TopicAlreadyExistsError:
                raise error(f"creating {name}: {result['error_message']}")
    finally:
        admin.close()
    return name


@dataclass
class Produced:
    records: int
    bytes: int
    seconds: float
    per_partition: dict[int, int]


def produce_states(
    bootstrap: str, topic: str, partitions: int, states: Iterator[tuple[bytes, bytes]]
) -> Produced:
    """Write the states to the changelog as fast as the broker takes them."""
    return asyncio.run(_produce(bootstrap, topic, partitions, states))


async def _produce(
    bootstrap: str, topic: str, partitions: int, states: Iterator[tuple[bytes, bytes]]
) -> Produced:
    started = time.monotonic()
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        linger_ms=20,
        max_batch_size=1024 * 1024,
        max_request_size=8 * 1024 * 1024,
    )
    await producer.start()
    counts = dict.fromkeys(range(partitions), 0)
    size = 0
    pending: list[asyncio.Future[Any]] = []
    try:
        for key, value in states:
            partition = partition_for(key, partitions)
            counts[partition] += 1
            size += len(value)
            pending.append(await producer.send(topic, value, key=key, partition=partition))
            if len(pending) >= 20_000:
                # Bounded: a million undelivered futures would cost the bench ~1 GB.
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return Produced(sum(counts.values()), size, time.monotonic() - started, counts)


def publish(bootstrap: str, topic: str, records: Sequence[tuple[bytes, bytes]]) -> None:
    """A few records (probes, canaries), delivered before this returns."""

    async def send() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
        await producer.start()
        try:
            futures = [await producer.send(topic, value, key=key) for key, value in records]
            await asyncio.gather(*futures)
        finally:
            await producer.stop()

    asyncio.run(send())


@dataclass
class ActionRecord:
    action_id: str
    customer_id: str
    rule_id: str
    created_at: float  # the worker's clock when its batch started (epoch seconds)
    due_at: float  # the step's own due time
    sent_at: float  # the record's timestamp: when the worker's producer sent it


def read_actions(
    bootstrap: str,
    topic: str,
    partitions: int,
    *,
    rules: set[str] | None = None,
    timeout: float = 600.0,
) -> list[ActionRecord]:
    """Every action on an action topic (of these rules), up to its end offsets.

    Read after the run, not during it: consuming a million actions costs the bench a
    core's worth of CPU for a while, which it would take from the worker under test.
    Lateness comes from the actions' own clocks, so reading later changes nothing.
    """

    def parse(record: ConsumerRecord[bytes, bytes]) -> ActionRecord | None:
        value = orjson.loads(record.value or b"{}")
        if rules is not None and value["rule_id"] not in rules:
            return None
        return ActionRecord(
            action_id=value["action_id"],
            customer_id=value["customer_id"],
            rule_id=value["rule_id"],
            created_at=_epoch(value["created_at"]),
            due_at=_epoch(value["due_at"]),
            sent_at=record.timestamp / 1000,
        )

    return read_topic(bootstrap, topic, partitions, parse, timeout=timeout)


@dataclass
class TimerInput:
    key: bytes
    sent_at: float  # when the worker's timer task sent it


def read_timer_inputs(bootstrap: str, partitions: int, timeout: float = 600.0) -> list[TimerInput]:
    """The timer firings the worker sent itself on omnicue.customer-inputs."""

    def parse(record: ConsumerRecord[bytes, bytes]) -> TimerInput | None:
        if not (record.value or b"").startswith(b'{"timer_due_at"'):
            return None
        return TimerInput(record.key or b"", record.timestamp / 1000)

    return read_topic(bootstrap, CUSTOMER_INPUTS, partitions, parse, timeout=timeout)


def read_topic(
    bootstrap: str,
    topic: str,
    partitions: int,
    parse: Callable[[ConsumerRecord[bytes, bytes]], T | None],
    *,
    timeout: float = 600.0,
) -> list[T]:
    """`parse` of every record of the topic up to its end offsets as of the call
    (end offsets are exact on Apache Kafka); None results are left out."""
    return asyncio.run(_read_topic(bootstrap, topic, partitions, parse, timeout))


async def _read_topic(
    bootstrap: str,
    topic: str,
    partitions: int,
    parse: Callable[[ConsumerRecord[bytes, bytes]], T | None],
    timeout: float,
) -> list[T]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=8 * 1024 * 1024,
        fetch_max_bytes=64 * 1024 * 1024,
    )
    await consumer.start()
    out: list[T] = []
    try:
        # From the caller: without a subscription the client has no metadata for it.
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        remaining = {tp for tp in tps if ends[tp] > 0}
        deadline = time.monotonic() + timeout
        while remaining:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic}: not read to its end offsets in {timeout:.0f}s")
            batches = await consumer.getmany(*remaining, timeout_ms=500, max_records=50_000)
            for records in batches.values():
                for record in records:
                    item = parse(record)
                    if item is not None:
                        out.append(item)
            for tp in list(remaining):
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
    finally:
        # aiokafka 0.14 without a group: stop() re-raises the CancelledError of its
        # own offset-reset task (which never ran with a manual assignment).
        with suppress(asyncio.CancelledError):
            await consumer.stop()
    return out


def _epoch(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


# -- the worker -----------------------------------------------------------------------


def worker_process(
    settings: Settings, rules_path: Path, log_path: Path, extra_env: dict[str, str] | None = None
) -> ManagedProcess:
    """`omnicue worker` as in production (not started): OMNICUE_DEV_BROKER=false."""
    env = child_env(
        settings,
        {
            "OMNICUE_RULES": str(rules_path),
            "OMNICUE_APP_ID": settings.app_id,
            "OMNICUE_TIMER_INTERVAL": str(settings.timer_interval),
            **(extra_env or {}),
        },
    )
    return ManagedProcess(
        [sys.executable, "-m", "omnicue.cli", "worker"],
        env=env,
        cwd=REPO,
        log_path=log_path,
        name="worker",
    )


def start_worker(worker: ManagedProcess) -> int:
    """Start it; returns where this run's lines begin in its log (a restart appends)."""
    try:
        offset = worker.log_path.stat().st_size
    except FileNotFoundError:
        offset = 0
    worker.start()
    return offset


def wait_for_line(
    worker: ManagedProcess, offset: int, pattern: str, timeout: float, poll: float = 0.5
) -> str:
    """Like `ManagedProcess.wait_for_line`, reading only what is new, twice a second: a
    recovering worker logs a progress table every few seconds, and re-reading the whole
    log every 50 ms cost the bench a sixth of a core, taken from the worker."""
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout
    partial = b""
    with open(worker.log_path, "rb") as log:
        log.seek(offset)
        while True:
            exited = not worker.running
            chunk = partial + log.read()
            lines = chunk.split(b"\n")
            partial = lines.pop()
            for line in lines:
                text = line.decode("utf-8", errors="replace")
                if regex.search(text):
                    return text
            if exited:
                raise ServiceError(f"worker exited before logging {pattern!r}\n{worker.log_tail()}")
            if time.monotonic() > deadline:
                raise ServiceError(
                    f"worker: no {pattern!r} after {timeout:.0f}s\n{worker.log_tail()}"
                )
            time.sleep(poll)


def log_since(worker: ManagedProcess, offset: int) -> str:
    with open(worker.log_path, "rb") as log:
        log.seek(offset)
        return log.read().decode("utf-8", errors="replace")


def proc_status(pid: int | None) -> dict[str, int]:
    """/proc/<pid>/status memory fields in kB (VmRSS, VmHWM: the peak RSS)."""
    if pid is None:
        return {}
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                name, _, value = line.partition(":")
                if name in ("VmRSS", "VmHWM"):
                    out[name] = int(value.split()[0])
    except OSError:
        pass
    return out


@dataclass
class Sample:
    t: float  # seconds since the sampler started
    rss_mb: float
    cpu_s: float


@dataclass
class ProcSampler:
    """Samples a process's RSS and CPU time once a second, in a thread (cheap: two
    small /proc reads), so memory over time and the peak are known even if the
    process is killed."""

    pid: int | None
    interval: float = 1.0
    samples: list[Sample] = field(default_factory=list)
    peak_kb: int = 0

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="proc-sampler", daemon=True)

    def start(self) -> ProcSampler:
        self._thread.start()
        return self

    def sample(self) -> None:
        status = proc_status(self.pid)
        if not status:
            return
        self.peak_kb = max(self.peak_kb, status.get("VmHWM", 0), status.get("VmRSS", 0))
        self.samples.append(
            Sample(
                round(time.monotonic() - self._t0, 1),
                round(status.get("VmRSS", 0) / 1024, 1),
                round(cpu_seconds(self.pid), 2),
            )
        )

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self.sample()
        self._stop.set()
        self._thread.join(timeout=5)

    @property
    def peak_mb(self) -> float:
        return round(self.peak_kb / 1024, 1)


def log_times(text: str, patterns: dict[str, str]) -> dict[str, float]:
    """Epoch time of the first log line matching each pattern (faust stamps lines
    `[YYYY-mm-dd HH:MM:SS,mmm]` in local time)."""
    found: dict[str, float] = {}
    compiled = {name: re.compile(p) for name, p in patterns.items()}
    for line in text.splitlines():
        stamp = _LOG_TIME.match(line)
        if stamp is None:
            continue
        for name, regex in compiled.items():
            if name not in found and regex.search(line):
                found[name] = time.mktime(time.strptime(stamp[1], "%Y-%m-%d %H:%M:%S")) + (
                    int(stamp[2]) / 1000
                )
    return found


def quantiles(values: Sequence[float], qs: Sequence[float] = (0.5, 0.9, 0.99)) -> dict[str, float]:
    """p50/p90/p99 (nearest rank) and max, rounded to ms."""
    if not values:
        return {}
    ordered = sorted(values)
    out = {f"p{round(q * 100):d}": round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)
           for q in qs}  # fmt: skip
    out["max"] = round(ordered[-1], 3)
    out["min"] = round(ordered[0], 3)
    return out


# -- reporting ------------------------------------------------------------------------


def cpu_snapshot(worker: int | None, broker: int | None) -> dict[str, float]:
    """CPU seconds so far of the worker, the broker, this process and the machine."""
    return {
        "wall": time.monotonic(),
        "worker": cpu_seconds(worker),
        "broker": cpu_seconds(broker),
        "bench": time.process_time(),
        "machine": machine_cpu_seconds(),
    }


def usage(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Cores used in between by each, and by everything else on the machine (other
    people's tests on a 2-core machine skew every figure)."""
    wall = after["wall"] - before["wall"]
    if wall <= 0:
        return {}
    used = {k: (after[k] - before[k]) / wall for k in ("worker", "broker", "bench", "machine")}
    used["others"] = max(0.0, used["machine"] - used["worker"] - used["broker"] - used["bench"])
    return {k: round(v, 2) for k, v in used.items()}


def meminfo_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def save(output: Path, label: str, entry: dict[str, Any]) -> None:
    """Replace this label's entry in the results file, keep the others."""
    data: dict[str, Any] = {}
    if output.is_file():
        try:
            data = json.loads(output.read_text(encoding="utf-8"))
        except ValueError:
            data = {}
    data.setdefault("runs", {})[label] = entry
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def machine() -> dict[str, Any]:
    return {
        **machine_info(),
        "nproc": os.cpu_count(),
        "memory_gb": meminfo_gb(),
        "modified_code": modified_code(),
    }


def modified_code() -> list[str]:
    """Files of the code under test that differ from the commit: a figure measured
    on a patched copy must say so."""
    try:
        status = subprocess.run(
            ["git", "status", "--porcelain", "--", "streams", "triggers", "schemas", "omnicue"],
            cwd=REPO, capture_output=True, text=True, check=False,
        ).stdout  # fmt: skip
    except OSError:
        return []
    return sorted(line[3:] for line in status.splitlines() if line.strip())


def terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)
