"""The HTML report in a real browser: headless Chromium, offline, and every chart drew.

`omnicue report --html` writes one page with plotly.js inlined. Here Debian's
`chromium` (installed by `.ci/run`) opens it from a file with every host name
unresolvable, runs its scripts and dumps the DOM; each chart container must then
hold plotly's SVG with data traces that drew something.

Without chromium the test skips with the reason; with CI set it fails instead
(as `tests/brokers.py` does for Java), so CI never passes by skipping it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

from omnicue.cli import app
from omnicue.report import write_html
from schemas.report import MODELS, Report
from tests.brokers import in_ci
from tests.omnicue.test_report import RULES_YAML, generated_events

BROWSERS = ("chromium", "chromium-browser")
RENDER_TIMEOUT = 60.0  # seconds of wall clock; the page takes about 2 s
# HTML elements without an end tag: they never enclose a chart's content.
VOID = frozenset(
    "area base br col embed hr img input link meta source track wbr".split()
)  # fmt: skip
# A path that draws: a command after the first move-to (a lone "M0,0" draws nothing).
DRAWS = re.compile(r"[LHVCSQTAZlhvcsqtaz]")


def chromium() -> str:
    """The browser's path; skips (or fails, in CI) where there is none."""
    for name in BROWSERS:
        path = shutil.which(name)
        if path is not None:
            return path
    reason = "headless Chromium not found (apt-get install chromium; .ci/run installs it)"
    if in_ci():
        pytest.fail(f"{reason}; CI must render the report, not skip it")
    pytest.skip(reason)


def render(page: Path, profile: Path) -> str:
    """The DOM after the page's scripts ran, offline: no host name resolves."""
    command = [
        chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-extensions", "--disable-background-networking",
        "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={profile}",
        "--window-size=1280,900", "--virtual-time-budget=10000", "--dump-dom",
        page.resolve().as_uri(),
    ]  # fmt: skip
    # Its own session, so a hung browser is stopped with all its child processes.
    with subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
        start_new_session=True,
    ) as browser:
        try:
            dom, errors = browser.communicate(timeout=RENDER_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(browser.pid, signal.SIGKILL)
            browser.communicate()
            pytest.fail(f"chromium did not render {page} within {RENDER_TIMEOUT:.0f} s")
    assert browser.returncode == 0 and dom, (
        f"chromium exited {browser.returncode}:\n{errors[-3000:]}"
    )
    return dom


@dataclass
class Chart:
    """What one chart container holds once the page ran."""

    id: str
    heading: str = ""
    main_svgs: int = 0
    traces: int = 0
    drawn_paths: int = 0

    def problem(self) -> str | None:
        if self.main_svgs == 0:
            return "no svg.main-svg: plotly did not draw it"
        if self.traces == 0:
            return "no data trace: an empty plot"
        if self.drawn_paths == 0:
            return f"{self.traces} trace(s) but no mark drawn"
        return None


@dataclass
class ChartParser(HTMLParser):
    """The page's chart containers (plotly's `plotly-graph-div`) and their SVG."""

    charts: dict[str, Chart] = field(default_factory=dict)
    _open: list[str] = field(default_factory=list)
    _chart: tuple[Chart, int] | None = None  # the chart being read, its depth
    _trace_depths: list[int] = field(default_factory=list)
    _heading: str | None = None
    _last_heading: str = ""

    def __post_init__(self) -> None:
        super().__init__(convert_charrefs=True)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        classes = (values.get("class") or "").split()
        depth = len(self._open)
        if tag == "h2":
            self._heading = ""
        if tag == "div" and "plotly-graph-div" in classes:
            chart = Chart(values.get("id") or f"chart #{len(self.charts) + 1}", self._last_heading)
            self.charts[chart.id] = chart
            self._chart = (chart, depth)
        elif self._chart is not None:
            chart = self._chart[0]
            if tag == "svg" and "main-svg" in classes:
                chart.main_svgs += 1
            elif tag == "g" and "trace" in classes:
                chart.traces += 1
                self._trace_depths.append(depth)
            elif tag == "path" and self._trace_depths and DRAWS.search(values.get("d") or ""):
                chart.drawn_paths += 1
        if tag not in VOID:
            self._open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag not in self._open:
            return
        while self._open and self._open.pop() != tag:
            pass
        depth = len(self._open)
        while self._trace_depths and self._trace_depths[-1] >= depth:
            self._trace_depths.pop()
        if self._chart is not None and self._chart[1] >= depth:
            self._chart = None
        if tag == "h2" and self._heading is not None:
            self._last_heading, self._heading = self._heading.strip(), None

    def handle_data(self, data: str) -> None:
        if self._heading is not None:
            self._heading += data


def charts_in(page: str) -> dict[str, Chart]:
    parser = ChartParser()
    parser.feed(page)
    parser.close()
    return parser.charts


def undrawn(page: Path, dom: str) -> list[str]:
    """One line per chart container of the page that did not draw with data."""
    expected = charts_in(page.read_text(encoding="utf-8"))
    assert expected, f"{page} has no chart container"
    drawn = charts_in(dom)
    problems = []
    for chart_id, chart in expected.items():
        rendered = drawn.get(chart_id)
        problem = "missing from the rendered page" if rendered is None else rendered.problem()
        if problem is not None:
            problems.append(f"{chart_id} ({chart.heading!r}): {problem}")
    return problems


def report_html(tmp_path: Path) -> Path:
    """`omnicue report --html` on a replay of two weeks of simulator visits."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES_YAML, encoding="utf-8")
    events = generated_events(tmp_path / "events.jsonl", journeys=200)
    actions, decisions = tmp_path / "actions.jsonl", tmp_path / "decisions.jsonl"
    runner = CliRunner()
    replayed = runner.invoke(
        app,
        ["replay", str(events), "--out", str(actions), "--rules", str(rules),
         "--decisions", str(decisions)],
    )  # fmt: skip
    assert replayed.exit_code == 0, replayed.output
    page = tmp_path / "report.html"
    reported = runner.invoke(
        app,
        ["report", "--events", str(events), "--actions", str(actions),
         "--decisions", str(decisions), "--rules", str(rules),
         "--json", str(tmp_path / "report.json"), "--html", str(page)],
    )  # fmt: skip
    assert reported.exit_code == 0, reported.output
    return page


def test_every_chart_of_the_report_draws_offline_in_chromium(tmp_path: Path) -> None:
    chromium()  # skip before building anything
    page = report_html(tmp_path)
    assert len(charts_in(page.read_text(encoding="utf-8"))) == 5
    dom = render(page, tmp_path / "profile")
    problems = undrawn(page, dom)
    assert not problems, "charts that did not draw:\n" + "\n".join(problems)


def test_an_empty_report_is_caught_as_charts_without_data(tmp_path: Path) -> None:
    """The check above can fail: plotly draws axes for an empty figure, but no trace."""
    chromium()
    report = Report(
        conversions=0, attributed_conversions=0, revenue=0.0, attributed_revenue=0.0,
        attribution={m: {} for m in MODELS}, lift={}, funnel={}, paths=[],
    )  # fmt: skip
    page = tmp_path / "empty.html"
    write_html(report, page)
    problems = undrawn(page, render(page, tmp_path / "profile"))
    named = [line.split(" ", 1)[0] for line in problems]
    assert named == list(charts_in(page.read_text(encoding="utf-8"))), problems
    assert all("no data trace" in line for line in problems), problems
