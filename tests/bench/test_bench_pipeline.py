"""The benchmark's own logic, and one tiny end-to-end run of it (broker + two workers)
on each broker.

The Kafka run needs Java 17+: outside CI a machine without it skips it with a
one-line reason; with CI set (as `.ci/run` runs) it runs and fails, so CI never
passes by skipping it.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bench import pipeline, profile, trace, workload
from omnicue import services
from omnicue.kafka_broker import JAVA_MISSING, KAFKA_VERSION
from omnicue.rules import parse_rules_text
from schemas.events import parse_event
from tests.brokers import skip_without_java
from triggers.engine import EnginePolicy, decide
from triggers.ruleset import compile_rules


def test_workload_identifies_every_customer_before_its_triggers() -> None:
    events = workload.generate(events=500, customers=40, seed=3)
    assert len(events) == 540
    identified: set[bytes] = set()
    for event in events:
        parsed = parse_event(event.value)  # contract-valid
        assert event.key == parsed.customer_id.encode()  # type: ignore[union-attr]
        if parsed.type == "identify":
            identified.add(event.key)
        else:
            assert event.triggers and event.key in identified
    assert len(identified) == 40


def test_workload_is_deterministic_per_seed() -> None:
    first = [e.event_id for e in workload.generate(50, 5, seed=1)]
    assert first == [e.event_id for e in workload.generate(50, 5, seed=1)]
    assert first != [e.event_id for e in workload.generate(50, 5, seed=2)]


def test_each_trigger_event_yields_exactly_one_email_action() -> None:
    # The bench counts on this: if the engine ever caps or defers the bench rule,
    # the pipeline run would wait for actions that never come.
    rules = compile_rules(parse_rules_text(workload.RULES_YAML))
    policy = EnginePolicy()
    now = datetime.now(UTC)
    state = None
    events = workload.generate(events=30, customers=1, seed=5)
    for i, event in enumerate(events):
        result = decide(
            state,
            parse_event(event.value),
            now + timedelta(seconds=i),
            rules,
            policy,
            "cust-000000",
        )
        state = result.state
        expected = 1 if event.triggers else 0
        assert [a.channel for a in result.actions] == ["email"] * expected


def test_steady_rate_ignores_the_ramps() -> None:
    # 100 outputs/s in the middle, a slow start and a slow tail.
    times = [i * 0.5 for i in range(10)] + [5 + i / 100 for i in range(80)]
    times += [6 + i * 0.5 for i in range(10)]
    assert pipeline.steady_rate(times) == pytest.approx(100, rel=0.05)


def test_histogram_quantile_of_the_observations_in_between() -> None:
    name = "lat_seconds"
    before = {f"{name}_bucket{{le={le}}}": 10.0 for le in ("0.1", "1.0", "inf")}
    after = {
        f"{name}_bucket{{le=0.1}}": 10.0 + 50,
        f"{name}_bucket{{le=1.0}}": 10.0 + 99,
        f"{name}_bucket{{le=inf}}": 10.0 + 100,
    }
    assert pipeline.histogram_quantile(before, after, name, 0.5) == 0.1
    assert pipeline.histogram_quantile(before, after, name, 0.99) == 1.0
    assert pipeline.histogram_quantile(before, before, name, 0.5) is None


def test_profile_summary_counts_own_and_inclusive_samples(tmp_path: Path) -> None:
    raw = tmp_path / "profile.txt"
    raw.write_text(
        'process 1:"python";main (app.py:1);work (app.py:5);json (orjson.py:2) 30\n'
        'process 1:"python";main (app.py:1);idle (app.py:9) 10\n',
        encoding="utf-8",
    )
    text = profile.summarize(raw)
    assert "40 on-CPU samples" in text
    assert " 75.0%  json (orjson.py:2)" in text
    assert "100.0%  main (app.py:1)" in text


@pytest.mark.e2e
@pytest.mark.parametrize("broker", pipeline.BROKERS)
def test_tiny_bench_run_measures_every_system_and_leaves_nothing_running(
    tmp_path: Path, broker: str
) -> None:
    skip_without_java(broker)
    output = tmp_path / "result.json"
    # Services of other tests (session fixtures) may still run; the bench's must not.
    running_before = set(services._live)
    code = pipeline.main(
        [
            "--events", "300", "--customers", "30", "--partitions", "2", "--broker", broker,
            "--latency-seconds", "2", "--latency-rate", "20", "--output", str(output),
        ]
    )  # fmt: skip
    assert code == 0
    result = json.loads(output.read_text())
    assert result["config"]["broker"] == broker
    assert result["config"]["broker_version"] == (KAFKA_VERSION if broker == "kafka" else None)
    runs = {r["system"]: r for r in result["runs"]}
    assert runs["bare"]["outputs"] == 330 and runs["pipeline"]["outputs"] == 300
    assert runs["passthrough"]["outputs"] == 330 and runs["passthrough"]["duplicates"] == 0
    assert all(run["rate"] > 0 for run in runs.values())
    assert {x["system"] for x in result["latency"]} == {"bare", "pipeline"}
    assert all(x["missing"] == 0 for x in result["latency"])
    # Every child (broker, workers) was stopped, not just abandoned.
    assert services._live <= running_before


def test_trace_overrides_set_module_constants_for_an_experiment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import streams.consumer

    monkeypatch.setattr(streams.consumer, "FETCH_MAX_WAIT_MS", streams.consumer.FETCH_MAX_WAIT_MS)
    monkeypatch.setattr(workload, "RULES_YAML", workload.RULES_YAML)
    trace.apply_overrides(
        "streams.consumer.FETCH_MAX_WAIT_MS=1500; bench.workload.RULES_YAML=@bench.trace:__name__"
    )
    assert streams.consumer.FETCH_MAX_WAIT_MS == 1500
    assert workload.RULES_YAML == "bench.trace"
    with pytest.raises(SystemExit, match="no NOPE"):
        trace.apply_overrides("streams.consumer.NOPE=1")


def test_trace_names_the_innermost_awaits_of_a_task() -> None:
    import asyncio

    async def inner(gate: asyncio.Event) -> None:
        await gate.wait()

    async def outer(gate: asyncio.Event) -> None:
        await inner(gate)

    async def main() -> str:
        gate = asyncio.Event()
        task = asyncio.create_task(outer(gate))
        await asyncio.sleep(0)
        chain = trace._chain(task.get_coro())
        gate.set()
        await task
        return chain

    chain = asyncio.run(main())
    assert "outer@" in chain and "inner@" in chain and chain.index("outer@") < chain.index("inner@")


def test_a_kafka_bench_run_has_its_own_results_file() -> None:
    # The committed latest.json is Tansu's cleanest run; a Kafka run must not replace it.
    assert pipeline.parse_args([]).output == pipeline.RESULTS / "latest.json"
    kafka = pipeline.parse_args(["--broker", "kafka"])
    assert kafka.output == pipeline.RESULTS / "latest-kafka.json"


def test_bench_on_kafka_without_java_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "no-jdk"))
    running_before = set(services._live)
    output = tmp_path / "result.json"
    assert pipeline.main(["--broker", "kafka", "--output", str(output)]) == 1
    assert capsys.readouterr().err == f"bench: {JAVA_MISSING}\n"
    assert not output.exists()
    assert services._live <= running_before
