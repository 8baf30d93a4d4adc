"""bench.replay's partitioned mode on a tiny input: the scaled file stays a time-ordered
REES46 file, and N = 1 and 2 run in one go (and agree, which the bench asserts)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from bench.replay import generate, main, scale_rees46


def test_scaling_repeats_the_sample_with_new_users_and_later_times(tmp_path: Path) -> None:
    sample = tmp_path / "sample.csv"
    generate(sample, 200)
    scaled = tmp_path / "scaled.csv"
    assert scale_rees46(sample, scaled, 500) == 600
    rows = list(csv.reader(scaled.open()))[1:]
    assert len(rows) == 600
    assert [r[0] for r in rows] == sorted(r[0] for r in rows)
    first, third = rows[0], rows[400]
    assert int(third[7]) - 2_000_000_000 == int(first[7])
    assert third[8].endswith("-2")


def test_workers_mode_writes_a_table_and_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "scaling.json"
    assert main(["--events", "400", "--workers", "1,2", "--repeat", "1", "--json", str(out)]) == 0
    assert "speed-up" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert [r["workers"] for r in data["results"]] == [1, 2]
    assert len(data["runs"]) == 2
