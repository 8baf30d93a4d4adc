"""Benchmark: how late timers fire on one worker holding a million pending timers.

    PYTHONPATH=. python -m bench.timers [--customers 1000000] [--firing N]
                                        [--window 180] [--lead 60] [--store rocksdb]
                                        [--label NAME] [--profile] [--help]

On Apache Kafka 4.4.0 (`omnicue.kafka_broker`, Java 17+), the worker as in
production (`OMNICUE_DEV_BROKER=false`, rocksdb store by default, one worker).
`--customers` states, each with one pending journey of the `bench_timer` rule (a
transactional email), are written to the customers table's changelog before the
worker starts (see `bench.seed`); the worker recovers them and rebuilds its timer
schedule from them. `--firing` of them (default: all) are due over `--window`
seconds, evenly spread, starting about `--lead` seconds after the worker is ready;
the others are due a day later, so they stay pending for the whole run.

Measured: the time to recover the table (worker start to its schedule rebuilt,
split by the worker's log lines), how late each timer fired (the action's
`created_at`, the worker's clock when it took the timer's batch, minus the step's
due time; also the record's send time), read back by consuming the action topic
after the run, whether every due timer fired exactly once (actions counted by id),
the worker's `omnicue_timer_lateness_seconds` histogram, its RSS (peak: VmHWM) and
CPU, and how much CPU the broker and everything else used (2 cores: anyone else's
load skews the figures). Also the timer inputs the worker sent itself (on
omnicue.customer-inputs): repeats there are timers sent again before they fired.
Results: bench/results/timers.json, one entry per `--label` (a rerun replaces its
own entry only); with `--profile`, py-spy summaries of the recovery and the firing.
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench import profile, seed
from bench.pipeline import (
    KAFKA_START_TIMEOUT,
    KAFKA_STOP_TIMEOUT,
    STORES,
    cpu_seconds,
    histogram_quantile,
    log,
    scrape,
)
from bench.profile import Profiler
from omnicue.kafka_broker import KAFKA_VERSION, JavaNotFound, KafkaBroker, find_java
from omnicue.services import ManagedProcess, ServiceError, free_port
from omnicue.settings import Settings
from omnicue.topics import create_topics
from schemas.topics import ACTIONS

RESULTS = Path(__file__).resolve().parent / "results"
READY_LINE = "timer schedule rebuilt"
# faust's log lines that split a start into its phases.
PHASES = {
    "restoring": r"Restoring state from changelog topics",
    "changelog_read": r"Done reading from changelog topics",
    "schedule_rebuilt": READY_LINE,
    "worker_ready": r"\bWorker ready\b",
}
# Seconds per seeded customer to produce it (32-66 s for 1,000,000) and for the worker
# to recover it (192-299 s from its start to ready for 1,000,000, the slower ones with
# other tests running): the due window is placed after the worker is ready without
# running the recovery twice. A faster recovery just leaves a longer wait (reported as
# `first_due_after_ready_s`).
PRODUCE_S_PER_STATE = 45e-6
RECOVER_S_PER_STATE = 330e-6
# A worker's start without state (interpreter, imports, group join), with some margin.
START_S = 15.0
# Extra customers (not due in the run) are due this much after the window.
LATER = timedelta(days=1)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.timers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--customers", type=int, default=1_000_000, help="pending timers")
    parser.add_argument(
        "--firing", type=int, default=None, help="of them, due in the window (default: all)"
    )
    parser.add_argument("--window", type=float, default=180.0, help="seconds the due times span")
    parser.add_argument(
        "--lead", type=float, default=60.0,
        help="seconds from the worker's (estimated) readiness to the first due time",
    )  # fmt: skip
    parser.add_argument(
        "--ready-in", type=float, default=None,
        help="seconds from the start of seeding to the worker's readiness (default: "
        "estimated from --customers, as measured on this machine)",
    )  # fmt: skip
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--store", choices=list(STORES), default="rocksdb")
    parser.add_argument("--batch-size", type=int, default=None, help="OMNICUE_BATCH_SIZE")
    parser.add_argument(
        "--worker-env", action="append", default=[], metavar="KEY=VALUE",
        help="extra environment for the worker",
    )  # fmt: skip
    parser.add_argument(
        "--grace", type=float, default=300.0,
        help="seconds after the last due time to wait for the last actions",
    )  # fmt: skip
    parser.add_argument(
        "--settle", type=float, default=10.0,
        help="seconds to keep the worker running after the last action (duplicates show)",
    )  # fmt: skip
    parser.add_argument("--label", default=None, help="name of this run in the results file")
    parser.add_argument(
        "--profile", action="store_true",
        help="py-spy the worker during its recovery and the firing window",
    )  # fmt: skip
    parser.add_argument("--output", type=Path, default=RESULTS / "timers.json")
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args(argv)
    if args.firing is None:
        args.firing = args.customers
    if not 0 < args.firing <= args.customers:
        parser.error("--firing must be between 1 and --customers")
    if args.label is None:
        args.label = f"{args.customers}-pending-{args.firing}-due-in-{args.window:.0f}s"
    args.worker_env = dict(item.split("=", 1) for item in args.worker_env)
    return args


def due_times(first: datetime, window: float, firing: int, customers: int) -> Iterator[datetime]:
    """Customer i's due time: the first `firing` evenly over the window, the rest later.

    Spread over the customer indexes (every k-th one is due in the window) so that the
    timers due in the window are spread over the partitions like the rest.
    """
    later = first + timedelta(seconds=window) + LATER
    step = customers / firing
    due_index = 0
    next_due = 0.0
    for i in range(customers):
        if i >= next_due and due_index < firing:
            yield first + timedelta(seconds=window * (due_index + 0.5) / firing)
            due_index += 1
            next_due += step
        else:
            yield later


class TimerBench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.broker: KafkaBroker | None = None
        self.worker: ManagedProcess | None = None
        self.result: dict[str, Any] = {}

    def stop_all(self) -> None:
        if self.worker is not None:
            self.worker.stop(timeout=30)
        if self.broker is not None:
            self.broker.stop(timeout=KAFKA_STOP_TIMEOUT)

    def run(self) -> dict[str, Any]:
        args, result = self.args, self.result
        self.broker = KafkaBroker(
            free_port(), log_path=self.workdir / "kafka.log", data_dir=self.workdir / "kafka-data"
        )
        self.broker.start(timeout=KAFKA_START_TIMEOUT)
        (self.workdir / "worker-data").mkdir()
        settings = Settings(
            broker=self.broker.url,
            dev_broker=False,
            partitions=args.partitions,
            store=STORES[args.store],
            data_dir=self.workdir / "worker-data",
            web_port=free_port(),
            app_id="omnicue-bench-timers",
            **({"batch_size": args.batch_size} if args.batch_size else {}),
        )
        log(
            f"Apache Kafka {KAFKA_VERSION} on {self.broker.bootstrap_server}, "
            f"work dir {self.workdir}"
        )
        create_topics(settings)
        changelog = seed.create_changelog(settings)

        factory = seed.StateFactory(seed.bench_rules())
        now = datetime.now(UTC)
        state_bytes = factory.check(0, now)
        # The worker should be ready about `lead` seconds before the first due time.
        estimate = args.ready_in
        if estimate is None:
            estimate = args.customers * (PRODUCE_S_PER_STATE + RECOVER_S_PER_STATE) + START_S
        first_due = now + timedelta(seconds=estimate + args.lead)
        log(
            f"seeding {args.customers} states ({state_bytes} bytes each) to {changelog}; "
            f"{args.firing} due from {first_due:%H:%M:%S} over {args.window:.0f}s"
        )
        states = (
            factory.state(i, due)
            for i, due in enumerate(due_times(first_due, args.window, args.firing, args.customers))
        )
        produced = seed.produce_states(
            self.broker.bootstrap_server, changelog, args.partitions, states
        )
        log(
            f"seeded {produced.records} states ({produced.bytes / 1e6:.0f} MB) "
            f"in {produced.seconds:.1f}s"
        )
        result["seed"] = {
            "records": produced.records,
            "mb": round(produced.bytes / 1e6, 1),
            "state_bytes": state_bytes,
            "seconds": round(produced.seconds, 1),
            "per_partition": produced.per_partition,
        }

        rules = self.workdir / "bench-rules.yaml"
        rules.write_text(seed.RULES_YAML, encoding="utf-8")
        worker = self.worker = seed.worker_process(
            settings, rules, self.workdir / "worker.log", args.worker_env
        )
        started = time.time()
        offset = seed.start_worker(worker)
        sampler = seed.ProcSampler(worker.pid).start()
        profiler = self._profile(worker, "recovery")
        try:
            seed.wait_for_line(worker, offset, READY_LINE, timeout=args.customers * 1e-3 + 300)
        finally:
            self._finish_profile(profiler, "recovery")
        ready = time.time()
        rebuilt = re.search(
            r"timer schedule rebuilt: (\d+) customers, (\d+) pending", worker.log_text()
        )
        phases = seed.log_times(worker.log_text(), PHASES)
        result["recovery"] = {
            "start_to_ready_s": round(ready - started, 2),
            "phases_s": {
                name: round(at - started, 2)
                for name, at in sorted(phases.items(), key=lambda x: x[1])
            },
            "customers": int(rebuilt[1]) if rebuilt else None,
            "pending": int(rebuilt[2]) if rebuilt else None,
            "rss_mb_at_ready": round(seed.proc_status(worker.pid).get("VmRSS", 0) / 1024, 1),
            "peak_rss_mb_at_ready": round(seed.proc_status(worker.pid).get("VmHWM", 0) / 1024, 1),
            "worker_cpu_s": round(cpu_seconds(worker.pid), 1),
        }
        if {"restoring", "changelog_read", "schedule_rebuilt"} <= phases.keys():
            # Reading the changelog into the store (faust), then the schedule's scan (ours).
            result["recovery"]["changelog_read_s"] = round(
                phases["changelog_read"] - phases["restoring"], 1
            )
            result["recovery"]["schedule_rebuild_s"] = round(
                phases["schedule_rebuilt"] - phases["changelog_read"], 1
            )
        slack = first_due.timestamp() - ready
        result["recovery"]["first_due_after_ready_s"] = round(slack, 1)
        log(f"worker ready after {ready - started:.1f}s; first timer due {slack:.0f}s later")
        if slack < 5:
            log("warning: the worker was ready late: the first timers measure its recovery")

        self._fire(settings, first_due, started)
        sampler.stop()
        result["memory"] = {
            "peak_rss_mb": sampler.peak_mb,
            "rss_mb_end": sampler.samples[-1].rss_mb if sampler.samples else None,
            # Every 5th sample: enough to see growth, small enough to read.
            "rss_mb_every_5s": [s.rss_mb for s in sampler.samples[::5]],
        }
        worker.stop(timeout=30)
        self.worker = None
        return result

    def _fire(self, settings: Settings, first_due: datetime, started: float) -> None:
        args, result = self.args, self.result
        assert self.broker is not None and self.worker is not None
        worker = self.worker
        last_due = first_due.timestamp() + args.window
        name = f"omnicue_actions_total{{channel=email,rule={seed.TIMER_RULE}}}"
        before = scrape(settings.web_port)
        timeline: list[dict[str, float]] = []
        cpu0 = seed.cpu_snapshot(worker.pid, self.broker.pid)
        in_window = False
        profiler: Profiler | None = None
        profiled = False
        # Until every due timer has fired, polling the metrics endpoint every 2 s.
        deadline = last_due + args.grace
        fired = 0.0
        while fired < args.firing:
            if not worker.running:
                raise ServiceError(f"worker exited with {worker.returncode}\n{worker.log_tail()}")
            if time.time() > deadline:
                log(
                    f"timeout: {fired:.0f}/{args.firing} actions "
                    f"{args.grace:.0f}s after the last due time"
                )
                break
            now = time.time()
            if args.profile and not profiled and now >= first_due.timestamp() + 10:
                profiler, profiled = self._profile(worker, "firing"), True
            if profiler is not None and now >= first_due.timestamp() + 70:
                self._finish_profile(profiler, "firing")
                profiler = None
            if not in_window and now >= first_due.timestamp():
                # CPU is counted from the first due time: the wait before it is idle.
                in_window = True
                cpu0 = seed.cpu_snapshot(worker.pid, self.broker.pid)
            samples = scrape(settings.web_port)
            fired = samples.get(name, fired)
            timeline.append({
                "t": round(now - first_due.timestamp(), 1),
                "actions": fired,
                "pending": samples.get("omnicue_timers_pending{}", float("nan")),
            })  # fmt: skip
            if len(timeline) % 15 == 0:
                log(
                    f"{fired:.0f}/{args.firing} timers fired, {timeline[-1]['pending']:.0f} pending"
                )
            time.sleep(2.0)
        if profiler is not None:
            self._finish_profile(profiler, "firing")
        cpu1 = seed.cpu_snapshot(worker.pid, self.broker.pid)
        done_at = time.time()
        time.sleep(args.settle)
        after = scrape(settings.web_port)

        actions = seed.read_actions(
            self.broker.bootstrap_server,
            ACTIONS["email"],
            args.partitions,
            rules={seed.TIMER_RULE},
        )
        inputs = seed.read_timer_inputs(self.broker.bootstrap_server, args.partitions)
        ids: dict[str, int] = {}
        for a in actions:
            ids[a.action_id] = ids.get(a.action_id, 0) + 1
        late = [a.created_at - a.due_at for a in actions]
        sent_late = [a.sent_at - a.due_at for a in actions]
        created = sorted(a.created_at for a in actions)
        lat = "omnicue_timer_lateness_seconds"
        count = after.get(f"{lat}_count{{}}", 0) - before.get(f"{lat}_count{{}}", 0)
        result["firing"] = {
            "expected": args.firing,
            "actions": len(actions),
            "distinct": len(ids),
            "duplicates": len(actions) - len(ids),
            "missing": args.firing - len(ids),
            "customers": len({a.customer_id for a in actions}),
            "exactly_once": len(ids) == args.firing and len(actions) == len(ids),
            "lateness_s": seed.quantiles(late),
            "sent_lateness_s": seed.quantiles(sent_late),
            "share_late_over_1s": round(sum(x > 1 for x in late) / len(late), 4) if late else None,
            "lateness_by_due_window": by_due_window(actions, first_due.timestamp(), args.window),
            # Timers processed per second while firing (10%..90% of the actions).
            "fired_per_s": round(steady(created), 1),
            "due_per_s": round(args.firing / args.window, 1),
            "last_action_after_last_due_s": round(created[-1] - last_due, 1) if created else None,
            "timer_inputs_sent": timer_input_summary(inputs),
            "worker_histogram": {
                "timer_inputs": count,
                "p50_le_s": histogram_quantile(before, after, lat, 0.5),
                "p99_le_s": histogram_quantile(before, after, lat, 0.99),
                "max_le_s": histogram_quantile(before, after, lat, 1.0),
            },
            "worker_metrics_end": {
                k: v
                for k, v in after.items()
                if k.startswith(
                    (
                        "omnicue_timers_pending",
                        "omnicue_customers_in_state",
                        "omnicue_timer_errors",
                        "omnicue_batch_events_count",
                        "omnicue_batch_events_sum",
                        "omnicue_actions_total",
                    )
                )
            },  # fmt: skip
            # Cores used from the first due time until the last action.
            "cpu": seed.usage(cpu0, cpu1),
            # Worker CPU per timer input processed in that time: its cost per timer.
            "worker_cpu_ms_per_timer_input": round(
                (cpu1["worker"] - cpu0["worker"]) * 1000 / max(1.0, count), 3
            ),
            "timeline_every_10s": timeline[::5],
            "seconds_from_worker_start_to_last_action": round(done_at - started, 1),
        }
        f = result["firing"]
        log(
            f"fired {f['distinct']}/{f['expected']} (duplicates {f['duplicates']}), lateness "
            f"p50 {f['lateness_s'].get('p50')} s, p99 {f['lateness_s'].get('p99')} s, "
            f"max {f['lateness_s'].get('max')} s; {f['fired_per_s']}/s processed"
        )

    def _profile(self, worker: ManagedProcess, name: str) -> Profiler | None:
        if not self.args.profile or worker.pid is None:
            return None
        return Profiler(worker.pid, self.workdir / f"profile-timers-{name}.txt").start()

    def _finish_profile(self, profiler: Profiler | None, name: str) -> None:
        if profiler is None:
            return
        raw = profiler.stop()
        # The summary goes into the results; the raw stacks stay in the work dir.
        self.result.setdefault("profiles", {})[name] = profile.summarize(raw).splitlines()
        log(f"profile of the {name}: {raw}")


def timer_input_summary(inputs: Sequence[seed.TimerInput]) -> dict[str, Any]:
    """How many timer firings the worker sent itself, and how many were repeats: a
    customer whose firing is not processed within the retry interval (5 s) is sent
    another one, and each one is a full input for the customers agent."""
    by_key: dict[bytes, list[float]] = {}
    for item in inputs:
        by_key.setdefault(item.key, []).append(item.sent_at)
    gaps = [b - a for times in by_key.values() for a, b in zip(times, times[1:], strict=False)]
    counts = [len(v) for v in by_key.values()]
    return {
        "records": len(inputs),
        "customers": len(by_key),
        "repeats": len(inputs) - len(by_key),
        "max_per_customer": max(counts, default=0),
        "repeat_gap_s": seed.quantiles(gaps, (0.01, 0.5)),
    }


def steady(times: Sequence[float], low: float = 0.1, high: float = 0.9) -> float:
    if len(times) < 10:
        return float("nan")
    first, last = int(len(times) * low), int(len(times) * high) - 1
    span = times[last] - times[first]
    return (last - first) / span if span > 0 else float("nan")


def by_due_window(
    actions: Sequence[seed.ActionRecord], first_due: float, window: float, buckets: int = 9
) -> list[dict[str, float]]:
    """Lateness per slice of the due window: a rising p50 means the worker fell behind."""
    width = window / buckets
    grouped: dict[int, list[float]] = {}
    for a in actions:
        index = min(buckets - 1, max(0, int((a.due_at - first_due) // width)))
        grouped.setdefault(index, []).append(a.created_at - a.due_at)
    return [
        {"due_from_s": round(i * width), "count": len(v), **seed.quantiles(v, (0.5, 0.99))}
        for i, v in sorted(grouped.items())
    ]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        find_java()
    except JavaNotFound as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    previous = signal.signal(signal.SIGTERM, seed.terminate)
    workdir = Path(tempfile.mkdtemp(prefix="omnicue-bench-timers-"))
    bench = TimerBench(args, workdir)
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
            "firing": args.firing,
            "window_s": args.window,
            "lead_s": args.lead,
            "partitions": args.partitions,
            "store": args.store,
            "workers": 1,
            "dev_broker": False,
            "batch_size": args.batch_size or Settings.model_fields["batch_size"].default,
            "timer_interval_s": Settings.model_fields["timer_interval"].default,
            "worker_env": args.worker_env,
        },
        **bench.result,
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
