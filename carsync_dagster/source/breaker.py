"""Circuit breaker: after a run of consecutive failures every request pauses for a cool-down,
then one probe decides whether to resume. Opening and closing are logged once each."""

from __future__ import annotations

import asyncio
import logging
import time

logger = logging.getLogger("carsync.source")


class CircuitBreaker:
    def __init__(self, failures_to_open: int = 10, cooldown: float = 60.0) -> None:
        self.failures_to_open = failures_to_open
        self.cooldown = cooldown
        self.consecutive_failures = 0
        self.opened = 0  # how many times it opened, for metadata
        self._open_until: float | None = None
        self._probe: asyncio.Lock | None = None

    @property
    def is_open(self) -> bool:
        return self._open_until is not None

    async def admit(self) -> bool:
        """Wait while open. Returns True when the caller is the probe that decides."""
        while self._open_until is not None:
            delay = self._open_until - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
                continue
            if self._probe is None:
                self._probe = asyncio.Lock()
            if not self._probe.locked():
                await self._probe.acquire()
                return True
            await asyncio.sleep(min(0.05, self.cooldown))
        return False

    def succeeded(self, probe: bool) -> None:
        self.consecutive_failures = 0
        if self._open_until is not None:
            self._open_until = None
            logger.warning("circuit closed: the API answers again, requests resume")
        self._release(probe)

    def failed(self, probe: bool) -> None:
        self.consecutive_failures += 1
        if probe:
            self._open_until = time.monotonic() + self.cooldown  # stays open, no new log line
        elif self._open_until is None and self.consecutive_failures >= self.failures_to_open:
            self.opened += 1
            self._open_until = time.monotonic() + self.cooldown
            logger.warning(
                "circuit open: %d consecutive failures, pausing all requests for %.0fs",
                self.consecutive_failures,
                self.cooldown,
            )
        self._release(probe)

    def release(self, probe: bool) -> None:
        """The probe ended without a verdict (a 429 or an error that is not the server's)."""
        if probe and self._open_until is not None:
            self._open_until = time.monotonic()  # let the next request probe at once
        self._release(probe)

    def _release(self, probe: bool) -> None:
        if probe and self._probe is not None and self._probe.locked():
            self._probe.release()
