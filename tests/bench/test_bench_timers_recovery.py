"""The timer and recovery benchmarks' own logic (bench.seed, bench.timers,
bench.recovery), and one tiny run of each on Apache Kafka.

The runs need Java 17+: outside CI a machine without it skips them with a one-line
reason; with CI set they run and fail, so CI never passes by skipping them.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bench import recovery, seed, timers
from omnicue import services
from schemas.events import parse_event
from streams.topics import partition_for
from tests.brokers import skip_without_java
from triggers.engine import EnginePolicy, decide
from triggers.state import CustomerState

DUE = datetime(2026, 3, 2, 1, 45, 0, 123456, tzinfo=UTC)


def test_a_seeded_state_is_byte_for_byte_what_the_worker_would_store() -> None:
    # The same customer built by the engine from the events the state stands for,
    # serialized as the worker does.
    rules = seed.bench_rules()
    key, raw = seed.StateFactory(rules).state(7, DUE)
    customer = key.decode()
    started = DUE - seed.TIMER_AFTER
    state = None
    for event in (
        seed.identify(customer, f"{customer}-i", started),
        seed.cart_add(customer, f"{customer}-c", started, seed.StateFactory.CART),
    ):
        state = decide(state, parse_event(event), started, rules, EnginePolicy(), customer).state
    assert state is not None
    assert state.model_dump_json(exclude_defaults=True).encode() == raw
    assert CustomerState.model_validate_json(raw).next_due() == DUE


def test_every_seeded_timer_yields_one_email_at_its_due_time() -> None:
    factory = seed.StateFactory(seed.bench_rules())
    assert factory.check(3, DUE) > 1000  # asserts inside; the size is reported
    # Each customer has its own journey (its id is part of the action id).
    assert factory.state(3, DUE)[1] != factory.state(4, DUE)[1]


def test_due_times_spread_the_firing_customers_over_the_window() -> None:
    due = list(timers.due_times(DUE, 30.0, firing=3, customers=9))
    in_window = [d for d in due if d <= DUE + timedelta(seconds=30)]
    assert in_window == [DUE + timedelta(seconds=s) for s in (5, 15, 25)]
    # Every third customer, so that they are spread over the partitions like the rest.
    assert [i for i, d in enumerate(due) if d in in_window] == [0, 3, 6]
    assert all(d > DUE + timedelta(days=1) for d in due if d not in in_window)


def test_probe_and_canary_keys_cover_every_partition() -> None:
    keys = recovery.one_key_per_partition("probe-0", 8)
    assert [partition_for(k, 8) for k in keys] == list(range(8))


def test_timer_input_summary_counts_repeats_per_customer() -> None:
    inputs = [seed.TimerInput(b"a", 1.0), seed.TimerInput(b"a", 6.0), seed.TimerInput(b"b", 2.0)]
    summary = timers.timer_input_summary(inputs)
    assert summary["records"] == 3 and summary["customers"] == 2 and summary["repeats"] == 1
    assert summary["repeat_gap_s"]["max"] == 5.0


def test_log_times_reads_faust_timestamps() -> None:
    text = (
        "[2026-03-02 10:00:00,250] [1] [INFO] Joined group 'x' (generation 2)\n"
        "[2026-03-02 10:00:03,750] [1] [INFO] timer schedule rebuilt: 3 customers, 3 pending\n"
    )
    times = seed.log_times(text, recovery.PHASES)
    assert times["schedule_rebuilt"] - times["group_joined"] == pytest.approx(3.5)


@pytest.mark.e2e
def test_tiny_timer_bench_fires_every_timer_once(tmp_path: Path) -> None:
    skip_without_java("kafka")
    output = tmp_path / "timers.json"
    running_before = set(services._live)
    code = timers.main(
        [
            "--customers", "300", "--firing", "200", "--window", "3", "--lead", "2",
            "--ready-in", "10",
            "--partitions", "2", "--settle", "2", "--label", "tiny", "--output", str(output),
        ]
    )  # fmt: skip
    assert code == 0
    run = json.loads(output.read_text())["runs"]["tiny"]
    assert run["error"] is None and run["config"]["broker"].startswith("Apache Kafka")
    assert run["recovery"]["customers"] == 300 and run["recovery"]["pending"] == 300
    firing = run["firing"]
    assert firing["exactly_once"] and firing["actions"] == 200
    assert firing["lateness_s"]["max"] >= firing["lateness_s"]["p50"] >= 0
    assert firing["worker_histogram"]["timer_inputs"] >= 200
    assert run["memory"]["peak_rss_mb"] > 0 and run["machine"]["nproc"]
    assert services._live <= running_before


@pytest.mark.e2e
def test_tiny_recovery_bench_measures_a_sigkill_restart(tmp_path: Path) -> None:
    skip_without_java("kafka")
    output = tmp_path / "recovery.json"
    running_before = set(services._live)
    code = recovery.main(
        [
            "--customers", "300", "--partitions", "2", "--repeats", "1",
            "--label", "tiny", "--output", str(output),
        ]
    )  # fmt: skip
    assert code == 0
    run = json.loads(output.read_text())["runs"]["tiny"]
    assert run["error"] is None
    (restart,) = run["rocksdb"]["restarts"]
    assert restart["exactly_once"] == {"probes": True, "canaries": True}
    assert restart["schedule"]["pending"] == 300 + 2  # the seeded ones and the canaries
    assert 0 < restart["probe_action_after_restart_s"]["max"] < 120
    assert restart["canary_action_after_restart_s"]["count"] == 2
    assert services._live <= running_before
