"""Benchmark: offline replay (backtest) throughput, on one core.

    PYTHONPATH=. python -m bench.replay [--events 200000] [--file PATH] [--contacts]

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
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

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
    args = parser.parse_args(argv)

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


if __name__ == "__main__":
    sys.exit(main())
