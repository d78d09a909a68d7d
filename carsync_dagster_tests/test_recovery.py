"""The stale-run sensor on a real Postgres-backed instance: a `carsync sync` killed with kill -9,
and one paused with SIGSTOP (alive but silent), are failed and requested again; the re-run
resumes from the landed partitions and leaves the warehouse exact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from dagster import (
    DagsterInstance,
    DagsterRunStatus,
    RunRequest,
    SensorResult,
    SkipReason,
    build_sensor_context,
)

from carsync_dagster.definitions import defs as load_definitions
from carsync_dagster.orchestration.partitions import page_ranges
from carsync_dagster.orchestration.recovery import (
    RECOVERS_TAG,
    STALE_TAG,
    contiguous_blocks,
    failed_partitions,
    recover_stale_runs,
    retry_failed_partitions,
    stale_recovery_pending,
)
from carsync_dagster.runner import dagster_postgres_url
from carsync_dagster.simulator.process import start_simulator
from carsync_dagster.warehouse.schema import migrate
from carsync_dagster_tests.conftest import carsync_env, use_dagster_home
from carsync_dagster_tests.warehouse_truth import differences


def _start_sync_and_wait_for_landing(env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, "-m", "carsync_dagster", "sync", "--json"],
        env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while len(list((cwd / "data" / "landing").glob("*.json"))) < 2:
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    return process


def _recover(
    instance: Any,
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
    database_url: str,
    stale_after: float,
) -> RunRequest:
    result = recover_stale_runs(build_sensor_context(instance=instance), stale_after)
    assert isinstance(result, SensorResult)
    if not result.run_requests:
        # A run whose worker is gone is left one tick, for a code server that would fail it.
        assert result.cursor and instance.get_run_records()[0].dagster_run.status == (
            DagsterRunStatus.STARTED
        )
        context = build_sensor_context(instance=instance, cursor=result.cursor)
        result = recover_stale_runs(context, stale_after)
        assert isinstance(result, SensorResult)
    assert len(result.run_requests or []) == 1
    request = (result.run_requests or [])[0]
    failed = instance.get_run_records()
    assert failed[0].dagster_run.status == DagsterRunStatus.FAILURE
    # What the daemon would launch: the same sync, from its landed partitions.
    for name in ("API_BASE_URL", "API_KEY", "CARSYNC_DATA_DIR", "CARSYNC_PAGES_PER_PARTITION"):
        monkeypatch.setenv(name, env[name])
    monkeypatch.setenv("DATABASE_URL", database_url)
    rerun = (
        load_definitions()
        .resolve_job_def(str(request.job_name))
        .execute_in_process(instance=instance, tags=request.tags)
    )
    assert rerun.success
    return request


@pytest.fixture
def instance_env(monkeypatch: pytest.MonkeyPatch, database_url: str, tmp_path: Path) -> None:
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    monkeypatch.setenv("CARSYNC_DAGSTER_PG_URL", dagster_postgres_url(database_url))


@pytest.mark.usefixtures("instance_env")
@pytest.mark.parametrize("how", ["kill -9", "SIGSTOP"])
def test_an_interrupted_sync_is_failed_and_rerun_to_an_exact_warehouse(
    how: str, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with start_simulator(cars=6_000, seed=31, args=["--latency-ms", "30"]) as sim:
        env = carsync_env(
            tmp_path, database_url, sim, CARSYNC_PAGES_PER_PARTITION="5", CARSYNC_CONCURRENCY="2"
        )
        process = _start_sync_and_wait_for_landing(env, tmp_path)
        if how == "kill -9":
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
        else:
            os.kill(process.pid, signal.SIGSTOP)
            time.sleep(3)
        with DagsterInstance.get() as instance:
            before = instance.get_run_records()[0].dagster_run
            assert before.status == DagsterRunStatus.STARTED
            request = _recover(instance, monkeypatch, env, database_url, stale_after=2)
            reason = instance.get_run_records(limit=2)[1]  # the failed run, older than the re-run
        if how == "SIGSTOP":
            assert process.wait(timeout=10) == -signal.SIGKILL, "a silent worker is ended"
        assert request.tags["carsync/sync_id"] == before.tags["carsync/sync_id"]
        assert request.run_key == f"stale:{before.run_id}"
        assert reason.dagster_run.status == DagsterRunStatus.FAILURE
        assert differences(sim.control.truth(), database_url) == []


@pytest.mark.usefixtures("instance_env")
def test_failed_partitions_are_retried_at_most_three_times(
    database_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name, value in {
        "API_BASE_URL": "http://127.0.0.1:9",  # nothing listens: every request fails at once
        "API_KEY": "retry-test-key",
        "DATABASE_URL": database_url,
        "CARSYNC_DATA_DIR": str(tmp_path / "data"),
        "CARSYNC_MAX_ATTEMPTS": "1",
    }.items():
        monkeypatch.setenv(name, value)
    migrate(database_url, "carsync")
    use_dagster_home(tmp_path / "dagster", database_url, monkeypatch)
    with DagsterInstance.get() as instance:
        instance.add_dynamic_partitions(str(page_ranges.name), ["p00001-00005", "p00006-00010"])
        failed = (
            load_definitions()
            .resolve_job_def("page_ranges_sync")
            .execute_in_process(
                instance=instance, partition_key="p00006-00010", raise_on_error=False
            )
        )
        assert not failed.success
        assert failed_partitions(instance) == ["p00006-00010"]

        cursor, keys = None, []
        for _ in range(4):
            context = build_sensor_context(instance=instance, cursor=cursor)
            result = retry_failed_partitions(context, limit=3)
            assert isinstance(result, SensorResult)
            keys += [request.run_key for request in result.run_requests or []]
            cursor = result.cursor
        assert keys == [f"retry:p00006-00010..p00006-00010:{n}" for n in (1, 2, 3)], "3, no more"

        instance.create_run_for_job(
            job_def=load_definitions().resolve_job_def("full_sync"), status=DagsterRunStatus.STARTED
        )
        busy = retry_failed_partitions(build_sensor_context(instance=instance), limit=3)
        assert isinstance(busy, SkipReason), "never while a sync that may redo them runs"


def test_neighbouring_failed_ranges_are_retried_in_one_run() -> None:
    order = ["p1", "p2", "p3", "p4", "p5", "p6"]
    assert contiguous_blocks(["p5", "p1", "p2", "p4"], order) == [["p1", "p2"], ["p4", "p5"]]
    assert contiguous_blocks([], order) == []


def test_partitions_of_a_stale_run_are_left_to_its_rerun(
    database_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    use_dagster_home(tmp_path / "dagster", database_url, monkeypatch)
    for name, value in (("API_BASE_URL", "http://127.0.0.1:9"), ("API_KEY", "k")):
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("DATABASE_URL", database_url)
    full_sync = load_definitions().resolve_job_def("full_sync")
    with DagsterInstance.get() as instance:
        stale = instance.create_run_for_job(
            job_def=full_sync, status=DagsterRunStatus.STARTED, tags={STALE_TAG: "true"}
        )
        instance.report_run_failed(stale, "carsync stale-run sensor: test")
        # The one tick between the stale-run sensor failing a run and its re-run being created.
        assert stale_recovery_pending(instance)
        skipped = retry_failed_partitions(build_sensor_context(instance=instance), limit=3)
        assert isinstance(skipped, SkipReason) and "stale-run" in str(skipped.skip_message)
        instance.create_run_for_job(
            job_def=full_sync, status=DagsterRunStatus.SUCCESS, tags={RECOVERS_TAG: stale.run_id}
        )
        assert not stale_recovery_pending(instance)
