"""A direct evaluator for the simple CEL that rules mostly use, with CEL's semantics.

Conditions like `event.properties.cart_id == journey.key` or
`customer.order_count == 0` are evaluated here as Python closures over the context
dicts: no conversion of the context into CEL values, which is most of the cost of
a CEL call. The subset is field selection, literals (int, double, string, bool,
null), `== != < <= > >=`, `in`, `!`, `&&`, `||` and parentheses. `compile_subset`
returns None for anything else (calls, macros, indexing, arithmetic, ...), and
evaluation raises `Unsupported` for values it leaves to CEL (lists or maps compared
with `==`), so the caller runs the full CEL program in both cases.

CEL semantics kept: a missing field or a wrong type is an error, not false; `&&`
and `||` absorb an error when the other side decides the result; `==` between
different types is false, except that ints and doubles compare by value; bools are
not numbers. tests/triggers/test_cel_subset.py checks all of it against CEL.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

Context = dict[str, Any]
Node = Callable[[Context], Any]


class CelError(Exception):
    """What CEL would report as an evaluation error (the condition is then false)."""


class Unsupported(Exception):
    """A value this evaluator leaves to CEL."""


_TOKEN = re.compile(
    r"""\s*(?:
        (?P<float>\d+\.\d+(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+)
      | (?P<int>\d+)(?![\w.])
      | (?P<string>"[^"\\\n]*"|'[^'\\\n]*')
      | (?P<op>==|!=|<=|>=|&&|\|\||[<>!().])
      | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
    )""",
    re.VERBOSE,
)
_RESERVED = frozenset({"in", "true", "false", "null"})
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
    source = source.rstrip()
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
            return _constant(int(text))
        if kind == "float":
            return _constant(float(text))
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
        if not isinstance(value, dict):
            raise CelError(f"no field {name!r} on a {type(value).__name__}")
        try:
            return value[name]
        except KeyError:
            raise CelError(f"no such key: {name!r}") from None

    return select


def _is_number(value: Any) -> bool:
    return type(value) in (int, float)


def equal(a: Any, b: Any) -> bool:
    """CEL `==` on scalars; containers are left to CEL."""
    if isinstance(a, dict | list) or isinstance(b, dict | list):
        raise Unsupported("container equality")
    if type(a) is bool or type(b) is bool:
        return type(a) is type(b) and a == b
    if _is_number(a):
        return _is_number(b) and a == b
    if type(a) is str:
        return type(b) is str and a == b
    if a is None:
        return b is None
    raise Unsupported(f"equality on {type(a).__name__}")


def _eq(left: Node, right: Node) -> Node:
    return lambda context: equal(left(context), right(context))


def _ne(left: Node, right: Node) -> Node:
    return lambda context: not equal(left(context), right(context))


def _ordering(compare: Callable[[Any, Any], bool]) -> Callable[[Node, Node], Node]:
    def build(left: Node, right: Node) -> Node:
        def evaluate(context: Context) -> bool:
            a, b = left(context), right(context)
            if (_is_number(a) and _is_number(b)) or (type(a) is type(b) and type(a) in (str, bool)):
                return compare(a, b)
            raise CelError("no such overload")

        return evaluate

    return build


def _in(left: Node, right: Node) -> Node:
    def evaluate(context: Context) -> bool:
        item, container = left(context), right(context)
        if isinstance(container, dict):
            if type(item) is not str:
                raise Unsupported("non-string map key")
            return item in container
        if isinstance(container, list):
            return any(equal(item, element) for element in container)
        raise CelError("no such overload")

    return evaluate


def _not(operand: Node) -> Node:
    def evaluate(context: Context) -> bool:
        value = operand(context)
        if type(value) is not bool:
            raise CelError("no such overload")
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
                raise CelError("no such overload")
            if a is (not decisive):
                return not decisive
            raise a if isinstance(a, CelError) else CelError("no such overload")

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
