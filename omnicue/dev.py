"""`omnicue dev`: the whole pipeline on one machine, for a newcomer's first run.

Broker (Tansu, in memory) and Redis run from pip-installed binaries; with
`--broker kafka` the broker is Apache Kafka instead (`omnicue.kafka_broker`: Java,
and Maven once to fetch its jars), so the stack runs without the Tansu workarounds
(`Settings.dev_broker`) the way production does. The worker,
the console senders and the simulator run as child processes of this one, each in
a session of its own (see `omnicue.services`), so a Ctrl-C reaches only us and we
stop everything in order: producers first, the infrastructure last.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import site
import socket
import sys
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Literal

from prometheus_client.parser import text_string_to_metric_families

from omnicue.kafka_broker import (
    KAFKA_VERSION,
    STAMP_NAME,
    JavaNotFound,
    KafkaBroker,
    find_java,
    kafka_cache_root,
    kafka_jars,
)
from omnicue.services import ManagedProcess, RedisServer, ServiceError, TansuBroker, free_port
from omnicue.settings import Settings, parse_write_keys
from schemas.topics import ACTION_CHANNELS

if TYPE_CHECKING:
    from senders.mail_catcher import MailCatcher

# "tansu" needs only Python; "kafka" is what production runs, and needs Java.
BrokerKind = Literal["tansu", "kafka"]
BROKER_PORT = 9092
# A JVM start plus KRaft's first controller election; a cold 2-core laptop is slow.
KAFKA_START_TIMEOUT = 90.0
# Kafka's shutdown (controlled, then the log flush) takes seconds, Tansu's none.
KAFKA_STOP_TIMEOUT = 30.0
REDIS_PORT = 6379
WEB_PORT = 6066
INGEST_PORT = 8088
# The dev stack's write key, unless OMNICUE_INGEST_WRITE_KEYS names others.
DEV_WRITE_KEYS = "dev=web"
# How the dev senders deliver: console (email to the mail catcher), or a webhook.
DevTransport = Literal["console", "webhook"]
# Placeholders unless the environment names real ones: dev email goes nowhere real.
DEV_UNSUBSCRIBE_URL = "https://unsubscribe.example.invalid/{action_id}"
DEV_WEBHOOK_SECRET = "omnicue-dev"
# The first Faust group join on Tansu takes a few seconds; a cold laptop (imports,
# RocksDB) can take much longer, and a false "failed to start" is worse than waiting.
READY_TIMEOUT = 90.0
# Faust logs this once the worker has joined the group and recovered its tables.
WORKER_READY = re.compile(r"\[\^Worker\]: Ready")
SIMULATOR_READY = re.compile(r"simulator started")
WORKER_STOP_TIMEOUT = 20.0
TTY_REFRESH = 1.0
PLAIN_REFRESH = 5.0


class _Interrupted(BaseException):
    """SIGINT/SIGTERM/SIGHUP: a BaseException, so no `except Exception` swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class ChildDied(RuntimeError):
    def __init__(self, proc: ManagedProcess) -> None:
        super().__init__(f"{proc.name} exited unexpectedly with code {proc.returncode}")
        self.proc = proc


def _say(message: str, *, err: bool = False) -> None:
    """Print, but never fail: when the terminal goes away (SIGHUP, a closed pipe) we
    must still stop every child, and an exception from print() would abort that."""
    try:
        print(message, file=sys.stderr if err else sys.stdout, flush=True)
    except (OSError, ValueError):
        pass


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Like the servers themselves: otherwise connections in TIME_WAIT from our own
        # /metrics scrapes of a previous run would make a free port look taken.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    # Bindable here can still mean a listener on another address (e.g. ::1 or a
    # Docker proxy on 0.0.0.0 with SO_REUSEPORT): a connect tells those apart.
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.3):
            return True
    except OSError:
        return False


def _port_or_free(preferred: int) -> int:
    return preferred if not _port_in_use(preferred) else free_port()


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _new_run_dir(base: Path) -> Path:
    stamp = datetime.now(UTC).astimezone().strftime("%Y%m%d-%H%M%S")
    run = base / stamp
    n = 1
    while run.exists():
        n += 1
        run = base / f"{stamp}-{n}"
    run.mkdir(parents=True)
    return run


def _pythonpath() -> str:
    """PYTHONPATH for the children, so they run the same omnicue as we do.

    From a checkout (`python -m omnicue.cli` with cwd or PYTHONPATH at the repo)
    the children would otherwise depend on their cwd; from an installed venv the
    package root is site-packages, already on every interpreter's path.
    """
    import omnicue

    root = str(Path(omnicue.__file__).resolve().parent.parent)
    existing = os.environ.get("PYTHONPATH", "")
    parts = [p for p in existing.split(os.pathsep) if p]
    installed = {str(Path(p).resolve()) for p in site.getsitepackages()}
    if root not in parts and root not in installed:
        parts.insert(0, root)
    return os.pathsep.join(parts)


# -- metrics --------------------------------------------------------------------------


@dataclass
class Snapshot:
    at: float
    events: float = 0.0
    dlq: dict[str, float] = field(default_factory=dict)
    actions: dict[str, float] = field(default_factory=dict)
    suppressed: dict[str, float] = field(default_factory=dict)
    cancelled: dict[str, float] = field(default_factory=dict)
    timers_pending: float = 0.0
    sent: dict[str, float] = field(default_factory=dict)
    worker_up: bool = True


def _scrape(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            text: str = response.read().decode("utf-8")
            return text
    except (urllib.error.URLError, OSError):
        return None


def _add(into: dict[str, float], key: str, value: float) -> None:
    into[key] = into.get(key, 0.0) + value


def parse_worker_metrics(text: str, at: float) -> Snapshot:
    snap = Snapshot(at=at)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            # Counters also expose `_created` timestamps; only `_total` is a count.
            name, labels, value = sample.name, sample.labels, sample.value
            if name == "omnicue_events_consumed_total":
                snap.events += value
            elif name == "omnicue_events_invalid_total":
                _add(snap.dlq, labels.get("reason", "?"), value)
            elif name == "omnicue_actions_total":
                _add(snap.actions, labels.get("channel", "?"), value)
            elif name == "omnicue_decisions_total":
                outcome = labels.get("outcome")
                if outcome == "suppressed":
                    _add(snap.suppressed, labels.get("reason", "?"), value)
                elif outcome == "cancelled":
                    _add(snap.cancelled, labels.get("reason", "?"), value)
            elif name == "omnicue_timers_pending":
                snap.timers_pending = value
    return snap


def _sender_sent(text: str) -> dict[str, float]:
    sent: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (
                sample.name == "omnicue_sender_actions_total"
                and sample.labels.get("outcome") == "sent"
            ):
                _add(sent, sample.labels.get("channel", "?"), sample.value)
    return sent


def _total(values: dict[str, float]) -> int:
    return int(sum(values.values()))


def _by_key(values: dict[str, float], keys: tuple[str, ...] = ()) -> str:
    names = list(keys) + sorted(k for k in values if k not in keys)
    return ", ".join(f"{k} {int(values.get(k, 0))}" for k in names)


def _rate(now: Snapshot, before: Snapshot | None) -> float:
    if before is None or now.at <= before.at:
        return 0.0
    return max(0.0, now.events - before.events) / (now.at - before.at)


def _uptime(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def render_line(snap: Snapshot, before: Snapshot | None, uptime: float) -> str:
    """The plain summary: one line, for logs and pipes."""
    if not snap.worker_up:
        return f"[{_uptime(uptime):>6}] worker /metrics not answering"
    return (
        f"[{_uptime(uptime):>6}] events {_rate(snap, before):.1f}/s ({int(snap.events)} total)"
        f" | actions {_total(snap.actions)} ({_by_key(snap.actions, ACTION_CHANNELS)})"
        f" | sent {_total(snap.sent)}"
        f" | suppressed {_total(snap.suppressed)}"
        f" | cancelled {_total(snap.cancelled)}"
        f" | dlq {_total(snap.dlq)}"
        f" | timers {int(snap.timers_pending)}"
    )


def render_screen(snap: Snapshot, before: Snapshot | None, uptime: float, stack: DevStack) -> str:
    """The TTY summary: one screen, redrawn in place."""
    lines = [
        f"omnicue dev  up {_uptime(uptime)}  (Ctrl-C stops everything)",
        "",
        f"broker   {stack.broker_url} ({stack.broker_name})",
        f"redis    {stack.redis_url}",
        f"worker   {stack.metrics_url}",
        f"ingest   {stack.ingest_url}",
        f"mail     {stack.mail_note}",
        f"logs     {stack.run_dir}",
        "",
    ]
    if not snap.worker_up:
        lines.append("worker /metrics not answering")
        return "\n".join(lines)
    lines += [
        f"events      {_rate(snap, before):7.1f}/s   {int(snap.events)} total",
        f"actions     {_total(snap.actions):7d}     {_by_key(snap.actions, ACTION_CHANNELS)}",
        f"sent        {_total(snap.sent):7d}     {_by_key(snap.sent, ACTION_CHANNELS)}",
        f"suppressed  {_total(snap.suppressed):7d}     {_by_key(snap.suppressed)}",
        f"cancelled   {_total(snap.cancelled):7d}     {_by_key(snap.cancelled)}",
        f"dlq         {_total(snap.dlq):7d}     {_by_key(snap.dlq)}",
        f"timers      {int(snap.timers_pending):7d}     pending",
    ]
    return "\n".join(lines)


# -- the stack ------------------------------------------------------------------------


@dataclass
class DevStack:
    run_dir: Path
    rules: Path
    simulate: bool
    broker_kind: BrokerKind = "tansu"
    broker: TansuBroker | KafkaBroker | None = None
    redis: RedisServer | None = None
    worker: ManagedProcess | None = None
    senders: list[ManagedProcess] = field(default_factory=list)
    sender_ports: dict[str, int] = field(default_factory=dict)
    simulator: ManagedProcess | None = None
    ingest: ManagedProcess | None = None
    web_port: int = WEB_PORT
    ingest_port: int = INGEST_PORT
    transport: DevTransport = "console"
    webhook_url: str | None = None
    mail: MailCatcher | None = None

    @property
    def broker_url(self) -> str:
        return f"kafka://127.0.0.1:{BROKER_PORT}"

    @property
    def broker_name(self) -> str:
        """Which broker runs, for the ready line and the summary screen."""
        return f"Apache Kafka {KAFKA_VERSION}" if self.broker_kind == "kafka" else "Tansu, embedded"

    @property
    def dev_broker(self) -> bool:
        """Whether the workers need the Tansu workarounds (`Settings.dev_broker`)."""
        return self.broker_kind == "tansu"

    @property
    def redis_url(self) -> str:
        return self.redis.url if self.redis is not None else "-"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}/metrics"

    @property
    def ingest_url(self) -> str:
        return f"http://127.0.0.1:{self.ingest_port}"

    @property
    def mail_note(self) -> str:
        """Where the mail catcher listens and writes, for the ready line and the screen."""
        if self.mail is None:
            return "-"
        return f"{self.mail.url}, emails in {self.run_dir}/email-*.eml"

    def sender_env(self, channel: str) -> dict[str, str]:
        """The channel's sender settings: every sender to the webhook, or console ones
        with email over SMTP to the mail catcher."""
        if self.transport == "webhook":
            assert self.webhook_url is not None
            return {
                "OMNICUE_SENDER_TRANSPORT": "webhook",
                "OMNICUE_SENDER_URL": self.webhook_url,
                "OMNICUE_WEBHOOK_SECRET": os.environ.get("OMNICUE_WEBHOOK_SECRET")
                or DEV_WEBHOOK_SECRET,
            }
        if channel == "email" and self.mail is not None:
            return {
                "OMNICUE_SENDER_TRANSPORT": "smtp",
                "OMNICUE_SENDER_URL": self.mail.url,
                "OMNICUE_SENDER_UNSUBSCRIBE_URL": os.environ.get("OMNICUE_SENDER_UNSUBSCRIBE_URL")
                or DEV_UNSUBSCRIBE_URL,
            }
        return {"OMNICUE_SENDER_TRANSPORT": "console"}

    @property
    def write_keys(self) -> str:
        return os.environ.get("OMNICUE_INGEST_WRITE_KEYS") or DEV_WRITE_KEYS

    def children(self) -> list[ManagedProcess]:
        """Every started process, in start order."""
        procs: list[ManagedProcess | None] = [
            self.broker,
            self.redis,
            self.worker,
            *self.senders,
            self.ingest,
            self.simulator,
        ]
        return [p for p in procs if p is not None]

    def check_alive(self) -> None:
        for proc in self.children():
            if proc.pid is not None and not proc.running:
                raise ChildDied(proc)

    def child_env(self, **extra: str) -> dict[str, str]:
        assert self.redis is not None
        env = dict(os.environ)
        env.update(
            OMNICUE_BROKER=self.broker_url,
            OMNICUE_REDIS_URL=self.redis.url,
            OMNICUE_DEV_BROKER="true" if self.dev_broker else "false",
            OMNICUE_RULES=str(self.rules),
            # RocksDB like production, unless the developer asked for another store.
            OMNICUE_STORE=os.environ.get("OMNICUE_STORE", "rocksdb://"),
            OMNICUE_DATA_DIR=str(self.run_dir / "worker-data"),
            OMNICUE_WEB_PORT=str(self.web_port),
            OMNICUE_INGEST_HOST="127.0.0.1",
            OMNICUE_INGEST_PORT=str(self.ingest_port),
            OMNICUE_INGEST_WRITE_KEYS=self.write_keys,
            PYTHONPATH=_pythonpath(),
            # Print lines must reach the log (and our readiness checks) right away.
            PYTHONUNBUFFERED="1",
            # Marks every Python child of this run, e.g. for a leak check in tests.
            OMNICUE_DEV_RUN=str(self.run_dir),
        )
        env.update(extra)
        return env

    def _python(self, name: str, args: list[str], env: dict[str, str]) -> ManagedProcess:
        proc = ManagedProcess(
            [sys.executable, "-m", "omnicue.cli", *args],
            log_path=self.run_dir / f"{name}.log",
            env=env,
            name=name,
        )
        proc.start()
        _say(f"started {name} (pid {proc.pid}), log {proc.log_path}")
        return proc

    def start(self) -> None:
        from omnicue.topics import create_topics

        log_path = self.run_dir / "broker.log"
        if self.broker_kind == "kafka":
            # In the run directory beside its log; a fresh cluster each run.
            self.broker = KafkaBroker(
                BROKER_PORT, log_path=log_path, data_dir=self.run_dir / "broker-data"
            )
            self.broker.start(timeout=KAFKA_START_TIMEOUT)
        else:
            self.broker = TansuBroker(BROKER_PORT, log_path=log_path)
            self.broker.start(timeout=30)
        _say(f"started broker {self.broker.url} (pid {self.broker.pid}): {self.broker_name}")

        redis_port = _port_or_free(REDIS_PORT)
        if redis_port != REDIS_PORT:
            _say(f"port {REDIS_PORT} is taken: Redis uses port {redis_port} instead")
        self.redis = RedisServer(redis_port, log_path=self.run_dir / "redis.log")
        self.redis.start(timeout=30)
        _say(f"started redis {self.redis.url} (pid {self.redis.pid})")

        self.web_port = _port_or_free(WEB_PORT)
        settings = Settings(
            broker=self.broker_url,
            redis_url=self.redis.url,
            dev_broker=self.dev_broker,
            data_dir=self.run_dir / "worker-data",
            web_port=self.web_port,
        )
        created = create_topics(settings)
        _say(f"created {len(created)} topic(s) with {settings.partitions} partitions")

        # Worker, senders and the ingest start together: their group joins overlap.
        self.worker = self._python("worker", ["worker"], self.child_env())
        self.ingest_port = _port_or_free(INGEST_PORT)
        if self.ingest_port != INGEST_PORT:
            _say(f"port {INGEST_PORT} is taken: the ingest uses port {self.ingest_port} instead")
        self.ingest = self._python("ingest", ["ingest"], self.child_env())
        from senders.mail_catcher import MailCatcher

        # In this process (a thread), before the email sender that sends to it.
        self.mail = MailCatcher(self.run_dir)
        self.mail.start()
        _say(f"started mail catcher {self.mail.url}, emails in {self.run_dir}")
        for channel in ACTION_CHANNELS:
            port = free_port()
            self.sender_ports[channel] = port
            env = self.child_env(OMNICUE_SENDER_METRICS_PORT=str(port), **self.sender_env(channel))
            self.senders.append(
                self._python(f"sender-{channel}", ["send", "--channel", channel], env)
            )

        worker = self.worker
        waits: dict[str, Callable[[], bool]] = {
            "worker": lambda: (
                bool(WORKER_READY.search(worker.log_text())) and _http_ok(self.metrics_url)
            ),
        }
        for channel, sender in zip(ACTION_CHANNELS, self.senders, strict=True):
            waits[f"sender-{channel}"] = _line_check(sender, f"sender {channel} ready")
        waits["ingest"] = lambda: _http_ok(f"{self.ingest_url}/health")
        self._wait(waits)

        if self.simulate:
            # Web and app traffic through the ingest, as a site's Segment library sends it.
            key = next(iter(parse_write_keys(self.write_keys)))
            args = ["simulate", "--ingest", self.ingest_url, "--write-key", key]
            self.simulator = self._python("simulator", args, self.child_env())
            simulator = self.simulator
            self._wait({"simulator": lambda: bool(SIMULATOR_READY.search(simulator.log_text()))})

    def _wait(self, checks: dict[str, Callable[[], bool]]) -> None:
        """Until every check passes; any child dying meanwhile ends the wait at once."""
        pending = dict(checks)
        deadline = time.monotonic() + READY_TIMEOUT
        while pending:
            self.check_alive()
            for name, check in list(pending.items()):
                if check():
                    del pending[name]
            if not pending:
                return
            if time.monotonic() >= deadline:
                procs = {p.name: p for p in self.children()}
                tails = "\n".join(procs[n].log_tail() for n in pending if n in procs)
                raise ServiceError(
                    f"not ready after {READY_TIMEOUT:.0f}s: {', '.join(pending)}\n{tails}"
                )
            time.sleep(0.2)

    def stop(self) -> None:
        """Producers first, so nothing writes to a stopping broker; infrastructure last."""
        if self.simulator is not None:
            self._stop(self.simulator, 10)
        if self.ingest is not None:
            self._stop(self.ingest, 15)
        # Signal all senders first so they shut down in parallel, then reap each. Only
        # once: a second SIGTERM means "die now" to a sender that is still closing.
        for sender in self.senders:
            sender.kill(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for sender in self.senders:
            if sender.pid is not None:
                try:
                    sender.wait(max(0.1, deadline - time.monotonic()))
                except ServiceError:
                    pass  # stop() below escalates to SIGKILL
            self._stop(sender, 1)
        if self.mail is not None:
            self.mail.stop()
        if self.worker is not None:
            self._stop(self.worker, WORKER_STOP_TIMEOUT)
        if self.redis is not None:
            self._stop(self.redis, 10)
        if self.broker is not None:
            kafka = isinstance(self.broker, KafkaBroker)
            self._stop(self.broker, KAFKA_STOP_TIMEOUT if kafka else 10)
        if not any(p.running for p in self.children()):
            # The tables' changelogs lived in this run's broker (in memory, or a Kafka
            # cluster no later run starts again), so this state can never be used
            # again; only the logs are worth keeping.
            shutil.rmtree(self.run_dir / "worker-data", ignore_errors=True)
            shutil.rmtree(self.run_dir / "broker-data", ignore_errors=True)

    @staticmethod
    def _stop(proc: ManagedProcess, timeout: float) -> None:
        try:
            code = proc.stop(timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - the next child must be stopped regardless
            _say(f"could not stop {proc.name} (pid {proc.pid}): {exc}", err=True)
            return
        if code is not None:
            _say(f"stopped {proc.name} (pid {proc.pid}, exit code {code})")

    def metrics(self, at: float) -> Snapshot:
        text = _scrape(self.metrics_url)
        if text is None:
            return Snapshot(at=at, worker_up=False)
        snap = parse_worker_metrics(text, at)
        for port in self.sender_ports.values():
            sender_text = _scrape(f"http://127.0.0.1:{port}/metrics")
            if sender_text is not None:
                for channel, value in _sender_sent(sender_text).items():
                    _add(snap.sent, channel, value)
        return snap


def _senders_note(stack: DevStack) -> str:
    if stack.transport == "webhook":
        return f"webhook {stack.webhook_url}"
    return "console (email over SMTP to the mail catcher)"


def _keys_note(write_keys: str) -> str:
    if write_keys == DEV_WRITE_KEYS:
        return "write key dev, channel web"
    return "write keys from OMNICUE_INGEST_WRITE_KEYS"


def _line_check(proc: ManagedProcess, text: str) -> Callable[[], bool]:
    return lambda: text in proc.log_text()


@contextmanager
def _signals_interrupt() -> Iterator[Callable[[], None]]:
    """While active, SIGINT/SIGTERM/SIGHUP raise `_Interrupted` in the main thread.

    Yields a function that makes further signals harmless: once the shutdown has
    begun, a second Ctrl-C must not abort it halfway and leak children.
    """
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise _Interrupted(signum)

    def shutting_down(signum: int, frame: FrameType | None) -> None:
        _say("already stopping, please wait")

    def disarm() -> None:
        for sig in sigs:
            signal.signal(sig, shutting_down)

    previous = {sig: signal.signal(sig, interrupt) for sig in sigs}
    try:
        yield disarm
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _kafka_missing() -> str | None:
    """What Apache Kafka lacks on this machine (Java), said as how to get it; None if
    nothing does. Checked before anything starts, so a missing JVM leaves no
    half-started stack and no run directory behind."""
    try:
        find_java()
    except JavaNotFound as exc:
        return f"{exc}. `omnicue dev --broker tansu` (the default) needs only Python."
    return None


def _ensure_kafka_jars() -> str | None:
    """Resolve the broker's jars now, if the cache lacks them; an error message if
    that fails (no Maven, say). Before the run starts: it can take a minute."""
    # Without mvn, kafka_jars() says how to get it; a "fetching" first would mislead.
    if not (kafka_cache_root() / KAFKA_VERSION / STAMP_NAME).is_file() and shutil.which("mvn"):
        _say(
            f"omnicue dev: fetching Apache Kafka {KAFKA_VERSION}'s jars with Maven into "
            f"{kafka_cache_root()} (first use only; about a minute)"
        )
    try:
        kafka_jars(KAFKA_VERSION)
    except ServiceError as exc:
        return str(exc)
    except KeyboardInterrupt:
        # Before our signal handlers: a Ctrl-C here would end in a traceback otherwise.
        # The launcher drops the half-resolved jars itself; the next run starts over.
        return "interrupted while fetching Apache Kafka's jars; nothing was started"
    return None


def run_dev(
    rules: Path | None,
    simulate: bool,
    broker: BrokerKind = "tansu",
    transport: DevTransport = "console",
    webhook_url: str | None = None,
) -> int:
    """Start the stack, show the live summary until a signal; 0 on a clean stop."""
    from omnicue.rules import load_rules, packaged_rules_path
    from schemas.rules import RulesError

    rules_path = (rules or packaged_rules_path("demo")).resolve()
    try:
        ruleset = load_rules(rules_path)
    except RulesError as exc:
        _say(str(exc), err=True)
        return 2

    if broker == "kafka" and (missing := _kafka_missing()) is not None:
        _say(f"omnicue dev: {missing}", err=True)
        return 1

    if _port_in_use(BROKER_PORT):
        _say(
            f"omnicue dev: port {BROKER_PORT} is already in use, and the dev broker needs "
            f"127.0.0.1:{BROKER_PORT}. Stop what listens there (another Kafka, or another "
            f"`omnicue dev`), e.g. find it with `lsof -i :{BROKER_PORT}`.",
            err=True,
        )
        return 1

    if broker == "kafka" and (failed := _ensure_kafka_jars()) is not None:
        _say(f"omnicue dev: {failed}", err=True)
        return 1

    run_dir = _new_run_dir(Path(".omnicue/dev")).resolve()
    stack = DevStack(
        run_dir=run_dir,
        rules=rules_path,
        simulate=simulate,
        broker_kind=broker,
        transport=transport,
        webhook_url=webhook_url,
    )
    _say(f"omnicue dev: logs in {stack.run_dir}")
    _say(f"rules {rules_path}: {', '.join(r.id for r in ruleset.rules)}")
    started = time.monotonic()
    code = 0
    with _signals_interrupt() as disarm:
        try:
            stack.start()
            _say(
                f"omnicue dev ready in {time.monotonic() - started:.1f}s: "
                f"ingest {stack.ingest_url} ({_keys_note(stack.write_keys)}), "
                f"senders {_senders_note(stack)}, mail catcher {stack.mail_note}, "
                f"broker {stack.broker_url} ({stack.broker_name}), redis {stack.redis_url}, "
                f"worker metrics {stack.metrics_url}, logs {stack.run_dir}"
            )
            _summary_loop(stack, started)
        except _Interrupted as exc:
            disarm()
            _say(f"\n{signal.Signals(exc.signum).name}: stopping")
        except ChildDied as exc:
            disarm()
            _say(f"omnicue dev: {exc}\n{exc.proc.log_tail()}", err=True)
            code = 1
        except ServiceError as exc:
            disarm()
            _say(f"omnicue dev: {exc}", err=True)
            code = 1
        except Exception:
            # E.g. the broker refusing topic creation: still stop what runs, then explain.
            disarm()
            _say(traceback.format_exc(), err=True)
            code = 1
        finally:
            disarm()
            stack.stop()
    _say(f"omnicue dev stopped (exit code {code})")
    return code


def _summary_loop(stack: DevStack, started: float) -> None:
    tty = sys.stdout.isatty()
    refresh = TTY_REFRESH if tty else PLAIN_REFRESH
    before: Snapshot | None = None
    next_at = time.monotonic()
    while True:
        # Children are checked every second even when the summary prints every 5.
        stack.check_alive()
        now = time.monotonic()
        if now >= next_at:
            snap = stack.metrics(now)
            if tty:
                screen = render_screen(snap, before, now - started, stack)
                # Home + clear: redraw in place instead of scrolling.
                _say("\x1b[H\x1b[2J" + screen)
            else:
                _say(render_line(snap, before, now - started))
            if snap.worker_up:
                before = snap
            next_at = now + refresh
        time.sleep(min(1.0, max(0.0, next_at - time.monotonic())))
