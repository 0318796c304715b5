"""Rate shaping: sensors advertise several times a second; the store wants a reading per
metric at most once per interval, unless the value moved by more than a threshold.

The latest value is always kept (for the live view and the nearby list); only what is
*stored* is shaped. Thresholds are absolute per metric, with a relative fallback for
metrics nobody configured.
"""

from __future__ import annotations

DEFAULT_THRESHOLDS: dict[str, float] = {
    "temperature": 0.2,
    "humidity": 1.0,
    "moisture": 1.0,
    "pressure": 0.5,
    "battery": 2.0,
    "voltage": 0.05,
    "illuminance": 10.0,
    "co2": 25.0,
    "pm25": 2.0,
    "pm10": 2.0,
}


class RateShaper:
    """Decides, per (device, metric), whether a value is worth a row in the store."""

    __slots__ = ("_last", "interval_s", "relative", "thresholds")

    def __init__(self, interval_s: float, thresholds: dict[str, float] | None = None,
                 relative: float = 0.05) -> None:
        self.interval_s = interval_s
        self.thresholds = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
        self.relative = relative
        # device -> metric -> (value stored last, when)
        self._last: dict[str, dict[str, tuple[float, float]]] = {}

    def select(self, device: str, values: list[tuple[str, float, str]], now: float) -> list[tuple[str, float, str]]:
        """The subset of ``values`` to store now (and remember them as stored)."""
        last = self._last.get(device)
        if last is None:
            last = self._last[device] = {}
        out: list[tuple[str, float, str]] = []
        for item in values:
            metric, value = item[0], item[1]
            prev = last.get(metric)
            if prev is not None and now - prev[1] < self.interval_s:
                limit = self.thresholds.get(metric)
                if limit is None:
                    limit = self.relative * max(abs(prev[0]), abs(value), 1e-9)
                if abs(value - prev[0]) < limit:
                    continue
            last[metric] = (value, now)
            out.append(item)
        return out

    def forget(self, device: str) -> None:
        self._last.pop(device, None)

    def __len__(self) -> int:
        return len(self._last)
