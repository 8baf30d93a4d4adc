"""One tiny run of the webhook sender benchmark (bench.webhook_send), end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_a_tiny_run_reports_both_rates() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.webhook_send", "--actions", "200", "--rounds", "1",
         "--concurrency", "8"],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    [round_] = report["rounds"]
    assert round_["bare_aiohttp_per_s"] > 0 and round_["sender_per_s"] > 0
    assert report["median_ratio"] == round_["ratio"]
