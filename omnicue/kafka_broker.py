"""Apache Kafka as a child process: one KRaft node, broker and controller in one JVM.

The same broker as docker-compose.yml, started by the project itself, so that tests can
run against real Kafka where Tansu's quirks would hide or fake a behaviour. Nothing is
installed: the broker's jars are resolved from Maven Central by `deploy/kafka/pom.xml`
once per Kafka version, into a cache outside the repository (`kafka_cache_root()`), and
every later start uses that cache without running Maven. Java 17 or newer runs it.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Self

from kafka.admin import KafkaAdminClient
from kafka.errors import KafkaError

from omnicue.services import ManagedProcess, ServiceError, _accepts_tcp, free_port

log = logging.getLogger(__name__)

# Also the apache/kafka image tag in docker-compose.yml (a test keeps them equal). Kafka
# 4.x dropped the protocol versions older clients used (KIP-896); aiokafka 0.14,
# kafka-python 3.0 and faust-streaming 0.15.3 were checked against this one.
KAFKA_VERSION = "4.4.0"
JAVA_MIN_VERSION = 17

# The compose broker's settings (docker-compose.yml's KAFKA_* variables) as
# server.properties keys: the one place the launcher keeps them, and a test compares
# them with the compose file. What differs by design is set per run, in
# `KafkaBroker.server_settings()`: listeners and the controller quorum (free ports on
# 127.0.0.1 here, container names there), log.dirs (a temporary directory) and the
# cluster id (random per broker).
BROKER_SETTINGS: Mapping[str, str] = {
    "node.id": "1",
    "process.roles": "broker,controller",
    "listener.security.protocol.map": (
        "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,PLAINTEXT_HOST:PLAINTEXT"
    ),
    "controller.listener.names": "CONTROLLER",
    "inter.broker.listener.name": "PLAINTEXT",
    "offsets.topic.replication.factor": "1",
    "transaction.state.log.replication.factor": "1",
    "transaction.state.log.min.isr": "1",
    "group.initial.rebalance.delay.ms": "0",
    # Topics come from `omnicue topics create` (and Faust's own declarations).
    "auto.create.topics.enable": "false",
}

# The image's default heap is 1 GiB fixed; tests run several brokers beside workers on
# a 2-core machine, and a test broker's data fits in far less. The rest is what
# kafka-run-class.sh passes.
JVM_OPTIONS = (
    "-Xms256m",
    "-Xmx512m",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent",
    "-Djava.awt.headless=true",
)

KAFKA_POM = Path(__file__).resolve().parents[1] / "deploy" / "kafka" / "pom.xml"
STAMP_NAME = "resolved.json"
MAVEN_TIMEOUT = 600.0
FORMAT_TIMEOUT = 60.0

JAVA_MISSING = (
    f"Apache Kafka needs Java {JAVA_MIN_VERSION} or newer: "
    f"`apt-get install openjdk-{JAVA_MIN_VERSION}-jre-headless`, or set JAVA_HOME"
)
MAVEN_MISSING = (
    "Apache Kafka's jars are not in the cache {cache} yet, and resolving them needs "
    "Maven once: `apt-get install maven`, or put `mvn` on PATH"
)

# Console only: ManagedProcess sends stdout to the broker's log file. No file appenders,
# so nothing is written beside the data. Without shutdownHook="disable", log4j's own
# hook stops logging while Kafka's hook is still shutting down, and the log of a stop
# ends mid-way.
_LOG4J2_XML = """\
<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="warn" shutdownHook="disable">
  <Appenders>
    <Console name="stdout" target="SYSTEM_OUT">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
    </Console>
  </Appenders>
  <Loggers>
    <!-- A start dumps its whole configuration 9 times (some 3,000 lines of 3,400);
         server.properties beside this file says what was set. -->
    <Logger name="org.apache.kafka.common.config.AbstractConfig" level="warn"/>
    <Root level="info">
      <AppenderRef ref="stdout"/>
    </Root>
  </Loggers>
</Configuration>
"""


class JavaNotFound(ServiceError):
    """No java (or one older than JAVA_MIN_VERSION) on JAVA_HOME or PATH."""


class MavenNotFound(ServiceError):
    """The jar cache is empty and there is no `mvn` to fill it."""


# -- Java ---------------------------------------------------------------------------------


def find_java() -> Path:
    """The java to run Kafka with: $JAVA_HOME/bin/java, else the one on PATH."""
    java_home = os.environ.get("JAVA_HOME")
    candidate: str | None = None
    if java_home and os.access(Path(java_home) / "bin" / "java", os.X_OK):
        candidate = str(Path(java_home) / "bin" / "java")
    else:
        candidate = shutil.which("java")
    if candidate is None:
        raise JavaNotFound(JAVA_MISSING)
    version = _java_major_version(candidate)
    if version is None or version < JAVA_MIN_VERSION:
        found = f"Java {version}" if version is not None else "a java of unknown version"
        raise JavaNotFound(f"{JAVA_MISSING} ({candidate} is {found})")
    return Path(candidate)


def _java_major_version(java: str) -> int | None:
    try:
        probe = subprocess.run(
            [java, "-version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    # `openjdk version "17.0.15" 2025-04-15`; Java 8 and older say "1.8.0_392".
    match = re.search(r'version "(\d+)(?:\.(\d+))?', probe.stderr + probe.stdout)
    if match is None:
        return None
    major = int(match.group(1))
    if major == 1 and match.group(2) is not None:
        major = int(match.group(2))
    return major


# -- the jar cache ------------------------------------------------------------------------


def kafka_cache_root() -> Path:
    """Where each Kafka version's jars go: $OMNICUE_KAFKA_CACHE, else the XDG cache.

    Outside the repository: 45 jars (about 45 MB) are no source, and one cache serves
    every clone and work tree of the project.
    """
    override = os.environ.get("OMNICUE_KAFKA_CACHE")
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "omnicue" / "kafka"


def _pom_digest() -> str | None:
    try:
        return hashlib.sha256(KAFKA_POM.read_bytes()).hexdigest()
    except FileNotFoundError:
        # Installed without the repository's deploy/: a filled cache still works.
        return None


def _cache_is_complete(version_dir: Path, version: str) -> bool:
    try:
        stamp = json.loads((version_dir / STAMP_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(stamp, dict) or stamp.get("kafka_version") != version:
        return False
    digest = _pom_digest()
    # A changed pom (another logging binding, say) must resolve again.
    if digest is not None and stamp.get("pom_sha256") != digest:
        return False
    jars = stamp.get("jars")
    if not isinstance(jars, list) or not jars:
        return False
    libs = version_dir / "libs"
    return all(isinstance(jar, str) and (libs / jar).is_file() for jar in jars)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock: two test sessions with an empty cache resolve it once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def kafka_jars(version: str = KAFKA_VERSION) -> Path:
    """The directory holding the broker's jars; Maven fills it on first use only."""
    root = kafka_cache_root()
    version_dir = root / version
    if _cache_is_complete(version_dir, version):
        return version_dir / "libs"
    with _locked(root / f".{version}.lock"):
        # Another process may have filled it while we waited for the lock.
        if not _cache_is_complete(version_dir, version):
            _resolve(version, version_dir)
    return version_dir / "libs"


def _resolve(version: str, version_dir: Path) -> None:
    if not KAFKA_POM.is_file():
        raise ServiceError(
            f"Apache Kafka's jars are not in the cache {version_dir}, and {KAFKA_POM}, "
            "which resolves them, is missing: run from a checkout of the repository"
        )
    find_java()  # Maven runs on Java too; say so rather than let mvn fail obscurely.
    mvn = shutil.which("mvn")
    if mvn is None:
        raise MavenNotFound(MAVEN_MISSING.format(cache=version_dir))
    digest = _pom_digest()
    # Left by a resolution that was killed; we hold the lock, so none is running now.
    for stale in version_dir.parent.glob(f".{version}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{version}.partial-", dir=version_dir.parent))
    try:
        libs = partial / "libs"
        maven_log = partial / "maven.log"
        started = time.monotonic()
        with open(maven_log, "wb") as out:
            try:
                result = subprocess.run(
                    [
                        mvn, "-B", "-q",
                        "-f", str(KAFKA_POM),
                        f"-Dkafka.version={version}",
                        f"-DoutputDirectory={libs}",
                        "dependency:copy-dependencies",
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    timeout=MAVEN_TIMEOUT,
                    check=False,
                )  # fmt: skip
            except subprocess.TimeoutExpired as exc:
                raise ServiceError(
                    f"Maven did not resolve Apache Kafka {version} within "
                    f"{MAVEN_TIMEOUT:.0f}s; its output: {maven_log}"
                ) from exc
        jars = sorted(path.name for path in libs.glob("*.jar")) if libs.is_dir() else []
        if result.returncode != 0 or not any(jar.startswith("kafka_2.13-") for jar in jars):
            tail = "\n".join(maven_log.read_text(errors="replace").splitlines()[-30:])
            raise ServiceError(
                f"Maven could not resolve Apache Kafka {version} (exit code "
                f"{result.returncode}):\n{tail}"
            )
        stamp = {"kafka_version": version, "pom_sha256": digest, "jars": jars}
        (partial / STAMP_NAME).write_text(json.dumps(stamp, indent=1), encoding="utf-8")
        if version_dir.exists():
            shutil.rmtree(version_dir)  # an incomplete or outdated earlier resolution
        os.replace(partial, version_dir)
        log.info(
            "resolved Apache Kafka %s (%d jars) into %s in %.1fs",
            version, len(jars), version_dir, time.monotonic() - started,
        )  # fmt: skip
    finally:
        shutil.rmtree(partial, ignore_errors=True)


# -- the broker ---------------------------------------------------------------------------


def _random_cluster_id() -> str:
    # Kafka's Uuid in its string form: URL-safe base64 of 16 bytes, unpadded. Kafka's
    # own generator avoids a leading "-", which its command lines take for an option.
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def _properties_text(settings: Mapping[str, str]) -> str:
    """A .properties file, which Kafka reads as ISO-8859-1: a home directory with
    non-ASCII letters must reach it as \\uXXXX escapes."""

    def escape(text: str) -> str:
        out = []
        for char in text.replace("\\", "\\\\"):
            if ord(char) < 0x7F:
                out.append(char)
            else:
                # Java strings are UTF-16: a character beyond the BMP is two escapes.
                units = char.encode("utf-16-be")
                for i in range(0, len(units), 2):
                    out.append(f"\\u{int.from_bytes(units[i : i + 2], 'big'):04x}")
        return "".join(out)

    return "".join(f"{key}={escape(value)}\n" for key, value in settings.items())


class KafkaBroker(ManagedProcess):
    """Apache Kafka in KRaft mode, one combined broker and controller, on 127.0.0.1.

    Storage is formatted on the first start into `data_dir` (a temporary directory
    unless given); a later start of the same object reuses it, like a restarted broker.
    Leaving the context manager stops the broker and removes a temporary data_dir.
    `stop()` returns 143 after a clean stop: the JVM's exit status for SIGTERM, once
    Kafka's shutdown hook has finished.
    """

    def __init__(
        self,
        port: int,
        log_path: Path | None = None,
        *,
        controller_port: int | None = None,
        data_dir: Path | None = None,
        version: str = KAFKA_VERSION,
    ) -> None:
        self._port = port
        while controller_port is None or controller_port == port:
            controller_port = free_port()
        self.controller_port = controller_port
        self.version = version
        self._data_dir = data_dir
        self._owns_data_dir = data_dir is None
        # Compared at readiness: whatever else squats on the port has another cluster id.
        self.cluster_id = _random_cluster_id()
        # The command needs java and the jars, which start() finds (and may download),
        # so constructing a broker stays cheap.
        super().__init__(["java"], log_path=log_path, name=f"kafka-{port}")

    @property
    def port(self) -> int:
        return self._port

    @property
    def bootstrap_server(self) -> str:
        return f"127.0.0.1:{self._port}"

    @property
    def url(self) -> str:
        return f"kafka://127.0.0.1:{self._port}"

    @property
    def data_dir(self) -> Path:
        """The log dirs and config; a temporary directory made on first use unless given."""
        if self._data_dir is None:
            self._data_dir = Path(tempfile.mkdtemp(prefix=f"omnicue-kafka-{self._port}-"))
        return self._data_dir

    @property
    def config_path(self) -> Path:
        return self.data_dir / "config" / "server.properties"

    def server_settings(self) -> dict[str, str]:
        """server.properties: BROKER_SETTINGS plus this broker's addresses and log dir."""
        return {
            **BROKER_SETTINGS,
            "listeners": (
                f"CONTROLLER://127.0.0.1:{self.controller_port},PLAINTEXT://127.0.0.1:{self._port}"
            ),
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self._port}",
            "controller.quorum.voters": (
                f"{BROKER_SETTINGS['node.id']}@127.0.0.1:{self.controller_port}"
            ),
            "log.dirs": str(self.data_dir / "log"),
        }

    def start(self, timeout: float = 60.0) -> Self:
        """Find Java, resolve the jars if the cache lacks them, format, start, wait.

        `timeout` bounds the wait for the started broker; a first resolution (Maven)
        and the storage format have their own limits.
        """
        if self.running:
            raise ServiceError(f"{self.name} is already running (pid {self.pid})")
        java = find_java()
        classpath = f"{kafka_jars(self.version)}/*"
        config_dir = self.config_path.parent
        config_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(_properties_text(self.server_settings()), encoding="utf-8")
        log4j = config_dir / "log4j2.xml"
        log4j.write_text(_LOG4J2_XML, encoding="utf-8")
        jvm = [str(java), *JVM_OPTIONS, f"-Dlog4j2.configurationFile={log4j}", "-cp", classpath]
        if not (self.data_dir / "log" / "meta.properties").is_file():
            self._format(jvm)
        self.args = [*jvm, "kafka.Kafka", str(self.config_path)]
        return super().start(timeout)

    def _format(self, jvm: list[str]) -> None:
        """`kafka-storage.sh format`: KRaft refuses to start on an unformatted log dir."""
        command = [
            *jvm, "kafka.tools.StorageTool", "format",
            "--cluster-id", self.cluster_id,
            "--config", str(self.config_path),
            "--ignore-formatted",
        ]  # fmt: skip
        try:
            result = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=FORMAT_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise ServiceError(
                f"{self.name}: storage format still running after {FORMAT_TIMEOUT:.0f}s"
            ) from exc
        if result.returncode != 0:
            output = "\n".join((result.stdout + result.stderr).splitlines()[-30:])
            raise ServiceError(
                f"{self.name}: storage format failed with code {result.returncode}\n{output}"
            )

    def _ready(self) -> bool:
        # kafka-python logs every refused connection at ERROR level; skip that noise.
        if not _accepts_tcp(self._port):
            return False
        try:
            admin = KafkaAdminClient(
                bootstrap_servers=self.bootstrap_server,
                client_id="omnicue-probe",
                bootstrap_timeout_ms=1000,
                request_timeout_ms=2000,
            )
        except KafkaError:
            return False
        try:
            return bool(admin.describe_cluster()["cluster_id"] == self.cluster_id)
        except KafkaError:
            return False
        finally:
            admin.close()

    def remove_data(self) -> None:
        """Delete the data directory if this broker made it; only once it has stopped."""
        if self._owns_data_dir and self._data_dir is not None and not self.running:
            shutil.rmtree(self._data_dir, ignore_errors=True)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        super().__exit__(exc_type, exc, tb)
        self.remove_data()
