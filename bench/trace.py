"""Where a worker's time goes, wall clock: a tracer loaded into the worker process.

    BENCH_TRACE=/tmp/trace.jsonl python -m bench.trace omnicue.cli worker

(`python -m bench.pipeline --trace` runs every worker so, one file per worker in
the work dir; `--worker-env BENCH_SET=...` runs them so too, see apply_overrides).
It changes nothing in the code under test; it wraps, in this process:

- every thread's selector `select()`: how long each event loop sat idle (the
  main loop, faust's consumer thread, ...), so busy = wall - idle per thread;
- while the main loop is idle, what each agent task is awaiting (its innermost
  await frames), weighted by the idle time: a wall-clock wait profile;
- spans: the customers agent's batches (`streams.customers.process_batch`), the
  outbox flushes (`streams.outbox.Outbox.flush`), faust's offset commits and
  producer flushes, the consumer thread's fetches (records returned, time).

Every `interval` seconds one JSON line of totals for that interval goes to the file.
"""

from __future__ import annotations

import asyncio
import json
import os
import runpy
import selectors
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

_lock = threading.Lock()
_idle: defaultdict[str, float] = defaultdict(float)  # thread name -> seconds blocked in select
_selects: Counter[str] = Counter()
# "task: await chain" -> main-loop idle seconds
_waits: defaultdict[str, float] = defaultdict(float)
_spans: defaultdict[str, list[float]] = defaultdict(list)  # name -> durations
_counts: Counter[str] = Counter()
_main = threading.main_thread()


def _chain(coro: Any, depth: int = 3) -> str:
    """The innermost `depth` frames a coroutine (or async generator) awaits in."""
    frames: list[str] = []
    seen = 0
    while coro is not None and seen < 40:
        seen += 1
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
        frame = frame or getattr(coro, "gi_frame", None)
        if frame is not None:
            name = frame.f_code.co_filename.rsplit("/", 1)[-1]
            frames.append(f"{frame.f_code.co_name}@{name}:{frame.f_lineno}")
        nxt = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
        coro = nxt or getattr(coro, "gi_yieldfrom", None)
    return " > ".join(frames[-depth:])


def _agent_tasks(loop: asyncio.AbstractEventLoop) -> list[tuple[str, Any]]:
    out = []
    for task in asyncio.all_tasks(loop):
        text = _chain(task.get_coro(), depth=40)
        for marker, label in (
            ("ingest@ingest.py", "ingest"),
            ("customers@customers.py", "customers"),
            ("_drain_messages", "fetch-loop"),
        ):
            if marker in text:
                out.append((label, task.get_coro()))
    return out


def _wrap_select(cls: type[selectors.BaseSelector]) -> None:
    original = cls.select

    def select(self: Any, timeout: float | None = None) -> Any:
        name = threading.current_thread().name
        tasks: list[tuple[str, Any]] = []
        if threading.current_thread() is _main and (timeout is None or timeout > 0):
            loop = asyncio.events._get_running_loop()
            if loop is not None:
                tasks = _agent_tasks(loop)
        started = time.perf_counter()
        try:
            return original(self, timeout)
        finally:
            spent = time.perf_counter() - started
            with _lock:
                _idle[name] += spent
                _selects[name] += 1
                for label, coro in tasks:
                    _waits[f"{label}: {_chain(coro)}"] += spent

    cls.select = select  # type: ignore[method-assign]


def span(name: str, seconds: float, count: int = 0) -> None:
    with _lock:
        _spans[name].append(seconds)
        if count:
            _counts[name] += count


def _timed(name: str, fn: Callable[..., Awaitable[Any]], size: Callable[..., int] | None = None
           ) -> Callable[..., Awaitable[Any]]:
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        items = size(*args, **kwargs) if size else 0
        # Which agent: the coroutine that awaits this one.
        caller = sys._getframe(1).f_code.co_name
        started = time.perf_counter()
        try:
            return await fn(*args, **kwargs)
        finally:
            span(f"{name}[{caller}]", time.perf_counter() - started, items)

    return wrapper


def _patch() -> None:
    for cls_name in ("EpollSelector", "SelectSelector", "PollSelector"):
        cls = getattr(selectors, cls_name, None)
        if cls is not None:
            _wrap_select(cls)
    import faust.transport.consumer as fc
    from faust.transport.drivers import aiokafka as fa

    import streams.customers as customers
    import streams.outbox as outbox

    customers.process_batch = _timed(  # type: ignore[assignment]
        "customers.batch", customers.process_batch, lambda p, batch: len(batch)
    )
    outbox.Outbox.flush = _timed(  # type: ignore[method-assign,assignment]
        "outbox.flush", outbox.Outbox.flush, lambda self: len(self._records)
    )
    fc.Consumer._commit_offsets = _timed(  # type: ignore[method-assign,assignment]
        "faust.commit_offsets", fc.Consumer._commit_offsets
    )
    original_fetch = fa.AIOKafkaConsumerThread._fetch_records

    async def fetch(self: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        records = await original_fetch(self, *args, **kwargs)
        span("thread.fetch", time.perf_counter() - started,
             sum(len(v) for v in (records or {}).values()))
        return records

    fa.AIOKafkaConsumerThread._fetch_records = fetch  # type: ignore[method-assign]
    original_flush = fa.Producer.flush

    async def producer_flush(self: Any) -> None:
        started = time.perf_counter()
        await original_flush(self)
        span("faust.producer_flush", time.perf_counter() - started)

    fa.Producer.flush = producer_flush  # type: ignore[method-assign]


def _schedstat() -> dict[str, tuple[float, float]]:
    """Per thread: seconds on a CPU, and seconds runnable but waiting for one."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, tuple[float, float]] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                run_ns, wait_ns, _ = f.read().split()
        except OSError:
            continue
        name = names.get(int(tid), f"tid-{tid}")
        prev: tuple[float, float] = out.get(name, (0.0, 0.0))
        out[name] = (prev[0] + int(run_ns) / 1e9, prev[1] + int(wait_ns) / 1e9)
    return out


def _reporter(path: str, interval: float) -> None:
    last = time.perf_counter()
    cpu_last = time.process_time()
    sched_last = _schedstat()
    with open(path, "a", encoding="utf-8") as out:
        while True:
            time.sleep(interval)
            now, cpu = time.perf_counter(), time.process_time()
            sched = _schedstat()
            # Per thread: on a CPU, and runnable but waiting for one (machine contention).
            zero = (0.0, 0.0)
            oncpu = {k: round(v[0] - sched_last.get(k, zero)[0], 3) for k, v in sched.items()}
            runq = {k: round(v[1] - sched_last.get(k, zero)[1], 3) for k, v in sched.items()}
            sched_last = sched
            with _lock:
                spans = {
                    k: {"n": len(v), "sum_s": round(sum(v), 3),
                        "max_ms": round(max(v) * 1000, 1), "items": _counts[k]}
                    for k, v in _spans.items() if v
                }
                record = {
                    "t": round(time.time(), 2),
                    "wall_s": round(now - last, 3),
                    "cpu_s": round(cpu - cpu_last, 3),
                    "idle_s": {k: round(v, 3) for k, v in _idle.items()},
                    "oncpu_s": {k: v for k, v in oncpu.items() if v >= 0.005},
                    "runqueue_s": {k: v for k, v in runq.items() if v >= 0.005},
                    "selects": dict(_selects),
                    "spans": spans,
                    "waits": {
                        k: round(v, 3)
                        for k, v in sorted(_waits.items(), key=lambda kv: -kv[1])[:15]
                    },
                }
                _idle.clear()
                _selects.clear()
                _waits.clear()
                _spans.clear()
                _counts.clear()
            last, cpu_last = now, cpu
            out.write(json.dumps(record) + "\n")
            out.flush()


def install(path: str, interval: float = 2.0) -> None:
    _patch()
    threading.Thread(target=_reporter, args=(path, interval), daemon=True,
                     name="bench-trace").start()


def apply_overrides(spec: str) -> None:
    """`module.attr=value;...`: experiments on module constants, code unchanged.

    A value is a Python literal (`1500`, `True`), or `@module:attr` for an object.
    Used for measured A/B pairs, e.g. faust's fetch wait against ours:
    `BENCH_SET=streams.consumer.FETCH_MAX_WAIT_MS=1500`.
    """
    import ast
    import importlib

    for item in filter(None, (part.strip() for part in spec.split(";"))):
        target, _, raw = item.partition("=")
        module_name, _, attr = target.rpartition(".")
        module = importlib.import_module(module_name)
        if raw.startswith("@"):
            source, _, name = raw[1:].partition(":")
            value = getattr(importlib.import_module(source), name)
        else:
            value = ast.literal_eval(raw)
        if not hasattr(module, attr):
            raise SystemExit(f"BENCH_SET: {module_name} has no {attr}")
        setattr(module, attr, value)


def main() -> None:
    if os.environ.get("BENCH_SET"):
        apply_overrides(os.environ["BENCH_SET"])
    path = os.environ.get("BENCH_TRACE")
    if path:
        install(path, float(os.environ.get("BENCH_TRACE_INTERVAL", "2.0")))
    module, sys.argv = sys.argv[1], [sys.argv[1], *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
