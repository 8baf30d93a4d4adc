"""The direct evaluator agrees with the CEL specification's own conformance cases.

The cases are google/cel-spec's tests/simple/testdata, extracted to JSON in the shared
data folder next to the repository (see its README); they are not copied in here, so a
clone without that folder skips this module. OMNICUE_CEL_CASES names another copy.

A case runs when the subset accepts its expression and can hold its variables: the
cases that need protos, uints, bytes or type values, a container (namespace), or a
variable with a dotted name (CEL's qualified identifiers, which a context of plain
`event`/`customer`/`journey` never has) are CEL's alone.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest

from triggers.cel_subset import CelError, Unsupported, compile_subset

CASES_PATH = Path(
    os.environ.get("OMNICUE_CEL_CASES")
    or Path(__file__).resolve().parents[3] / "shared" / "data" / "cel-spec" / "cases.json"
)
if not CASES_PATH.is_file():
    pytest.skip(f"no CEL conformance cases at {CASES_PATH}", allow_module_level=True)

Case = dict[str, Any]


def _runs_in_subset(case: Case) -> bool:
    return (
        case["skip"] is None
        and not case["container"]
        and case["expect"] is not None
        and not any("." in name for name in case["bindings"])
        and compile_subset(case["expr"]) is not None
    )


ALL_CASES: list[Case] = json.loads(CASES_PATH.read_text(encoding="utf-8"))
CASES = [case for case in ALL_CASES if _runs_in_subset(case)]


def _same(value: Any, expected: Any) -> bool:
    """Equal as CEL values: of the same type (1 is not 1.0, nor true), NaN like NaN."""
    if type(value) is not type(expected):
        return False
    if type(value) is float and math.isnan(value):
        return math.isnan(expected)
    if type(value) is list:
        return len(value) == len(expected) and all(map(_same, value, expected))
    if type(value) is dict:
        return value.keys() == expected.keys() and all(
            _same(value[key], expected[key]) for key in value
        )
    return bool(value == expected)


@pytest.mark.parametrize(
    "case", CASES, ids=[f"{case['file']}/{case['section']}/{case['name']}" for case in CASES]
)
def test_subset_agrees_with_the_conformance_case(case: Case) -> None:
    node = compile_subset(case["expr"])
    assert node is not None
    kind, expected = case["expect"]
    try:
        value = node(case["bindings"])
    except CelError as error:
        assert kind == "error", f"{case['expr']}: expected {expected!r}, got the error {error}"
        return
    except Unsupported as reason:
        pytest.skip(f"left to CEL: {reason}")
    assert kind == "value", f"{case['expr']}: expected the error {expected}, got {value!r}"
    assert _same(value, expected), f"{case['expr']}: expected {expected!r}, got {value!r}"


def test_the_cases_cover_the_subset() -> None:
    """A change to the file's format or to the filter above must not quietly run none."""
    assert len(ALL_CASES) > 1000
    assert len(CASES) >= 140
    assert {case["file"] for case in CASES} >= {"basic", "comparisons", "logic", "parse"}
