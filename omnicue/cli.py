"""The `omnicue` command line."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from omnicue.settings import Settings

if TYPE_CHECKING:
    from triggers.ruleset import RuleSet

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
topics_app = typer.Typer(no_args_is_help=True, help="Kafka topics.")
schema_app = typer.Typer(no_args_is_help=True, help="JSON Schema of the contracts.")
rules_app = typer.Typer(no_args_is_help=True, help="Rules files.")
app.add_typer(topics_app, name="topics")
app.add_typer(schema_app, name="schema")
app.add_typer(rules_app, name="rules")


def _settings() -> Settings:
    return Settings()


@app.command()
def worker(
    rules: Annotated[Path | None, typer.Option(help="Rules file (default: OMNICUE_RULES)")] = None,
) -> None:
    """Run a pipeline worker (creates missing topics first)."""
    from omnicue.rules import load_rules
    from omnicue.topics import create_topics
    from streams.worker import run_worker

    settings = _settings()
    ruleset = _load_or_exit(load_rules, rules or settings.rules)
    create_topics(settings)
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
def send(
    channel: Annotated[str, typer.Option(help="push, email, sms or kakao")],
    group: Annotated[str | None, typer.Option(help="Consumer group")] = None,
) -> None:
    """Console sender: consume one action topic and log each action once."""
    from omnicue.senders import run_console_sender

    run_console_sender(_settings(), channel, group)


@app.command()
def simulate(
    rate: Annotated[float, typer.Option(help="Customer journeys started per second")] = 5.0,
    customers: Annotated[int, typer.Option(help="Distinct customers")] = 1000,
    invalid_ratio: Annotated[float, typer.Option(help="Share of invalid events")] = 0.02,
    duration: Annotated[float | None, typer.Option(help="Stop after seconds")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed")] = None,
) -> None:
    """Publish realistic cross-channel customer journeys."""
    from omnicue.simulator import run_simulator

    run_simulator(
        _settings(),
        rate=rate,
        customers=customers,
        invalid_ratio=invalid_ratio,
        duration=duration,
        seed=seed,
    )


@app.command()
def dev(
    simulate: Annotated[bool, typer.Option("--simulate/--no-simulate")] = True,
    rules: Annotated[Path | None, typer.Option(help="Rules file (default: demo rules)")] = None,
) -> None:
    """Run everything locally: broker, Redis, worker, senders and a simulator."""
    from omnicue.dev import run_dev

    raise typer.Exit(run_dev(rules=rules, simulate=simulate))


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
