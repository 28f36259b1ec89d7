"""Grammar constraints: output that parses, enforced by the host on every token.

Name a constraint — ``JsonSchema(schema)``, ``JsonObject()``, ``Regex(pattern)``,
``Grammar(lark_text)``, ``Choice([...])`` — and pass it to ``Context.generate(...,
grammar=...)``: the host compiles it once (a bad one raises ``ValueError`` with the
compiler's reason) and masks every step of the generation itself, with no guest work per
token. ``Context.constrain(constraint)`` binds a ``Matcher`` to a context instead: every
later ``generate`` and ``decode_step`` of the context continues the same grammar, and a
fork continues it from the same point.
"""

from __future__ import annotations

import json
from typing import Any

from inferlet._wit import grammar as wit_grammar


class Constraint:
    """What generated text must match; compiled on the host at first use."""

    kind = ""

    def __init__(self, source: str) -> None:
        self.source = source
        self._compiled: Any = None

    def compiled(self) -> Any:
        """The host's compiled grammar (``ValueError`` if it does not compile)."""
        if self._compiled is None:
            try:
                self._compiled = wit_grammar.Grammar.compile(self.kind, self.source)
            except Exception as e:  # the bindings raise Err for an error result
                raise ValueError(f"{self.kind}: {getattr(e, 'value', e)}") from None
        return self._compiled


class JsonSchema(Constraint):
    """JSON that validates against ``schema`` (a dict or JSON text)."""

    kind = "json_schema"

    def __init__(self, schema: dict[str, Any] | str) -> None:
        super().__init__(schema if isinstance(schema, str) else json.dumps(schema))


class JsonObject(Constraint):
    """Any JSON object."""

    kind = "json_object"

    def __init__(self) -> None:
        super().__init__("")


class Regex(Constraint):
    """Text that matches ``pattern`` whole."""

    kind = "regex"


class Grammar(Constraint):
    """Text in the language of a Lark grammar (``start`` is the start rule)."""

    kind = "lark"


class Choice(Constraint):
    """Exactly one of ``options``."""

    kind = "choice"

    def __init__(self, options: list[str]) -> None:
        if not options or not all(isinstance(o, str) and o for o in options):
            raise ValueError("Choice needs a non-empty list of non-empty strings")
        super().__init__(json.dumps(list(options)))
        self.options = list(options)


class Matcher:
    """A position in a constraint: the tokens allowed next, advanced by tokens taken."""

    def __init__(self, constraint: Constraint, raw: Any = None) -> None:
        self.constraint = constraint
        self._raw = raw if raw is not None else wit_grammar.Matcher(constraint.compiled())

    def mask(self) -> list[int]:
        """The allowed next tokens as a BRLE logit mask (true = forbidden)."""
        return list(self._raw.mask())

    def accept(self, tokens: list[int]) -> bool:
        """Take ``tokens``; False (taking none) when the constraint forbids one."""
        return bool(self._raw.accept(list(tokens)))

    def is_accepting(self) -> bool:
        """The output may end here."""
        return bool(self._raw.is_accepting())

    def is_done(self) -> bool:
        """Only end-of-sequence may follow."""
        return bool(self._raw.is_stopped())

    def fork(self) -> Matcher:
        return Matcher(self.constraint, self._raw.fork())
