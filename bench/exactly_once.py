"""Experiment: what faust's processing_guarantee="exactly_once" gives on Apache Kafka.

    PYTHONPATH=. python -m bench.exactly_once [--records 20000] [--kills 5] [--repeats 3]
        [--configs at_least_once,exactly_once] [--stores rocksdb,memory]
        [--phases crash,throughput] [--append] [--help]
    python -m bench.exactly_once worker     # the faust app below, as a child process

The app is the least that exercises every part of a transaction: an agent consumes
topic `in`, increments a changelog-backed table (a count per key) and sends one record
per input to topic `out` with `topic.send`, so under exactly_once faust routes both the
changelog write and the output through its TransactionManager. It is built with the
pipeline's own factory (streams.app.faust_app, as production runs it on Kafka); only
processing_guarantee differs between configurations.

Per configuration and repeat, on a fresh Apache Kafka 4.4.0 started here:

1. Crashes. A producer publishes `--records` records with unique ids at a steady rate
   while the worker is SIGKILLed `--kills` times, each time at a random moment after
   it has started emitting again, and restarted at once in the same data dir. The
   last worker drains the rest and stops cleanly. Then `out` is read from the start
   with isolation_level=read_committed, by consuming until nothing more comes (end
   offsets are used only to report transaction markers, never to count), and every id
   is checked: missing, duplicated. The counts the worker emitted must be 1..n once
   per key; the changelog, read with read_committed (what a restoring worker gets),
   must end at n per key: more is a double count.
2. Throughput. On the same broker, new topics and a new consumer group: a backlog of
   `--throughput-records` records, a fresh worker, no kills; outputs/s between 10%
   and 90% of the outputs, on the records' own timestamps (set by the worker's
   producer), read with read_committed. It first waits (up to `--quiet-wait`) for the
   machine to be idle, and records the cores everything else used meanwhile and the
   worker's CPU per output: on a shared 2-core machine the rate alone measures the
   neighbours.

Results: a table on stdout and bench/results/exactly_once.json; `--append` adds this
invocation's runs to the runs already there (same workload only), so the repeats can be
run a few minutes at a time. Every child (broker, worker) is stopped on exit, error,
Ctrl-C or SIGTERM.
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
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import faust
import orjson
from faust.types import StreamT
from faust.types.enums import ProcessingGuarantee
from faust.worker import Worker
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.consumer.fetcher import ConsumerRecord

from omnicue.kafka_broker import KAFKA_VERSION, KafkaBroker
from omnicue.services import ManagedProcess, ServiceError, free_port
from omnicue.settings import Settings
from streams.app import faust_app
from streams.topics import raw_topic

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
APP_ID = "omnicue-bench-eos"
INPUT_TOPIC = "in"
OUTPUT_TOPIC = "out"
COUNTS_TABLE = "counts"
CONFIGS = {
    "at_least_once": (ProcessingGuarantee.AT_LEAST_ONCE, False),
    "exactly_once": (ProcessingGuarantee.EXACTLY_ONCE, False),
    # The same, plus an agent that consumes `out` (and does nothing): then faust's
    # consumer knows `out`'s partitions and its assignor puts `out` in the input's
    # copartitioned group, the two things its TransactionManager.send needs to put an
    # output into a transaction at all (see `build_app`). A probe of a workaround, not
    # something the pipeline could do: its outputs are read by other consumers.
    "exactly_once_out_consumed": (ProcessingGuarantee.EXACTLY_ONCE, True),
}
KAFKA_START_TIMEOUT = 90.0
KAFKA_STOP_TIMEOUT = 30.0
# A worker's start: import, group join (after a SIGKILL the dead member holds the group
# for the 10 s session timeout), recovery of the changelog.
WORKER_READY_TIMEOUT = 120.0
READY_LINE = r"\[\^Worker\]: Ready"
# Cores other processes may use during a throughput run for it to count as quiet.
QUIET = 0.3
_CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- the faust app (the worker process) -------------------------------------------


def build_app(
    settings: Settings,
    guarantee: ProcessingGuarantee,
    input_topic: str = INPUT_TOPIC,
    output_topic: str = OUTPUT_TOPIC,
    *,
    consume_output: bool = False,
) -> faust.App:
    app_id = settings.app_id
    if app_id == Settings.model_fields["app_id"].default:
        # Never the pipeline's group and tables.
        app_id = APP_ID
    app = faust_app(settings.model_copy(update={"app_id": app_id}))
    # The factory fixes at_least_once (see streams/app.py); this switch is what is
    # measured, set before anything reads it (app.in_transaction is cached).
    # (faust's annotation says the enum class, its setter takes a member.)
    app.conf.processing_guarantee = guarantee  # type: ignore[assignment]

    source = raw_topic(app, input_topic, settings.partitions)
    sink = raw_topic(app, output_topic, settings.partitions)
    counts = app.Table(
        COUNTS_TABLE,
        default=int,
        key_type=bytes,
        value_type=int,
        partitions=settings.partitions,
    )

    async def count(stream: StreamT[bytes]) -> None:
        async for key, value in stream.items():
            record = orjson.loads(value)
            counts[key] += 1
            # Under exactly_once faust sends this through its TransactionManager, which
            # picks the transaction from the *destination* partition: the consumer's
            # metadata for `out`, and `out`'s copartitioned group. Without either it
            # falls back to the plain producer, outside every transaction.
            out = {"id": record["id"], "count": counts[key]}
            await sink.send(key=key, value=orjson.dumps(out))

    app.agent(source, name="bench.eos.count")(count)

    if consume_output:

        async def ignore(stream: StreamT[bytes]) -> None:
            async for _ in stream:
                pass

        app.agent(sink, name="bench.eos.ignore")(ignore)
    return app


def worker_main() -> None:
    settings = Settings()
    config = os.environ.get("BENCH_CONFIG", "at_least_once")
    if config not in CONFIGS:
        raise SystemExit(f"BENCH_CONFIG must be one of {', '.join(CONFIGS)}, got {config!r}")
    guarantee, consume_output = CONFIGS[config]
    app = build_app(
        settings,
        guarantee,
        os.environ.get("BENCH_INPUT_TOPIC", INPUT_TOPIC),
        os.environ.get("BENCH_OUTPUT_TOPIC", OUTPUT_TOPIC),
        consume_output=consume_output,
    )
    Worker(app, loglevel=settings.log_level).execute_from_commandline()


# -- measurement records -------------------------------------------------------------


@dataclass
class OutputCheck:
    """`out` read with read_committed, against the ids that were published."""

    records: int
    unique_ids: int
    duplicates: int  # records beyond the first one of their id
    duplicated_ids: int
    missing: int
    # The counts the worker emitted: each of 1..n exactly once per key of n inputs
    # when every input was counted once and emitted once.
    repeated_counts: int  # (key, count) emitted more than once: a replay that was undone
    counts_above_inputs: int  # emitted counts above the key's inputs: counted twice
    # Offsets minus records read uncommitted: transaction markers (commits, aborts).
    # 0 means no record of the topic was written in a transaction.
    transaction_markers: int
    aborted_records: int  # visible read_uncommitted, not read_committed


@dataclass
class TableCheck:
    """The changelog read with read_committed: what a restoring worker ends up with."""

    keys: int
    exact: int
    over: int  # keys counted above their inputs: double counts
    under: int
    excess: int  # sum of the counts above
    deficit: int
    transaction_markers: int


@dataclass
class CrashRun:
    config: str
    repeat: int
    store: str
    records: int
    kills_done: int = 0
    # Seconds from a (re)start to its worker's "Ready", the first start included.
    restart_ready_s: list[float] = field(default_factory=list)
    # Outputs seen (read_uncommitted, duplicates included) when each kill struck.
    outputs_at_kill: list[int] = field(default_factory=list)
    produce_s: float = 0.0
    total_s: float = 0.0
    output: OutputCheck | None = None
    table: TableCheck | None = None
    # Distinct ERROR/CRITICAL/exception lines of every worker run, the first few.
    worker_errors: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass
class ThroughputRun:
    config: str
    repeat: int
    store: str
    records: int
    outputs: int = 0
    duplicates: int = 0
    startup_s: float = 0.0  # worker start to first output
    total_s: float = 0.0  # worker start to last output
    rate: float = 0.0  # outputs/s between 10% and 90% of the outputs, record timestamps
    cpu_worker: float = 0.0  # cores the worker used from first to last output
    cpu_others: float = 0.0  # cores used by anything but the worker, broker and bench
    # The worker's CPU per output: what the guarantee costs in work, which a busy
    # machine skews much less than the rate.
    cpu_ms_per_output: float = 0.0
    # Seconds spent waiting for the machine to calm down before the start, and the
    # cores it was using at the start (see wait_for_quiet).
    waited_for_quiet_s: float = 0.0
    busy_before: float = 0.0
    error: str | None = None


# -- cpu ---------------------------------------------------------------------------------


@dataclass
class CpuSample:
    """CPU seconds used so far by the worker, the broker, this process and the machine."""

    wall: float
    worker: float
    broker: float
    bench: float
    machine: float

    def usage(self, later: CpuSample) -> tuple[float, float]:
        """Cores used in between by the worker, and by other processes on the machine:
        with 2 cores, someone else's test run skews the rate."""
        wall = later.wall - self.wall
        if wall <= 0:
            return 0.0, 0.0
        worker = later.worker - self.worker
        others = later.machine - self.machine - worker
        others -= (later.broker - self.broker) + (later.bench - self.bench)
        return round(worker / wall, 2), round(max(0.0, others / wall), 2)


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
    try:
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:]]
    except OSError:
        return 0.0
    # user nice system idle iowait irq softirq steal: idle and iowait are not busy.
    return (sum(fields[:8]) - fields[3] - fields[4]) / _CLK_TCK


def wait_for_quiet(limit: float, busy: float = 0.4, sample: float = 2.0) -> tuple[float, float]:
    """Wait up to `limit` seconds until the machine uses under `busy` cores.

    Others run tests on this 2-core machine: a throughput run started beside them
    measures them. Returns the seconds waited and the cores in use at the start.
    """
    started = time.monotonic()
    while True:
        before = machine_cpu_seconds()
        time.sleep(sample)
        used = (machine_cpu_seconds() - before) / sample
        if used < busy or time.monotonic() - started >= limit:
            return round(time.monotonic() - started, 1), round(used, 2)


# -- kafka io ----------------------------------------------------------------------------


def create_topics(bootstrap: str, names: Sequence[str], partitions: int) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1) for name in names]
        )
    finally:
        admin.close()


def record_key(i: int, keys: int) -> bytes:
    return f"k{i % keys:04d}".encode()


def record_id(i: int) -> str:
    return f"r{i:07d}"


def expected_counts(records: int, keys: int) -> Counter[bytes]:
    return Counter(record_key(i, keys) for i in range(records))


def input_producer(bootstrap: str) -> KafkaProducer:
    # kafka-python 3 is idempotent with acks=all by default: the inputs themselves are
    # never duplicated, so every duplicate in `out` is the worker's.
    return KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)


def produce_backlog(bootstrap: str, topic: str, records: int, keys: int) -> None:
    producer = input_producer(bootstrap)
    try:
        for i in range(records):
            value = orjson.dumps({"id": record_id(i)})
            producer.send(topic, key=record_key(i, keys), value=value)
        producer.flush(timeout=120)
    finally:
        producer.close(timeout=10)


class PacedProducer(threading.Thread):
    """Publishes records 0..n-1 at a steady rate, in a thread of its own."""

    def __init__(self, bootstrap: str, topic: str, records: int, keys: int, rate: float) -> None:
        super().__init__(name="eos-producer", daemon=True)
        self.bootstrap, self.topic = bootstrap, topic
        self.records, self.keys, self.rate = records, keys, rate
        self.sent = 0
        self.error: BaseException | None = None
        self.stopping = threading.Event()
        self.seconds = 0.0

    def run(self) -> None:
        started = time.monotonic()
        try:
            producer = input_producer(self.bootstrap)
            try:
                for i in range(self.records):
                    if self.stopping.is_set():
                        return
                    delay = started + i / self.rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    value = orjson.dumps({"id": record_id(i)})
                    producer.send(self.topic, key=record_key(i, self.keys), value=value)
                    self.sent = i + 1
                producer.flush(timeout=120)
            finally:
                producer.close(timeout=10)
        except BaseException as exc:  # reported by the main thread
            self.error = exc
        finally:
            self.seconds = time.monotonic() - started


def _consumer(bootstrap: str, topic: str, partitions: int, isolation: str) -> KafkaConsumer:
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level=isolation,
        fetch_max_wait_ms=100,
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
    return consumer


def read_all(
    bootstrap: str,
    topic: str,
    partitions: int,
    isolation: str,
    *,
    idle: float = 5.0,
    timeout: float = 180.0,
) -> tuple[list[ConsumerRecord], int]:
    """Every record of `topic`, consumed until `idle` seconds bring nothing more.

    Returns the records and the sum of the partitions' end offsets as this isolation
    level reports them (read_committed: the last stable offset), for diagnostics only.
    """
    consumer = _consumer(bootstrap, topic, partitions, isolation)
    try:
        records: list[ConsumerRecord] = []
        deadline = time.monotonic() + timeout
        last_new = time.monotonic()
        while time.monotonic() - last_new < idle:
            if time.monotonic() > deadline:
                raise ServiceError(f"reading {topic} ({isolation}) took over {timeout:.0f}s")
            for batch in consumer.poll(timeout_ms=200, max_records=50_000).values():
                if batch:
                    records.extend(batch)
                    last_new = time.monotonic()
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        ends = consumer.end_offsets(tps)
        return records, sum(ends.values())
    finally:
        consumer.close()


class Progress:
    """Counts `out` records as they arrive (read_uncommitted, duplicates included)."""

    def __init__(self, bootstrap: str, topic: str, partitions: int) -> None:
        self.consumer = _consumer(bootstrap, topic, partitions, "read_uncommitted")
        self.records = 0
        self.ids: set[str] = set()

    def poll(self, timeout_ms: int = 100) -> int:
        new = 0
        for batch in self.consumer.poll(timeout_ms=timeout_ms, max_records=50_000).values():
            for record in batch:
                self.records += 1
                new += 1
                self.ids.add(orjson.loads(record.value)["id"])
        return new

    def close(self) -> None:
        self.consumer.close()


# -- checks ------------------------------------------------------------------------------


def check_outputs(
    committed: list[ConsumerRecord],
    uncommitted_records: int,
    uncommitted_end: int,
    records: int,
    keys: int,
) -> OutputCheck:
    ids: Counter[str] = Counter()
    emitted: Counter[tuple[bytes, int]] = Counter()
    for record in committed:
        value = orjson.loads(record.value)
        ids[value["id"]] += 1
        emitted[(record.key, int(value["count"]))] += 1
    sent = {record_id(i) for i in range(records)}
    inputs = expected_counts(records, keys)
    return OutputCheck(
        records=len(committed),
        unique_ids=len(ids),
        duplicates=sum(n - 1 for n in ids.values()),
        duplicated_ids=sum(1 for n in ids.values() if n > 1),
        missing=len(sent - ids.keys()),
        repeated_counts=sum(n - 1 for n in emitted.values()),
        counts_above_inputs=sum(n for (key, c), n in emitted.items() if c > inputs[key]),
        transaction_markers=uncommitted_end - uncommitted_records,
        aborted_records=uncommitted_records - len(committed),
    )


def check_table(
    changelog: list[ConsumerRecord],
    uncommitted_end: int,
    uncommitted_records: int,
    records: int,
    keys: int,
) -> TableCheck:
    final: dict[bytes, int] = {}
    # Per partition in offset order, so the last value of a key is what recovery keeps.
    for record in sorted(changelog, key=lambda r: (r.partition, r.offset)):
        if record.value is not None:
            final[record.key] = int(json.loads(record.value))
    inputs = expected_counts(records, keys)
    diffs = {key: final.get(key, 0) - n for key, n in inputs.items()}
    return TableCheck(
        keys=len(inputs),
        exact=sum(1 for d in diffs.values() if d == 0),
        over=sum(1 for d in diffs.values() if d > 0),
        under=sum(1 for d in diffs.values() if d < 0),
        excess=sum(d for d in diffs.values() if d > 0),
        deficit=-sum(d for d in diffs.values() if d < 0),
        transaction_markers=uncommitted_end - uncommitted_records,
    )


def worker_errors(text: str, limit: int = 8) -> list[str]:
    """Distinct error lines of a worker log, without their timestamp and pid."""
    found: dict[str, None] = {}
    for line in text.splitlines():
        if any(word in line for word in ("[ERROR]", "[CRITICAL]", "Traceback", "Error:")):
            # "[2026-12-03 18:40:50,665] [19036] [ERROR] ..." -> "[ERROR] ..."
            parts = line.split("] ", 2)
            found.setdefault((parts[2] if len(parts) == 3 else line)[:300], None)
    return list(found)[:limit]


# -- the experiment ----------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class Experiment:
    def __init__(
        self, args: argparse.Namespace, workdir: Path, earlier: dict[str, Any] | None = None
    ) -> None:
        self.args = args
        self.workdir = workdir
        # Runs of earlier invocations (--append): repeats are numbered on from them, per
        # phase (a phase can be run again on its own).
        earlier = earlier or {}
        self.done = {
            phase: Counter((r["store"], r["config"]) for r in earlier.get(phase, []))
            for phase in ("crash", "throughput")
        }
        self.broker: KafkaBroker | None = None
        self.children: list[ManagedProcess] = []
        self.crashes: list[CrashRun] = []
        self.throughputs: list[ThroughputRun] = []

    # -- processes ------------------------------------------------------------

    def fresh_broker(self, name: str) -> KafkaBroker:
        self.stop_all()
        self.broker = KafkaBroker(
            free_port(),
            log_path=self.workdir / f"kafka-{name}.log",
            data_dir=self.workdir / f"kafka-{name}-data",
        )
        self.broker.start(timeout=KAFKA_START_TIMEOUT)
        log(f"{name}: Apache Kafka on {self.broker.bootstrap_server}")
        return self.broker

    def stop_all(self) -> None:
        for proc in reversed(self.children):
            proc.stop()
        self.children.clear()
        if self.broker is not None:
            self.broker.stop(timeout=KAFKA_STOP_TIMEOUT)
            if not self.args.keep_logs:
                shutil.rmtree(self.broker.data_dir, ignore_errors=True)
            self.broker = None

    def worker(
        self, name: str, config: str, store: str, app_id: str, topics: tuple[str, str]
    ) -> ManagedProcess:
        assert self.broker is not None
        data_dir = self.workdir / name / "data"
        data_dir.parent.mkdir(parents=True, exist_ok=True)  # faust makes no parents
        # Only our OMNICUE_* values: a developer's own exports must not leak in.
        env = {k: v for k, v in os.environ.items() if not k.startswith("OMNICUE_")}
        env.update(
            {
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
                "OMNICUE_BROKER": self.broker.url,
                # Production settings: Kafka, not the dev broker's workarounds.
                "OMNICUE_DEV_BROKER": "false",
                "OMNICUE_PARTITIONS": str(self.args.partitions),
                "OMNICUE_STORE": f"{store}://",
                "OMNICUE_DATA_DIR": str(data_dir),
                "OMNICUE_WEB_PORT": str(free_port()),
                "OMNICUE_APP_ID": app_id,
                "OMNICUE_LOG_LEVEL": "info",
                "BENCH_CONFIG": config,
                "BENCH_INPUT_TOPIC": topics[0],
                "BENCH_OUTPUT_TOPIC": topics[1],
            }
        )
        worker = ManagedProcess(
            [sys.executable, "-m", "bench.exactly_once", "worker"],
            env=env,
            cwd=REPO,
            log_path=self.workdir / f"{name}.log",
            name=name,
        )
        self.children.append(worker)
        return worker

    def start_worker(self, worker: ManagedProcess) -> float:
        """Start (or restart) it and wait for faust's Ready; returns the seconds taken."""
        started = time.monotonic()
        worker.start()
        worker.wait_for_line(READY_LINE, timeout=WORKER_READY_TIMEOUT)
        return time.monotonic() - started

    # -- runs -----------------------------------------------------------------

    def run(self) -> None:
        args = self.args
        for _ in range(args.repeats):
            for store in args.stores:
                # Alternate the order, so a slow phase of the machine hits both configs.
                flip = self.done[args.phases[0]][(store, args.configs[0])] % 2
                for config in reversed(args.configs) if flip else args.configs:
                    repeats = {}
                    for phase in args.phases:
                        self.done[phase][(store, config)] += 1
                        repeats[phase] = self.done[phase][(store, config)]
                    self.fresh_broker(f"{store}-{config}-{repeats[args.phases[0]]}")
                    if "crash" in repeats:
                        self.crashes.append(self.crash_run(config, store, repeats["crash"]))
                    if "throughput" in repeats:
                        run = self.throughput_run(config, store, repeats["throughput"])
                        self.throughputs.append(run)
                    self.stop_all()

    def crash_run(self, config: str, store: str, repeat: int) -> CrashRun:
        args = self.args
        assert self.broker is not None
        bootstrap = self.broker.bootstrap_server
        create_topics(bootstrap, [INPUT_TOPIC, OUTPUT_TOPIC], args.partitions)
        name = f"crash-{store}-{config}-{repeat}"
        app_id = f"{APP_ID}-{config.replace('_', '-')}-{store}-{repeat}"
        worker = self.worker(name, config, store, app_id, (INPUT_TOPIC, OUTPUT_TOPIC))
        run = CrashRun(config, repeat, store, args.records)
        rng = random.Random(args.seed * 1000 + repeat)
        started = time.monotonic()
        logs: list[str] = []
        progress = Progress(bootstrap, OUTPUT_TOPIC, args.partitions)
        producer = PacedProducer(bootstrap, INPUT_TOPIC, args.records, args.keys, args.rate)
        try:
            run.restart_ready_s.append(round(self.start_worker(worker), 1))
            producer.start()
            for kill in range(args.kills):
                # Strike while it works: after it has emitted again since its start, at
                # a random point (faust commits every second, so mostly mid-transaction).
                self.wait_for_outputs(worker, progress, producer, progress.records + 1)
                strike = time.monotonic() + rng.uniform(0.3, args.kill_within)
                while time.monotonic() < strike:
                    progress.poll()
                worker.kill(signal.SIGKILL)
                worker.wait(timeout=30)
                logs.append(worker.log_text())
                run.kills_done += 1
                run.outputs_at_kill.append(progress.records)
                log(
                    f"{name}: kill {kill + 1}/{args.kills} at {progress.records} outputs "
                    f"({len(progress.ids)} ids, {producer.sent} published)"
                )
                run.restart_ready_s.append(round(self.start_worker(worker), 1))
            producer.join(timeout=args.records / args.rate + 120)
            if producer.error is not None:
                raise ServiceError(f"input producer failed: {producer.error!r}")
            run.produce_s = round(producer.seconds, 1)
            self.drain(worker, progress, args.records)
            # A second more: the last outputs' transactions commit with the next commit.
            time.sleep(2.0)
            worker.stop(timeout=30)
            logs.append(worker.log_text())
            run.total_s = round(time.monotonic() - started, 1)
            run.output, run.table = self.check(app_id)
        except ServiceError as exc:
            run.error = str(exc)
            log(f"{name}: FAILED: {exc}")
            logs.append(worker.log_text())
        finally:
            producer.stopping.set()
            progress.close()
            worker.stop()
        errors: dict[str, None] = {}
        for text in logs:
            errors.update(dict.fromkeys(worker_errors(text)))
        run.worker_errors = list(errors)[:8]
        self.report_crash(name, run)
        return run

    def wait_for_outputs(
        self, worker: ManagedProcess, progress: Progress, producer: PacedProducer, records: int
    ) -> None:
        deadline = time.monotonic() + self.args.timeout
        while progress.records < records:
            if not worker.running:
                raise ServiceError(
                    f"{worker.name} exited with {worker.returncode}\n{worker.log_tail()}"
                )
            if producer.error is not None:
                raise ServiceError(f"input producer failed: {producer.error!r}")
            if time.monotonic() > deadline:
                raise ServiceError(f"{worker.name}: no new output in {self.args.timeout:.0f}s")
            progress.poll()

    def drain(self, worker: ManagedProcess, progress: Progress, records: int) -> None:
        """Wait until every id has an output, or until outputs stop coming."""
        last_new = time.monotonic()
        while len(progress.ids) < records:
            if not worker.running:
                raise ServiceError(
                    f"{worker.name} exited with {worker.returncode}\n{worker.log_tail()}"
                )
            if progress.poll():
                last_new = time.monotonic()
            elif time.monotonic() - last_new > self.args.stall:
                # Not an error: missing outputs are one of the things measured.
                log(
                    f"{worker.name}: no new output for {self.args.stall:.0f}s at "
                    f"{len(progress.ids)}/{records} ids; checking what is there"
                )
                return

    def check(self, app_id: str) -> tuple[OutputCheck, TableCheck]:
        assert self.broker is not None
        bootstrap, p = self.broker.bootstrap_server, self.args.partitions
        committed, _ = read_all(bootstrap, OUTPUT_TOPIC, p, "read_committed")
        uncommitted, end = read_all(bootstrap, OUTPUT_TOPIC, p, "read_uncommitted")
        output = check_outputs(committed, len(uncommitted), end, self.args.records, self.args.keys)
        changelog = f"{app_id}-{COUNTS_TABLE}-changelog"
        table_committed, _ = read_all(bootstrap, changelog, p, "read_committed")
        table_uncommitted, table_end = read_all(bootstrap, changelog, p, "read_uncommitted")
        table = check_table(
            table_committed, table_end, len(table_uncommitted), self.args.records, self.args.keys
        )
        return output, table

    def report_crash(self, name: str, run: CrashRun) -> None:
        if run.output is None or run.table is None:
            return
        o, t = run.output, run.table
        log(
            f"{name}: {run.kills_done} kills; out (read_committed): {o.records} records, "
            f"{o.duplicates} duplicates ({o.duplicated_ids} ids), {o.missing} missing, "
            f"{o.transaction_markers} transaction markers; emitted counts: "
            f"{o.repeated_counts} repeated, {o.counts_above_inputs} above the inputs; "
            f"table: {t.exact}/{t.keys} keys exact, {t.over} over (+{t.excess}), "
            f"{t.under} under (-{t.deficit})"
        )

    def throughput_run(self, config: str, store: str, repeat: int) -> ThroughputRun:
        args = self.args
        assert self.broker is not None
        bootstrap = self.broker.bootstrap_server
        topics = ("throughput.in", "throughput.out")
        create_topics(bootstrap, topics, args.partitions)
        produce_backlog(bootstrap, topics[0], args.throughput_records, args.keys)
        name = f"throughput-{store}-{config}-{repeat}"
        app_id = f"{APP_ID}-throughput-{config.replace('_', '-')}-{store}-{repeat}"
        worker = self.worker(name, config, store, app_id, topics)
        run = ThroughputRun(config, repeat, store, args.throughput_records)
        # read_committed: under exactly_once what downstream consumers would see.
        reader = _consumer(bootstrap, topics[1], args.partitions, "read_committed")
        broker_pid = self.broker.pid
        run.waited_for_quiet_s, run.busy_before = wait_for_quiet(args.quiet_wait)
        try:
            started = time.monotonic()
            worker.start()
            times: list[float] = []
            ids: set[str] = set()
            first: CpuSample | None = None
            deadline = started + args.timeout
            while len(ids) < args.throughput_records:
                if not worker.running:
                    raise ServiceError(f"{name} exited with {worker.returncode}")
                if time.monotonic() > deadline:
                    raise ServiceError(
                        f"{name}: {len(ids)}/{args.throughput_records} outputs after "
                        f"{args.timeout:.0f}s"
                    )
                for batch in reader.poll(timeout_ms=100, max_records=50_000).values():
                    for record in batch:
                        value = orjson.loads(record.value)
                        if value["id"] in ids:
                            run.duplicates += 1
                            continue
                        ids.add(value["id"])
                        times.append(record.timestamp / 1000)
                if times and first is None:
                    first = self.cpu_sample(worker.pid, broker_pid)
                    run.startup_s = round(time.monotonic() - started, 1)
            last = self.cpu_sample(worker.pid, broker_pid)
            run.total_s = round(time.monotonic() - started, 1)
            run.outputs = len(ids)
            run.rate = round(steady_rate(times), 1)
            assert first is not None
            run.cpu_worker, run.cpu_others = first.usage(last)
            if run.rate > 0:
                run.cpu_ms_per_output = round(run.cpu_worker / run.rate * 1000, 3)
        except ServiceError as exc:
            run.error = str(exc)
            log(f"{name}: FAILED: {exc}\n{worker.log_tail()}")
        finally:
            reader.close()
            worker.stop()
        log(
            f"{name}: {run.rate:.0f} outputs/s (startup {run.startup_s}s, total {run.total_s}s, "
            f"{run.duplicates} duplicates, worker {run.cpu_worker:.2f} cores, "
            f"others {run.cpu_others:.2f})"
        )
        return run

    def cpu_sample(self, worker: int | None, broker: int | None) -> CpuSample:
        return CpuSample(
            time.monotonic(),
            cpu_seconds(worker),
            cpu_seconds(broker),
            time.process_time(),
            machine_cpu_seconds(),
        )


def steady_rate(times: Sequence[float], low: float = 0.1, high: float = 0.9) -> float:
    ordered = sorted(times)
    first, last = int(len(ordered) * low), int(len(ordered) * high) - 1
    span = ordered[last] - ordered[first]
    return (last - first) / span if span > 0 else float("nan")


# -- reporting ---------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    from importlib.metadata import version

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
        check=False,
    ).stdout.strip()  # fmt: skip
    return {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "faust": version("faust-streaming"),
        "aiokafka": version("aiokafka"),
        "kafka-python": version("kafka-python"),
        "kafka": KAFKA_VERSION,
        "commit": commit,
        "loadavg_1m_at_start": round(os.getloadavg()[0], 2),
    }


def summarize(crashes: list[dict[str, Any]], throughputs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per store and configuration: every run's figures, and the throughput ratio."""
    summary: dict[str, Any] = {}
    groups = dict.fromkeys((r["store"], r["config"]) for r in [*crashes, *throughputs])
    for store, config in groups:
        runs = [r for r in crashes if (r["store"], r["config"]) == (store, config)]
        checked = [r for r in runs if r["output"] is not None and r["table"] is not None]
        measured = [
            t
            for t in throughputs
            if (t["store"], t["config"]) == (store, config) and t["error"] is None
        ]
        rates = [t["rate"] for t in measured]
        summary[f"{store} {config}"] = {
            "store": store,
            "config": config,
            "crash_runs": len(runs),
            "failed_runs": len(runs) - len(checked),
            "kills": sum(r["kills_done"] for r in runs),
            "runs_with_duplicates": sum(1 for r in checked if r["output"]["duplicates"]),
            "duplicates": [r["output"]["duplicates"] for r in checked],
            "missing": [r["output"]["missing"] for r in checked],
            "out_transaction_markers": [r["output"]["transaction_markers"] for r in checked],
            "runs_with_double_counts": sum(1 for r in checked if r["table"]["over"]),
            "table_excess": [r["table"]["excess"] for r in checked],
            "table_deficit": [r["table"]["deficit"] for r in checked],
            "restart_ready_s_median": _median(
                [secs for r in runs for secs in r["restart_ready_s"][1:]]
            ),
            "throughput": rates,
            "throughput_median": _median(rates),
            # Cores other processes used meanwhile, per throughput run: above ~0.2 of
            # the 2 the rate says more about the machine than about the guarantee.
            "throughput_cpu_others": [t["cpu_others"] for t in measured],
            "cpu_ms_per_output": [t.get("cpu_ms_per_output") for t in measured],
            # The runs the rest of the machine left alone: the fairer comparison.
            "throughput_quiet": [t["rate"] for t in measured if t["cpu_others"] <= QUIET],
            "throughput_quiet_median": _median(
                [t["rate"] for t in measured if t["cpu_others"] <= QUIET]
            ),
        }
    for values in summary.values():
        base = summary.get(f"{values['store']} at_least_once", {})
        for suffix in ("", "_quiet"):
            median = values[f"throughput{suffix}_median"]
            reference = base.get(f"throughput{suffix}_median")
            values[f"throughput{suffix}_ratio_to_at_least_once"] = (
                round(median / reference, 3) if reference and median else None
            )
    return summary


def _median(values: Sequence[float]) -> float | None:
    return round(statistics.median(values), 1) if values else None


def print_report(result: dict[str, Any]) -> None:
    c = result["workload"]
    print(
        f"\n{c['records']} records, {c['keys']} keys, {c['partitions']} partitions, "
        f"{c['kills']} SIGKILLs per crash run, published at {c['rate']:.0f}/s; "
        f"throughput on {c['throughput_records']} backlog records\n"
    )
    # markers: transaction markers in `out` (0: no output was in a transaction);
    # cnt>n: emitted counts above the key's inputs; tbl over/excess: keys whose
    # committed changelog count is above their inputs, and by how much in all.
    header = (
        f"{'store':<9}{'config':<27}{'run':>4}{'kills':>6}{'dup':>7}{'missing':>8}"
        f"{'markers':>8}{'cnt>n':>7}{'tbl over':>9}{'excess':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in result["crash"]:
        lead = f"{r['store']:<9}{r['config']:<27}{r['repeat']:>4}{r['kills_done']:>6}"
        if r["output"] is None:
            print(f"{lead}  FAILED")
            continue
        o, tb = r["output"], r["table"]
        print(
            f"{lead}{o['duplicates']:>7}{o['missing']:>8}{o['transaction_markers']:>8}"
            f"{o['counts_above_inputs']:>7}{tb['over']:>9}{tb['excess']:>7}"
        )
    header = (
        f"{'store':<9}{'config':<27}{'run':>4}{'out/s':>8}{'dup':>6}{'startup s':>11}"
        f"{'cpu worker':>12}{'ms/output':>11}{'cpu others':>12}"
    )
    print(f"\n{header}")
    print("-" * len(header))
    for t in result["throughput"]:
        lead = f"{t['store']:<9}{t['config']:<27}{t['repeat']:>4}"
        if t["error"] is not None:
            print(f"{lead}  FAILED")
            continue
        print(
            f"{lead}{t['rate']:>8.0f}{t['duplicates']:>6}{t['startup_s']:>11.1f}"
            f"{t['cpu_worker']:>12.2f}{t.get('cpu_ms_per_output', 0.0):>11.3f}"
            f"{t['cpu_others']:>12.2f}"
        )
    print()
    for key, s in result["summary"].items():
        print(
            f"{key}: {s['crash_runs']} runs ({s['failed_runs']} failed), {s['kills']} kills; "
            f"duplicates {s['duplicates']}, missing {s['missing']}, table excess "
            f"{s['table_excess']}; restart to Ready {s['restart_ready_s_median']}s (median); "
            f"throughput {s['throughput']} (ratio to at_least_once "
            f"{s['throughput_ratio_to_at_least_once']})"
        )
    for r in result["crash"]:
        if r["worker_errors"] or r["error"]:
            print(f"\n{r['store']} {r['config']} run {r['repeat']}:")
            if r["error"]:
                print(f"  run failed: {r['error'].splitlines()[0]}")
            for line in r["worker_errors"]:
                print(f"  worker log: {line}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.exactly_once",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--records", type=int, default=20_000, help="records per crash run")
    parser.add_argument("--keys", type=int, default=200, help="distinct keys (table rows)")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--kills", type=int, default=5, help="SIGKILLs per crash run")
    parser.add_argument(
        "--rate", type=float, default=250.0, help="records/s published during a crash run"
    )
    parser.add_argument(
        "--kill-within",
        type=float,
        default=4.0,
        help="a kill strikes 0.3 s to this many seconds after the worker emits again",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--phases",
        type=lambda v: v.split(","),
        default=["crash", "throughput"],
        help="comma-separated, from crash, throughput (e.g. throughput again on a quiet machine)",
    )
    parser.add_argument(
        "--configs",
        type=lambda v: v.split(","),
        default=["at_least_once", "exactly_once"],
        help=f"comma-separated, from {', '.join(CONFIGS)}",
    )
    parser.add_argument(
        "--stores",
        type=lambda v: v.split(","),
        default=["rocksdb"],
        help="comma-separated table stores, from rocksdb (production's), memory",
    )
    parser.add_argument(
        "--throughput-records", type=int, default=20_000, help="backlog records; 0: skip"
    )
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=120.0,
        help="seconds a throughput run may wait for the machine to be idle first",
    )
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds a phase may wait for outputs"
    )
    parser.add_argument(
        "--stall", type=float, default=45.0, help="seconds without new outputs that end a drain"
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "exactly_once.json")
    parser.add_argument(
        "--append",
        action="store_true",
        help="add the runs to those in --output (same workload), not replace them",
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the work dir")
    args = parser.parse_args(argv)
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {', '.join(CONFIGS)}")
    if not set(args.phases) <= {"crash", "throughput"}:
        parser.error(f"unknown phases in {args.phases}; choose from crash, throughput")
    if args.throughput_records <= 0 and "throughput" in args.phases:
        args.phases.remove("throughput")
    if not args.phases:
        parser.error("nothing to run: no crash phase, and --throughput-records 0")
    if not set(args.stores) <= {"rocksdb", "memory"}:
        parser.error(f"unknown stores in {args.stores}; choose from rocksdb, memory")
    return args


# What the runs of one results file must share to be compared.
WORKLOAD = ("records", "keys", "partitions", "kills", "rate", "kill_within", "throughput_records")


def load_earlier(args: argparse.Namespace) -> dict[str, Any] | None:
    if not args.append or not args.output.is_file():
        return None
    earlier: dict[str, Any] = json.loads(args.output.read_text(encoding="utf-8"))
    workload = {key: getattr(args, key) for key in WORKLOAD}
    if earlier.get("workload") != workload:
        raise SystemExit(
            f"--append: {args.output} holds another workload ({earlier.get('workload')}); "
            f"this one is {workload}"
        )
    return earlier


def _terminate(signum: int, frame: FrameType | None) -> None:
    # Turn SIGTERM into an exception so the finally blocks stop every child.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["worker"]:
        worker_main()
        return 0
    args = parse_args(argv)
    earlier = load_earlier(args) or {"invocations": [], "crash": [], "throughput": []}
    previous = signal.signal(signal.SIGTERM, _terminate)
    workdir = Path(tempfile.mkdtemp(prefix="omnicue-eos-"))
    log(f"work dir {workdir}")
    experiment = Experiment(args, workdir, earlier)
    started = datetime.now(UTC)
    error: str | None = None
    try:
        experiment.run()
    except ServiceError as exc:
        error = str(exc)
        print(f"experiment failed: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        # Ctrl-C: the children are stopped below; report what was measured so far.
        error = "interrupted"
        print("experiment interrupted", file=sys.stderr)
    finally:
        experiment.stop_all()
        signal.signal(signal.SIGTERM, previous)
    crashes = earlier["crash"] + [asdict(r) for r in experiment.crashes]
    throughputs = earlier["throughput"] + [asdict(t) for t in experiment.throughputs]
    invocation = {
        "when": started.isoformat(timespec="seconds"),
        "machine": machine_info(),
        "stores": args.stores,
        "configs": args.configs,
        "repeats": args.repeats,
        "seed": args.seed,
        "error": error,
    }
    result = {
        "workload": {key: getattr(args, key) for key in WORKLOAD},
        # The pipeline's factory on Kafka (streams/app.py); only the guarantee varies.
        "faust_settings": {"session_timeout_s": 10.0, "commit_interval_s": 1.0},
        "invocations": [*earlier["invocations"], invocation],
        "summary": summarize(crashes, throughputs),
        "crash": crashes,
        "throughput": throughputs,
    }
    if experiment.crashes or experiment.throughputs:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print_report(result)
        print(f"\nwritten: {args.output}" + ("" if error is None else " (partial)"))
    if error is None and not args.keep_logs:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"logs kept in {workdir}", file=sys.stderr)
    return 0 if error is None else 1


if __name__ == "__main__":
    sys.exit(main())
