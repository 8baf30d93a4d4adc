"""Rule conditions in the Common Expression Language (CEL), never Python `eval`.

Expressions are compiled once when rules load. A condition sees three variables:
`event` (the event as JSON), `customer` (a projection of the state) and `journey`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import cel

from triggers.cel_subset import CelError, Unsupported, compile_subset, journey_key_match

VARIABLES = frozenset({"event", "customer", "journey"})


class ConditionError(ValueError):
    pass


class Condition:
    """A compiled CEL boolean expression."""

    def __init__(self, source: str) -> None:
        try:
            self._program = cel.compile(source)
        except (ValueError, RuntimeError) as exc:
            raise ConditionError(f"invalid CEL expression {source!r}: {exc}") from None
        unknown = set(self._program.variables()) - VARIABLES
        if unknown:
            raise ConditionError(
                f"CEL expression {source!r} uses unknown variable(s) {sorted(unknown)}; "
                f"available: {sorted(VARIABLES)}"
            )
        self.source = source
        # Converting the context is most of an evaluation's cost: pass only these.
        self.variables = frozenset(self._program.variables())
        # The same expression without the conversion, when it is simple enough.
        self._direct = compile_subset(source)
        # `event.P == journey.key` (&& ...): P, so journeys can be looked up by key.
        self.journey_key_path = journey_key_match(source)

    def holds(self, context: Callable[[frozenset[str]], dict[str, Any]]) -> bool:
        """Evaluate on a lazily built context; a condition whose evaluation fails in any
        way (a missing field, a type error, division by zero, int64 overflow) is false.

        Treating evaluation errors as false keeps one odd event from stopping a rule
        for everyone, and matches how marketers read `when`: "only if this is true".
        """
        variables = context(self.variables)
        if self._direct is not None:
            try:
                return self._direct(variables) is True
            except CelError:
                return False
            except Unsupported:
                pass
        try:
            return self._program.execute(variables) is True
        except Exception:
            # The cel library reports CEL's evaluation errors as whatever Python
            # exception fits (KeyError, TypeError, ValueError, RuntimeError,
            # ZeroDivisionError, OverflowError, ...), a list no contract fixes. Building
            # the context stays outside this `try`: its failures are the engine's own.
            return False
