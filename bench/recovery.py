"""Benchmark: how long a worker holding a million customers takes to come back from
SIGKILL.

    PYTHONPATH=. python -m bench.recovery [--customers 1000000] [--store rocksdb|memory|both]
                                          [--repeats 3] [--profile] [--help]

On Apache Kafka 4.4.0 (Java 17+), one worker as in production
(`OMNICUE_DEV_BROKER=false`). `--customers` states with a pending journey each (due
a day later: a million pending timers that stay pending) are written to the
customers table's changelog (`bench.seed`), and a worker recovers them. Then, per
repeat:

1. One canary customer per partition starts a `bench_canary` journey (an identify
   and a checkout.started, published to omnicue.events), its step due one second
   after the kill below.
2. Once the worker has applied them, it is killed with SIGKILL and started again at
   once with the same data directory (rocksdb: its local state survives; memory:
   the whole changelog is read again).
3. Right after the restart, one probe customer per partition publishes an identify
   and a product.viewed, which the `bench_probe` rule answers with an email at once.

Measured per restart, from the worker's own clocks (the actions' `created_at`):
(a) restart to the probes' actions: when it processes new events again; (b)
restart to the canaries' actions: when its timers fire again; both also from the
kill; the restart split by the worker's log lines (group joined, changelog read,
timer schedule rebuilt, worker ready); its peak RSS; and that each probe and canary
fired exactly once. Results: bench/results/recovery.json, one entry per `--label`.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench import profile, seed
from bench.pipeline import KAFKA_START_TIMEOUT, KAFKA_STOP_TIMEOUT, STORES, log, scrape
from bench.profile import Profiler
from omnicue.kafka_broker import KAFKA_VERSION, JavaNotFound, KafkaBroker, find_java
from omnicue.services import ManagedProcess, ServiceError, free_port
from omnicue.settings import Settings
from omnicue.topics import create_topics
from schemas.topics import ACTIONS, EVENTS
from streams.topics import partition_for

RESULTS = Path(__file__).resolve().parent / "results"
READY_LINE = "timer schedule rebuilt"
# A worker's start, split by its log lines (faust's and ours), in order.
PHASES = {
    "worker_starting": r"\[\^Worker\]: Starting",
    "join_requested": r"\(Re-\)joining group",
    "group_joined": r"Joined group '",
    "assigned": r"Setting newly assigned partitions",
    "changelog_read": r"Done reading from changelog topics",
    "schedule_rebuilt": READY_LINE,
    "worker_ready": r"\bWorker ready\b",
}
# The canaries' steps are due this long after the kill.
CANARY_DUE_AFTER_KILL = timedelta(seconds=1)
# The kill waits this long after the canaries were applied: faust commits offsets
# every second, and a committed input is not processed again after the restart.
SETTLE_BEFORE_KILL = 2.5
# After a restart's measurement, the longest wait for its schedule's rebuild to end.
REBUILD_TIMEOUT = 120.0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.recovery",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--store", choices=[*STORES, "both"], default="rocksdb")
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="kills and restarts per store")
    parser.add_argument(
        "--timeout", type=float, default=900.0,
        help="seconds a start (first or restart) may take to fire probes and canaries",
    )  # fmt: skip
    parser.add_argument(
        "--worker-env", action="append", default=[], metavar="KEY=VALUE",
        help="extra environment for the worker",
    )  # fmt: skip
    parser.add_argument("--label", default=None, help="name of this run in the results file")
    parser.add_argument("--profile", action="store_true", help="py-spy each restart")
    parser.add_argument("--output", type=Path, default=RESULTS / "recovery.json")
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args(argv)
    args.worker_env = dict(item.split("=", 1) for item in args.worker_env)
    return args


def one_key_per_partition(prefix: str, partitions: int) -> list[bytes]:
    """Customer keys, one on each partition (murmur2, as the worker's producer)."""
    keys: dict[int, bytes] = {}
    i = 0
    while len(keys) < partitions:
        key = f"{prefix}-{i}".encode()
        keys.setdefault(partition_for(key, partitions), key)
        i += 1
    return [keys[p] for p in range(partitions)]


class RecoveryBench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.broker: KafkaBroker | None = None
        self.worker: ManagedProcess | None = None
        self.results: dict[str, Any] = {}

    def stop_all(self) -> None:
        if self.worker is not None:
            self.worker.stop(timeout=30)
            self.worker = None
        if self.broker is not None:
            self.broker.stop(timeout=KAFKA_STOP_TIMEOUT)
            self.broker = None

    def run(self) -> dict[str, Any]:
        stores = list(STORES) if self.args.store == "both" else [self.args.store]
        # rocksdb first: it is the production store and the one the target is about.
        for store in sorted(stores, key=lambda s: s != "rocksdb"):
            result: dict[str, Any] = {}
            self.results[store] = result
            try:
                self.run_store(store, result)
            finally:
                self.stop_all()
        return self.results

    def run_store(self, store: str, result: dict[str, Any]) -> None:
        args = self.args
        base = self.workdir / store
        base.mkdir()
        self.broker = broker = KafkaBroker(
            free_port(), log_path=base / "kafka.log", data_dir=base / "kafka-data"
        )
        broker.start(timeout=KAFKA_START_TIMEOUT)
        (base / "worker-data").mkdir()
        settings = Settings(
            broker=broker.url,
            dev_broker=False,
            partitions=args.partitions,
            store=STORES[store],
            data_dir=base / "worker-data",
            web_port=free_port(),
            app_id=f"omnicue-bench-recovery-{store}",
        )
        log(f"{store}: Apache Kafka {KAFKA_VERSION} on {broker.bootstrap_server}, in {base}")
        create_topics(settings)
        changelog = seed.create_changelog(settings)
        factory = seed.StateFactory(seed.bench_rules())
        due = datetime.now(UTC) + timedelta(days=1)
        state_bytes = factory.check(0, due)
        produced = seed.produce_states(
            broker.bootstrap_server,
            changelog,
            args.partitions,
            (factory.state(i, due) for i in range(args.customers)),
        )
        log(f"{store}: seeded {produced.records} states ({produced.bytes / 1e6:.0f} MB) "
            f"in {produced.seconds:.1f}s")  # fmt: skip
        result["seed"] = {
            "records": produced.records,
            "mb": round(produced.bytes / 1e6, 1),
            "state_bytes": state_bytes,
            "seconds": round(produced.seconds, 1),
        }
        rules = base / "bench-rules.yaml"
        rules.write_text(seed.RULES_YAML, encoding="utf-8")
        worker = self.worker = seed.worker_process(
            settings, rules, base / "worker.log", args.worker_env
        )
        started = time.time()
        offset = seed.start_worker(worker)
        sampler = seed.ProcSampler(worker.pid).start()
        seed.wait_for_line(worker, offset, READY_LINE, timeout=args.timeout)
        sampler.stop()
        result["first_start"] = {
            "start_to_ready_s": round(time.time() - started, 1),
            "phases_s": phases(worker, started),
            "peak_rss_mb": sampler.peak_mb,
        }
        log(f"{store}: first start ready after {result['first_start']['start_to_ready_s']}s")
        result["restarts"] = restarts = []
        for repeat in range(args.repeats):
            restarts.append(self.kill_and_restart(store, settings, repeat))
        self.summarize(result)

    def kill_and_restart(self, store: str, settings: Settings, repeat: int) -> dict[str, Any]:
        assert self.broker is not None and self.worker is not None
        args, bootstrap = self.args, self.broker.bootstrap_server
        worker = self.worker
        # 1. Canaries: each partition gets a customer whose step is due just after the kill.
        canaries = one_key_per_partition(f"canary-{repeat}", args.partitions)
        in_state = scrape(settings.web_port).get("omnicue_customers_in_state{}", 0.0)
        publish_at = datetime.now(UTC)
        # About a second for the worker to apply them, then the settle time.
        planned_kill = publish_at + timedelta(seconds=SETTLE_BEFORE_KILL + 1.5)
        occurred = planned_kill + CANARY_DUE_AFTER_KILL - seed.CANARY_AFTER
        records: list[tuple[bytes, bytes]] = []
        for key in canaries:
            customer = key.decode()
            records.append((key, seed.identify(customer, f"{customer}-i", occurred)))
            records.append((key, seed.event("checkout.started", customer, f"{customer}-c",
                                            occurred, cart_id="cart-canary")))  # fmt: skip
        seed.publish(bootstrap, EVENTS, records)
        wait_for_metric(worker, settings.web_port, "omnicue_customers_in_state{}",
                        in_state + len(canaries), timeout=60)  # fmt: skip
        time.sleep(max(SETTLE_BEFORE_KILL, planned_kill.timestamp() - time.time()))
        canary_due = occurred + seed.CANARY_AFTER

        # 2. SIGKILL, then the same worker again at once, on the same data directory.
        peak_before = seed.proc_status(worker.pid).get("VmHWM", 0) / 1024
        killed = time.time()
        worker.kill(signal.SIGKILL)
        worker.wait(timeout=30)
        restarted = time.time()
        worker.start()
        sampler = seed.ProcSampler(worker.pid, interval=0.5).start()
        profiled: list[str] | None = None
        profiler = (
            Profiler(worker.pid, self.workdir / f"profile-{store}-{repeat}.txt").start()
            if args.profile and worker.pid is not None
            else None
        )
        # 3. Probes, published as soon as the new process runs.
        probes = one_key_per_partition(f"probe-{repeat}", args.partitions)
        now = datetime.now(UTC)
        records = []
        for key in probes:
            customer = key.decode()
            records.append((key, seed.identify(customer, f"{customer}-i", now)))
            records.append((key, seed.event("product.viewed", customer, f"{customer}-v", now,
                                            product_id="sku-probe", price=1.0)))  # fmt: skip
        seed.publish(bootstrap, EVENTS, records)
        probes_sent = time.time()
        log(f"{store}: killed, restarted, probes sent; waiting for them and the canaries")
        try:
            wait_for_actions(worker, settings.web_port, len(probes), len(canaries), args.timeout)
        finally:
            if profiler is not None:
                raw = profiler.stop()
                # The summary goes into the results; the raw stacks stay in the work dir.
                profiled = profile.summarize(raw).splitlines()
                log(f"profile of restart {repeat}: {raw}")
        sampler.stop()
        # The schedule's rebuild runs beside the agents and may end after the last
        # canary fired: its line, for the phases and the schedule's size.
        wait_for_log(worker, READY_LINE, timeout=REBUILD_TIMEOUT)
        actions = seed.read_actions(
            bootstrap, ACTIONS["email"], args.partitions,
            rules={seed.PROBE_RULE, seed.CANARY_RULE},
        )  # fmt: skip
        mine = {k.decode() for k in (*probes, *canaries)}
        ours = [a for a in actions if a.customer_id in mine]
        probe_ids = {k.decode() for k in probes}
        probe_actions = [a for a in ours if a.customer_id in probe_ids]
        canary_actions = [a for a in ours if a.customer_id not in probe_ids]
        text = worker.log_text()
        rebuilt = re.search(r"timer schedule rebuilt: (\d+) customers, (\d+) pending", text)
        entry: dict[str, Any] = {
            "repeat": repeat,
            "kill_to_restart_s": round(restarted - killed, 2),
            "probes_sent_after_restart_s": round(probes_sent - restarted, 2),
            # (a) processing new events again; (b) timers firing again.
            "probe_action_after_restart_s": spread(probe_actions, restarted),
            "canary_action_after_restart_s": spread(canary_actions, restarted),
            "canary_action_after_kill_s": spread(canary_actions, killed),
            "canary_due_after_kill_s": round(canary_due.timestamp() - killed, 2),
            "canary_lateness_s": seed.quantiles([a.created_at - a.due_at for a in canary_actions]),
            "phases_after_restart_s": phases(worker, restarted),
            "schedule": {"customers": int(rebuilt[1]), "pending": int(rebuilt[2])}
            if rebuilt
            else None,
            "exactly_once": {
                "probes": sorted(count_by_customer(probe_actions).values()) == [1] * len(probes),
                "canaries": sorted(count_by_customer(canary_actions).values())
                == [1] * len(canaries),
            },
            "peak_rss_mb_restarted": sampler.peak_mb,
            # Anyone else's load skews these figures (2 cores).
            "loadavg_1m_after": round(os.getloadavg()[0], 2),
            "peak_rss_mb_before_kill": round(peak_before, 1),
            "worker_cpu_s_to_last_action": sampler.samples[-1].cpu_s if sampler.samples else None,
        }
        if profiled is not None:
            entry["profile"] = profiled  # fmt: skip
        log(
            f"{store} restart {repeat}: probes answered after "
            f"{entry['probe_action_after_restart_s'].get('max')} s, canaries fired after "
            f"{entry['canary_action_after_restart_s'].get('max')} s (from the restart); "
            f"phases {entry['phases_after_restart_s']}"
        )
        return entry

    def summarize(self, result: dict[str, Any]) -> None:
        restarts: list[dict[str, Any]] = result["restarts"]
        probe = [r["probe_action_after_restart_s"].get("max") for r in restarts]
        canary = [r["canary_action_after_restart_s"].get("max") for r in restarts]
        rebuilt = [r["phases_after_restart_s"].get("schedule_rebuilt") for r in restarts]
        result["summary"] = {
            "processing_again_after_restart_s": sorted(x for x in probe if x is not None),
            "timers_firing_again_after_restart_s": sorted(x for x in canary if x is not None),
            "schedule_rebuilt_after_restart_s": sorted(x for x in rebuilt if x is not None),
            "all_exactly_once": all(all(r["exactly_once"].values()) for r in restarts),
        }


def spread(actions: Sequence[seed.ActionRecord], since: float) -> dict[str, float]:
    """First and last action (created_at), seconds after `since`."""
    times = sorted(a.created_at - since for a in actions)
    if not times:
        return {}
    return {"min": round(times[0], 2), "max": round(times[-1], 2), "count": len(times)}


def count_by_customer(actions: Sequence[seed.ActionRecord]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for a in actions:
        counts[a.customer_id] = counts.get(a.customer_id, 0) + 1
    return counts


def wait_for_log(worker: ManagedProcess, pattern: str, timeout: float) -> bool:
    """Whether the worker's current run logs `pattern` within `timeout` (polled)."""
    deadline = time.monotonic() + timeout
    while True:
        if re.search(pattern, worker.log_text()):
            return True
        if time.monotonic() > deadline or not worker.running:
            return False
        time.sleep(0.5)


def phases(worker: ManagedProcess, since: float) -> dict[str, float]:
    times = seed.log_times(worker.log_text(), PHASES)
    return {name: round(at - since, 2) for name, at in sorted(times.items(), key=lambda x: x[1])}


def wait_for_metric(
    worker: ManagedProcess, port: int, name: str, at_least: float, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while scrape(port).get(name, 0.0) < at_least:
        if not worker.running:
            raise ServiceError(f"worker exited with {worker.returncode}\n{worker.log_tail()}")
        if time.monotonic() > deadline:
            raise ServiceError(f"{name} below {at_least} after {timeout:.0f}s")
        time.sleep(0.2)


def wait_for_actions(
    worker: ManagedProcess, port: int, probes: int, canaries: int, timeout: float
) -> None:
    """Until the restarted worker has sent every probe's and canary's action (its own
    counters, which start at zero with the process)."""
    deadline = time.monotonic() + timeout
    probe = f"omnicue_actions_total{{channel=email,rule={seed.PROBE_RULE}}}"
    canary = f"omnicue_actions_total{{channel=email,rule={seed.CANARY_RULE}}}"
    while True:
        if not worker.running:
            raise ServiceError(f"worker exited with {worker.returncode}\n{worker.log_tail()}")
        samples = scrape(port)  # {} until its web server is up
        if samples.get(probe, 0.0) >= probes and samples.get(canary, 0.0) >= canaries:
            return
        if time.monotonic() > deadline:
            raise ServiceError(f"probes or canaries missing after {timeout:.0f}s: {samples}")
        time.sleep(0.25)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.label is None:
        args.label = f"{args.customers}-customers"
    try:
        find_java()
    except JavaNotFound as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    previous = signal.signal(signal.SIGTERM, seed.terminate)
    workdir = Path(tempfile.mkdtemp(prefix="omnicue-bench-recovery-"))
    bench = RecoveryBench(args, workdir)
    error = None
    try:
        bench.run()
    except (ServiceError, TimeoutError, AssertionError) as exc:
        error = str(exc)
        print(f"bench failed: {exc}", file=sys.stderr)
    except (KeyboardInterrupt, SystemExit):
        # Ctrl-C or SIGTERM: the children are stopped below; what was measured is kept.
        error = "interrupted"
    finally:
        bench.stop_all()
        signal.signal(signal.SIGTERM, previous)
    entry = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": seed.machine(),
        "config": {
            "broker": f"Apache Kafka {KAFKA_VERSION}",
            "customers": args.customers,
            "pending_timers": args.customers,
            "partitions": args.partitions,
            "stores": args.store,
            "workers": 1,
            "dev_broker": False,
            "repeats": args.repeats,
            "session_timeout_s": Settings.model_fields["broker_session_timeout"].default or 10.0,
            "worker_env": args.worker_env,
        },
        **bench.results,
        "error": error,
    }
    seed.save(args.output, args.label, entry)
    log(f"written: {args.output} ({args.label})")
    if error is None and not args.keep_logs:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"logs kept in {workdir}", file=sys.stderr)
    return 0 if error is None else 1


if __name__ == "__main__":
    sys.exit(main())
