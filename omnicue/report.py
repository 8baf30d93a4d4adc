"""`omnicue report`: did it work? Attribution, lift, funnels and paths, offline.

The shell around `measure`: it reads the event log (with the replay's readers),
the actions and decisions JSONL a replay (or the live topics) wrote, and the rules
file; `measure.report.build_report` does the counting; this module writes the JSON
(`schemas/json/report.schema.json`) and a self-contained HTML page of charts.
"""

from __future__ import annotations

import html
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import IO, Any, TextIO, TypeVar

from pydantic import BaseModel, ValidationError

from measure.report import ReportConfig, build_report
from measure.touches import (
    conversions_from,
    decision_links,
    identity_links,
    resolve,
    touches_from,
)
from omnicue.replay import MAX_REPORTED_INVALID, Format, Rees46Reader, open_events, read_jsonl
from omnicue.rules import read_rules_file
from schemas.actions import Action
from schemas.decisions import Decision
from schemas.events import (
    Alias,
    CartItemAdded,
    CartItemRemoved,
    Event,
    MessageFeedback,
    OrderCompleted,
    describe_validation_error,
)
from schemas.report import MODELS, Report
from schemas.rules import RulesFile
from triggers.guards import pick_variant
from triggers.replay import InvalidLine

Model = TypeVar("Model", bound=BaseModel)


class ReportInputError(ValueError):
    """An input file that cannot be used at all."""


@dataclass
class MeasuredEvents:
    """What of an event log the report needs: orders, feedback, identity, carts."""

    orders: list[OrderCompleted] = field(default_factory=list)
    feedback: list[MessageFeedback] = field(default_factory=list)
    identity: list[Event] = field(default_factory=list)
    cart_changes: list[CartItemAdded | CartItemRemoved] = field(default_factory=list)
    events: int = 0
    invalid: int = 0


def read_events(stream: IO[bytes], fmt: Format) -> MeasuredEvents:
    """Keep the events measurement looks at; count (and skip) invalid lines."""
    kept = MeasuredEvents()
    items: Iterator[Event | InvalidLine] = (
        iter(Rees46Reader(stream)) if fmt == "rees46" else read_jsonl(stream)
    )
    for item in items:
        if isinstance(item, InvalidLine):
            kept.invalid += 1
            continue
        kept.events += 1
        if isinstance(item, OrderCompleted):
            kept.orders.append(item)
        elif isinstance(item, MessageFeedback):
            kept.feedback.append(item)
        elif isinstance(item, CartItemAdded | CartItemRemoved):
            kept.cart_changes.append(item)
        if isinstance(item, Alias) or (
            item.customer_id is not None and item.anonymous_id is not None
        ):
            kept.identity.append(item)
    return kept


def read_records(path: Path, model: type[Model], stderr: TextIO) -> list[Model]:
    """One model per JSONL line; invalid lines are reported and skipped."""
    records: list[Model] = []
    shown = 0
    with open(path, "rb") as stream:
        for number, line in enumerate(stream, 1):
            if not line.strip():
                continue
            try:
                records.append(model.model_validate_json(line))
            except ValidationError as exc:
                shown += 1
                if shown <= MAX_REPORTED_INVALID:
                    print(f"{path}:{number}: {describe_validation_error(exc)}", file=stderr)
    return records


def config_from_rules(rules: RulesFile, lookback: timedelta, half_life: timedelta) -> ReportConfig:
    """Holdouts, conversion windows, categories, costs and the cart rule from the file."""
    by_id = {rule.id: rule for rule in rules.rules}
    cart_rules = [r for r in rules.rules if "cart.item_added" in r.trigger.events]

    def variant_of(rule_id: str, customer_id: str) -> str | None:
        # The engine's own pick: stable per customer, so also right for customers who
        # were never sent anything.
        rule = by_id.get(rule_id)
        return pick_variant(rule_id, rule.variants, customer_id) if rule is not None else None

    return ReportConfig(
        lookback=lookback,
        half_life=half_life,
        holdout_rules=frozenset(r.id for r in rules.rules if r.holdout > 0),
        global_holdout=rules.policy.holdout > 0,
        windows={r.id: r.conversion.within for r in rules.rules if r.conversion is not None},
        transactional_rules=frozenset(r.id for r in rules.rules if r.category == "transactional"),
        costs={str(channel): cost for channel, cost in rules.policy.costs.items()},
        cart_rule=cart_rules[0].id if cart_rules else None,
        cart_delay=cart_rules[0].steps[0].after if cart_rules else timedelta(minutes=30),
        variant_of=variant_of if any(r.variants for r in rules.rules) else None,
    )


def make_report(
    events_path: Path,
    fmt: Format,
    actions_path: Path,
    decisions_path: Path,
    rules_path: Path | None,
    lookback: timedelta,
    half_life: timedelta,
    stderr: TextIO | None = None,
) -> tuple[Report, MeasuredEvents]:
    """Read everything and measure. Raises `RulesError`, `ReplayInputError`, `OSError`."""
    err = stderr if stderr is not None else sys.stderr
    rules = read_rules_file(rules_path)
    with open_events(events_path) as (stream, _):  # plain, gzip or zstd
        measured = read_events(stream, fmt)
    actions = read_records(actions_path, Action, err)
    decisions = read_records(decisions_path, Decision, err)
    links = identity_links(measured.identity) | decision_links(decisions)

    def resolved(key: str) -> str:
        return resolve(links, key)

    report = build_report(
        touches_from(actions, measured.feedback, links),
        conversions_from(measured.orders, links),
        decisions,
        measured.cart_changes,
        config_from_rules(rules, lookback, half_life),
        resolved,
    )
    return report, measured


def write_json(report: Report, path: Path) -> None:
    path.write_text(report.model_dump_json(indent=2) + "\n", encoding="utf-8")


def summary(report: Report) -> str:
    """A few lines for the terminal."""
    share = report.attributed_conversions / report.conversions if report.conversions else 0.0
    lines = [
        f"conversions:       {report.conversions:,} (revenue {report.revenue:,.2f})",
        f"attributed:        {report.attributed_conversions:,} ({share:.1%}), "
        f"revenue {report.attributed_revenue:,.2f}",
    ]
    for model in MODELS:
        by = report.attribution.get(model, {})
        parts = ", ".join(f"{ch} {c.conversions:,.2f}" for ch, c in by.items())
        lines.append(f"  {model + ':':<16} {parts or '-'}")
    for rule, result in report.lift.items():
        t, c = result.treatment, result.control
        if result.abs_lift is None or result.ci95 is None:
            numbers = "no lift (a group is empty)"
        else:
            lo, hi = result.ci95
            numbers = f"lift {result.abs_lift:+.2%} [{lo:+.2%}, {hi:+.2%}]"
        lines.append(
            f"lift {rule}: treatment {t.converted:,}/{t.customers:,}, "
            f"control {c.converted:,}/{c.customers:,}: {numbers}"
        )
    for channel, f in report.funnel.items():
        lines.append(
            f"funnel {channel}: sent {f.sent:,}, delivered {f.delivered:,}, "
            f"opened {f.opened:,}, clicked {f.clicked:,}, converted {f.converted:,}"
        )
    for path in report.paths[:5]:
        lines.append(f"path {' -> '.join(path.path)}: {path.conversions:,}")
    return "\n".join(lines)


# ------------------------------------------------------------------------ HTML


def figures(report: Report) -> list[tuple[str, str, Any]]:
    """(chart id, title, plotly figure) for each chart of the page."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    charts: list[tuple[str, str, Any]] = []

    funnel = go.Figure()
    stages = ["sent", "delivered", "opened", "clicked", "converted"]
    for channel, f in report.funnel.items():
        values = [f.sent, f.delivered, f.opened, f.clicked, f.converted]
        funnel.add_trace(go.Funnel(name=channel, y=stages, x=values, textinfo="value"))
    charts.append(("chart-funnel", "Funnel per channel", funnel))

    attribution = make_subplots(rows=1, cols=2, subplot_titles=("Conversions", "Revenue"))
    channels = sorted({ch for by in report.attribution.values() for ch in by})
    for index, channel in enumerate(channels):
        conversions = [report.attribution[m][channel].conversions for m in MODELS]
        revenue = [report.attribution[m][channel].revenue for m in MODELS]
        group = dict(name=channel, legendgroup=channel, marker_color=_colour(index))
        attribution.add_trace(go.Bar(x=list(MODELS), y=conversions, **group), row=1, col=1)
        attribution.add_trace(
            go.Bar(x=list(MODELS), y=revenue, showlegend=False, **group), row=1, col=2
        )
    attribution.update_layout(barmode="stack")
    charts.append(("chart-attribution", "Attribution by channel, per model", attribution))

    # Only rules whose two groups both have customers have a lift to draw.
    measured = [
        (rule, lift.abs_lift * 100, lift.ci95[0] * 100, lift.ci95[1] * 100)
        for rule, lift in report.lift.items()
        if lift.abs_lift is not None and lift.ci95 is not None
    ]
    lift = go.Figure(
        go.Scatter(
            x=[rule for rule, *_ in measured],
            y=[value for _, value, _, _ in measured],
            mode="markers",
            marker={"size": 12},
            error_y={
                "type": "data",
                "symmetric": False,
                "array": [hi - value for _, value, _, hi in measured],
                "arrayminus": [value - lo for _, value, lo, _ in measured],
            },
            name="absolute lift",
        )
    )
    lift.add_hline(y=0, line_dash="dot")
    lift.update_layout(yaxis_title="conversion rate, treatment - control (points)")
    charts.append(("chart-lift", "Lift with its 95% interval (Newcombe-Wilson)", lift))

    over_time = make_subplots(specs=[[{"secondary_y": True}]])
    days = [d.day for d in report.daily]
    over_time.add_trace(go.Bar(x=days, y=[d.actions for d in report.daily], name="actions"))
    over_time.add_trace(
        go.Scatter(x=days, y=[d.conversions for d in report.daily], name="conversions"),
        secondary_y=True,
    )
    over_time.add_trace(
        go.Scatter(x=days, y=[d.attributed_conversions for d in report.daily], name="attributed"),
        secondary_y=True,
    )
    # Days as labels: on a date axis one day's bar fills the plot, ticked in hours.
    over_time.update_xaxes(type="category")
    over_time.update_yaxes(rangemode="tozero")
    charts.append(("chart-over-time", "Actions and conversions per day (UTC)", over_time))

    top = list(reversed(report.paths[:15]))
    paths = go.Figure(
        go.Bar(
            x=[p.conversions for p in top],
            y=[" → ".join(p.path) for p in top],
            orientation="h",
        )
    )
    paths.update_layout(height=max(300, 28 * len(top) + 120), margin={"l": 260})
    charts.append(("chart-paths", "Top paths before conversion", paths))
    return charts


def _colour(index: int) -> str:
    palette = ("#636EFA", "#EF553B", "#00CC96", "#AB63FA", "#FFA15A", "#19D3F3")
    return palette[index % len(palette)]


def render_html(report: Report, title: str = "Omnicue report") -> str:
    """One page, plotly.js inlined once: it opens offline, from a file or an attachment."""
    parts = []
    for number, (chart_id, heading, figure) in enumerate(figures(report)):
        figure.update_layout(title=None, template="plotly_white")
        div = figure.to_html(
            full_html=False, include_plotlyjs=number == 0, div_id=chart_id, validate=False
        )
        parts.append(f"<section><h2>{html.escape(heading)}</h2>{div}</section>")
    totals = (
        f"{report.conversions:,} conversions ({report.revenue:,.2f}), "
        f"{report.attributed_conversions:,} attributed ({report.attributed_revenue:,.2f})"
    )
    # Script content is not entity-decoded: only "</" could end it early.
    data = json.dumps(report.model_dump(mode="json"), sort_keys=True).replace("</", "<\\/")
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:system-ui,sans-serif;margin:2rem;max-width:1200px}"
        "section{margin-bottom:2rem}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{html.escape(totals)}</p>"
        + "".join(parts)
        # The numbers behind the charts, for whoever opens the file later.
        + f"<script type='application/json' id='report-data'>{data}</script>"
        + "</body></html>\n"
    )


def write_html(report: Report, path: Path, title: str = "Omnicue report") -> None:
    path.write_text(render_html(report, title), encoding="utf-8")


# --------------------------------------------------------------------- command


def run_report(
    events_path: Path,
    actions_path: Path,
    decisions_path: Path,
    rules_path: Path | None,
    *,
    json_path: Path,
    html_path: Path | None = None,
    fmt: str | None = None,
    lookback: str = "7d",
    half_life: str = "7d",
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """`omnicue report` (and `omnicue replay --report`): 0, or 2 with the reason on stderr."""
    from omnicue.replay import FORMATS, ReplayInputError, format_for
    from schemas.rules import RulesError, parse_duration

    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    chosen = fmt if fmt is not None else format_for(events_path)
    if chosen not in FORMATS:
        print(f"--format must be one of {', '.join(FORMATS)}, not {chosen!r}", file=err)
        return 2
    try:
        windows = {"--lookback": parse_duration(lookback), "--half-life": parse_duration(half_life)}
    except ValueError as exc:
        print(str(exc), file=err)
        return 2
    for option, value in windows.items():
        if value <= timedelta(0):
            print(f"{option} must be positive, not {value}", file=err)
            return 2
    try:
        report, measured = make_report(
            events_path,
            chosen,
            actions_path,
            decisions_path,
            rules_path,
            windows["--lookback"],
            windows["--half-life"],
            err,
        )
        write_json(report, json_path)
        if html_path is not None:
            write_html(report, html_path, f"Omnicue report: {events_path.name}")
    except RulesError as exc:
        print(str(exc), file=err)
        return 2
    except ReplayInputError as exc:
        print(f"{events_path}: {exc}", file=err)
        return 2
    except OSError as exc:
        print(f"{exc.filename or events_path}: {exc.strerror or exc}", file=err)
        return 2
    if measured.invalid:
        print(f"{events_path}: {measured.invalid:,} invalid line(s) skipped", file=err)
    print(summary(report), file=out)
    written = [json_path] + ([html_path] if html_path is not None else [])
    print("report written to " + ", ".join(str(p) for p in written), file=out)
    return 0
