"""Time in query strings: unix seconds (``1717171717.5``) or ISO 8601
(``2024-05-31T16:08:37Z``; no zone means UTC), always handled as unix seconds."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import BeforeValidator


def to_unix(value: Any) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            try:
                dt = datetime.fromisoformat(text)
            except ValueError:
                raise ValueError("expected unix seconds or an ISO 8601 time") from None
            if dt.tzinfo is None:
                dt = dt.replace(tzinfo=UTC)
            seconds = dt.timestamp()
    else:
        raise ValueError("expected unix seconds or an ISO 8601 time")
    if not math.isfinite(seconds) or not 0 <= seconds < 32503680000:  # year 3000
        raise ValueError("time out of range")
    return seconds


Timestamp = Annotated[float, BeforeValidator(to_unix)]
