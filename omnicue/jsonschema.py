"""JSON Schema export of the contracts (committed under schemas/json/)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from schemas.actions import Action
from schemas.conversions import ConversionRecord
from schemas.decisions import Decision
from schemas.events import event_adapter
from schemas.report import Report
from schemas.rules import RulesFile


def schemas() -> dict[str, dict[str, Any]]:
    """File name -> schema. Events are validated (input); actions and decisions are
    produced by Omnicue (serialization); the rules file is input too."""
    return {
        "event.schema.json": event_adapter.json_schema(mode="validation"),
        "action.schema.json": TypeAdapter(Action).json_schema(mode="serialization"),
        "decision.schema.json": TypeAdapter(Decision).json_schema(mode="serialization"),
        "rules.schema.json": TypeAdapter(RulesFile).json_schema(mode="validation"),
        # What `omnicue report --json` writes.
        "report.schema.json": TypeAdapter(Report).json_schema(mode="serialization"),
        # What the customer agent writes to omnicue.conversions.
        "conversion.schema.json": TypeAdapter(ConversionRecord).json_schema(mode="serialization"),
    }


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def export_schemas(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in schemas().items():
        path = directory / name
        path.write_text(render(schema), encoding="utf-8")
        written.append(path)
    return written
