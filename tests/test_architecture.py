"""The dependency direction is streams -> triggers -> schemas (and measure -> schemas);
only streams imports faust."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STDLIB_OK = {"__future__"}

FORBIDDEN = {
    "schemas": {"faust", "kafka", "aiokafka", "redis", "triggers", "streams", "omnicue", "yaml",
                "cel"},
    # Measurement is pure like the engine, and beside it: it needs neither.
    "measure": {"faust", "kafka", "aiokafka", "redis", "triggers", "streams", "omnicue", "mode",
                "yaml", "cel", "plotly"},
    "triggers": {"faust", "kafka", "aiokafka", "redis", "streams", "omnicue", "mode"},
    "omnicue": {"faust", "mode", "aiokafka"},
    # Senders are their own asyncio service: no faust, no pipeline internals.
    "senders": {"faust", "mode", "streams", "triggers"},
    "bench": set(),
}


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", ["schemas", "triggers", "measure", "omnicue", "senders"])
def test_forbidden_imports(package: str) -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_roots(path) & FORBIDDEN[package])
        for path in (ROOT / package).rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_schemas_import_only_pydantic_and_the_standard_library() -> None:
    import sys

    allowed = {"pydantic", "schemas"} | set(sys.stdlib_module_names)
    for path in (ROOT / "schemas").rglob("*.py"):
        assert imported_roots(path) <= allowed, path


def test_measure_imports_only_schemas_and_the_standard_library() -> None:
    import sys

    allowed = {"schemas", "measure"} | set(sys.stdlib_module_names)
    for path in (ROOT / "measure").rglob("*.py"):
        assert imported_roots(path) <= allowed, path


def test_only_streams_imports_faust() -> None:
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in {".venv", "streams", "bench", "tests"} or "site-packages" in rel.parts:
            continue
        assert "faust" not in imported_roots(path), rel
