"""A parameterised WHERE clause for the list queries (audit, events, alerts, runs, tokens, series).

Every list endpoint filters by a handful of optional columns: each filter left out (None)
adds nothing, each given one adds a condition with ``?`` placeholders and its values, all
joined with AND. Values always travel as parameters; only the fixed condition text is SQL.
"""

from __future__ import annotations

from typing import Any


class Where:
    def __init__(self) -> None:
        self.terms: list[str] = []
        self.params: list[Any] = []

    def add(self, term: str, *params: Any) -> None:
        """Require ``term``; ``params`` fill its ``?`` placeholders, in order."""
        self.terms.append(term)
        self.params.extend(params)

    def given(self, term: str, value: Any) -> None:
        """Require ``term`` (one ``?``, filled with ``value``), unless ``value`` is None: a filter left out."""
        if value is not None:
            self.add(term, value)

    def sql(self) -> str:
        """``" WHERE a AND b"`` (with its leading space), or ``""`` when nothing is required."""
        return " WHERE " + " AND ".join(self.terms) if self.terms else ""
