"""End to end: the real `carsync sync` command, the simulator over loopback, a real PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from carsync_dagster.ranges import page_span
from carsync_dagster.simulator.process import RunningSimulator, start_simulator
from carsync_dagster_tests.conftest import carsync_env, run_carsync
from carsync_dagster_tests.warehouse_truth import differences, tables_holding


def _summary(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stderr}\n{result.stdout}"
    summary: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return summary


def _xmins(database_url: str) -> dict[str, int]:
    with psycopg.connect(database_url) as conn:
        return {
            car_id: int(xmin)
            for car_id, xmin in conn.execute("SELECT id, xmin::text FROM carsync.cars")
        }


@pytest.fixture(scope="module")
def simulator() -> Iterator[RunningSimulator]:
    with start_simulator(cars=20_000, seed=7, args=["--broken-rate", "0.01"]) as running:
        yield running


def test_sync_is_exact_then_writes_nothing_then_counts_changes(
    simulator: RunningSimulator, database_url: str, tmp_path: Path
) -> None:
    env = carsync_env(tmp_path, database_url, simulator, CARSYNC_PAGES_PER_PARTITION="20")
    truth = simulator.control.truth()
    assert len(truth["rejected"]) > 50, "the feed must carry broken records"

    run = run_carsync(["sync", "--json"], env, tmp_path)
    first = _summary(run)
    assert differences(truth, database_url) == []
    assert simulator.api_key not in run.stdout + run.stderr
    assert "pages/s" in run.stderr, "progress lines go to stderr while the sync runs"
    assert " 0/0 " not in run.stderr, "before any stage counts, the line says the run launches"
    assert tables_holding(database_url, simulator.api_key) == []
    assert first["inserted"] == len(truth["cars"])
    assert first["rejected"] == len(truth["rejected"])
    assert first["fetched"] == len(truth["cars"]) + len(truth["rejected"])
    assert first["pages"] == 200
    assert first["checks_failed"] == []
    assert first["partitions_unchanged"] == 0

    before = _xmins(database_url)
    second = _summary(run_carsync(["sync", "--json"], env, tmp_path))
    assert second["checks_failed"] == []
    assert second["partitions_unchanged"] == second["partitions"] == 10, "nothing to normalise"
    assert (second["inserted"], second["updated"]) == (0, 0)
    assert second["unchanged"] == len(truth["cars"])
    assert _xmins(database_url) == before, "an unchanged feed must not rewrite any row of cars"

    changes = simulator.control.mutate(update=37, insert=12)
    third = _summary(run_carsync(["sync", "--json"], env, tmp_path))
    assert (third["updated"], third["inserted"]) == (37, 12)
    assert third["partitions_unchanged"] < third["partitions"], "changed pages are normalised"
    assert differences(simulator.control.truth(), database_url) == []
    after = _xmins(database_url)
    rewritten = {car_id for car_id, xmin in after.items() if before.get(car_id) != xmin}
    assert rewritten == set(changes["updated"]) | set(changes["inserted"])

    status = run_carsync(["status", "--json"], env, tmp_path)
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    syncs = report["syncs"]
    assert [(s["kind"], s["status"]) for s in syncs] == [("full", "succeeded")] * 3
    assert syncs[0]["summary"]["updated"] == 37
    assert report["listing_ranges"] == 11 and report["failed_listing_ranges"] == []  # 20,012
    assert set(report["next_scheduled"]) == {"full_sync_schedule", "incremental_sync_schedule"}


def test_a_killed_sync_resumes_without_fetching_landed_partitions(
    database_url: str, tmp_path: Path
) -> None:
    with start_simulator(cars=6_000, seed=11, args=["--latency-ms", "40"]) as simulator:
        env = carsync_env(
            tmp_path,
            database_url,
            simulator,
            CARSYNC_PAGES_PER_PARTITION="5",
            CARSYNC_CONCURRENCY="2",
        )
        process = subprocess.Popen(
            [sys.executable, "-m", "carsync_dagster", "sync", "--json"],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        landing = tmp_path / "data" / "landing"
        deadline = time.monotonic() + 120
        while len(list(landing.glob("*.json"))) < 4:
            assert process.poll() is None, "the sync ended before it could be killed"
            assert time.monotonic() < deadline, "no partition landed in time"
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        landed = {path.stem for path in landing.glob("*.json")}
        assert 4 <= len(landed) < 12, landed

        simulator.control.reset_stats()
        summary = _summary(run_carsync(["sync", "--json"], env, tmp_path))
        assert summary["partitions_resumed"] == len(landed)
        fetched_again = {
            int(page) for page, count in simulator.control.stats()["list_pages"].items() if count
        }
        landed_pages = {page for key in landed for page in page_span(key, 100).pages}
        # Page 1 is asked for once with per_page=1: the feed's size, before the run.
        assert not fetched_again & landed_pages - {1}, "landed pages were fetched again"
        assert differences(simulator.control.truth(), database_url) == []


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CARSYNC_PAGE_SIZE", "0"),
        ("CARSYNC_PAGE_SIZE", "1001"),
        ("CARSYNC_CONCURRENCY", "0"),
        ("CARSYNC_RPS", "-1"),
        ("CARSYNC_SCHEMA", "cars; drop table x"),
        ("API_BASE_URL", "ftp://example.invalid"),
        ("DATABASE_URL", "mysql://user:hunter2@example.invalid/db"),
    ],
)
def test_bad_settings_exit_2_naming_the_setting_and_write_nothing(
    variable: str, value: str, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CARSYNC_", "API_"))}
    env.pop("DATABASE_URL", None)
    env[variable] = value
    env["API_KEY"] = "secret-key-for-test"
    result = run_carsync(["sync"], env, tmp_path, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and variable in lines[0], result.stderr
    assert "hunter2" not in result.stderr + result.stdout
    assert "secret-key-for-test" not in result.stderr + result.stdout
    assert list(tmp_path.iterdir()) == [], "nothing may be written"


def test_api_base_url_without_key_is_refused(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CARSYNC_", "API_"))}
    env["API_BASE_URL"] = "http://127.0.0.1:9"
    result = run_carsync(["sync"], env, tmp_path, timeout=60)
    assert result.returncode == 2
    assert "API_KEY" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_real_database_without_a_real_api_is_refused(database_url: str, tmp_path: Path) -> None:
    """The bundled simulator's invented listings never reach a real warehouse unasked."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CARSYNC_", "API_"))}
    env["DATABASE_URL"] = database_url
    result = run_carsync(["sync"], env, tmp_path, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "API_BASE_URL" in lines[0] and "--simulator" in lines[0], lines
    assert list(tmp_path.iterdir()) == [], "nothing may be written"
    with psycopg.connect(database_url) as conn:
        schemas = {row[0] for row in conn.execute("SELECT nspname FROM pg_namespace")}
    assert "carsync" not in schemas and "dagster" not in schemas
