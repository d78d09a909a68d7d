"""What a person sees with `carsync ui` and its daemon: a full sync launched from the UI loses its
run worker (kill -9) or has it paused (SIGSTOP); without anyone touching anything, the run is
marked failed, exactly one re-run is launched, and the warehouse ends exact."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

from carsync_dagster.orchestration.jobs import freshness_job
from carsync_dagster.orchestration.recovery import worker_pid
from carsync_dagster.runner import dagster_postgres_url
from carsync_dagster.simulator.process import start_simulator
from carsync_dagster_tests.conftest import carsync_env
from carsync_dagster_tests.ui_process import carsync_ui, graphql, wait_for
from carsync_dagster_tests.warehouse_truth import differences

KEYS_QUERY = (
    '{ assetNodeOrError(assetKey: {path: ["pages"]}) { ... on AssetNode { partitionKeys } } }'
)
LAUNCH = """mutation($params: ExecutionParams!) { launchRun(executionParams: $params) {
  __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }"""
STALE_AFTER = 20  # seconds of silence before the stale-run sensor acts
SENSOR_INTERVAL = 5


@pytest.fixture
def ui(database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    # 20,000 cars over 20 page ranges; one request at a time with 40 ms latency takes ~8 s.
    with start_simulator(cars=20_000, seed=61, args=["--latency-ms", "40"]) as sim:
        env = carsync_env(
            tmp_path, database_url, sim,
            CARSYNC_PAGES_PER_PARTITION="10", CARSYNC_CONCURRENCY="1",
            CARSYNC_SENSOR_INTERVAL=str(SENSOR_INTERVAL), CARSYNC_STALE_AFTER=str(STALE_AFTER),
        )  # fmt: skip
        with carsync_ui(env, tmp_path) as (base, _):
            monkeypatch.setenv("DAGSTER_HOME", env["DAGSTER_HOME"])
            monkeypatch.setenv("CARSYNC_DAGSTER_PG_URL", dagster_postgres_url(database_url))
            with DagsterInstance.get() as instance:
                yield base, instance, sim


def _launch_full_sync(base: str) -> str:
    keys = wait_for(
        "the discovery sensor",
        60,
        lambda: graphql(base, KEYS_QUERY)["assetNodeOrError"]["partitionKeys"],
    )
    assert len(keys) == 20
    params = {
        "selector": {
            "repositoryLocationName": "carsync_dagster.definitions",
            "repositoryName": "__repository__",
            "jobName": "full_sync",
        },
        "executionMetadata": {
            "tags": [
                {"key": "dagster/asset_partition_range_start", "value": keys[0]},
                {"key": "dagster/asset_partition_range_end", "value": keys[-1]},
                {"key": "carsync/kind", "value": "full"},
            ]
        },
    }
    launched = graphql(base, LAUNCH, {"params": params})["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    return str(launched["run"]["runId"])


def _sync_runs(instance: DagsterInstance) -> list[Any]:
    """Runs of the sync jobs: the freshness schedule (every 30 minutes, on by default) launches
    runs of its own that a test crossing :00 or :30 sees too (it did in CI at 02:00)."""
    records = instance.get_run_records(RunsFilter(), ascending=True)
    return [r.dagster_run for r in records if r.dagster_run.job_name != freshness_job.name]


@pytest.mark.parametrize("how", ["kill -9", "SIGSTOP"])
def test_a_daemon_run_worker_that_dies_or_hangs_is_recovered(
    how: str, ui: Any, database_url: str, tmp_path: Path
) -> None:
    base, instance, sim = ui
    run_id = _launch_full_sync(base)
    wait_for(
        "two landed page ranges",
        120,
        lambda: len(list((tmp_path / "data" / "landing").glob("*.json"))) >= 2,
    )
    run = instance.get_run_by_id(run_id)
    assert run is not None and run.status == DagsterRunStatus.STARTED
    pid = worker_pid(instance, run)
    assert pid is not None
    worker = psutil.Process(pid)
    family = [worker, *worker.children(recursive=True)]  # with Dagster's log tailers
    # The in-process executor: the steps run inside the worker, which spawns no step process.
    spawned = [p for p in family[1:] if "multiprocessing" in " ".join(p.cmdline())]
    assert not spawned, "a step process beside the run worker"
    hit = time.monotonic()
    if how == "kill -9":
        worker.kill()
    else:
        for process in family:
            process.send_signal(signal.SIGSTOP)

    def failed() -> bool:
        current = instance.get_run_by_id(run_id)
        return current is not None and current.status == DagsterRunStatus.FAILURE

    wait_for("the run marked failed", STALE_AFTER + 3 * SENSOR_INTERVAL + 30, failed)
    detected = time.monotonic() - hit
    wait_for("the worker and its helpers to end", 15, lambda: not any(map(_running, family)))

    def recovered() -> list[Any]:
        return [r for r in _sync_runs(instance)[1:] if r.status == DagsterRunStatus.SUCCESS]

    [rerun] = wait_for("the re-run", 120 + 60, recovered)
    took = time.monotonic() - hit
    time.sleep(2 * SENSOR_INTERVAL)  # long enough for any second re-run to be requested
    runs = _sync_runs(instance)
    assert [r.run_id for r in runs] == [run_id, rerun.run_id], [
        (r.job_name, r.status.value, r.tags.get("carsync/kind")) for r in runs
    ]
    failure = instance.get_run_by_id(run_id)
    assert failure is not None and failure.status == DagsterRunStatus.FAILURE
    if how == "kill -9":
        # Dagster's code server fails the run; the failed-partition sensor owns the re-run.
        assert rerun.job_name == "page_ranges_sync" and rerun.tags["carsync/kind"] == "retry"
    else:
        # Only the stale-run sensor sees a paused worker; it requests the same sync again.
        assert rerun.job_name == "full_sync" and rerun.tags["carsync/recovers"] == run_id
    assert differences(sim.control.truth(), database_url) == []
    print(f"{how}: failed after {detected:.0f}s, recovered after {took:.0f}s")


def _running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
