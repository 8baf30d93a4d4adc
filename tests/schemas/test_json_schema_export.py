from __future__ import annotations

from pathlib import Path

from omnicue.jsonschema import render, schemas

COMMITTED = Path(__file__).resolve().parents[2] / "schemas" / "json"


def test_committed_json_schemas_are_up_to_date() -> None:
    for name, schema in schemas().items():
        path = COMMITTED / name
        assert path.exists(), f"missing {path}: run `make schema`"
        assert path.read_text(encoding="utf-8") == render(schema), (
            f"{path} is stale: run `make schema` and commit the result"
        )


def test_event_schema_is_a_discriminated_union_over_the_catalog() -> None:
    event = schemas()["event.schema.json"]
    assert event["discriminator"]["propertyName"] == "type"
    assert "cart.item_added" in event["discriminator"]["mapping"]
