"""A direct evaluator for the simple CEL that rules mostly use, with CEL's semantics.

Conditions like `event.properties.cart_id == journey.key` or
`customer.order_count == 0` are evaluated here as Python closures over the context
dicts: no conversion of the context into CEL values, which is most of the cost of
a CEL call. The subset is field selection, literals (int64, finite double, string
without escapes, bool, null), `== != < <= > >=`, `in`, `!`, `&&`, `||` and
parentheses. `compile_subset` returns None for anything else (calls, macros,
indexing, arithmetic, type names, ...), and evaluation raises `Unsupported` for
values it leaves to CEL, so the caller runs the full CEL program in both cases.

CEL semantics kept: a missing field or a wrong type is an error, not false; `&&`
and `||` absorb an error when the other side decides the result; `==` between
different types is false, except that ints and doubles compare as numbers, the int
converted to double (as the cel library and the CEL conformance suite do) for `==`
and the orderings alike, so `x <= d && x >= d` is `x == d`; bools are not numbers.

Left to CEL (`Unsupported`): lists or maps compared with `==`, ints beyond int64
(the cel library makes uints or doubles of them), ordering NaN (the cel library
reports an error), and values of any type but the exact JSON ones (dict, list, str,
int, float, bool, None), such as subclasses, which the library converts by what they
are made of. tests/triggers/test_cel_subset.py checks all of it against the cel
library, tests/triggers/test_cel_conformance.py against the CEL conformance cases.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any, NoReturn

Context = dict[str, Any]
Node = Callable[[Context], Any]


class CelError(Exception):
    """What CEL would report as an evaluation error (the condition is then false)."""


class Unsupported(Exception):
    """A value this evaluator leaves to CEL."""


# CEL's lexer: ASCII digits only, whitespace is space, tab, newline, return and form
# feed (as in _WHITESPACE), and a quoted string holds neither newline nor return.
# Python's \s and \d take more, which CEL rejects.
_WHITESPACE = " \t\n\r\f"
_TOKEN = re.compile(
    r"""[ \t\n\r\f]*(?:
        (?P<float>[0-9]+\.[0-9]+(?:[eE][+-]?[0-9]+)?|[0-9]+[eE][+-]?[0-9]+)
      | (?P<int>[0-9]+)(?![\w.])
      | (?P<string>"[^"\\\n\r]*"|'[^'\\\n\r]*')
      | (?P<op>==|!=|<=|>=|&&|\|\||[<>!().])
      | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
    )""",
    re.VERBOSE,
)
_RESERVED = frozenset({"in", "true", "false", "null"})
# Bare, these denote types (`int == int` is true), not variables.
_TYPE_NAMES = frozenset(
    {"bool", "bytes", "double", "int", "list", "map", "null_type", "string", "type", "uint"}
)
_CEL_RESERVED = frozenset(
    {
        "as",
        "break",
        "const",
        "continue",
        "else",
        "for",
        "function",
        "if",
        "import",
        "let",
        "loop",
        "package",
        "namespace",
        "return",
        "var",
        "void",
        "while",
    }
)


def _tokens(source: str) -> list[tuple[str, str]] | None:
    out: list[tuple[str, str]] = []
    pos = 0
    source = source.rstrip(_WHITESPACE)
    while pos < len(source):
        match = _TOKEN.match(source, pos)
        if match is None or match.end() == pos:
            return None
        kind = match.lastgroup
        assert kind is not None
        out.append((kind, match.group(kind)))
        pos = match.end()
    return out


class _Parser:
    def __init__(self, tokens: list[tuple[str, str]]) -> None:
        self._tokens = tokens
        self._pos = 0

    def _peek(self) -> tuple[str, str] | None:
        return self._tokens[self._pos] if self._pos < len(self._tokens) else None

    def _next(self) -> tuple[str, str]:
        token = self._peek()
        if token is None:
            raise SyntaxError("unexpected end")
        self._pos += 1
        return token

    def _accept(self, value: str) -> bool:
        token = self._peek()
        if token is not None and token[1] == value and token[0] in ("op", "ident"):
            self._pos += 1
            return True
        return False

    def parse(self) -> Node:
        node = self._or()
        if self._peek() is not None:
            raise SyntaxError("trailing input")
        return node

    def _or(self) -> Node:
        node = self._and()
        while self._accept("||"):
            node = _or(node, self._and())
        return node

    def _and(self) -> Node:
        node = self._relation()
        while self._accept("&&"):
            node = _and(node, self._relation())
        return node

    def _relation(self) -> Node:
        node = self._unary()
        token = self._peek()
        if token is not None and token[1] in _RELATIONS and token[0] in ("op", "ident"):
            self._pos += 1
            node = _RELATIONS[token[1]](node, self._unary())
            after = self._peek()
            if after is not None and after[1] in _RELATIONS:
                raise SyntaxError("chained relations are left to CEL")
        return node

    def _unary(self) -> Node:
        if self._accept("!"):
            return _not(self._unary())
        return self._member()

    def _member(self) -> Node:
        node = self._primary()
        while self._accept("."):
            kind, name = self._next()
            if kind != "ident" or name in _RESERVED:
                raise SyntaxError("field name expected")
            node = _select(node, name)
        if self._peek() == ("op", "("):
            raise SyntaxError("method calls are left to CEL")
        return node

    def _primary(self) -> Node:
        kind, text = self._next()
        if kind == "op" and text == "(":
            node = self._or()
            if not self._accept(")"):
                raise SyntaxError("missing )")
            return node
        if kind == "int":
            value = int(text)
            if value > _INT64_MAX:
                raise SyntaxError("CEL rejects an int literal beyond int64")
            return _constant(value)
        if kind == "float":
            number = float(text)
            if math.isinf(number):
                raise SyntaxError("CEL rejects a double literal beyond the double range")
            return _constant(number)
        if kind == "string":
            return _constant(text[1:-1])
        if kind == "ident":
            if text == "true":
                return _constant(True)
            if text == "false":
                return _constant(False)
            if text == "null":
                return _constant(None)
            if text in _RESERVED or text in _CEL_RESERVED:
                raise SyntaxError("reserved word")
            if text in _TYPE_NAMES:
                raise SyntaxError("type names are left to CEL")
            following = self._peek()
            if following == ("op", "("):
                raise SyntaxError("calls are left to CEL")
            return _variable(text)
        raise SyntaxError(f"unexpected {text!r}")


def compile_subset(source: str) -> Node | None:
    """A closure evaluating `source`, or None when it is not in the subset."""
    tokens = _tokens(source)
    if not tokens:
        return None
    try:
        return _Parser(tokens).parse()
    except SyntaxError:
        return None


# ----------------------------------------------------------------------- semantics


def _constant(value: Any) -> Node:
    return lambda context: value


def _variable(name: str) -> Node:
    def read(context: Context) -> Any:
        try:
            return context[name]
        except KeyError:
            raise CelError(f"undeclared reference to {name!r}") from None

    return read


def _select(operand: Node, name: str) -> Node:
    def select(context: Context) -> Any:
        value = operand(context)
        if type(value) is not dict:
            _no_overload(value)
        try:
            return value[name]
        except KeyError:
            raise CelError(f"no such key: {name!r}") from None

    return select


_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
_SCALARS = frozenset({bool, int, float, str, type(None)})
# The types a JSON context is made of. The subset tests exact types, not isinstance:
# the cel library converts a subclass (an IntEnum, a defaultdict) by what it is made
# of, and guessing that here would be wrong as often as not.
_CEL_TYPES = _SCALARS | {dict, list}


def _int64(value: int) -> int:
    if _INT64_MIN <= value <= _INT64_MAX:
        return value
    # CEL has no such int; the cel library makes a uint or a double of it, compared
    # by other rules.
    raise Unsupported("an integer beyond int64")


def _orderable(value: float) -> float:
    if value != value:
        # Ordering NaN is an error in the cel library, where IEEE says false: under
        # `!` or `||` the two differ, so the library decides.
        raise Unsupported("ordering NaN")
    return value


def _no_overload(*values: Any) -> NoReturn:
    """CEL's error for an operator applied to the wrong types, once the values are
    known to be ones CEL would see the same way."""
    for value in values:
        if type(value) not in _CEL_TYPES:
            raise Unsupported(f"a value of type {type(value).__name__}")
    raise CelError("no such overload")


def equal(a: Any, b: Any) -> bool:
    """CEL `==` on scalars; containers are left to CEL."""
    same: bool
    kind = type(a)
    if kind is type(b):
        if kind is int:
            return _int64(a) == _int64(b)
        if kind in _SCALARS:
            same = a == b
            return same
    elif kind is int and type(b) is float:
        same = float(_int64(a)) == b
        return same
    elif kind is float and type(b) is int:
        same = a == float(_int64(b))
        return same
    elif kind in _SCALARS and type(b) in _SCALARS:
        return False
    raise Unsupported(f"equality of {kind.__name__} and {type(b).__name__}")


def _eq(left: Node, right: Node) -> Node:
    return lambda context: equal(left(context), right(context))


def _ne(left: Node, right: Node) -> Node:
    return lambda context: not equal(left(context), right(context))


def _comparable(a: Any, b: Any) -> tuple[Any, Any]:
    """`a` and `b` in a form Python orders as CEL does: strings by code point, false
    before true, numbers by value, an int against a double converted to double."""
    kind = type(a)
    if kind is type(b):
        if kind is str or kind is bool:
            return a, b
        if kind is int:
            return _int64(a), _int64(b)
        if kind is float:
            return _orderable(a), _orderable(b)
    elif kind is int and type(b) is float:
        return float(_int64(a)), _orderable(b)
    elif kind is float and type(b) is int:
        return _orderable(a), float(_int64(b))
    _no_overload(a, b)


def _ordering(compare: Callable[[Any, Any], bool]) -> Callable[[Node, Node], Node]:
    def build(left: Node, right: Node) -> Node:
        return lambda context: compare(*_comparable(left(context), right(context)))

    return build


def _in(left: Node, right: Node) -> Node:
    def evaluate(context: Context) -> bool:
        item, container = left(context), right(context)
        kind = type(container)
        if kind is dict:
            if type(item) is not str:
                raise Unsupported("non-string map key")
            return item in container
        if kind is list:
            return any(equal(item, element) for element in container)
        _no_overload(item, container)

    return evaluate


def _not(operand: Node) -> Node:
    def evaluate(context: Context) -> bool:
        value = operand(context)
        if type(value) is not bool:
            _no_overload(value)
        return not value

    return evaluate


def _logical(decisive: bool) -> Callable[[Node, Node], Node]:
    """`&&` (decided by a false side) or `||` (by a true side). Either side deciding
    absorbs an error on the other, as in CEL; otherwise both must be bools."""

    def build(left: Node, right: Node) -> Node:
        def evaluate(context: Context) -> bool:
            try:
                a: object = left(context)
            except CelError as exc:
                a = exc
            if a is decisive:
                return decisive
            b: object = right(context)  # an error here is the result: `a` cannot absorb it
            if b is decisive:
                return decisive
            if type(b) is not bool:
                _no_overload(b)
            if a is (not decisive):
                return not decisive
            if isinstance(a, CelError):
                raise a
            _no_overload(a)

        return evaluate

    return build


_and = _logical(False)
_or = _logical(True)


_RELATIONS: dict[str, Callable[[Node, Node], Node]] = {
    "==": _eq,
    "!=": _ne,
    "<": _ordering(lambda a, b: a < b),
    "<=": _ordering(lambda a, b: a <= b),
    ">": _ordering(lambda a, b: a > b),
    ">=": _ordering(lambda a, b: a >= b),
    "in": _in,
}


def journey_key_match(source: str) -> tuple[str, ...] | None:
    """The event path P when `source` is `event.P == journey.key`, alone or `&&`-ed
    with other terms at the top level. Only the journey keyed by the event's value at
    P can then satisfy it, so the engine looks that one journey up instead of
    evaluating the condition on every journey of the rule."""
    tokens = _tokens(source)
    if not tokens or compile_subset(source) is None:
        return None
    terms = _top_level_terms(tokens)
    if terms is None:
        return None
    for term in terms:
        texts = [text for _, text in term]
        if texts.count("==") != 1:
            continue
        cut = texts.index("==")
        sides = (_dotted(texts[:cut]), _dotted(texts[cut + 1 :]))
        for path, other in (sides, sides[::-1]):
            if other == ("journey", "key") and path and len(path) > 1 and path[0] == "event":
                return path[1:]
    return None


def _top_level_terms(tokens: list[tuple[str, str]]) -> list[list[tuple[str, str]]] | None:
    """The operands of a top-level `&&` chain; None when `||` joins at the top."""
    terms: list[list[tuple[str, str]]] = [[]]
    depth = 0
    for token in tokens:
        if token == ("op", "("):
            depth += 1
        elif token == ("op", ")"):
            depth -= 1
        elif depth == 0 and token == ("op", "||"):
            return None
        elif depth == 0 and token == ("op", "&&"):
            terms.append([])
            continue
        terms[-1].append(token)
    return terms


def _dotted(texts: list[str]) -> tuple[str, ...] | None:
    """`["event", ".", "properties", ".", "cart_id"]` -> ("event", "properties", "cart_id")."""
    names = texts[::2]
    if not names or texts[1::2] != ["."] * (len(names) - 1):
        return None
    if not all(_IDENTIFIER.fullmatch(name) and name not in _RESERVED for name in names):
        return None
    return tuple(names)


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
