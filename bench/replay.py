"""Benchmark: offline replay (backtest) throughput, on one core and partitioned.

    PYTHONPATH=. python -m bench.replay [--events 200000] [--file PATH] [--contacts]
    PYTHONPATH=. python -m bench.replay --scale-from SAMPLE.csv --rows 2000000 \
        --workers 1,2 [--contacts] [--json bench/results/replay-partitioned.json]
    PYTHONPATH=. python -m bench.replay --instructions [--file SAMPLE.csv] [--contacts]

Generates a REES46-like CSV ("eCommerce behavior data from multi category store":
mostly views, some cart adds and removals, few purchases, many users and
sessions, time-ordered) into a temp dir, or reads `--file`, and measures:

  parse          the REES46 reader alone (CSV + pydantic events)
  parse+engine   the reader driving `triggers.replay.Replayer` with the packaged
                 rules (outputs consumed, not written)
  end-to-end     `omnicue.replay.run_replay`: the above plus writing actions and
                 decisions as JSONL

Each is run `--repeat` times and the best kept (the machine may be shared). Rates
are events per second of wall time and of this process's CPU time; the replay is
single-threaded, so CPU time is the one-core figure when other work competes.

`--workers 1,2` measures `omnicue replay --workers N` (`omnicue.partitioned`) for
each N in one run, alternating, best of `--repeat`, with the load average beside
every figure, each worker's peak RSS and the speed-up over N = 1. `--scale-from`
builds its input by repeating a real REES46 file (the sample in ../shared/data)
with shifted user ids, sessions and times, up to `--rows` rows.

`--instructions` counts instructions (valgrind's callgrind, the same on every run,
unlike times on a shared machine) of cumulative stages on `--file`, one process
each, and reports the differences per event: read (CSV rows and times),
validate (pydantic events), engine (`Replayer`), write (JSONL outputs), and route
(what a worker pays for a row of another partition).
"""

from __future__ import annotations

import argparse
import csv
import gc
import io
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from omnicue.partitioned import (
    IdentityGroups,
    PartitionSpec,
    _Clock,
    _Router,
    route_rees46,
    run_partitioned,
)
from omnicue.replay import REES46_COLUMNS, Rees46Reader, gc_tuned, run_replay
from omnicue.rules import load_rules
from omnicue.settings import Settings
from triggers.engine import EnginePolicy
from triggers.replay import Replayer

START = datetime(2019, 10, 1, tzinfo=UTC)
# REES46 October 2019: ~42M rows in 31 days, ~16 rows/s on average.
ROWS_PER_SECOND = 16.0
_CATEGORY_CODES = (
    "electronics.smartphone",
    "electronics.audio.headphone",
    "appliances.kitchen.refrigerators",
    "computers.notebook",
    "apparel.shoes",
    "furniture.living_room.sofa",
    "",
)
_BRANDS = ("samsung", "apple", "xiaomi", "huawei", "lenovo", "lg", "bosch", "")


@dataclass
class Session:
    user_id: int
    session_id: str
    products: list[int]
    cart: list[int]
    remaining: int


def generate(path: Path, rows: int, seed: int = 7) -> None:
    """A time-ordered REES46-format CSV of `rows` rows, deterministic per seed.

    Sessions interleave like real traffic: a pool of open sessions, each browsing a
    few products (so some are viewed repeatedly), sometimes adding to the cart,
    removing, or buying what is in it. Users come back with new sessions.
    """
    rng = random.Random(seed)
    products = [
        (
            1_000_000 + i,
            2_053_013_552_326_770_905 + (i % 900),
            _CATEGORY_CODES[i % len(_CATEGORY_CODES)],
            _BRANDS[(i * 7) % len(_BRANDS)],
            round(rng.lognormvariate(4.5, 1.0), 2),
        )
        for i in range(max(rows // 20, 100))
    ]
    # ~6 rows a session; some users come back (REES46: ~4 rows a user in 3 hours).
    users = max(rows // 5, 10)
    open_sessions: list[Session] = []
    at = START
    with path.open("w", encoding="utf-8", newline="") as out:
        out.write(",".join(REES46_COLUMNS) + "\n")
        for _ in range(rows):
            at += timedelta(seconds=rng.expovariate(ROWS_PER_SECOND))
            if not open_sessions or rng.random() < 0.25:
                open_sessions.append(_new_session(rng, users, len(products)))
            index = rng.randrange(len(open_sessions))
            session = open_sessions[index]
            kind, product = _next_action(rng, session)
            pid, category_id, code, brand, price = products[product]
            out.write(
                f"{at:%Y-%m-%d %H:%M:%S} UTC,{kind},{pid},{category_id},{code},{brand},"
                f"{price:.2f},{session.user_id},{session.session_id}\n"
            )
            session.remaining -= 1
            if session.remaining <= 0 or kind == "purchase":
                open_sessions[index] = open_sessions[-1]
                open_sessions.pop()


def _new_session(rng: random.Random, users: int, products: int) -> Session:
    # Popular products get most views (a rough Zipf law), as on a real store.
    browsing = [min(int(rng.paretovariate(1.2)) - 1, products - 1) for _ in range(3)]
    browsing = [rng.randrange(products) if p > products // 2 else p for p in browsing]
    return Session(
        user_id=500_000_000 + rng.randrange(users),
        session_id=f"{rng.getrandbits(128):032x}",
        products=browsing,
        cart=[],
        remaining=max(1, int(rng.expovariate(1 / 6))),
    )


def _next_action(rng: random.Random, session: Session) -> tuple[str, int]:
    # Shares near REES46's: ~95% views, ~3% cart adds, ~1.7% purchases (some with
    # no cart add before, as in the data set), removals only from a cart.
    roll = rng.random()
    if roll < 0.017:
        return "purchase", rng.choice(session.cart or session.products)
    if roll < 0.025 and session.cart:
        return "remove_from_cart", session.cart.pop()
    if roll < 0.055:
        product = rng.choice(session.products)
        session.cart.append(product)
        return "cart", product
    return "view", rng.choice(session.products)


def scale_rees46(sample: Path, path: Path, rows: int) -> int:
    """`rows` rows (at least) of `sample` repeated: copy k shifts user ids by
    k * 10^9, renames sessions and moves times by k times the sample's span (rounded
    up to the hour), so the result stays in time order; returns the rows written."""
    with sample.open(encoding="utf-8", newline="") as source:
        reader = csv.reader(source)
        header = next(reader)
        body = list(reader)
    first = datetime.fromisoformat(body[0][0].replace(" UTC", "+00:00"))
    last = datetime.fromisoformat(body[-1][0].replace(" UTC", "+00:00"))
    span = timedelta(hours=(last - first) // timedelta(hours=1) + 1)
    times = [datetime.fromisoformat(r[0].replace(" UTC", "+00:00")) for r in body]
    written = 0
    with path.open("w", encoding="utf-8", newline="") as out:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(header)
        copy = 0
        while written < rows:
            shift = span * copy
            stamps: dict[datetime, str] = {}
            for row, at in zip(body, times, strict=True):
                stamp = stamps.get(at)
                if stamp is None:
                    stamp = stamps[at] = f"{at + shift:%Y-%m-%d %H:%M:%S} UTC"
                user = str(int(row[7]) + copy * 1_000_000_000) if row[7] else ""
                writer.writerow([stamp, *row[1:7], user, f"{row[8]}-{copy}"])
            written += len(body)
            copy += 1
    return written


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


@dataclass
class Scaling:
    workers: int
    events: int
    wall: float
    per_second: float
    peak_rss_mib: float
    load_before: str
    load_after: str
    # CPU seconds: this process (identity pre-pass, merge) and each worker.
    parent_cpu: float = 0.0
    worker_cpu: tuple[float, ...] = ()

    @property
    def critical_cpu(self) -> float:
        """The run's longest chain of CPU work: the parent's serial part and the
        slowest worker, i.e. its wall time with a free core per worker."""
        return self.parent_cpu + max(self.worker_cpu, default=0.0)

    @property
    def per_critical_cpu_second(self) -> float:
        return self.events / self.critical_cpu if self.critical_cpu else 0.0


def measure_scaling(
    source: Path, workdir: Path, workers: list[int], repeat: int, contacts: bool,
    rules: Path | None, runs: list[Scaling] | None = None,
) -> list[Scaling]:
    """Each N in turn, `repeat` rounds (alternating, so drifting load hits all); the
    best of each N, and every run appended to `runs`."""
    best: dict[int, Scaling] = {}
    outputs: dict[int, bytes] = {}
    for _ in range(repeat):
        for n in workers:
            gc.collect()
            before = load_average()
            cpu = time.process_time()
            summary = run_partitioned(
                source, workdir / f"actions-{n}.jsonl", workdir / f"decisions-{n}.jsonl",
                rules, None, "rees46", False, Settings(), workers=n, synthetic_contacts=contacts,
            )  # fmt: skip
            result = Scaling(
                n, summary.stats.events, summary.elapsed, summary.events_per_second,
                summary.peak_rss_kib / 1024, before, load_average(),
                time.process_time() - cpu, summary.worker_cpu_seconds,
            )  # fmt: skip
            print(
                f"  workers {n}: {result.per_second:,.0f} events/s in {result.wall:.1f}s "
                f"({result.per_critical_cpu_second:,.0f}/s of critical-path CPU), "
                f"peak RSS {result.peak_rss_mib:,.0f} MiB/worker, load {before} -> "
                f"{result.load_after}",
                file=sys.stderr,
            )
            if runs is not None:
                runs.append(result)
            digest = (workdir / f"actions-{n}.jsonl").read_bytes()
            digest += (workdir / f"decisions-{n}.jsonl").read_bytes()
            if n in outputs:
                assert outputs[n] == digest
            outputs[n] = digest
            if n not in best or result.wall < best[n].wall:
                best[n] = result
    first = outputs[workers[0]]
    # The point of partitioning: the same bytes for every N.
    assert all(o == first for o in outputs.values()), "outputs differ between worker counts"
    return [best[n] for n in workers]


# ------------------------------------------------------------------ instructions

# Cumulative stages: each includes the ones before it.
STAGES = ("start", "read", "validate", "engine", "write", "route")


def run_stage(stage: str, source: Path, contacts: bool, rules_path: Path | None) -> int:
    """One stage's work on `source` (run under callgrind by `count_instructions`)."""
    rules = load_rules(rules_path)
    with gc_tuned(), source.open("rb") as stream:
        if stage == "start":
            return 0
        if stage == "read":
            # What every worker does for every row: CSV, the row's time and user.
            text = io.TextIOWrapper(stream, encoding="utf-8-sig", newline="")
            clock = _Clock()
            rows = 0
            for row in csv.reader(text):
                clock.see(row[0])
                rows += len(row[7]) > 0
            return rows
        if stage == "route":
            # A worker that owns none of the rows: reads, routes, and skips them all.
            router = _Router(PartitionSpec(frozenset(), 8), IdentityGroups())
            reader = Rees46Reader(stream, synthetic_contacts=contacts)
            return sum(1 for _ in route_rees46(reader, router, _Clock(), lambda lines: None))
        reader = Rees46Reader(stream, synthetic_contacts=contacts)
        if stage == "validate":
            return sum(1 for _ in reader)
        if stage == "engine":
            replayer = Replayer(rules, EnginePolicy())
            for _ in replayer.run(reader):
                pass
            return replayer.stats.events
    with tempfile.TemporaryDirectory() as tmp:
        summary = run_replay(
            source, Path(tmp) / "a.jsonl", Path(tmp) / "d.jsonl", rules_path, None, "rees46",
            False, Settings(), synthetic_contacts=contacts,
        )  # fmt: skip
    return summary.stats.events


def count_instructions(
    source: Path, contacts: bool, rules: Path | None
) -> dict[str, dict[str, float]]:
    """Instructions of every stage (callgrind's Ir), and per event."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("--instructions needs valgrind")
    totals: dict[str, int] = {}
    events = 0
    for stage in STAGES:
        command = [
            valgrind, "--tool=callgrind", "--callgrind-out-file=/dev/null",
            sys.executable, "-m", "bench.replay", "--stage", stage, "--file", str(source),
        ]  # fmt: skip
        if contacts:
            command.append("--contacts")
        if rules is not None:
            command += ["--rules", str(rules)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        found = re.search(r"Collected : (\d+)", done.stderr)
        if found is None:
            raise SystemExit(f"no instruction count from callgrind:\n{done.stderr[-2000:]}")
        totals[stage] = int(found.group(1))
        counted = re.search(r"^events (\d+)$", done.stdout, re.M)
        if stage == "write" and counted:
            events = int(counted.group(1))
        print(f"  {stage}: {totals[stage]:,} instructions", file=sys.stderr)
    start = totals["start"]
    per_stage = {
        "read": totals["read"] - start,
        "validate": totals["validate"] - totals["read"],
        "engine": totals["engine"] - totals["validate"],
        "write": totals["write"] - totals["engine"],
        "route (another partition's row)": totals["route"] - start,
    }
    return {
        stage: {"instructions": count, "per_event": count / events if events else 0.0}
        for stage, count in per_stage.items()
    } | {"total (read..write)": {
        "instructions": totals["write"] - start,
        "per_event": (totals["write"] - start) / events if events else 0.0,
    }, "events": {"instructions": 0, "per_event": float(events)}}


@dataclass
class Measurement:
    name: str
    events: int
    wall: float
    cpu: float

    @property
    def per_second(self) -> float:
        return self.events / self.wall if self.wall else 0.0

    @property
    def per_cpu_second(self) -> float:
        return self.events / self.cpu if self.cpu else 0.0


def measure(name: str, run: Callable[[], int], repeat: int) -> Measurement:
    best: Measurement | None = None
    for _ in range(repeat):
        gc.collect()
        wall, cpu = time.perf_counter(), time.process_time()
        events = run()
        result = Measurement(name, events, time.perf_counter() - wall, time.process_time() - cpu)
        if best is None or result.cpu < best.cpu:
            best = result
    assert best is not None
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000, help="rows to generate")
    parser.add_argument("--file", type=Path, help="an existing REES46 CSV instead")
    parser.add_argument(
        "--contacts",
        action="store_true",
        help="synthetic email + consent per user, so reminders fire",
    )
    parser.add_argument("--rules", type=Path, help="rules file (default: the packaged rules)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--scale-from", type=Path, help="a REES46 CSV to repeat up to --rows")
    parser.add_argument("--rows", type=int, default=2_000_000, help="with --scale-from")
    parser.add_argument("--workers", help="partitioned replay for these N, e.g. 1,2")
    parser.add_argument(
        "--instructions", action="store_true", help="instructions per stage (valgrind)"
    )
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage is not None:
        print(f"events {run_stage(args.stage, args.file, args.contacts, args.rules)}")
        return 0
    if args.instructions:
        return instructions_main(args)
    if args.workers is not None:
        return scaling_main(args)

    rules = load_rules(args.rules)
    policy = EnginePolicy()
    with tempfile.TemporaryDirectory(prefix="omnicue-replay-bench-") as tmp:
        workdir = Path(tmp)
        if args.file is not None:
            source = args.file
        else:
            source = workdir / "events.csv"
            started = time.perf_counter()
            generate(source, args.events, args.seed)
            print(
                f"generated {args.events:,} rows in {time.perf_counter() - started:.1f}s "
                f"({source.stat().st_size / 1e6:.1f} MB)",
                file=sys.stderr,
            )

        # As `run_replay` does: see `gc_tuned`.
        def parse_only() -> int:
            with gc_tuned(), source.open("rb") as stream:
                reader = Rees46Reader(stream, synthetic_contacts=args.contacts)
                return sum(1 for _ in reader)

        def parse_and_engine() -> int:
            with gc_tuned(), source.open("rb") as stream:
                replayer = Replayer(rules, policy)
                reader = Rees46Reader(stream, synthetic_contacts=args.contacts)
                for _ in replayer.run(reader):
                    pass
                return replayer.stats.events

        summaries = []

        def end_to_end() -> int:
            summary = run_replay(
                source,
                workdir / "actions.jsonl",
                workdir / "decisions.jsonl",
                args.rules,
                None,
                "rees46",
                False,
                Settings(),
                synthetic_contacts=args.contacts,
            )
            summaries.append(summary)
            return summary.stats.events

        results = [
            measure("parse", parse_only, args.repeat),
            measure("parse+engine", parse_and_engine, args.repeat),
            measure("end-to-end", end_to_end, args.repeat),
        ]
        # The counts of the last measured end-to-end run; every run gives the same.
        summary = summaries[-1]

    print(
        f"source: {args.file or f'generated, {args.events:,} rows'}; "
        f"rules: {args.rules or 'packaged default'} ({len(rules.rules)}); "
        f"contacts: {args.contacts}; "
        f"python {platform.python_version()}"
    )
    print(f"{'stage':<14}{'events':>10}{'wall s':>9}{'events/s':>12}{'events/cpu-s':>14}")
    for r in results:
        print(
            f"{r.name:<14}{r.events:>10,}{r.wall:>9.2f}{r.per_second:>12,.0f}"
            f"{r.per_cpu_second:>14,.0f}"
        )
    s = summary.stats
    print(
        f"customers {s.customers:,}, journeys started {s.journeys_started:,}, "
        f"timers fired {s.timers_fired:,}, decisions {sum(s.outcomes.values()):,}, "
        f"actions {s.action_count:,}"
    )
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "source": str(args.file) if args.file else f"generated:{args.events}",
                    "contacts": args.contacts,
                    "results": [
                        asdict(r) | {"per_second": r.per_second, "per_cpu_second": r.per_cpu_second}
                        for r in results
                    ],
                },
                indent=2,
            )
        )
    return 0


def instructions_main(args: argparse.Namespace) -> int:
    if args.file is None:
        raise SystemExit("--instructions needs --file (e.g. the REES46 sample)")
    per_stage = count_instructions(args.file, args.contacts, args.rules)
    events = int(per_stage["events"]["per_event"])
    print(f"source: {args.file}; contacts: {args.contacts}; events {events:,}; "
          f"python {platform.python_version()}")  # fmt: skip
    print(f"{'stage':<34}{'instructions':>16}{'per event':>12}")
    for stage, figures in per_stage.items():
        if stage != "events":
            print(f"{stage:<34}{figures['instructions']:>16,.0f}{figures['per_event']:>12,.0f}")
    if args.json is not None:
        args.json.write_text(json.dumps({
            "source": str(args.file), "contacts": args.contacts, "events": events,
            "python": platform.python_version(), "tool": "valgrind --tool=callgrind (Ir)",
            "stages": {k: v for k, v in per_stage.items() if k != "events"},
        }, indent=2) + "\n")  # fmt: skip
    return 0


def scaling_main(args: argparse.Namespace) -> int:
    workers = [int(n) for n in args.workers.split(",")]
    with tempfile.TemporaryDirectory(prefix="omnicue-replay-scale-") as tmp:
        workdir = Path(tmp)
        if args.scale_from is not None:
            source = workdir / "events.csv"
            started = time.perf_counter()
            rows = scale_rees46(args.scale_from, source, args.rows)
            print(
                f"built {rows:,} rows from {args.scale_from} in "
                f"{time.perf_counter() - started:.1f}s ({source.stat().st_size / 1e6:.0f} MB)",
                file=sys.stderr,
            )
        elif args.file is not None:
            source, rows = args.file, 0
        else:
            source, rows = workdir / "events.csv", args.events
            generate(source, rows, args.seed)
        runs: list[Scaling] = []
        results = measure_scaling(
            source, workdir, workers, args.repeat, args.contacts, args.rules, runs
        )
    base = results[0].per_second
    print(f"source: {args.scale_from or args.file or 'generated'} ({rows:,} rows); "
          f"contacts: {args.contacts}; cpus: {os.cpu_count()}; "
          f"python {platform.python_version()}")  # fmt: skip
    cpu_base = results[0].per_critical_cpu_second
    print(f"{'workers':>7}{'events':>12}{'wall s':>9}{'events/s':>12}{'speed-up':>10}"
          f"{'crit. CPU s':>12}{'events/s':>12}{'speed-up':>10}"
          f"{'peak RSS MiB':>14}  load (1/5/15 min) before -> after")  # fmt: skip
    for r in results:
        print(f"{r.workers:>7}{r.events:>12,}{r.wall:>9.1f}{r.per_second:>12,.0f}"
              f"{r.per_second / base:>9.2f}x{r.critical_cpu:>12.1f}"
              f"{r.per_critical_cpu_second:>12,.0f}{r.per_critical_cpu_second / cpu_base:>9.2f}x"
              f"{r.peak_rss_mib:>14,.0f}  {r.load_before} -> {r.load_after}")  # fmt: skip
    if args.json is not None:
        args.json.write_text(json.dumps({
            "source": str(args.scale_from or args.file or "generated"),
            "rows": rows, "contacts": args.contacts, "cpus": os.cpu_count(),
            "python": platform.python_version(), "repeat": args.repeat,
            "results": [
                asdict(r) | {
                    "speed_up": r.per_second / base,
                    "critical_cpu": r.critical_cpu,
                    "per_critical_cpu_second": r.per_critical_cpu_second,
                    "critical_cpu_speed_up": r.per_critical_cpu_second / cpu_base,
                }
                for r in results
            ],
            # Every run in order: round by round, N by N (the load drifts between them).
            "runs": [asdict(r) | {"per_critical_cpu_second": r.per_critical_cpu_second}
                     for r in runs],
        }, indent=2) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
