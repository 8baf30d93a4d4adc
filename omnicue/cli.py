"""The `omnicue` command line."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, cast

import typer

from omnicue.settings import Settings

if TYPE_CHECKING:
    from datetime import datetime

    from omnicue.dlq import Selection
    from omnicue.replay import Format
    from schemas.events import Channel
    from triggers.ruleset import RuleSet


class _Commands(typer.core.TyperGroup):
    """`omnicue replay merge ...` is `replay-merge`: `replay` takes a file argument,
    so it cannot be a group of its own."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args[:2] == ["replay", "merge"]:
            args = ["replay-merge", *args[2:]]
        return super().parse_args(ctx, args)


app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__, cls=_Commands)
topics_app = typer.Typer(no_args_is_help=True, help="Kafka topics.")
schema_app = typer.Typer(no_args_is_help=True, help="JSON Schema of the contracts.")
rules_app = typer.Typer(no_args_is_help=True, help="Rules files.")
dlq_app = typer.Typer(no_args_is_help=True, help="Dead letters (omnicue.events.dlq).")
app.add_typer(topics_app, name="topics")
app.add_typer(schema_app, name="schema")
app.add_typer(rules_app, name="rules")
app.add_typer(dlq_app, name="dlq")


def _settings() -> Settings:
    return Settings()


@app.command()
def worker(
    rules: Annotated[Path | None, typer.Option(help="Rules file (default: OMNICUE_RULES)")] = None,
) -> None:
    """Run a pipeline worker (creates missing topics first)."""
    from omnicue.rules import decode_applied, latest_valid_rules, load_rules, read_rules_records
    from omnicue.topics import create_topics
    from streams.worker import run_worker
    from triggers.ruleset import compile_rules

    settings = _settings()
    create_topics(settings)
    # Rules applied with `omnicue rules apply` are the live configuration and win over
    # the file: the newest valid record only, never the topic's history in order. The
    # worker then follows the rules topic while it runs.
    applied, errors = latest_valid_rules(read_rules_records(settings))
    for error in errors:
        typer.echo(f"warning: ignoring an invalid record on the rules topic: {error}", err=True)
    if applied is not None:
        ruleset = compile_rules(decode_applied(applied)[0])
    else:
        ruleset = _load_or_exit(load_rules, rules or settings.rules)
    run_worker(settings, ruleset)


@topics_app.command("create")
def topics_create() -> None:
    """Create Omnicue's topics with OMNICUE_PARTITIONS partitions (idempotent)."""
    from omnicue.topics import create_topics

    created = create_topics(_settings())
    typer.echo(f"created {len(created)} topic(s)" + (f": {', '.join(created)}" if created else ""))


@schema_app.command("export")
def schema_export(directory: Path) -> None:
    """Write JSON Schema for events, actions and decisions into DIRECTORY."""
    from omnicue.jsonschema import export_schemas

    for path in export_schemas(directory):
        typer.echo(str(path))


@rules_app.command("validate")
def rules_validate(path: Path) -> None:
    """Validate a rules file; errors name the rule and field."""
    from omnicue.rules import load_rules

    ruleset = _load_or_exit(load_rules, path)
    names = ", ".join(r.id for r in ruleset.rules)
    typer.echo(f"{path}: ok, {len(ruleset.rules)} rule(s): {names}")


@app.command()
def publish(
    source: Annotated[str, typer.Argument(help="JSONL file of events, or - for stdin")],
) -> None:
    """Validate and publish events; bad lines are reported with their line numbers."""
    from omnicue.producer import publish_file

    raise typer.Exit(publish_file(_settings(), source))


@app.command()
def ingest(
    host: Annotated[str | None, typer.Option(help="Default: OMNICUE_INGEST_HOST")] = None,
    port: Annotated[int | None, typer.Option(help="Default: OMNICUE_INGEST_PORT")] = None,
) -> None:
    """Serve the Segment-compatible HTTP ingest (and /v1/events for contract JSON)."""
    from omnicue.ingest import run_ingest

    settings = _settings()
    overrides = {"ingest_host": host, "ingest_port": port}
    updates = {name: value for name, value in overrides.items() if value is not None}
    run_ingest(settings.model_copy(update=updates) if updates else settings)


@app.command("webhook-catcher")
def webhook_catcher(
    directory: Annotated[Path, typer.Option("--dir", help="Where messages are written")] = Path(
        "webhooks"
    ),
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8099,
) -> None:
    """A local webhook provider: writes each message it gets to DIR/<channel>/<key>.json
    (once per Idempotency-Key), checking signatures when OMNICUE_WEBHOOK_SECRET is set."""
    from senders.webhook_catcher import run_catcher

    secret = _settings().webhook_secret
    run_catcher(host, port, directory, secret.get_secret_value() if secret else None)


@app.command()
def send(
    channel: Annotated[str, typer.Option(help="push, email, sms or kakao")],
    transport: Annotated[
        str | None,
        typer.Option(help="console, webhook or smtp (default: OMNICUE_SENDER_TRANSPORT)"),
    ] = None,
    url: Annotated[
        str | None,
        typer.Option(
            help="Webhook URL ({channel} is replaced), or smtp://host:port (OMNICUE_SENDER_URL)"
        ),
    ] = None,
    rate: Annotated[
        str | None,
        typer.Option(help="N/s for the channel, shared by its senders (OMNICUE_SENDER_RATE)"),
    ] = None,
    group: Annotated[str | None, typer.Option(help="Consumer group")] = None,
    templates: Annotated[
        Path | None,
        typer.Option(help="Templates directory overriding the packaged ones (ko/, en/)"),
    ] = None,
) -> None:
    """Run a channel's sender: each action to its provider once per idempotency key."""
    from pydantic import ValidationError

    from senders.runtime import run_sender

    # Options given on the command line win over OMNICUE_SENDER_* variables.
    options = {
        "sender_transport": transport,
        "sender_url": url,
        "sender_rate": rate,
        "sender_templates": templates,
    }
    given: dict[str, Any] = {name: value for name, value in options.items() if value}
    try:
        settings = Settings(**given)
    except ValidationError as exc:
        raise SystemExit(f"omnicue send: {exc}") from None
    run_sender(settings, channel, group)


@app.command()
def simulate(
    rate: Annotated[float, typer.Option(help="Customer journeys started per second")] = 5.0,
    customers: Annotated[int, typer.Option(help="Distinct customers")] = 1000,
    invalid_ratio: Annotated[float, typer.Option(help="Share of invalid events")] = 0.02,
    duration: Annotated[float | None, typer.Option(help="Stop after seconds")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed")] = None,
    ingest: Annotated[
        str | None,
        typer.Option(help="Send web and app events through this omnicue ingest (its URL)"),
    ] = None,
    write_key: Annotated[str, typer.Option(help="The ingest's write key (with --ingest)")] = "dev",
) -> None:
    """Publish realistic cross-channel customer journeys."""
    from omnicue.ingest_client import IngestClient
    from omnicue.simulator import run_simulator

    run_simulator(
        _settings(),
        rate=rate,
        customers=customers,
        invalid_ratio=invalid_ratio,
        duration=duration,
        seed=seed,
        ingest=IngestClient(ingest, write_key) if ingest is not None else None,
    )


@app.command()
def dev(
    simulate: Annotated[bool, typer.Option("--simulate/--no-simulate")] = True,
    rules: Annotated[Path | None, typer.Option(help="Rules file (default: demo rules)")] = None,
    broker: Annotated[
        Literal["tansu", "kafka"],
        typer.Option(
            help="tansu: embedded, needs only Python; kafka: Apache Kafka, as in "
            "production (needs Java 17+, and Maven once to fetch its jars)"
        ),
    ] = "tansu",
    transport: Annotated[
        Literal["console", "webhook"],
        typer.Option(
            help="console: console senders, email over SMTP to the local mail catcher; "
            "webhook: every sender POSTs to --webhook-url"
        ),
    ] = "console",
    webhook_url: Annotated[
        str | None, typer.Option(help="With --transport webhook; {channel} is replaced")
    ] = None,
) -> None:
    """Run everything locally: broker, Redis, worker, senders, the HTTP ingest, a simulator,
    and a mail catcher writing the emails sent as .eml files beside the logs."""
    from omnicue.dev import run_dev

    if (transport == "webhook") != (webhook_url is not None):
        typer.echo("--transport webhook and --webhook-url URL go together", err=True)
        raise typer.Exit(2)
    raise typer.Exit(
        run_dev(
            rules=rules,
            simulate=simulate,
            broker=broker,
            transport=transport,
            webhook_url=webhook_url,
        )
    )


@app.command()
def replay(
    events: Annotated[
        Path, typer.Argument(help="Event log: contract JSONL, Segment JSONL or REES46 CSV")
    ],
    out: Annotated[Path, typer.Option("--out", help="Where to write the actions (JSONL)")],
    decisions: Annotated[
        Path | None, typer.Option(help="Also write the decisions (JSONL) here")
    ] = None,
    rules: Annotated[
        Path | None, typer.Option(help="Rules file (default: the packaged rules)")
    ] = None,
    until: Annotated[
        str | None,
        typer.Option(help="Fire timers up to this RFC 3339 time (default: the last event)"),
    ] = None,
    fmt: Annotated[
        str | None,
        typer.Option(
            "--format",
            help="jsonl, segment (Segment messages, mapped as `omnicue ingest` maps them) "
            "or rees46 (default: rees46 for .csv, else jsonl)",
        ),
    ] = None,
    progress: Annotated[bool, typer.Option("--progress", help="Progress bar on stderr")] = False,
    synthetic_contacts: Annotated[
        bool,
        typer.Option(
            "--synthetic-contacts",
            help="rees46: give each user an email and consent (the data has none)",
        ),
    ] = False,
    channel: Annotated[
        str,
        typer.Option(help="segment: the channel of messages that name none (a write key's)"),
    ] = "web",
    report: Annotated[
        Path | None,
        typer.Option(
            help="Then write report.json and report.html here (as `omnicue report`); "
            "the decisions go here too unless --decisions says where",
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Replay the OMNICUE_PARTITIONS partitions (the live pipeline's, by "
            "customer) in N processes; the outputs are the same for every N",
        ),
    ] = None,
    partition: Annotated[
        str | None,
        typer.Option(
            help="i/N: replay partition i of N alone; --out is then a directory for "
            "its actions and decisions, which `omnicue replay merge` combines",
        ),
    ] = None,
) -> None:
    """Backtest rules offline: replay an event log through the engine in event time.

    The log may be gzip or zstd compressed. `omnicue replay merge DIR... --out FILE`
    combines the outputs of `--partition` runs."""
    from omnicue.replay import (
        REPLAY_FORMATS,
        ReplayInputError,
        format_for,
        parse_timestamp,
        run_replay,
    )
    from omnicue.segment import CHANNELS
    from schemas.rules import RulesError

    if fmt is None:
        fmt = format_for(events)
    if fmt not in REPLAY_FORMATS:
        typer.echo(f"--format must be one of {', '.join(REPLAY_FORMATS)}, not {fmt!r}", err=True)
        raise typer.Exit(2)
    if channel not in CHANNELS:
        typer.echo(f"--channel must be one of {', '.join(sorted(CHANNELS))}", err=True)
        raise typer.Exit(2)
    if report is not None and fmt == "segment":
        # `omnicue report` reads the event log again, and reads no Segment messages yet.
        typer.echo("--report needs a jsonl or rees46 log, not segment", err=True)
        raise typer.Exit(2)
    try:
        horizon = parse_timestamp(until) if until is not None else None
    except ValueError as exc:
        typer.echo(f"--until: {exc}", err=True)
        raise typer.Exit(2) from None
    if partition is not None:
        if workers is not None or report is not None:
            typer.echo("--partition runs alone: no --workers, no --report", err=True)
            raise typer.Exit(2)
        raise typer.Exit(
            _replay_one_partition(
                events, partition, out, rules, horizon, fmt, synthetic_contacts,
                cast("Channel", channel),
            )
        )  # fmt: skip
    if report is not None:
        report.mkdir(parents=True, exist_ok=True)
        # Lift is measured from the decisions: the report needs them.
        decisions = decisions or report / "decisions.jsonl"
    try:
        if workers is not None:
            from omnicue.partitioned import run_partitioned

            summary = run_partitioned(
                events,
                out,
                decisions,
                rules,
                horizon,
                fmt,
                progress,
                _settings(),
                workers=workers,
                synthetic_contacts=synthetic_contacts,
                segment_channel=cast("Channel", channel),
            )
        else:
            summary = run_replay(
                events,
                out,
                decisions,
                rules,
                horizon,
                fmt,
                progress,
                _settings(),
                synthetic_contacts=synthetic_contacts,
                segment_channel=cast("Channel", channel),
            )
    except RulesError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    except ReplayInputError as exc:
        typer.echo(f"{events}: {exc}", err=True)
        raise typer.Exit(2) from None
    except OSError as exc:
        typer.echo(f"{exc.filename or events}: {exc.strerror or exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(summary.render())
    if report is not None and decisions is not None:
        from omnicue.report import run_report

        code = run_report(
            events,
            out,
            decisions,
            rules,
            json_path=report / "report.json",
            html_path=report / "report.html",
            fmt=fmt,
        )
        raise typer.Exit(code)


def _replay_one_partition(
    events: Path,
    partition: str,
    out: Path,
    rules: Path | None,
    horizon: datetime | None,
    fmt: str,
    synthetic_contacts: bool,
    channel: Channel,
) -> int:
    from omnicue.partitioned import PartitionSpec, identity_prepass, replay_partition
    from omnicue.replay import ReplayInputError
    from schemas.rules import RulesError

    try:
        spec = PartitionSpec.parse(partition)
    except ValueError as exc:
        typer.echo(f"--partition: {exc}", err=True)
        return 2
    try:
        settings = _settings()
        groups = identity_prepass(
            events, cast("Format", fmt), channel, settings.identity_policy()
        )
        result = replay_partition(
            events, cast("Format", fmt), spec, groups, out, rules, horizon, settings,
            synthetic_contacts=synthetic_contacts, segment_channel=channel,
        )  # fmt: skip
    except RulesError as exc:
        typer.echo(str(exc), err=True)
        return 2
    except ReplayInputError as exc:
        typer.echo(f"{events}: {exc}", err=True)
        return 2
    except OSError as exc:
        typer.echo(f"{exc.filename or events}: {exc.strerror or exc}", err=True)
        return 2
    s = result.stats
    typer.echo(
        f"partition {partition}: {s.events:,} events, {s.action_count:,} actions, "
        f"{sum(s.outcomes.values()):,} decisions -> {out}/{spec.label}.*"
    )
    return 0


@app.command("replay-merge", hidden=True)
def replay_merge(
    parts: Annotated[
        list[Path], typer.Argument(help="Directories of `omnicue replay --partition` outputs")
    ],
    out: Annotated[Path, typer.Option("--out", help="Where to write the actions (JSONL)")],
    decisions: Annotated[
        Path | None, typer.Option(help="Also write the merged decisions (JSONL) here")
    ] = None,
) -> None:
    """`omnicue replay merge`: one partition output per partition, merged into the
    files and the summary one `omnicue replay` of the whole log writes."""
    from omnicue.partitioned import merge_partitions
    from omnicue.replay import ReplayInputError, ReplaySummary

    try:
        merged = merge_partitions(parts, out, decisions)
    except ReplayInputError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    except OSError as exc:
        typer.echo(f"{exc.filename}: {exc.strerror or exc}", err=True)
        raise typer.Exit(2) from None
    summary = ReplaySummary(
        source=", ".join(str(p) for p in parts),
        fmt="jsonl",
        stats=merged.stats,
        elapsed=0.0,
        actions_path=out,
        decisions_path=decisions,
        synthesized=merged.synthesized,
    )
    typer.echo(summary.render().split("\n", 1)[1])


@app.command("report")
def report_command(
    events: Annotated[Path, typer.Option(help="The event log: contract JSONL or REES46 CSV")],
    actions: Annotated[Path, typer.Option(help="Actions JSONL (omnicue replay --out)")],
    decisions: Annotated[Path, typer.Option(help="Decisions JSONL (omnicue replay --decisions)")],
    json_path: Annotated[Path, typer.Option("--json", help="Where to write the report (JSON)")],
    html_path: Annotated[
        Path | None, typer.Option("--html", help="Also write the charts (one offline HTML file)")
    ] = None,
    rules: Annotated[
        Path | None, typer.Option(help="Rules file (default: the packaged rules)")
    ] = None,
    lookback: Annotated[
        str | None,
        typer.Option(help="Touches this long before an order count (OMNICUE_ATTRIBUTION_*)"),
    ] = None,
    half_life: Annotated[
        str | None, typer.Option(help="Half-life of the time_decay model (default: 7d)")
    ] = None,
    fmt: Annotated[
        str | None,
        typer.Option("--format", help="jsonl or rees46 (default: rees46 for .csv, else jsonl)"),
    ] = None,
) -> None:
    """Did it work? Conversions, attribution by six models, holdout lift, funnels, paths."""
    from omnicue.report import run_report

    # The workers' settings by default, so the report and the live records agree.
    settings = _settings()
    lookback = lookback or f"{round(settings.attribution_lookback_days * 86_400)}s"
    half_life = half_life or f"{round(settings.attribution_half_life_days * 86_400)}s"
    code = run_report(
        events,
        actions,
        decisions,
        rules,
        json_path=json_path,
        html_path=html_path,
        fmt=fmt,
        lookback=lookback,
        half_life=half_life,
    )
    if code:
        raise typer.Exit(code)


@rules_app.command("apply")
def rules_apply(path: Path) -> None:
    """Validate a rules file, then publish it: running workers switch without a restart."""
    from omnicue.rules import apply_rules
    from omnicue.topics import create_topics
    from schemas.rules import RulesError

    settings = _settings()
    create_topics(settings)
    try:
        applied = apply_rules(settings, path)
    except RulesError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    for rule in applied.rules:
        typer.echo(f"applied {rule.id} version {rule.version}")


WorkerOption = Annotated[
    str | None, typer.Option(help="Any worker's URL (default: this host's web port)")
]


def _customer_view(customer_id: str, worker: str | None, view: str) -> dict[str, Any]:
    """GET /customers/{id}{view} from any worker (faust forwards it to the owner)."""
    import json
    import urllib.error
    import urllib.parse
    import urllib.request

    settings = _settings()
    base = worker or f"http://127.0.0.1:{settings.web_port}"
    url = f"{base.rstrip('/')}/customers/{urllib.parse.quote(customer_id, safe='')}{view}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            body: dict[str, Any] = json.loads(response.read())
            return body
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            typer.echo(f"no state for customer {customer_id!r}: no event seen for them yet")
            raise typer.Exit(1) from None
        typer.echo(f"{url}: HTTP {exc.code}", err=True)
        raise typer.Exit(2) from None
    except OSError as exc:
        typer.echo(f"cannot reach a worker at {base}: {exc}", err=True)
        raise typer.Exit(2) from None


@app.command()
def explain(
    customer_id: str,
    worker: WorkerOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw JSON")] = False,
) -> None:
    """Why did (or didn't) this customer get a message? Journeys and last decisions."""
    import json

    body = _customer_view(customer_id, worker, "/decisions")
    if as_json:
        typer.echo(json.dumps(body, indent=2))
        return
    typer.echo(f"customer {body['customer_id']}")
    typer.echo("journeys in progress:" if body["journeys"] else "no journey in progress")
    for journey in body["journeys"]:
        typer.echo(f"  {journey['text']}")
    typer.echo("last decisions (newest first):" if body["decisions"] else "no decision yet")
    for decision in body["decisions"]:
        typer.echo(f"  {decision['text']}")
    if body.get("held_back"):
        typer.echo("not started, though their trigger events came:")
        for item in body["held_back"]:
            typer.echo(f"  {item['text']}")


@app.command()
def profile(customer_id: str, worker: WorkerOption = None) -> None:
    """Everything the workers know about one customer, contact points masked (JSON)."""
    import json

    typer.echo(json.dumps(_customer_view(customer_id, worker, ""), indent=2, ensure_ascii=False))


ReasonOption = Annotated[
    list[str] | None,
    typer.Option(
        "--reason", help="Only this error class (omnicue.error.class, e.g. json); repeatable"
    ),
]
SinceOption = Annotated[
    str | None,
    typer.Option(help="Only dead letters written since: a duration (2h, 1d) or an ISO 8601 time"),
]


def _dlq_selection(reason: list[str] | None, since: str | None) -> Selection:
    from omnicue.dlq import Selection, parse_since

    try:
        start = parse_since(since) if since is not None else None
    except ValueError as exc:
        typer.echo(f"--since: {exc}", err=True)
        raise typer.Exit(2) from None
    return Selection(reasons=frozenset(reason or ()), since=start)


@dlq_app.command("list")
def dlq_list(
    reason: ReasonOption = None,
    since: SinceOption = None,
    examples: Annotated[int, typer.Option(help="Newest examples shown per group")] = 3,
) -> None:
    """Dead letters by stage and reason: counts and the newest examples."""
    from kafka.errors import KafkaError

    from omnicue.dlq import list_dead_letters

    settings, selection = _settings(), _dlq_selection(reason, since)
    try:
        summary = list_dead_letters(settings, selection, examples)
    except KafkaError as exc:
        typer.echo(f"{settings.broker}: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(summary.render())


@dlq_app.command("replay")
def dlq_replay(
    reason: ReasonOption = None,
    since: SinceOption = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count what would be replayed; publish nothing")
    ] = False,
    again: Annotated[
        bool, typer.Option("--again", help="Also replay dead letters replayed before")
    ] = False,
) -> None:
    """Put dead letters back: original key and bytes, to their source topic and partition.

    Each dead letter is replayed at most once (recorded in omnicue.events.dlq.replayed)
    unless --again; one that fails again returns to the dead-letter topic.
    """
    from kafka.errors import KafkaError

    from omnicue.dlq import replay_dead_letters

    settings, selection = _settings(), _dlq_selection(reason, since)
    try:
        report = replay_dead_letters(settings, selection, dry_run=dry_run, again=again)
    except KafkaError as exc:
        # Whatever was published before is recorded as replayed: running again is safe.
        typer.echo(f"{settings.broker}: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(report.render())
    if report.failed:
        raise typer.Exit(1)


def _load_or_exit(loader: Callable[[Path | None], RuleSet], path: Path | None) -> RuleSet:
    from schemas.rules import RulesError

    try:
        return loader(path)
    except RulesError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None


def main() -> None:
    app(prog_name="omnicue")


if __name__ == "__main__":
    main()
