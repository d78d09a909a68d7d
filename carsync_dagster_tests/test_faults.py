"""Faults of the world, as `carsync sync` meets them: an API that is not there, pages that stay
broken; and the pieces a stopped sync relies on. Each ends in one line that says what and where,
never a traceback. Real processes, the real simulator, real PostgreSQL. (A sync stopped by a
signal, a PostgreSQL restart and kill -9 are the chaos scenarios: test_chaos.py.)"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from carsync_dagster import interrupts
from carsync_dagster.simulator.process import start_simulator
from carsync_dagster.source.client import ListingsClient
from carsync_dagster.source.errors import ApiAuthError
from carsync_dagster.source.extract import PartitionPages, fetch_partitions
from carsync_dagster_tests.conftest import carsync_env, run_carsync


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("where", ["refused", "unknown host"])
def test_an_api_that_is_not_there_is_named_in_one_line(
    where: str, database_url: str, tmp_path: Path
) -> None:
    port = _free_port()  # nothing listens there
    host = "127.0.0.1" if where == "refused" else "carsync-no-such-host.invalid"
    api = SimpleNamespace(base_url=f"http://{host}:{port}", api_key="a-key-of-some-length")
    result = run_carsync(["sync"], carsync_env(tmp_path, database_url, api), tmp_path)
    assert result.returncode == 1
    why = "connection refused" if where == "refused" else "host name not found"
    assert _lines(result.stderr) == [
        f"carsync: cannot reach the API at {host}:{port} ({why}), 3 times: check API_BASE_URL "
        "and that the API is up"
    ]


def test_pages_that_stay_broken_end_the_sync_and_name_the_page(
    database_url: str, tmp_path: Path
) -> None:
    # Three broken pages with a circuit breaker that opens after two failures: the failures
    # of one page's retries must neither keep the circuit open for ever nor hide the page.
    with start_simulator(cars=3_000, seed=4, args=["--broken-rate", "0"]) as sim:
        sim.control.break_pages({3: "no_data", 17: "not_json", 25: "no_data"})
        env = carsync_env(
            tmp_path, database_url, sim, CARSYNC_PAGE_SIZE="100", CARSYNC_PARTITION_SIZE="1000",
            CARSYNC_BREAKER_FAILURES="2", CARSYNC_BREAKER_COOLDOWN="30",
        )  # fmt: skip
        result = run_carsync(["sync", "--json"], env, tmp_path, timeout=240)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "ExceptionGroup" not in result.stderr
    progress = ("starting", "fetch", "normalise", "merge")
    failure = [line for line in _lines(result.stderr) if not line.startswith(progress)]
    assert len(failure) == 1, result.stderr
    assert re.fullmatch(
        r"carsync: sync partial: 3 of 3 listing ranges not merged \(fetched again by the next "
        r"sync\); listing range 000\d001-000\d000: page (3|17|25): body .+ \(gave up after 8 "
        r"attempts\)",
        failure[0],
    ), failure[0]
    assert json.loads(result.stdout.strip().splitlines()[-1])["partitions_failed"] == 3


def test_deferred_signals_set_the_event_and_a_second_one_stops_at_once() -> None:
    calls: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda number, frame: calls.append(number))
    try:
        with interrupts.received_signals() as received, interrupts.deferred() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            _until(stop.is_set)
            assert calls == [], "the first signal only asks to stop"
            os.kill(os.getpid(), signal.SIGINT)
            _until(lambda: bool(calls))
            assert received() == [signal.SIGINT, signal.SIGINT]
        assert signal.getsignal(signal.SIGINT) is not None
        assert calls == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, previous)


def _until(condition: object, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not callable(condition) or not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_failing_task_of_a_fetch_raises_its_own_error(tmp_path: Path) -> None:
    """Not the ExceptionGroup of the task group, whose text says nothing."""

    class Nowhere:
        def add(self, page: object) -> None:
            pass

        def complete(self, seconds: float) -> None:
            pass

        def discard(self) -> None:
            pass

    async def fetch(base_url: str) -> None:
        async with ListingsClient(base_url, "not-the-key", concurrency=2) as client:
            parts = [PartitionPages("0000001-0000100", 1, 1, 0, 100)]
            await fetch_partitions(client, parts, 100, lambda part: Nowhere())

    with start_simulator(cars=200, seed=1) as sim, pytest.raises(ApiAuthError, match="API_KEY"):
        asyncio.run(fetch(sim.base_url))
