"""Sampling profiles of a worker with py-spy (optional: `pip install py-spy`).

py-spy attaches to the running worker, so the code under test runs unchanged;
the raw output (one collapsed stack per line with its sample count) is then
summarized as the frames with the most own and inclusive samples.
"""

from __future__ import annotations

import re
import shutil
import signal
import sys
from collections import Counter
from pathlib import Path

from omnicue.services import ManagedProcess, ServiceError

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?):(?P<line>\d+)\)$")


def py_spy_binary() -> str | None:
    # The venv's bin first: the bench usually runs without the venv activated.
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.is_file() else shutil.which("py-spy")


class Profiler:
    """`py-spy record` on one pid until stop(); only on-CPU samples (no --idle)."""

    def __init__(self, pid: int, output: Path, rate: int = 100) -> None:
        binary = py_spy_binary()
        if binary is None:
            raise ServiceError("--profile needs py-spy: pip install py-spy")
        self.output = output
        self.proc = ManagedProcess(
            [
                binary, "record", "--pid", str(pid), "--rate", str(rate),
                "--format", "raw", "--output", str(output),
                # Don't pause the worker at every sample: it would slow what we measure.
                "--nonblocking",
            ],
            log_path=output.with_suffix(".log"),
            name=f"py-spy-{pid}",
        )  # fmt: skip

    def start(self) -> Profiler:
        self.proc.start()
        return self

    def stop(self) -> Path:
        # SIGINT makes py-spy write its output and exit; SIGTERM would lose it.
        self.proc.kill(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        finally:
            self.proc.stop()
        return self.output


def _short(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    file = match["file"]
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    return f"{match['func']} ({file}:{match['line']})"


def summarize(raw: Path, top: int = 25) -> str:
    """Own and inclusive sample shares of the hottest frames, as readable text."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        # The first frame is the thread ("process 1:\"...\";..." in raw output) or the root.
        frames = [_short(f) for f in stack.split(";") if "(" in f]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return f"{raw}: no samples"
    lines = [f"{raw.name}: {total} on-CPU samples"]
    lines.append("  own time:")
    lines += [f"    {n / total:6.1%}  {frame}" for frame, n in own.most_common(top)]
    lines.append("  inclusive time:")
    lines += [f"    {n / total:6.1%}  {frame}" for frame, n in inclusive.most_common(top * 2)]
    return "\n".join(lines)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(summarize(Path(path)))
