"""Request pacing: a hard ceiling (CARSYNC_RPS=N) or a rate found from the server's 429s.

Both space requests evenly (no bursts), so a server's token bucket never drains from our side.
The adaptive controller follows what a token-bucket limit looks like from the client: over the
limit, sending faster does not raise the admitted rate, it only adds 429s; so on 429s it paces
just under the admitted rate. Random "overload" 429s are a steady fraction whatever the rate:
when slowing down does not lower that fraction, the fraction becomes the baseline and the rate
is restored, so a noisy server does not make the client collapse.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass


class Pacer:
    """At most `rate` request starts per second, evenly spaced; None means no pacing.

    With `hard=True` it also counts the starts it really made: a late wake-up can bunch two
    spaced starts together, and a server counting per second must still never see more than
    `rate` of them in any one second."""

    # A second, with room for a start that leaves late (a busy event loop) and for loopback
    # jitter: 20 starts must never land in one server second. It costs 5% of the ceiling.
    WINDOW = 1.05

    def __init__(self, rate: float | None, *, hard: bool = False) -> None:
        self.rate = rate
        self._next = 0.0
        self._started: deque[float] | None = deque() if hard and rate else None

    async def wait(self) -> None:
        if self.rate is None:
            return
        now = time.monotonic()
        # Claim the next slot before sleeping, so concurrent callers get distinct slots.
        start = max(now, self._next)
        self._next = start + 1.0 / self.rate
        if start > now:
            await asyncio.sleep(start - now)
        started = self._started
        if started is None:
            return
        limit = max(1, int(self.rate))
        while len(started) >= limit and time.monotonic() - started[0] < self.WINDOW:
            await asyncio.sleep(self.WINDOW - (time.monotonic() - started[0]))
            while started and time.monotonic() - started[0] >= self.WINDOW:
                started.popleft()
        started.append(time.monotonic())
        while len(started) > limit:
            started.popleft()

    async def quiet(self) -> None:
        """With a hard ceiling, wait until the last start is a window old, so whoever calls the
        API next (another run, when the pool hands over) has a whole second to itself."""
        if self._started:
            await asyncio.sleep(max(0.0, self.WINDOW - (time.monotonic() - self._started[-1])))


@dataclass
class _Window:
    started: float
    responses: int = 0
    rejected: int = 0


class _LimitEstimator:
    """The server's rate from the last few seconds of answers. A 429 means its bucket was
    empty then, so between two 429s it admitted exactly what refilled: counting only there
    keeps its burst out of the estimate."""

    HORIZON = 3.0

    def __init__(self) -> None:
        self._events: deque[tuple[float, bool]] = deque()

    def record(self, now: float, rejected: bool) -> None:
        self._events.append((now, rejected))
        while self._events and self._events[0][0] < now - self.HORIZON:
            self._events.popleft()

    def recent_rejected(self, answers: int) -> int:
        return sum(rejected for _, rejected in list(self._events)[-answers:])

    def estimate(self) -> float | None:
        rejections = [i for i, (_, rejected) in enumerate(self._events) if rejected]
        if len(rejections) < 2:
            return None
        first, last = rejections[0], rejections[-1]
        span = self._events[last][0] - self._events[first][0]
        if span < 0.3:
            return None
        admitted = sum(1 for _, rejected in list(self._events)[first:last] if not rejected)
        return admitted / span


class AdaptiveRate:
    """Finds and follows the server's rate limit from 429 answers (CARSYNC_RPS=0).

    A limit is only believed once it shows clearly (many 429s at once); after that, 429s at or
    above the estimate cut the rate to just under it, while a few 429s well under it are taken
    as overload and ignored. Quiet windows raise the rate: fast while nothing is known or far
    under the estimate, in small probes near it (after a hold), so a raised limit is found.

    Paced under a real token-bucket limit, a client gets next to no 429s; a server that answers
    a steady share of 429s whatever the rate ("overload") keeps answering them there. So the
    share seen under the estimate, once settled after a cut, is learnt as noise: every threshold
    sits above it, and a cut whose evidence did not stand clear of it is undone (the estimate is
    forgotten and the climb resumes), instead of pinning the client at a limit that is not there.
    """

    START_RATE = 80.0  # requests/s before anything is known
    MAX_RATE = 100_000.0
    MIN_RATE = 0.5
    MIN_SAMPLES = 40  # responses a window needs before it can judge
    QUICK_SAMPLES = 16  # responses of a quiet half window that let the slow start double
    MIN_REJECTED = 3  # fewer 429s than this in a window are no evidence
    MARGIN = 0.02  # 429 fraction that counts, once over the estimate
    LIMIT_EVIDENCE = 0.15  # a full window with this fraction shows a limit, known or not
    BACKOFF = 0.97  # pace this far under the estimated limit
    SLOW_START = 2.0  # growth per quiet window while no limit is known
    CATCH_UP = 1.1  # growth per quiet window while well under the estimate
    PROBE = 1.02  # growth per quiet window near the estimate
    HOLD = 20.0  # seconds after a cut before probing above the estimate again
    SETTLE = 2.0  # seconds after a cut before 429s under the estimate count as overload
    LEARN = 0.2  # weight of each settled window in the overload share (a moving average)

    def __init__(self, pacer: Pacer, window: float = 0.25) -> None:
        self.pacer = pacer
        self.pacer.rate = self.START_RATE
        self.window_seconds = window
        self.limit_estimate: float | None = None
        self.overload_ignored = 0  # 429s taken as overload, for metadata
        self._window = _Window(time.monotonic())
        self._estimator = _LimitEstimator()
        self._hold_until = 0.0
        self._settled_at = 0.0
        self._cut_fraction = 0.0  # the 429 share of the window that made the last cut
        self.overload_share = 0.0  # 429s the server answers whatever the rate

    @property
    def rate(self) -> float:
        assert self.pacer.rate is not None
        return self.pacer.rate

    def record(self, rejected: bool) -> None:
        window = self._window
        now = time.monotonic()
        window.responses += 1
        window.rejected += rejected
        self._estimator.record(now, rejected)
        elapsed = now - window.started
        # Far over a limit most answers are 429: react before a whole window of them.
        clearly_over = window.rejected >= 3 and self._estimator.recent_rejected(10) >= 5
        if clearly_over:
            self._cut(window, elapsed)
        elif elapsed >= self.window_seconds and window.responses >= self.MIN_SAMPLES:
            self._judge(window, elapsed)
        elif self._quiet_start(window, elapsed):
            self._grow()
        else:
            return
        self._window = _Window(now)

    def _quiet_start(self, window: _Window, elapsed: float) -> bool:
        """While no limit is known, a short window without a single 429 is enough to double:
        a sync of a fast API lasts seconds, and whole windows would spend one of them climbing.
        Cuts are still judged on whole windows only (or when clearly over a limit)."""
        return (
            self.limit_estimate is None
            and window.rejected == 0
            and window.responses >= self.QUICK_SAMPLES
            and elapsed >= self.window_seconds / 2
        )

    def _judge(self, window: _Window, elapsed: float) -> None:
        fraction = window.rejected / window.responses
        estimate = self.limit_estimate
        at_known_limit = estimate is not None and self.rate >= 0.99 * estimate
        if estimate is not None and not at_known_limit and time.monotonic() >= self._settled_at:
            self._learn_overload(fraction)
        noise = self.overload_share
        if window.rejected >= self.MIN_REJECTED and fraction > noise + self.MARGIN:
            if at_known_limit or fraction >= noise + self.LIMIT_EVIDENCE:
                self._cut(window, elapsed)
                return
            self.overload_ignored += window.rejected  # under any known limit: overload
        if window.responses / elapsed >= 0.8 * self.rate:
            # Only raise a rate we actually use; otherwise something else is the bottleneck.
            self._grow()

    def _learn_overload(self, fraction: float) -> None:
        self.overload_share += self.LEARN * (fraction - self.overload_share)
        if (
            self.overload_share > self.MARGIN
            and self._cut_fraction < self.overload_share + self.LIMIT_EVIDENCE
        ):
            # The 429s that made the cut go on under the estimate: noise, not a limit.
            self.limit_estimate = None
            self._hold_until = 0.0

    def _cut(self, window: _Window, elapsed: float) -> None:
        self._cut_fraction = window.rejected / max(1, window.responses)
        self._settled_at = time.monotonic() + self.SETTLE
        estimate = self._estimator.estimate()
        if estimate is None:  # too few 429s to see the limit yet: what got through lately,
            # but at most halving: answers to requests sent before a cut (all 429s, far over a
            # limit) would otherwise take the rate to nothing, cut after cut.
            got_through = (window.responses - window.rejected) / max(elapsed, 1e-3)
            estimate = max(got_through, self.rate / (2 * self.BACKOFF))
        self.limit_estimate = estimate
        self.pacer.rate = max(self.MIN_RATE, self.BACKOFF * estimate)
        self._hold_until = time.monotonic() + self.HOLD

    def _grow(self) -> None:
        estimate = self.limit_estimate
        if estimate is None:
            growth = self.SLOW_START
        elif self.rate < 0.95 * estimate:
            growth = self.CATCH_UP
        elif time.monotonic() >= self._hold_until:
            growth = self.PROBE
            # A quiet window at this rate shows the limit is at least this high.
            self.limit_estimate = max(estimate, self.rate)
        else:
            return
        self.pacer.rate = min(self.MAX_RATE, self.rate * growth)


class RateControl:
    """One per run: the ceiling, or the adaptive controller, shared by every request."""

    def __init__(self, ceiling: float) -> None:
        self.pacer = Pacer(ceiling if ceiling > 0 else None, hard=True)
        self.adaptive = AdaptiveRate(self.pacer) if ceiling <= 0 else None

    async def wait(self) -> None:
        await self.pacer.wait()

    def record(self, rejected: bool) -> None:
        if self.adaptive is not None:
            self.adaptive.record(rejected)

    @property
    def rate(self) -> float | None:
        return self.pacer.rate
