"""The direct evaluator agrees with CEL on every expression and context it accepts."""

from __future__ import annotations

import enum
import functools
import math
from collections import defaultdict
from typing import Any

import cel
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from triggers.cel_subset import CelError, Unsupported, compile_subset
from triggers.conditions import Condition

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# Where ints and doubles stop matching one to one (2**53), where int64 ends, and the
# doubles at the edges of their range: the values on which an evaluator's numbers differ.
EDGE_INTS = [0, 1, -1, 2**53, 2**53 + 1, -(2**53) - 1, INT64_MAX, INT64_MAX - 1, INT64_MIN]
EDGE_DOUBLES = [
    0.0,
    -0.0,
    2.5,
    2.0**53,
    2.0**63,
    -(2.0**63),
    1e308,
    1.7976931348623157e308,
    5e-324,
    math.inf,
    -math.inf,
    math.nan,
]
# Characters a literal has to escape, and what the escaped LITERALS below denote.
EDGE_STRINGS = ["", "a", "b", "'", '"', "\\", "\n", "\r", "\t", "\x00", "a'b", "é", "e\u0301"]
# Python ints CEL has no int for: the cel library turns them into uints or doubles.
BEYOND_INT64 = [2**63, 2**63 + 1, 2**64, 2**70, INT64_MIN - 1]

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(INT64_MIN, INT64_MAX)
    | st.sampled_from(EDGE_INTS)
    | st.sampled_from(BEYOND_INT64)
    | st.floats()
    | st.sampled_from(EDGE_DOUBLES)
    | st.sampled_from(EDGE_INTS).map(float)
    # UTF-8 leaves out lone surrogates: the cel library cannot convert them, so a
    # context holding one fails as a whole, whatever the expression reads.
    | st.text(st.characters(codec="utf-8"), max_size=3)
    | st.sampled_from(EDGE_STRINGS)
)
FIELDS = st.sampled_from(["a", "b", "key"])
CONTEXT_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(FIELDS, inner, max_size=3),
    max_leaves=6,
)
# Records with some of the fields paths name, so that paths often reach a value.
RECORDS = st.fixed_dictionaries(
    {}, optional={"a": CONTEXT_VALUES, "b": CONTEXT_VALUES, "key": CONTEXT_VALUES}
)
ROOTS = {"event": RECORDS, "journey": RECORDS, "customer": RECORDS | CONTEXT_VALUES}
# Mostly all three variables, sometimes some: an undeclared one is an error too.
CONTEXTS = st.fixed_dictionaries(ROOTS) | st.fixed_dictionaries({}, optional=ROOTS)

LITERALS = st.sampled_from(
    [
        "0",
        "1",
        "007",
        "9007199254740992",
        "9007199254740993",
        "9223372036854775807",
        "2.5",
        "0.0",
        "9007199254740992.0",
        "9.223372036854775807e18",
        "1e308",
        "1.7976931348623157e308",
        "1e-400",
        "'a'",
        '"b"',
        "''",
        "'é'",
        "'e\u0301'",
        "'\t'",
        "'\x00'",
        '"\'"',
        "'\"'",
        "true",
        "false",
        "null",
        # Literals the subset leaves to CEL: escapes, a sign, values CEL rejects.
        "'a\\'b'",
        '"\\u00e9"',
        "-9223372036854775808",
        "9223372036854775808",
        "1e400",
    ]
)
PATHS = st.builds(
    lambda root, fields: ".".join([root, *fields]),
    st.sampled_from(["event", "journey", "customer"]),
    st.lists(FIELDS, max_size=2),
)
OPERATORS = st.sampled_from(["==", "!=", "<", "<=", ">", ">=", "in"])


def _expressions() -> st.SearchStrategy[str]:
    atom = PATHS | LITERALS
    relation = st.builds(lambda a, op, b: f"{a} {op} {b}", atom, OPERATORS, atom)
    return st.recursive(
        relation | atom,
        lambda inner: (
            st.builds(lambda a, b: f"({a}) && ({b})", inner, inner)
            | st.builds(lambda a, b: f"({a}) || ({b})", inner, inner)
            | st.builds(lambda a: f"!({a})", inner)
        ),
        max_leaves=5,
    )


def _outcome(value: object) -> object:
    """What a condition can tell apart: true, false, an error or some other value."""
    return value if type(value) is bool else "value"


_cel_program = functools.cache(cel.compile)


def cel_outcome(source: str, context: dict[str, Any]) -> object:
    program = _cel_program(source)  # the subset accepts nothing CEL rejects
    try:
        return _outcome(program.execute(context))
    except Exception:  # the library reports CEL errors as assorted exception types
        return "error"


def direct_outcome(source: str, context: dict[str, Any]) -> object | None:
    """The subset's outcome, or None where it leaves the expression or the values to CEL."""
    node = compile_subset(source)
    if node is None:
        return None
    try:
        return _outcome(node(context))
    except CelError:
        return "error"
    except Unsupported:
        return None


@settings(max_examples=3000, deadline=None)
@given(_expressions(), CONTEXTS)
def test_direct_evaluation_matches_cel(source: str, context: dict[str, Any]) -> None:
    direct = direct_outcome(source, context)
    if direct is not None:
        assert direct == cel_outcome(source, context), source


NUMBERS = (
    st.integers(INT64_MIN, INT64_MAX)
    | st.sampled_from(EDGE_INTS)
    | st.floats()
    | st.sampled_from(EDGE_DOUBLES)
    | st.integers(-(2**54), 2**54).map(float)
    | st.sampled_from(EDGE_INTS).map(float)
)
# Few characters, so that strings are often equal or share a prefix.
STRINGS = st.text(st.sampled_from("a'\"\\\n\u00e9e\u0301\U0001f431"), max_size=3)
SCALAR_PAIRS = (
    st.tuples(NUMBERS, NUMBERS)
    | st.tuples(STRINGS, STRINGS)
    | st.tuples(st.booleans(), st.booleans())
    | st.tuples(SCALARS, SCALARS)
)
RELATIONS = ["==", "!=", "<", "<=", ">", ">="]


@settings(max_examples=1000, deadline=None)
@given(SCALAR_PAIRS)
def test_relations_on_scalars_match_cel(pair: tuple[Any, Any]) -> None:
    context = {"event": {"x": pair[0], "y": pair[1]}}
    for operator in RELATIONS:
        source = f"event.x {operator} event.y"
        direct = direct_outcome(source, context)
        if direct is not None:
            assert direct == cel_outcome(source, context), source


@settings(max_examples=1000, deadline=None)
@given(NUMBERS, NUMBERS)
def test_order_and_equality_of_numbers_agree(x: int | float, d: int | float) -> None:
    """`x <= d && x >= d` is `x == d`, for ints, doubles and the two mixed, as in CEL."""
    context = {"event": {"x": x, "d": d}}
    both_ways = direct_outcome("event.x <= event.d && event.x >= event.d", context)
    if both_ways is not None:
        assert both_ways == direct_outcome("event.x == event.d", context)
        assert both_ways == cel_outcome("event.x <= event.d && event.x >= event.d", context)


def _evaluate_directly(source: str, context: dict[str, Any]) -> object:
    node = compile_subset(source)
    assert node is not None
    try:
        return node(context)
    except CelError:
        return "error"


@pytest.mark.parametrize(
    ("source", "customer", "expected"),
    [
        # 2**53 + 1 has no double: CEL converts it to 2**53, so it equals 2.0**53.
        ("customer.n == 9007199254740993", {"n": 2.0**53}, True),
        ("customer.n != 9007199254740993", {"n": 2.0**53}, False),
        ("customer.n < 9007199254740993", {"n": 2.0**53}, False),
        ("customer.n >= 9007199254740993", {"n": 2.0**53}, True),
        ("9007199254740993 > customer.n", {"n": 2.0**53}, False),
        ("customer.i == customer.n", {"i": INT64_MAX, "n": 2.0**63}, True),
        ("customer.i < customer.n", {"i": INT64_MAX, "n": 2.0**63}, False),
        ("customer.i in customer.list", {"i": 2**53 + 1, "list": [2.0**53]}, True),
        ("customer.i < customer.n", {"i": INT64_MAX, "n": math.inf}, True),
        ("customer.n == 1", {"n": 1.0}, True),
        ("customer.n < 1", {"n": -0.0}, True),
    ],
)
def test_ints_compare_with_doubles_as_doubles(
    source: str, customer: dict[str, Any], expected: bool
) -> None:
    context = {"customer": customer}
    assert cel.compile(source).execute(context) is expected
    assert _evaluate_directly(source, context) is expected
    assert Condition(source).holds(lambda variables: context) is expected


@pytest.mark.parametrize("operator", ["<", "<=", ">", ">="])
def test_ordering_nan_is_left_to_cel(operator: str) -> None:
    """The cel library reports an error for ordering NaN (so `!(x < 1)` is false), where
    IEEE comparisons say false (and `!(x < 1)` true): the subset must not answer."""
    source = f"customer.n {operator} 1"
    context = {"customer": {"n": math.nan}}
    node = compile_subset(source)
    assert node is not None
    with pytest.raises(Unsupported):
        node(context)
    assert Condition(f"!({source})").holds(lambda variables: context) is (
        cel_outcome(f"!({source})", context) is True
    )


@pytest.mark.parametrize(
    ("source", "n"),
    [
        # The library keeps 2**63 .. 2**64-1 as uints, compared exactly ...
        ("customer.n > 9223372036854775807", 2**63),
        ("customer.n != 9223372036854775807", 2**63),
        # ... and turns larger ints, or ints below int64, into doubles.
        ("customer.n == 9223372036854775808.0", 2**63 + 1),
        ("customer.n == 1180591620717411303424.0", 2**70 + 1),
        ("customer.n == -9223372036854775808.0", INT64_MIN - 1),
        ("customer.n < -9223372036854775807", INT64_MIN - 1),
    ],
)
def test_ints_beyond_int64_are_left_to_cel(source: str, n: int) -> None:
    context = {"customer": {"n": n}}
    node = compile_subset(source)
    if node is not None:
        with pytest.raises(Unsupported):
            node(context)
    assert Condition(source).holds(lambda variables: context) is (
        cel.compile(source).execute(context) is True
    )


class Tier(enum.IntEnum):
    GOLD = 1


class Label(str):
    pass


@pytest.mark.parametrize(
    ("source", "customer"),
    [
        ("1 == customer.tier", {"tier": Tier.GOLD}),
        ("customer.tier < 2", {"tier": Tier.GOLD}),
        ("customer.label == 'vip'", {"label": Label("vip")}),
        ("customer.label >= 'a'", {"label": Label("vip")}),
        ("!customer.flags.a", {"flags": defaultdict(bool)}),
        ("customer.flags.a == false", {"flags": defaultdict(bool)}),
    ],
)
def test_values_of_other_python_types_are_left_to_cel(
    source: str, customer: dict[str, Any]
) -> None:
    """The library converts subclasses of int, str and dict by what they are made of; the
    subset only knows the exact JSON types and must not guess for the others."""
    context = {"customer": customer}
    node = compile_subset(source)
    assert node is not None
    with pytest.raises(Unsupported):
        node(context)
    assert Condition(source).holds(lambda variables: context) is (
        cel_outcome(source, context) is True
    )


@pytest.mark.parametrize(
    "source",
    [
        "event.n / event.d > 1",
        "event.n % event.d > 1",
        "event.big + 1 > 0",
        "event.big * 2 > 0",
        "event.small - 1 < 0",
        "event.small / -1 > 0",
    ],
)
def test_evaluation_errors_of_the_cel_program_are_false(source: str) -> None:
    """Division by zero and int64 overflow are CEL errors, which make a condition false."""
    context = {"event": {"n": 1, "d": 0, "big": INT64_MAX, "small": INT64_MIN}}
    condition = Condition(source)
    assert compile_subset(source) is None
    assert condition.holds(lambda variables: context) is False
    assert condition.holds(lambda variables: context | {"event": {"n": 1, "d": 1}}) is False


@pytest.mark.parametrize(
    "source",
    [
        "event.properties.cart_id == journey.key",
        "event.properties.cart_id == journey.key && !(journey.key in customer.carts)",
        "customer.order_count == 0",
        "customer.revenue >= 100.5 || customer.traits.tier == 'gold'",
        "customer.order_count ==\f0",
        "customer.order_count == 9223372036854775807",
        "customer.revenue < 1.7976931348623157e308",
        "customer.revenue > 1e-400",
        "customer.if == 1",
        "customer.int == 1",
    ],
)
def test_catalog_style_conditions_are_evaluated_directly(source: str) -> None:
    assert compile_subset(source) is not None
    cel.compile(source)


@pytest.mark.parametrize(
    "source",
    [
        "size(customer.carts) > 0",
        "customer.revenue + 1.0 > 2.0",
        "customer.tags[0] == 'vip'",
        "has(customer.email)",
        "customer.email.endsWith('@example.com')",
        "customer.order_count == 1u",
        "customer.tier == 'a\\'b'",
        "a < b < c",
        "customer.order_count > 0 ? true : false",
        "[1, 2] == customer.list",
        # Literals CEL cannot represent: it rejects them.
        "customer.order_count == 9223372036854775808",
        "customer.revenue < 1e400",
        "customer.revenue < 1.7976931348623159e308",
        # Characters CEL's lexer does not take: a carriage return inside a quoted string,
        # whitespace beyond space, tab, newline, return and form feed, non-ASCII digits.
        "customer.note == 'a\rb'",
        "customer.order_count ==\u00a00",
        "customer.order_count ==\x0b0",
        "customer.order_count ==\u20280",
        "customer.order_count == \u0663",
        # Type names denote types, not variables.
        "int == int",
        "customer.kind == string",
        "null_type != customer.kind",
    ],
)
def test_everything_else_is_left_to_cel(source: str) -> None:
    assert compile_subset(source) is None


def test_condition_falls_back_to_cel_for_container_equality() -> None:
    condition = Condition("customer.traits == journey.key")
    context = {"customer": {"traits": {"a": 1}}, "journey": {"key": {"a": 1.0}}}
    assert condition.holds(
        lambda variables: {"customer": context["customer"], "journey": context["journey"]}
    )
