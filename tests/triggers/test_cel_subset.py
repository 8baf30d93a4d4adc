"""The direct evaluator agrees with CEL on every expression and context it accepts."""

from __future__ import annotations

from typing import Any

import cel
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from triggers.cel_subset import CelError, Unsupported, compile_subset
from triggers.conditions import Condition

CONTEXT_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-3, 3)
    | st.sampled_from([0.0, 1.0, 2.5, -1.5])
    | st.sampled_from(["", "a", "b", "A1"]),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["a", "b", "key"]), inner, max_size=3)
    ),
    max_leaves=6,
)
CONTEXTS = st.fixed_dictionaries(
    {},
    optional={
        "event": st.dictionaries(st.sampled_from(["a", "b", "key"]), CONTEXT_VALUES, max_size=3),
        "journey": st.dictionaries(st.sampled_from(["a", "b", "key"]), CONTEXT_VALUES, max_size=3),
        "customer": CONTEXT_VALUES,
    },
)

LITERALS = st.sampled_from(["0", "1", "2.5", "-1", "'a'", '"b"', "''", "true", "false", "null"])
PATHS = st.builds(
    lambda root, fields: ".".join([root, *fields]),
    st.sampled_from(["event", "journey", "customer"]),
    st.lists(st.sampled_from(["a", "b", "key"]), max_size=2),
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


def cel_outcome(source: str, context: dict[str, Any]) -> bool:
    try:
        return cel.compile(source).execute(context) is True
    except (KeyError, RuntimeError, ValueError, TypeError):
        return False


def direct_outcome(source: str, context: dict[str, Any]) -> bool | None:
    node = compile_subset(source)
    if node is None:
        return None
    try:
        return node(context) is True
    except CelError:
        return False
    except Unsupported:
        return None


@settings(max_examples=1500, deadline=None)
@given(_expressions(), CONTEXTS)
def test_direct_evaluation_matches_cel(source: str, context: dict[str, Any]) -> None:
    direct = direct_outcome(source, context)
    if direct is not None:
        assert direct == cel_outcome(source, context), source


@pytest.mark.parametrize(
    "source",
    [
        "event.properties.cart_id == journey.key",
        "event.properties.cart_id == journey.key && !(journey.key in customer.carts)",
        "customer.order_count == 0",
        "customer.revenue >= 100.5 || customer.traits.tier == 'gold'",
    ],
)
def test_catalog_style_conditions_are_evaluated_directly(source: str) -> None:
    assert compile_subset(source) is not None


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
