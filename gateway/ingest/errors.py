"""The one error every source raises for bad input."""

from __future__ import annotations


class Rejected(ValueError):
    """Input refused. ``reason`` is a short stable label (a /metrics label value);
    ``detail`` is a human sentence safe to return to the sender."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
