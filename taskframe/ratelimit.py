"""Per-task rate limits of one worker: ``@app.task(rate_limit="10/s")`` (also /m, /h)."""

from __future__ import annotations

import re
import time

_RATE = re.compile(r"^\s*(?P<count>\d+(?:\.\d+)?)\s*(?:/\s*(?P<unit>[smh]))?\s*$")
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_rate(text: str) -> float:
    """Tasks per second of ``"10/s"``, ``"30/m"``, ``"100/h"`` or ``"5"`` (per second)."""
    match = _RATE.match(text)
    if match is None or float(match.group("count")) <= 0:
        msg = f"rate_limit {text!r} is not a rate; write it like '10/s', '30/m' or '100/h'"
        raise ValueError(msg)
    return float(match.group("count")) / _UNIT_S[match.group("unit") or "s"]


class TokenBucket:
    """Allows ``rate_per_s`` takes a second, spaced out (a burst of at most ``capacity``)."""

    def __init__(self, rate_per_s: float, capacity: float = 1.0) -> None:
        self.rate_per_s = rate_per_s
        self.capacity = capacity
        self._tokens = capacity
        self._updated = time.monotonic()

    def try_take(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self.capacity, self._tokens + (now - self._updated) * self.rate_per_s)
        self._updated = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False
