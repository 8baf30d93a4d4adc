"""Benchmark: the Omnicue pipeline against a bare Faust agent on the same broker.

    PYTHONPATH=. python -m bench.pipeline [--events 30000] [--store memory|rocksdb|both]
                                          [--broker tansu|kafka] [--profile]
                                          [--systems bare,passthrough,pipeline] [--help]

One fresh broker per store and phase: Tansu (the dev broker, the default), or with
`--broker kafka` Apache Kafka (`omnicue.kafka_broker`; needs Java 17+), where the
workers run as in production, without the dev-broker workarounds
(`OMNICUE_DEV_BROKER=false`: normal producer batching, idempotent producers).
The same events (an identify per
customer first, then product.viewed / cart.item_added) are pre-produced to an input
topic per system. Each worker then starts on that backlog, and its sustained rate is
taken from the outputs between 10% and 90% of the expected count, which leaves out
startup (group join, first fetch) and the drain of the last partitions. The rate
uses the output records' timestamps (set by the worker's producer when it sends),
so the bench's own polling cannot skew it.

Then latency, on a fresh broker holding only the identify events (Tansu slows down
with the number of record batches in a partition, so the backlog would skew it):
each worker again, warmed up, then events at a steady rate (by default half of its
measured rate) stamped `occurred_at` = now; latency = when the bench consumes the
output - `occurred_at`. For the pipeline the action's own clocks split it into
stages. Both systems get this, so the pipeline's figures have a baseline.

A third system, `passthrough` (bench/passthrough.py), is the physical limit for a
Python worker: a bare aiokafka loop that consumes a batch, produces it unchanged to
another topic and commits, with no Faust and no processing. Its rate is measured
on the same backlog; it has no latency phase.

CPU use of the worker, the broker, the bench and of everything else on the machine
is recorded: with 2 cores, anyone else's test run makes the figures unreliable, and
the report says so, with the load average beside every figure, and each throughput
run's rate per worker core, which such contention moves far less than the rate.
`--trace` runs the workers under bench/trace.py, which records where their wall
clock goes (event loop idle, runnable but waiting for a CPU, spans of batches,
flushes, commits and fetches). Results: a table on stdout and bench/results/latest.json. Every
child (broker, workers, py-spy) is stopped on exit, error, Ctrl-C or SIGTERM.
Results of a Kafka run go to bench/results/latest-kafka.json instead, so the two
brokers' figures are never mixed up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import orjson
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from bench import bare_agent, passthrough, profile, workload
from bench.profile import Profiler
from omnicue.kafka_broker import KAFKA_VERSION, JavaNotFound, KafkaBroker, find_java
from omnicue.services import ManagedProcess, ServiceError, TansuBroker, free_port
from omnicue.settings import Settings
from omnicue.topics import create_topics
from schemas.topics import ACTIONS, EVENTS

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
STORES = {"memory": "memory://", "rocksdb": "rocksdb://"}
BROKERS = ("tansu", "kafka")
# A JVM start plus KRaft's first controller election, on a machine the bench keeps busy.
KAFKA_START_TIMEOUT = 90.0
# Kafka's shutdown (controlled, then the log flush) takes seconds, Tansu's none.
KAFKA_STOP_TIMEOUT = 30.0
_CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- measurement records --------------------------------------------------------


@dataclass
class Seen:
    received: float  # wall clock when the bench consumed it
    produced: float  # the record's timestamp: when the worker's producer sent it
    value: dict[str, Any]


@dataclass
class CpuSample:
    """CPU seconds used so far by the worker, the broker, this process and the machine."""

    wall: float
    worker: float
    broker: float
    bench: float
    machine: float

    def usage(self, later: CpuSample) -> dict[str, float]:
        """Cores used in between by each, and by everything else on the machine."""
        wall = later.wall - self.wall
        used = {
            name: (getattr(later, name) - getattr(self, name)) / wall
            for name in ("worker", "broker", "bench", "machine")
        }
        # Other people's tests or benchmarks on a 2-core machine skew every figure here.
        used["others"] = max(0.0, used["machine"] - used["worker"] - used["broker"] - used["bench"])
        return {k: round(v, 2) for k, v in used.items()}


@dataclass
class ThroughputRun:
    system: str
    store: str
    inputs: int
    outputs_expected: int
    outputs: int
    duplicates: int
    startup_s: float  # worker start to first output
    total_s: float  # worker start to last output
    rate: float  # outputs/s between 10% and 90%, producer timestamps
    rate_received: float  # the same on the bench's receive times
    rate_by_decile: list[float]  # outputs/s in each tenth of the outputs: drift shows here
    # rate / worker cores used: what the worker does per CPU second, which other
    # processes on the machine move far less than the rate itself (a starved worker
    # sits runnable, not idle: bench/trace.py's runqueue figures).
    rate_per_core: float
    loadavg_1m: float  # the machine's 1-minute load average when the run ended
    # Cores used between 10% and 90% (1.0 = one full core) by worker, broker, bench,
    # and by other processes on the machine (a busy machine makes the run unreliable).
    cpu: dict[str, float]
    worker_metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class LatencyRun:
    system: str
    store: str
    target_rate: float
    produced: int
    produce_rate: float
    actions: int
    missing: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    # The worker's own histogram (due time -> emission), bucket upper bounds.
    worker_p50_le_s: float | None
    worker_p99_le_s: float | None
    cpu: dict[str, float]
    output_rate: float  # outputs/s the worker sent during the load
    # p50 of: event -> start of its worker batch (ingest hop, queueing, fetch waits),
    # batch start -> action sent, action sent -> consumed by the bench.
    stage_p50_ms: dict[str, float]
    p50_ms_by_second: list[float]
    loadavg_1m: float  # the machine's 1-minute load average when the load ended


# -- processes ----------------------------------------------------------------


def cpu_seconds(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # The command name (field 2) may contain spaces; count from its ")".
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def machine_cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine since boot (all cores, from /proc/stat)."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:]]
    except OSError:
        return 0.0
    # user nice system idle iowait irq softirq steal ...: idle and iowait are not busy.
    return (sum(fields[:8]) - fields[3] - fields[4]) / _CLK_TCK


def child_env(settings: Settings, extra: dict[str, str] | None = None) -> dict[str, str]:
    # Only our OMNICUE_* values: a developer's own exports must not leak into a run.
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNICUE_")}
    env.update(
        {
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
            "OMNICUE_BROKER": settings.broker,
            "OMNICUE_DEV_BROKER": "true" if settings.dev_broker else "false",
            "OMNICUE_PARTITIONS": str(settings.partitions),
            "OMNICUE_STORE": settings.store,
            "OMNICUE_DATA_DIR": str(settings.data_dir),
            "OMNICUE_WEB_PORT": str(settings.web_port),
            "OMNICUE_BATCH_SIZE": str(settings.batch_size),
            "OMNICUE_BATCH_WITHIN": str(settings.batch_within),
            # Not "warning": below INFO faust's Worker adds a terminal-spinner handler and
            # sets the root logger to DEBUG, so every send builds debug log records
            # (about 8% of the worker's CPU). Production runs at the default, info.
            "OMNICUE_LOG_LEVEL": "info",
        }
    )
    env.update(extra or {})
    return env


def parse_env(items: Sequence[str]) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--worker-env wants KEY=VALUE, got {item!r}")
        pairs[key] = value
    return pairs


# -- kafka io -----------------------------------------------------------------


def produce(bootstrap: str, topic: str, events: Iterable[workload.Event]) -> float:
    """Pre-produce a backlog as fast as the broker takes it; returns seconds taken."""
    started = time.monotonic()
    producer = KafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=5, batch_size=256 * 1024, acks=1
    )
    try:
        for event in events:
            producer.send(topic, key=event.key, value=event.value)
        producer.flush(timeout=120)
    finally:
        producer.close(timeout=10)
    return time.monotonic() - started


class OutputReader:
    """Reads one output topic from the start, keyed by the input event id it answers."""

    def __init__(self, bootstrap: str, topic: str, partitions: int, id_field: str) -> None:
        self.id_field = id_field
        self.consumer = KafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            # The latency phase measures our receive time, and Tansu answers a fetch
            # late rather than when data arrives (measured: p50 ~340 ms at the usual
            # 500-1500 ms max wait, ~13 ms at 100 ms): keep the wait short.
            fetch_max_wait_ms=20,
            max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        self.consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
        self.duplicates = 0
        self.seen: dict[str, Seen] = {}

    def poll(self, worker: ManagedProcess) -> int:
        """One fetch round; returns how many new ids it brought."""
        if not worker.running:
            raise ServiceError(
                f"{worker.name} exited with {worker.returncode}\n{worker.log_tail()}"
            )
        batches = self.consumer.poll(timeout_ms=50, max_records=20_000)
        received = time.time()
        new = 0
        for records in batches.values():
            for record in records:
                value = orjson.loads(record.value)
                event_id = value[self.id_field]
                if event_id in self.seen:
                    # At-least-once: a redelivered input yields its output again.
                    self.duplicates += 1
                    continue
                self.seen[event_id] = Seen(received, record.timestamp / 1000, value)
                new += 1
        return new

    def read(
        self,
        expected: set[str],
        worker: ManagedProcess,
        timeout: float,
        on_progress: Callable[[int], None] | None = None,
    ) -> dict[str, Seen]:
        """Consume until every expected id was seen; raises on timeout or worker exit."""
        deadline = time.monotonic() + timeout
        missing = set(expected) - self.seen.keys()
        while missing:
            if time.monotonic() > deadline:
                raise ServiceError(
                    f"{worker.name}: {len(expected) - len(missing)}/{len(expected)} outputs "
                    f"after {timeout:.0f}s\n{worker.log_tail()}"
                )
            if self.poll(worker):
                missing -= self.seen.keys()
                if on_progress is not None:
                    on_progress(len(expected) - len(missing))
        return {event_id: self.seen[event_id] for event_id in expected}

    def close(self) -> None:
        self.consumer.close()


def steady_rate(times: Sequence[float], low: float = 0.1, high: float = 0.9) -> float:
    ordered = sorted(times)
    first, last = int(len(ordered) * low), int(len(ordered) * high) - 1
    span = ordered[last] - ordered[first]
    return (last - first) / span if span > 0 else float("nan")


# -- worker metrics -------------------------------------------------------------


def scrape(port: int) -> dict[str, float]:
    """The worker's /metrics as {sample name with labels: value}; {} if unreachable."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def histogram_quantile(
    before: dict[str, float], after: dict[str, float], name: str, q: float
) -> float | None:
    """Upper bound of the bucket holding quantile q of the observations in between."""
    buckets: list[tuple[float, float]] = []
    prefix = f"{name}_bucket{{le="
    for key, value in after.items():
        if key.startswith(prefix):
            le = float(key[len(prefix) : -1])
            buckets.append((le, value - before.get(key, 0.0)))
    buckets.sort()
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    return next(le for le, count in buckets if count >= rank)


# -- the bench ----------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.broker: TansuBroker | KafkaBroker | None = None
        self.children: list[ManagedProcess] = []
        # What was measured so far: a failure in a later phase still reports these.
        self.runs: list[ThroughputRun] = []
        self.latencies: list[LatencyRun] = []
        self.phase = "setup"

    def settings(self, store: str, name: str) -> Settings:
        assert self.broker is not None
        # faust creates its data dir without parents.
        (self.workdir / self.phase).mkdir(parents=True, exist_ok=True)
        return Settings(
            broker=self.broker.url,
            dev_broker=self.args.broker == "tansu",
            partitions=self.args.partitions,
            store=STORES[store],
            # Per phase: a RocksDB store remembers changelog offsets of the previous
            # broker, and faust refuses to start on a fresh one with them.
            data_dir=self.workdir / self.phase / f"{name}-{store}-data",
            web_port=free_port(),
        )

    def start(self, proc: ManagedProcess) -> ManagedProcess:
        self.children.append(proc)
        return proc.start()

    def stop_all(self) -> None:
        for proc in reversed(self.children):
            proc.stop()
        self.children.clear()
        if self.broker is not None:
            kafka = isinstance(self.broker, KafkaBroker)
            self.broker.stop(timeout=KAFKA_STOP_TIMEOUT if kafka else 10.0)

    def run(self) -> dict[str, Any]:
        args = self.args
        events = workload.generate(args.events, args.customers, seed=args.seed)
        identifies = [e for e in events if not e.triggers]
        stores = ["memory", "rocksdb"] if args.store == "both" else [args.store]
        systems = [s for s in ("bare", "passthrough", "pipeline") if s in args.systems]
        runs, latencies = self.runs, self.latencies
        for store in stores:
            # A fresh broker per phase: the output topics (fixed names in the pipeline)
            # then hold only this run's outputs, and no phase pays for an older backlog.
            self.fresh_broker(f"throughput-{store}", events)
            for system in systems:
                worker, reader, settings = self.worker(system, store)
                expected = {e.event_id for e in events if system != "pipeline" or e.triggers}
                try:
                    run = self.throughput(system, store, worker, reader, len(events), expected)
                    if system == "pipeline":
                        run.worker_metrics = summarize_worker_metrics(scrape(settings.web_port))
                finally:
                    reader.close()
                    worker.stop()
                runs.append(run)
            self.stop_all()
            if args.latency_seconds <= 0:
                continue
            # Latency on a broker without the backlog: Tansu's cost per fetch grows with
            # the record batches a partition holds (measured: a 400/s trickle costs it
            # 0.12 cores on an empty topic, 0.62 with 4,000 single-record batches per
            # partition), which would measure the broker's backlog, not the workers.
            self.fresh_broker(f"latency-{store}", identifies)
            for run in runs[-len(systems) :]:
                if run.system == "passthrough":
                    continue  # no web port, no metrics: a limit, not a system to tune
                worker, reader, settings = self.worker(run.system, store)
                try:
                    self.start(worker)
                    self.warm_up(run.system, worker, reader)
                    latencies.append(
                        self.latency(run.system, store, worker, reader, settings, run.rate)
                    )
                finally:
                    reader.close()
                    worker.stop()
            self.stop_all()
        return self.measured()

    def measured(self) -> dict[str, Any]:
        return {
            "runs": [asdict(r) for r in self.runs],
            "latency": [asdict(x) for x in self.latencies],
        }

    def fresh_broker(self, name: str, backlog: list[workload.Event]) -> None:
        """A new broker with every topic created and `backlog` in both input topics."""
        self.phase = name
        kind = self.args.broker
        log_path = self.workdir / f"{kind}-{name}.log"
        if kind == "kafka":
            # In the work dir, so a failed run keeps the broker's data beside its log.
            self.broker = KafkaBroker(
                free_port(), log_path=log_path, data_dir=self.workdir / f"kafka-{name}-data"
            )
            self.broker.start(timeout=KAFKA_START_TIMEOUT)
        else:
            self.broker = TansuBroker(free_port(), log_path=log_path)
            self.broker.start()
        log(f"{name}: {kind} on {self.broker.bootstrap_server} (logs in {self.workdir})")
        create_topics(
            self.settings("memory", "admin"),
            [bare_agent.INPUT_TOPIC, bare_agent.OUTPUT_TOPIC, passthrough.OUTPUT_TOPIC],
        )
        for topic in (bare_agent.INPUT_TOPIC, EVENTS):
            spent = produce(self.broker.bootstrap_server, topic, backlog)
            log(f"pre-produced {len(backlog)} events to {topic} in {spent:.1f}s")

    def worker(self, system: str, store: str) -> tuple[ManagedProcess, OutputReader, Settings]:
        """The worker process (not started yet) and a reader of its outputs."""
        settings = self.settings(store, system)
        if system == "bare":
            args = [sys.executable, "-m", "bench.bare_agent", "worker"]
            extra = {
                "BENCH_INPUT_TOPIC": bare_agent.INPUT_TOPIC,
                "BENCH_OUTPUT_TOPIC": bare_agent.OUTPUT_TOPIC,
                "OMNICUE_APP_ID": f"{bare_agent.APP_ID}-{store}",
            }
            output, id_field = bare_agent.OUTPUT_TOPIC, "event_id"
        elif system == "passthrough":
            # The same input as the bare agent, read by a group of its own.
            args = [sys.executable, "-m", "bench.passthrough"]
            extra = {
                "BENCH_INPUT_TOPIC": bare_agent.INPUT_TOPIC,
                "BENCH_OUTPUT_TOPIC": passthrough.OUTPUT_TOPIC,
                "OMNICUE_APP_ID": f"{passthrough.APP_ID}-{store}",
            }
            output, id_field = passthrough.OUTPUT_TOPIC, "event_id"
        else:
            rules = self.workdir / "bench-rules.yaml"
            rules.write_text(workload.RULES_YAML, encoding="utf-8")
            args = [sys.executable, "-m", "omnicue.cli", "worker"]
            extra = {"OMNICUE_RULES": str(rules), "OMNICUE_APP_ID": f"omnicue-bench-{store}"}
            output, id_field = ACTIONS["email"], "trigger_event_id"
        if self.args.trace or "BENCH_SET" in self.args.worker_env:
            # bench/trace.py wraps the worker's event loops and spans, or sets the
            # constants of an A/B experiment; the code under test is unchanged.
            args = [sys.executable, "-m", "bench.trace", *args[2:]]
        if self.args.trace:
            extra["BENCH_TRACE"] = str(self.workdir / f"trace-{self.phase}-{system}.jsonl")
        worker = ManagedProcess(
            args,
            env=child_env(settings, {**extra, **self.args.worker_env}),
            cwd=REPO,
            log_path=self.workdir / f"{system}-{store}.log",
            name=f"{system}-{store}",
        )
        reader = OutputReader(self.broker_address, output, settings.partitions, id_field)
        return worker, reader, settings

    def warm_up(self, system: str, worker: ManagedProcess, reader: OutputReader) -> None:
        """Wait until the worker answers events: its group join is not latency."""
        rng = random.Random(self.args.seed + 2)
        producer = KafkaProducer(bootstrap_servers=self.broker_address, linger_ms=5, acks=1)
        topic = EVENTS if system == "pipeline" else bare_agent.INPUT_TOPIC
        try:
            # Customers spread over every partition, so each one has been fetched once.
            warm = [
                workload.encode(workload.trigger(rng, c, datetime.now(UTC)), validate=False)
                for c in rng.sample(range(self.args.customers), min(64, self.args.customers))
            ]
            for event in warm:
                producer.send(topic, key=event.key, value=event.value)
            producer.flush(timeout=30)
        finally:
            producer.close(timeout=5)
        started = time.monotonic()
        reader.read({e.event_id for e in warm}, worker, timeout=self.args.timeout)
        log(f"{system}: warm after {time.monotonic() - started:.1f}s")

    @property
    def broker_address(self) -> str:
        assert self.broker is not None
        return self.broker.bootstrap_server

    def cpu_sample(self, worker: ManagedProcess) -> CpuSample:
        return CpuSample(
            time.monotonic(),
            cpu_seconds(worker.pid),
            cpu_seconds(self.broker.pid if self.broker else None),
            time.process_time(),
            machine_cpu_seconds(),
        )

    def profile(self, worker: ManagedProcess, name: str) -> Profiler | None:
        if not self.args.profile or worker.pid is None:
            return None
        return Profiler(worker.pid, self.workdir / f"profile-{name}.txt").start()

    def finish_profile(self, profiler: Profiler | None) -> None:
        if profiler is None:
            return
        raw = profiler.stop()
        # Only the summary goes to results/: the raw stacks (MBs) stay in the kept work dir.
        RESULTS.mkdir(parents=True, exist_ok=True)
        # Per broker: a Kafka profile must not overwrite the Tansu one beside it.
        suffix = "-kafka.summary.txt" if self.args.broker == "kafka" else ".summary.txt"
        summary = RESULTS / raw.name.replace(".txt", suffix)
        summary.write_text(profile.summarize(raw) + "\n", encoding="utf-8")
        log(f"profile: {summary} (raw stacks: {raw})")

    def throughput(
        self,
        system: str,
        store: str,
        worker: ManagedProcess,
        reader: OutputReader,
        inputs: int,
        expected: set[str],
    ) -> ThroughputRun:
        assert self.broker is not None
        marks = {int(len(expected) * 0.1): "low", int(len(expected) * 0.9): "high"}
        cpu: dict[str, CpuSample] = {}

        def on_progress(count: int) -> None:
            for threshold, name in marks.items():
                if count >= threshold and name not in cpu:
                    cpu[name] = self.cpu_sample(worker)

        log(f"{system}/{store}: starting worker, expecting {len(expected)} outputs")
        started = time.time()
        self.start(worker)
        profiler = self.profile(worker, f"{system}-{store}")
        try:
            got = reader.read(expected, worker, self.args.timeout, on_progress)
            cpu_total = cpu_seconds(worker.pid)
        finally:
            self.finish_profile(profiler)
        produced = [s.produced for s in got.values()]
        received = [s.received for s in got.values()]
        run = ThroughputRun(
            system=system,
            store=store,
            inputs=inputs,
            outputs_expected=len(expected),
            outputs=len(got),
            duplicates=reader.duplicates,
            startup_s=round(min(received) - started, 2),
            total_s=round(max(received) - started, 2),
            rate=round(steady_rate(produced), 1),
            rate_received=round(steady_rate(received), 1),
            rate_by_decile=[
                round(steady_rate(produced, i / 10, (i + 1) / 10), 1) for i in range(10)
            ],
            cpu=cpu["low"].usage(cpu["high"]),
            rate_per_core=0.0,
            loadavg_1m=round(os.getloadavg()[0], 2),
        )
        if system == "passthrough":
            # It is done before the bench has read 90% of its outputs, so the CPU samples
            # at 10% and 90% miss its work: its outputs over all the CPU it used instead
            # (startup included, so a lower bound).
            run.rate_per_core = round(len(got) / cpu_total, 1) if cpu_total > 0 else 0.0
        elif run.cpu["worker"] > 0:
            run.rate_per_core = round(run.rate / run.cpu["worker"], 1)
        log(
            f"{system}/{store}: {run.rate:.0f} events/s, {run.rate_per_core:.0f} per worker core"
            f" (cores used: {format_cpu(run.cpu)}, load {os.getloadavg()[0]:.2f})"
        )
        return run

    def latency(
        self,
        system: str,
        store: str,
        worker: ManagedProcess,
        reader: OutputReader,
        settings: Settings,
        measured_rate: float,
    ) -> LatencyRun:
        input_topic = EVENTS if system == "pipeline" else bare_agent.INPUT_TOPIC
        rate = self.args.latency_rate or max(1.0, measured_rate * self.args.latency_share)
        count = int(rate * self.args.latency_seconds)
        rng = random.Random(self.args.seed + 1)
        before = scrape(settings.web_port)
        cpu_before = self.cpu_sample(worker)
        profiler = self.profile(worker, f"latency-{system}-{store}")
        log(
            f"latency {system}/{store}: {count} events at {rate:.0f}/s "
            f"for {self.args.latency_seconds:.0f}s"
        )
        customers = [rng.randrange(self.args.customers) for _ in range(count)]
        # event id -> occurred_at (epoch seconds), stamped just before the send.
        sent: dict[str, float] = {}
        done = threading.Event()
        stopping = threading.Event()
        window: dict[str, float] = {}

        def producer_loop() -> None:
            # A 5 ms linger batches the sends: one produce request per event would cost
            # Tansu and this process more CPU than the worker under test gets.
            producer = KafkaProducer(bootstrap_servers=self.broker_address, linger_ms=5, acks=1)
            try:
                start = time.monotonic()
                window["start"] = time.time()
                for i, customer in enumerate(customers):
                    if stopping.is_set():
                        return
                    pause = start + i / rate - time.monotonic()
                    if pause > 0:
                        time.sleep(pause)
                    occurred = datetime.now(UTC)
                    event = workload.encode(
                        workload.trigger(rng, customer, occurred), validate=False
                    )
                    sent[event.event_id] = occurred.timestamp()
                    producer.send(input_topic, key=event.key, value=event.value)
                window["end"] = time.time()
                producer.flush(timeout=30)
            finally:
                producer.close(timeout=5)
                done.set()

        thread = threading.Thread(target=producer_loop, name="latency-producer", daemon=True)
        thread.start()
        try:
            # Read while producing, so receive times are live; then what is still missing.
            deadline = time.monotonic() + self.args.latency_seconds + 60
            while not done.is_set():
                reader.poll(worker)
                if time.monotonic() > deadline:
                    raise ServiceError("latency producer did not finish")
            if "end" not in window:
                raise ServiceError("latency producer failed")
            missing = sent.keys() - reader.seen.keys()
            if missing:
                reader.read(missing, worker, timeout=max(5.0, deadline - time.monotonic()))
            cpu_after = self.cpu_sample(worker)
        finally:
            stopping.set()
            thread.join(timeout=10)
            self.finish_profile(profiler)
        after = scrape(settings.web_port)
        seen = {i: reader.seen[i] for i in sent if i in reader.seen}
        samples = sorted((sent[i], (s.received - sent[i]) * 1000) for i, s in seen.items())
        lat_ms = sorted(latency for _, latency in samples)
        # p50 per second of sending: a rising line means the worker falls behind at
        # this load, a flat one that the latency is per event, not queueing.
        by_second: dict[int, list[float]] = {}
        for occurred, latency in samples:
            by_second.setdefault(int(occurred - samples[0][0]), []).append(latency)
        # Outputs the worker sent while the load ran (its first fifth left out as warm-up):
        # at the input rate it keeps up; below it, that is its capacity under live load.
        start, end = window["start"] + (window["end"] - window["start"]) / 5, window["end"]
        sent_in_window = sum(start <= s.produced < end for s in seen.values())
        # Where the time goes, from the action's own clocks: created_at is the worker's
        # clock when its batch started, the record timestamp when it was sent.
        stages: dict[str, list[float]] = {"to_batch": [], "in_batch": [], "delivery": []}
        for event_id, s in seen.items():
            if "created_at" in s.value:
                created = datetime.fromisoformat(s.value["created_at"]).timestamp()
                stages["to_batch"].append((created - sent[event_id]) * 1000)
                stages["in_batch"].append((s.produced - created) * 1000)
            stages["delivery"].append((s.received - s.produced) * 1000)
        name = "omnicue_event_to_action_latency_seconds"
        run = LatencyRun(
            system=system,
            store=store,
            target_rate=round(rate, 1),
            produced=len(sent),
            produce_rate=round(len(sent) / (window["end"] - window["start"]), 1),
            actions=len(seen),
            missing=len(sent) - len(seen),
            p50_ms=round(quantile(lat_ms, 0.50), 1),
            p90_ms=round(quantile(lat_ms, 0.90), 1),
            p99_ms=round(quantile(lat_ms, 0.99), 1),
            p999_ms=round(quantile(lat_ms, 0.999), 1),
            max_ms=round(lat_ms[-1], 1) if lat_ms else float("nan"),
            worker_p50_le_s=histogram_quantile(before, after, name, 0.50),
            worker_p99_le_s=histogram_quantile(before, after, name, 0.99),
            cpu=cpu_before.usage(cpu_after),
            output_rate=round(sent_in_window / (end - start), 1),
            stage_p50_ms={k: round(statistics.median(v), 1) for k, v in stages.items() if v},
            p50_ms_by_second=[round(statistics.median(v)) for _, v in sorted(by_second.items())],
            loadavg_1m=round(os.getloadavg()[0], 2),
        )
        log(
            f"latency {system}/{store}: p50 {run.p50_ms:.0f} ms, p99 {run.p99_ms:.0f} ms "
            f"(cores used: {format_cpu(run.cpu)}, load {run.loadavg_1m:.2f})"
        )
        return run


def format_cpu(cpu: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in cpu.items() if k != "machine")


def quantile(ordered: Sequence[float], q: float) -> float:
    if not ordered:
        return float("nan")
    if len(ordered) == 1:
        return ordered[0]
    return statistics.quantiles(ordered, n=1000, method="inclusive")[int(q * 1000) - 1]


def summarize_worker_metrics(samples: dict[str, float]) -> dict[str, float]:
    """The few worker figures that explain a throughput number."""
    out: dict[str, float] = {}
    count = samples.get("omnicue_batch_events_count{}")
    total = samples.get("omnicue_batch_events_sum{}")
    if count:
        out["batches"] = count
        out["mean_batch_inputs"] = round((total or 0.0) / count, 1)
    for key, value in samples.items():
        if key.startswith(("omnicue_actions_total", "omnicue_events_consumed_total")):
            out[key] = value
        if key.startswith(("omnicue_decisions_total", "omnicue_events_invalid_total")):
            out[key] = value
    return out


# -- reporting ------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
            check=False,
        ).stdout.strip()  # fmt: skip
    except OSError:
        commit = ""
    from importlib.metadata import version

    return {
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "cpu": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "faust": version("faust-streaming"),
        "aiokafka": version("aiokafka"),
        "commit": commit,
        "loadavg_1m_at_start": round(os.getloadavg()[0], 2),
    }


def print_report(result: dict[str, Any]) -> None:
    m = result["machine"]
    print()
    print(
        f"machine: {m['usable_cores']} cores ({m['cpu']}), python {m['python']}, "
        f"faust {m['faust']}, commit {m['commit']}"
    )
    c = result["config"]
    broker = (
        f"Apache Kafka {c['broker_version']}"
        if c["broker"] == "kafka"
        else "dev broker Tansu (producer_max_batch_size=1)"
    )
    print(
        f"workload: {c['customers']} identify + {c['events']} trigger events, "
        f"{c['partitions']} partitions, {broker}"
    )
    print()
    cpu_broker = f"cpu {c['broker']}"
    header = f"{'system':<12}{'store':<9}{'events/s':>10}{'(recv)':>9}{'/core':>8}{'startup s':>11}"
    header += f"{'total s':>9}{'dup':>6}{'cpu worker':>12}{cpu_broker:>11}{'cpu others':>12}"
    header += f"{'load':>7}"
    print(header)
    print("-" * len(header))
    for r in result["runs"]:
        print(
            f"{r['system']:<12}{r['store']:<9}{r['rate']:>10.0f}{r['rate_received']:>9.0f}"
            f"{r.get('rate_per_core', 0):>8.0f}"
            f"{r['startup_s']:>11.1f}{r['total_s']:>9.1f}{r['duplicates']:>6}"
            f"{r['cpu']['worker']:>12.2f}{r['cpu']['broker']:>11.2f}{r['cpu']['others']:>12.2f}"
            f"{r.get('loadavg_1m', float('nan')):>7.2f}"
        )
    busy = [r for r in (*result["runs"], *result["latency"]) if r["cpu"]["others"] > 0.15]
    if busy:
        print(
            "\nWARNING: other processes used CPU during the measurement "
            f"(up to {max(r['cpu']['others'] for r in busy):.2f} cores of "
            f"{result['machine']['usable_cores']}): the figures are not reliable"
        )
    lats = {(x["system"], x["store"]): x for x in result["latency"]}
    runs = {(r["system"], r["store"]): r for r in result["runs"]}
    for store in dict.fromkeys(r["store"] for r in result["runs"]):
        bare, pipe = runs.get(("bare", store)), runs.get(("pipeline", store))
        limit = runs.get(("passthrough", store))
        lb, lp = lats.get(("bare", store)), lats.get(("pipeline", store))

        def cell(row: dict[str, Any] | None, key: str) -> str:
            return f"{row[key]:>10.0f}" if row else f"{'-':>10}"

        ratio = result["summary"]["ratio_pipeline_over_bare"].get(store)
        print(f"\nsummary ({store}://)      {'bare':>10}{'pipeline':>10}{'ratio':>8}")
        print(
            f"  events/s (backlog)   {cell(bare, 'rate')}{cell(pipe, 'rate')}"
            f"{(f'{ratio:.2f}' if ratio else '-'):>8}"
        )
        if limit:
            share = result["summary"]["ratio_pipeline_over_passthrough"].get(store)
            print(
                f"  passthrough limit    {cell(limit, 'rate')}"
                f"  (pipeline/passthrough {f'{share:.2f}' if share else '-'})"
            )
        print(f"  live load events/s   {cell(lb, 'produce_rate')}{cell(lp, 'produce_rate')}")
        print(f"  outputs/s under it   {cell(lb, 'output_rate')}{cell(lp, 'output_rate')}")
        print(f"  latency p50 ms       {cell(lb, 'p50_ms')}{cell(lp, 'p50_ms')}")
        print(f"  latency p99 ms       {cell(lb, 'p99_ms')}{cell(lp, 'p99_ms')}")
    for lat in result["latency"]:
        keeps_up = lat["output_rate"] >= 0.95 * lat["produce_rate"]
        stages = ", ".join(f"{k} {v:.0f}" for k, v in lat["stage_p50_ms"].items())
        print(
            f"\nlatency {lat['system']}/{lat['store']}: {lat['produced']} events at"
            f" {lat['produce_rate']:.0f}/s for {lat['produced'] / lat['produce_rate']:.0f}s,"
            f" outputs sent at {lat['output_rate']:.0f}/s"
            f" ({'keeps up' if keeps_up else 'FALLS BEHIND'})\n"
            f"  event -> output consumed: p50 {lat['p50_ms']:.0f} ms, p90 {lat['p90_ms']:.0f} ms,"
            f" p99 {lat['p99_ms']:.0f} ms, p99.9 {lat.get('p999_ms', float('nan')):.0f} ms,"
            f" max {lat['max_ms']:.0f} ms, missing {lat['missing']}\n"
            f"  p50 by stage (ms): {stages}\n"
            f"  p50 by second of load (ms): {lat['p50_ms_by_second']}\n"
            f"  worker histogram (due -> emitted): p50 <= {lat['worker_p50_le_s']} s,"
            f" p99 <= {lat['worker_p99_le_s']} s\n"
            f"  cores used: {format_cpu(lat['cpu'])},"
            f" load {lat.get('loadavg_1m', float('nan')):.2f}"
        )


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    by = {(r["system"], r["store"]): r for r in runs}
    ratios, shares = {}, {}
    for (system, store), run in by.items():
        bare, limit = by.get(("bare", store)), by.get(("passthrough", store))
        if system == "pipeline" and bare:
            ratios[store] = round(run["rate"] / bare["rate"], 3)
        if system == "pipeline" and limit:
            shares[store] = round(run["rate"] / limit["rate"], 3)
    return {"ratio_pipeline_over_bare": ratios, "ratio_pipeline_over_passthrough": shares}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.pipeline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--events", type=int, default=30_000, help="trigger events")
    parser.add_argument("--customers", type=int, default=2_000)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--store", choices=[*STORES, "both"], default="memory")
    parser.add_argument(
        "--broker",
        choices=BROKERS,
        default="tansu",
        help="tansu: the dev broker; kafka: Apache Kafka, as in production (needs Java 17+)",
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--systems",
        type=lambda v: set(v.split(",")),
        default={"bare", "passthrough", "pipeline"},
        help="comma-separated subset of bare,passthrough,pipeline",
    )
    parser.add_argument("--latency-seconds", type=float, default=15.0, help="0: skip")
    parser.add_argument(
        "--latency-rate", type=float, default=0.0, help="events/s (default: the share below)"
    )
    parser.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for both workers, e.g. OMNICUE_BATCH_SIZE=100",
    )
    parser.add_argument(
        "--latency-share",
        type=float,
        default=0.5,
        help="latency load as a share of the measured pipeline rate",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="seconds one system may take for all its outputs",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="py-spy each worker; raw stacks and summaries go to bench/results/",
    )
    parser.add_argument(
        "--trace",
        action="store_true",
        help="trace each worker's idle time, waits and spans (bench/trace.py) into the work dir",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="default: bench/results/latest.json, or latest-kafka.json with --broker kafka",
    )
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep the work dir (logs) even on success"
    )
    args = parser.parse_args(argv)
    if args.output is None:
        args.output = RESULTS / ("latest-kafka.json" if args.broker == "kafka" else "latest.json")
    return args


def check_workload(args: argparse.Namespace) -> None:
    per_partition = (args.events + args.customers) / args.partitions
    if args.broker == "tansu" and per_partition > 8_000:
        # Measured: Tansu's fetches slow down sharply past ~10k single-record batches
        # in one partition (the workers write one record per batch on it).
        log(
            f"warning: {per_partition:.0f} records per partition; past ~10k Tansu "
            "fetches slow down and the figures measure the broker, not the workers"
        )


def _terminate(signum: int, frame: FrameType | None) -> None:
    # Turn SIGTERM into an exception so the finally blocks stop every child.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.worker_env = parse_env(args.worker_env)
    if args.broker == "kafka":
        # Before anything starts: no work dir, no half-run to clean up.
        try:
            find_java()
        except JavaNotFound as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 1
    check_workload(args)
    before = machine_cpu_seconds()
    time.sleep(1.0)
    idle_load = machine_cpu_seconds() - before
    if idle_load > 0.3:
        log(f"warning: the machine is busy before the bench starts ({idle_load:.1f} cores used)")
    previous = signal.signal(signal.SIGTERM, _terminate)
    workdir = Path(tempfile.mkdtemp(prefix="omnicue-bench-"))
    bench = Bench(args, workdir)
    ok = False
    error = None
    try:
        bench.run()
        ok = True
    except ServiceError as exc:
        error = str(exc)
        print(f"bench failed: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        # Ctrl-C: the children are stopped below; report what was measured so far.
        error = "interrupted"
        print("bench interrupted", file=sys.stderr)
    finally:
        bench.stop_all()
        signal.signal(signal.SIGTERM, previous)
    if bench.runs:
        # Partial results too: a failure in a late phase keeps what came before.
        result = {
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": machine_info(),
            "config": {
                "events": args.events,
                "customers": args.customers,
                "partitions": args.partitions,
                "stores": args.store,
                "broker": args.broker,
                "broker_version": KAFKA_VERSION if args.broker == "kafka" else None,
                "seed": args.seed,
                "latency_seconds": args.latency_seconds,
                "latency_share": args.latency_share,
                "latency_rate": args.latency_rate,
                "batch_size": Settings.model_fields["batch_size"].default,
                "batch_within": Settings.model_fields["batch_within"].default,
                "worker_env": args.worker_env,
            },
            **bench.measured(),
            "error": error,
        }
        result["summary"] = summarize(result["runs"])
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print_report(result)
        print(f"\nwritten: {args.output}" + ("" if ok else " (partial: the bench failed)"))
    if ok and not (args.keep_logs or args.profile):
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"logs kept in {workdir}", file=sys.stderr)
    return 0 if ok else 130 if error == "interrupted" else 1


if __name__ == "__main__":
    sys.exit(main())
