"""A hostile API: faults, rate limits, a wrong key, an outage. Real simulator, real PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from carsync_dagster.simulator.process import start_simulator
from carsync_dagster_tests.conftest import carsync_env, run_carsync
from carsync_dagster_tests.warehouse_truth import differences, tables_holding

HOSTILE = [
    "--error-rate", "0.05", "--overload-429", "0.05", "--truncate-rate", "0.01",
    "--html-rate", "0.01", "--hang-rate", "0.01", "--hang-seconds", "30",
]  # fmt: skip


def _last_json(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stderr}"
    summary: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return summary


def test_hostile_profile_ends_exact_and_keeps_the_key_secret(
    database_url: str, tmp_path: Path
) -> None:
    with start_simulator(cars=20_000, seed=5, args=["--broken-rate", "0.01", *HOSTILE]) as sim:
        env = carsync_env(tmp_path, database_url, sim, CARSYNC_PAGES_PER_PARTITION="20")
        result = run_carsync(["sync", "--json"], env, tmp_path)
        summary = _last_json(result)
        assert differences(sim.control.truth(), database_url) == []
        errors = summary["errors"]
        for kind in ("5xx", "429", "truncated", "html"):
            assert errors.get(kind, 0) > 0, f"no {kind} seen: {errors}"
        assert summary["hedged"] > 0, "hung responses are raced by a second copy"
        assert summary["retries"] >= sum(errors.values())
        assert sim.api_key not in result.stdout + result.stderr
        assert tables_holding(database_url, sim.api_key) == []


def _server_errors(stats: dict[str, Any]) -> int:
    return sum(n for status, n in stats["by_status"].items() if status.startswith("5"))


def _server_counts(stats: dict[str, Any]) -> tuple[int, int, dict[int, int]]:
    per_second = {int(k): v for k, v in stats["admitted_per_second"].items()}
    return stats["by_status"].get("200", 0), stats["by_status"].get("429", 0), per_second


def test_adaptive_rate_finds_the_server_limit(database_url: str, tmp_path: Path) -> None:
    # 30 requests/s with a burst of 10; 700 pages take a little over 20 s at that rate.
    with start_simulator(
        cars=7_000, seed=3, args=["--rate-limit", "30", "--burst", "10", "--broken-rate", "0"]
    ) as sim:
        env = carsync_env(
            tmp_path, database_url, sim, CARSYNC_PAGE_SIZE="10", CARSYNC_PAGES_PER_PARTITION="100"
        )
        sim.control.reset_stats()
        _last_json(run_carsync(["sync", "--json"], env, tmp_path))
        admitted, rejected, per_second = _server_counts(sim.control.stats())
    busy = sorted(per_second)[1:-1]  # whole seconds only: the first and last are partial
    assert len(busy) >= 20, "measure over at least 20 s"
    achieved = sum(per_second[s] for s in busy) / len(busy)
    assert achieved >= 0.9 * 30, f"achieved {achieved:.1f} requests/s of 30"
    assert rejected <= 0.03 * (admitted + rejected), f"{rejected} 429s of {admitted + rejected}"


def test_a_rate_ceiling_is_never_exceeded(database_url: str, tmp_path: Path) -> None:
    with start_simulator(cars=2_000, seed=3, args=["--broken-rate", "0"]) as sim:
        env = carsync_env(
            tmp_path, database_url, sim, CARSYNC_PAGE_SIZE="10", CARSYNC_RPS="20",
            CARSYNC_PAGES_PER_PARTITION="50",
        )  # fmt: skip
        sim.control.reset_stats()
        _last_json(run_carsync(["sync", "--json"], env, tmp_path))
        _, _, per_second = _server_counts(sim.control.stats())
    assert len(per_second) >= 8
    assert max(per_second.values()) <= 20, per_second


def test_a_wrong_key_stops_at_once_without_retrying(database_url: str, tmp_path: Path) -> None:
    with start_simulator(cars=1_000, seed=3) as sim:
        env = carsync_env(tmp_path, database_url, sim, API_KEY="wrong-key-do-not-print")
        started = time.monotonic()
        result = run_carsync(["sync", "--json"], env, tmp_path, timeout=60)
        seconds = time.monotonic() - started
        stats = sim.control.stats()
    assert result.returncode != 0
    assert "401" in result.stderr and "API_KEY" in result.stderr
    assert stats["requests"] == 1 and stats["by_status"] == {"401": 1}, "a 401 is not retried"
    assert seconds < 10, f"took {seconds:.1f}s (process start included)"
    output = result.stdout + result.stderr
    assert "wrong-key-do-not-print" not in output and sim.api_key not in output


def test_circuit_breaker_pauses_during_an_outage_and_the_sync_completes(
    database_url: str, tmp_path: Path
) -> None:
    with start_simulator(cars=4_000, seed=9, args=["--latency-ms", "20"]) as sim:
        env = carsync_env(
            tmp_path, database_url, sim, CARSYNC_PAGES_PER_PARTITION="5",
            CARSYNC_CONCURRENCY="4", CARSYNC_BREAKER_COOLDOWN="1",
        )  # fmt: skip
        process = subprocess.Popen(
            [sys.executable, "-m", "carsync_dagster", "sync", "--json"],
            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        landing = tmp_path / "data" / "landing"
        deadline = time.monotonic() + 60
        while not list(landing.glob("*.json")):
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.05)
        sim.control.configure(error_rate=1.0)  # the outage
        while _server_errors(sim.control.stats()) < 10:
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.1)
        time.sleep(2.5)  # a few cool-downs and failed probes
        sim.control.configure(error_rate=0.0)  # healed
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr
        assert differences(sim.control.truth(), database_url) == []
    assert stderr.count("circuit open") == 1, stderr
    assert stderr.count("circuit closed") == 1, stderr
    assert json.loads(stdout.strip().splitlines()[-1])["errors"]["5xx"] >= 10
