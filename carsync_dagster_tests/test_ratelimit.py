"""The rate finder against simulated servers, on a simulated clock: token-bucket limits, steady
overload 429s, and both. Fast and deterministic, so every seed is checked, not a lucky one;
test_hostile.py checks the same client against the real simulator."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from carsync_dagster.source import ratelimit
from carsync_dagster.source.ratelimit import AdaptiveRate, Pacer


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now


@dataclass
class _Outcome:
    admitted_per_second: float  # from `settled` seconds on
    share_429: float
    final_rate: float


def _run(
    monkeypatch: pytest.MonkeyPatch,
    *,
    seconds: float,
    limit: float | None = None,
    overload: float = 0.0,
    seed: int = 1,
    capacity: float = 600.0,  # what the client could send at most (connections, CPU)
    burst: float = 10.0,
    settled: float = 5.0,
) -> _Outcome:
    clock = _Clock()
    monkeypatch.setattr(ratelimit, "time", clock)
    rng = random.Random(seed)
    controller = AdaptiveRate(Pacer(None))
    tokens, admitted, refused, answered = burst, 0, 0, 0
    while clock.now < seconds:
        step = 1.0 / min(controller.rate, capacity)
        clock.now += step
        over_limit = False
        if limit is not None:
            tokens = min(burst, tokens + limit * step)
            over_limit = tokens < 1
        rejected = over_limit or rng.random() < overload
        if not over_limit and limit is not None:
            tokens -= 1
        controller.record(rejected)
        answered += 1
        refused += rejected
        if clock.now >= settled and not rejected:
            admitted += 1
    return _Outcome(admitted / (seconds - settled), refused / answered, controller.rate)


@pytest.mark.parametrize("seed", range(1, 9))
def test_steady_overload_is_not_taken_for_a_limit(
    monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    # 5% of answers are 429 whatever the rate, and there is no limit: the client must keep
    # close to what it can send, not settle at a rate where a fluke of 429s once cut it.
    outcome = _run(monkeypatch, seconds=40, overload=0.05, seed=seed)
    assert outcome.admitted_per_second >= 0.8 * 0.95 * 600, outcome


@pytest.mark.parametrize("seed", range(1, 5))
def test_a_token_bucket_limit_is_found_and_kept(monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    outcome = _run(monkeypatch, seconds=60, limit=30, seed=seed)
    assert 0.9 * 30 <= outcome.admitted_per_second <= 30.5, outcome
    assert outcome.share_429 <= 0.03, outcome


@pytest.mark.parametrize("seed", range(1, 5))
def test_a_limit_with_overload_on_top_is_still_kept(
    monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    outcome = _run(monkeypatch, seconds=60, limit=30, overload=0.05, seed=seed)
    # The server admits at most 95% of its limit: 5% of what the bucket lets through is refused.
    assert 0.85 * 0.95 * 30 <= outcome.admitted_per_second <= 30.5, outcome
    assert outcome.share_429 <= 0.10, outcome


@pytest.mark.parametrize("limit", [5, 10, 20, 50, 100, 200])
def test_limits_far_under_the_start_rate_are_found(
    monkeypatch: pytest.MonkeyPatch, limit: int
) -> None:
    # Far over a limit nearly every answer is a 429, and answers to requests sent before a cut
    # keep coming after it: the rate must not be cut again and again on them.
    outcome = _run(monkeypatch, seconds=60, limit=limit, burst=max(10, limit / 3))
    assert 0.9 * limit <= outcome.admitted_per_second <= 1.02 * limit, outcome
    assert outcome.share_429 <= 0.05, outcome


def test_a_fast_server_is_reached_within_a_second(monkeypatch: pytest.MonkeyPatch) -> None:
    # No limit: a full sync of a fast API lasts a few seconds, so the slow start must reach
    # what the client can send in well under one (whole windows took 1.25 s to 640/s).
    outcome = _run(monkeypatch, seconds=0.8, capacity=10_000, settled=0.0)
    assert outcome.final_rate >= 600, outcome
    assert outcome.share_429 == 0, outcome
