"""`omnicue dev` as a newcomer runs it, on Tansu (the default) and on Apache Kafka.

The Kafka runs need Java 17+: outside CI a machine without it skips them with a
one-line reason; with CI set (as `.ci/run` runs) they run and fail, so CI never
passes by skipping them.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from omnicue.dev import Snapshot, parse_worker_metrics, render_line
from omnicue.kafka_broker import JAVA_MISSING, KAFKA_VERSION
from tests.brokers import skip_without_java

REPO = Path(__file__).resolve().parents[2]

# `omnicue dev` binds fixed ports: one dev-stack module at a time (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("dev_stack_lock")
# Kafka adds its JVM start (about 5 s here) to the stack's; the group joins are as quick.
READY_TIMEOUT = 120.0
FIRST_ACTION_TIMEOUT = 90.0
# Kafka's own shutdown takes a few seconds after the worker's.
STOP_TIMEOUT = 45.0
BROKERS = ("tansu", "kafka")
# What the ready line says runs, after the broker's address.
BROKER_NAMES = {"tansu": "Tansu, embedded", "kafka": f"Apache Kafka {KAFKA_VERSION}"}
READY_LINE = r"ready in .*broker (\S+) \(([^)]+)\), redis (\S+), worker metrics (\S+), logs (\S+)$"


def _port_taken(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        pass
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _env() -> dict[str, str]:
    # Run this checkout's code whatever is installed, and ignore the developer's own
    # OMNICUE_* settings: the dev stack must work from defaults.
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNICUE_")}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
    )
    return env


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _processes_of_run(run_dir: str) -> list[int]:
    """Pids whose environment marks them as children of this dev run."""
    marker = f"OMNICUE_DEV_RUN={run_dir}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


class Output:
    """Collects a child's stdout lines on a thread, so waits can have deadlines."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        assert proc.stdout is not None
        stream = proc.stdout

        def pump() -> None:
            for line in stream:
                self._queue.put(line.rstrip("\n"))
            self._queue.put(None)

        threading.Thread(target=pump, daemon=True).start()
        self._eof = False

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        regex = re.compile(pattern)
        for line in self.lines:
            if match := regex.search(line):
                return match
        deadline = time.monotonic() + timeout
        while not self._eof:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                line = self._queue.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                continue
            if line is None:
                self._eof = True
                break
            self.lines.append(line)
            if match := regex.search(line):
                return match
        tail = "\n".join(self.lines[-40:])
        raise AssertionError(f"no line matching {pattern!r} within {timeout}s:\n{tail}")

    def drain(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not self._eof and time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            if line is None:
                self._eof = True
            else:
                self.lines.append(line)


@pytest.fixture
def dev_args() -> list[str]:
    return []


@pytest.fixture
def broker() -> str:
    return "tansu"


def _post_to_ingest(url: str) -> None:
    """The dev write key works: one Segment message is accepted (and acknowledged)."""
    import base64
    import json
    import urllib.request

    message = {"messageId": "dev-ingest-1", "userId": "c-ingest", "event": "Video Played"}
    request = urllib.request.Request(
        f"{url}/v1/track",
        data=json.dumps(message).encode(),
        headers={
            "Authorization": "Basic " + base64.b64encode(b"dev:").decode(),
            "Content-Type": "application/json",
        },
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert json.loads(response.read()) == {"success": True, "accepted": 1, "rejected": 0}


@contextmanager
def running_dev(
    cwd: Path, *args: str, **env: str
) -> Iterator[tuple[subprocess.Popen[str], Output]]:
    """`omnicue dev ARGS` in `cwd`, with `env` over the defaults; whatever the test did,
    nothing of it is left running afterwards."""
    if _port_taken(9092):
        pytest.skip("port 9092 is in use; `omnicue dev` needs it for its broker")
    proc = subprocess.Popen(
        [sys.executable, "-m", "omnicue.cli", "dev", *args],
        cwd=cwd,
        env={**_env(), **env},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = Output(proc)
    try:
        yield proc, output
    finally:
        if proc.poll() is None:
            # The test failed before its own SIGINT: still leave nothing behind.
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pid in (int(p) for p in re.findall(r"\(pid (\d+)", "\n".join(output.lines))):
            if not _gone(pid):
                os.killpg(pid, signal.SIGKILL)


@pytest.fixture
def dev_process(
    tmp_path: Path, dev_args: list[str], broker: str
) -> Iterator[tuple[subprocess.Popen[str], Output]]:
    skip_without_java(broker)
    with running_dev(tmp_path, "--broker", broker, *dev_args) as running:
        yield running


@pytest.mark.e2e
@pytest.mark.timeout(300)
@pytest.mark.parametrize("broker", BROKERS)
def test_dev_runs_the_whole_pipeline_and_stops_cleanly(
    dev_process: tuple[subprocess.Popen[str], Output], broker: str
) -> None:
    proc, out = dev_process
    started = time.monotonic()

    ready = out.wait_for(READY_LINE, READY_TIMEOUT)
    ready_after = time.monotonic() - started
    broker_url, broker_name, redis_url, metrics_url, logs = ready.groups()
    assert broker_url == "kafka://127.0.0.1:9092"
    assert broker_name == BROKER_NAMES[broker]
    assert redis_url.startswith("redis://127.0.0.1:")
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/metrics", metrics_url)
    assert (Path(logs) / "worker.log").is_file()
    ingest = re.search(r"ingest (http://127\.0\.0\.1:\d+) \(write key dev, channel web\)",
                       ready.group(0))
    assert ingest is not None, ready.group(0)
    _post_to_ingest(ingest.group(1))

    # Cart abandonment fires 10s after the last cart add; invalid events are 2% of
    # everything the simulator sends, so both show up in well under a minute.
    out.wait_for(r"\| actions [1-9]\d* .*\| dlq [1-9]", FIRST_ACTION_TIMEOUT)
    action_after = time.monotonic() - started

    pids = [int(p) for p in re.findall(r"\(pid (\d+)", "\n".join(out.lines))]
    # Broker, Redis, worker, four senders, the ingest, simulator.
    assert len(pids) == 9, out.lines
    assert sorted(_processes_of_run(logs)) == sorted(pids[2:])

    proc.send_signal(signal.SIGINT)
    stop_started = time.monotonic()
    assert proc.wait(STOP_TIMEOUT) == 0
    stopped_after = time.monotonic() - stop_started
    out.drain()
    assert out.lines[-1] == "omnicue dev stopped (exit code 0)", out.lines[-15:]

    assert [pid for pid in pids if not _gone(pid)] == []
    assert _processes_of_run(logs) == []
    # The worker's state and Kafka's log dirs are of no use once the run's broker is gone.
    assert sorted(p.name for p in Path(logs).iterdir() if p.is_dir()) == []
    print(
        f"\nomnicue dev on {broker}: ready after {ready_after:.1f}s, first action after "
        f"{action_after:.1f}s, stopped in {stopped_after:.1f}s"
    )


@pytest.mark.e2e
@pytest.mark.timeout(300)
@pytest.mark.parametrize("broker", BROKERS)
@pytest.mark.parametrize("dev_args", [["--no-simulate"]], ids=["no-simulate"])
def test_dev_stops_everything_when_a_child_dies(
    dev_process: tuple[subprocess.Popen[str], Output],
) -> None:
    proc, out = dev_process
    logs = out.wait_for(READY_LINE, READY_TIMEOUT).group(5)
    assert not any("started simulator" in line for line in out.lines)
    sender = int(out.wait_for(r"started sender-sms \(pid (\d+)\)", 0).group(1))
    pids = [int(p) for p in re.findall(r"\(pid (\d+)", "\n".join(out.lines))]

    os.killpg(sender, signal.SIGKILL)

    assert proc.wait(STOP_TIMEOUT) == 1
    out.drain()
    text = "\n".join(out.lines)
    assert "sender-sms exited unexpectedly with code -9" in text
    assert f"--- last 40 lines of {logs}/sender-sms.log ---" in text
    assert "sender sms ready" in text  # the tail itself
    assert [pid for pid in pids if not _gone(pid)] == []
    assert _processes_of_run(logs) == []


@pytest.mark.parametrize("broker", BROKERS)
def test_dev_refuses_a_taken_broker_port(tmp_path: Path, broker: str) -> None:
    skip_without_java(broker)
    if _port_taken(9092):
        pytest.skip("port 9092 is in use by something else already")
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", 9092))
        squatter.listen()
        result = subprocess.run(
            [sys.executable, "-m", "omnicue.cli", "dev", "--broker", broker],
            cwd=tmp_path,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert "port 9092 is already in use" in result.stderr
    # Nothing was started, so nothing needs a log directory either.
    assert not (tmp_path / ".omnicue").exists()


def test_dev_on_kafka_without_java_says_how_to_get_it(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    env = _env()
    env["PATH"] = str(empty)
    env["JAVA_HOME"] = str(tmp_path / "no-jdk")
    result = subprocess.run(
        [sys.executable, "-m", "omnicue.cli", "dev", "--broker", "kafka"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr == (
        f"omnicue dev: {JAVA_MISSING}. `omnicue dev --broker tansu` (the default) needs "
        "only Python.\n"
    )
    assert "Traceback" not in result.stdout + result.stderr
    # Checked before anything starts: no broker, no Redis, no run directory.
    assert "started" not in result.stdout
    assert not (tmp_path / ".omnicue").exists()


METRICS = """\
# HELP omnicue_events_consumed_total Valid events consumed, by type
# TYPE omnicue_events_consumed_total counter
omnicue_events_consumed_total{type="identify"} 10.0
omnicue_events_consumed_total{type="cart.item_added"} 30.0
omnicue_events_consumed_created{type="identify"} 1.7e9
# HELP omnicue_events_invalid_total Events sent to the dead-letter topic, by reason
# TYPE omnicue_events_invalid_total counter
omnicue_events_invalid_total{reason="json"} 2.0
omnicue_events_invalid_total{reason="schema"} 3.0
# HELP omnicue_actions_total Actions emitted, by rule and channel
# TYPE omnicue_actions_total counter
omnicue_actions_total{channel="push",rule="cart_abandonment"} 4.0
omnicue_actions_total{channel="email",rule="cart_abandonment"} 6.0
# HELP omnicue_decisions_total Decisions made, by outcome and reason
# TYPE omnicue_decisions_total counter
omnicue_decisions_total{outcome="fired",reason="none"} 10.0
omnicue_decisions_total{outcome="suppressed",reason="no_consent"} 7.0
omnicue_decisions_total{outcome="cancelled",reason="purchased"} 5.0
# HELP omnicue_timers_pending Customers with a pending journey step
# TYPE omnicue_timers_pending gauge
omnicue_timers_pending 12.0
"""


def test_summary_reads_the_worker_metrics() -> None:
    snap = parse_worker_metrics(METRICS, at=10.0)
    assert snap.events == 40
    assert snap.dlq == {"json": 2, "schema": 3}
    assert snap.actions == {"push": 4, "email": 6}
    assert snap.suppressed == {"no_consent": 7}
    assert snap.cancelled == {"purchased": 5}
    assert snap.timers_pending == 12

    line = render_line(snap, Snapshot(at=5.0, events=20), uptime=65)
    assert line == (
        "[ 1m05s] events 4.0/s (40 total) | actions 10 (push 4, email 6, sms 0, kakao 0)"
        " | sent 0 | suppressed 7 | cancelled 5 | dlq 5 | timers 12"
    )
