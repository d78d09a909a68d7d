"""Fault settings, the token bucket and request statistics of the simulator."""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class Faults:
    """What goes wrong on /cars and /cars/{id}; rates are fractions of requests."""

    rate_limit: float = 0.0  # token bucket refill, requests/s; 0 = no limit
    burst: int = 10
    overload_429: float = 0.0
    error_rate: float = 0.0
    hang_rate: float = 0.0
    hang_seconds: float = 30.0
    truncate_rate: float = 0.0
    html_rate: float = 0.0
    latency_ms: float = 0.0
    drift_inserts: int = 0
    drift_deletes: int = 0
    fault_seed: int = 0

    def update(self, changes: dict[str, Any]) -> None:
        """Apply changes by name; ValueError names the first bad one and changes nothing."""
        names = {f.name for f in fields(self)}
        checked: dict[str, float] = {}
        for name, value in changes.items():
            if name not in names:
                raise ValueError(f"unknown setting {name!r}")
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number")
            integral = isinstance(getattr(self, name), int)
            if integral and value != int(value):
                raise ValueError(f"{name} must be an integer")
            if name != "fault_seed" and value < 0:
                raise ValueError(f"{name} must not be negative")
            if name.endswith(("_rate", "_429")) and value > 1:
                raise ValueError(f"{name} is a fraction of requests, at most 1")
            checked[name] = int(value) if integral else float(value)
        for name, value in checked.items():
            setattr(self, name, value)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class TokenBucket:
    """`rate` tokens per second, holding at most `burst`; one token admits one request."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = max(burst, 1)
        self.tokens = float(self.burst)
        self.last = time.monotonic()

    def take(self) -> int:
        """0 when admitted, else the whole seconds (at least 1) until a token is there."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0
        return max(1, math.ceil((1 - self.tokens) / self.rate))


class Stats:
    """Counters of API requests (control endpoints are not counted)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.by_status: Counter[int] = Counter()
        self.list_pages: Counter[int] = Counter()  # complete 200 pages without updated_since
        self.since_pages = 0  # complete 200 pages with updated_since
        self.by_id = 0  # /cars/{id} answered 200 or 404
        self.admitted: Counter[int] = Counter()  # per wall-clock second, past the rate limits
        self.in_flight = 0
        self.max_in_flight = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "by_status": {str(k): v for k, v in sorted(self.by_status.items())},
            "list_pages": {str(k): v for k, v in sorted(self.list_pages.items())},
            "since_pages": self.since_pages,
            "by_id": self.by_id,
            "admitted_per_second": {str(k): v for k, v in sorted(self.admitted.items())},
            "max_in_flight": self.max_in_flight,
        }
