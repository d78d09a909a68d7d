"""What a person sees with `carsync ui` (webserver and daemon): a full sync started from the UI,
both ways (a backfill of every asset, as "Materialize all" launches it, and a launched
`full_sync` job), loses its run worker mid-merge (kill -9) or has it paused (SIGSTOP) after 1% of
the source changed. Without anyone touching anything the sync is finished under its own sync
id, its closing steps included: the warehouse ends exact, deleted listings deactivated, and no
sync is left running."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

from carsync_dagster.orchestration.liveness import Worker
from carsync_dagster.orchestration.tags import RECOVERS_TAG, SYNC_ID_TAG, WORKER_TAG
from carsync_dagster.runner import dagster_postgres_url
from carsync_dagster.simulator.process import start_simulator
from carsync_dagster_tests.conftest import carsync_env, run_carsync
from carsync_dagster_tests.ui_process import carsync_ui, graphql, wait_for
from carsync_dagster_tests.warehouse_truth import differences

KEYS_QUERY = (
    '{ assetNodeOrError(assetKey: {path: ["pages"]}) { ... on AssetNode { partitionKeys } } }'
)
LAUNCH_RUN = """mutation($params: ExecutionParams!) { launchRun(executionParams: $params) {
  __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }"""
LAUNCH_BACKFILL = """mutation($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message } } }"""
EVERY_ASSET = ("pages", "normalised", "cars", "recent_changes", "vanished_listings")
SENSOR_INTERVAL = 5
HEALED_WITHIN = 240  # seconds from the kill to an exact warehouse


@pytest.fixture
def ui(
    request: pytest.FixtureRequest,
    database_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Any]:
    stale_after = getattr(request, "param", 60)
    # 20,000 cars in 20 listing ranges; one request at a time with 40 ms latency takes ~8 s.
    with start_simulator(cars=20_000, seed=61, args=["--latency-ms", "40"]) as sim:
        env = carsync_env(
            tmp_path, database_url, sim,
            CARSYNC_PARTITION_SIZE="1000", CARSYNC_CONCURRENCY="1",
            CARSYNC_SENSOR_INTERVAL=str(SENSOR_INTERVAL), CARSYNC_STALE_AFTER=str(stale_after),
        )  # fmt: skip
        first = run_carsync(["sync", "--json"], env, tmp_path)  # last night's sync
        assert first.returncode == 0, first.stderr
        with carsync_ui(env, tmp_path) as (base, _):
            monkeypatch.setenv("DAGSTER_HOME", env["DAGSTER_HOME"])
            monkeypatch.setenv("CARSYNC_DAGSTER_PG_URL", dagster_postgres_url(database_url))
            with DagsterInstance.get() as instance:
                graphql(base, "mutation { setNuxSeen }")
                yield base, instance, sim


def _launch_full_sync_job(base: str) -> None:
    keys = graphql(base, KEYS_QUERY)["assetNodeOrError"]["partitionKeys"]
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
            ]
        },
    }
    launched = graphql(base, LAUNCH_RUN, {"params": params})["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched


def _materialize_everything(base: str) -> None:
    """The UI's "Materialize all", all partitions: an asset backfill."""
    params = {"assetSelection": [{"path": [key]} for key in EVERY_ASSET], "allPartitions": True}
    launched = graphql(base, LAUNCH_BACKFILL, {"params": params})["launchPartitionBackfill"]
    assert launched["__typename"] == "LaunchBackfillSuccess", launched


def _syncs(database_url: str) -> list[tuple[str, str, str]]:
    """(sync id, kind, status) of every sync, oldest first."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT sync_id, kind, status FROM carsync.sync_runs ORDER BY started_at"
        ).fetchall()
    return [(str(a), str(b), str(c)) for a, b, c in rows]


def _merging(instance: DagsterInstance, database_url: str) -> Any:
    """The started run of the new sync once it merged two listing ranges (of 20), else None."""
    started = instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.STARTED]))
    run = started[0] if len(started) == 1 else None
    if run is None or WORKER_TAG not in run.tags:
        return None
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM carsync.sync_partitions WHERE sync_id = %s",
            (run.tags[SYNC_ID_TAG],),
        ).fetchone()
    return run if row and 2 <= row[0] < 20 else None


@pytest.mark.parametrize(
    ("start", "how", "ui"),
    [
        ("backfill of every asset", "kill -9", 60),
        ("launched full_sync job", "kill -9", 60),
        ("launched full_sync job", "SIGSTOP", 20),
    ],
    indirect=["ui"],
)
def test_a_ui_sync_whose_worker_dies_mid_merge_is_finished(
    start: str, how: str, ui: Any, database_url: str
) -> None:
    base, instance, sim = ui
    changes = sim.control.mutate(update=100, insert=50, delete=50)  # 1% of the feed
    if start == "launched full_sync job":
        _launch_full_sync_job(base)
    else:
        _materialize_everything(base)
    run = wait_for("the sync to merge two ranges", 120, lambda: _merging(instance, database_url))
    worker = Worker.from_tag(run.tags[WORKER_TAG])
    assert worker is not None and worker.on_this_host and worker.alive()
    process = psutil.Process(worker.pid)
    family = [process, *process.children(recursive=True)]
    # The in-process executor: the steps run inside the worker, which spawns no step process.
    assert not [p for p in family[1:] if "multiprocessing" in " ".join(p.cmdline())]
    hit = time.monotonic()
    if how == "kill -9":
        process.kill()
    else:
        for member in family:
            member.send_signal(signal.SIGSTOP)
    sync_id = run.tags[SYNC_ID_TAG]

    def healed() -> bool:
        return _syncs(database_url)[-1] == (sync_id, "full", "succeeded") and not differences(
            sim.control.truth(), database_url, strict=True
        )

    wait_for("an exact warehouse", HEALED_WITHIN, healed)
    took = time.monotonic() - hit
    time.sleep(2 * SENSOR_INTERVAL)  # long enough for any second re-run to be requested
    assert [status for _, _, status in _syncs(database_url)] == ["succeeded", "succeeded"]
    runs = instance.get_runs(RunsFilter(tags={SYNC_ID_TAG: sync_id}))
    recoveries = [r for r in runs if RECOVERS_TAG in r.tags]
    assert len(recoveries) == 1 and recoveries[0].job_name == "full_sync", [
        (r.job_name, r.status.value, dict(r.tags)) for r in runs
    ]
    assert recoveries[0].status == DagsterRunStatus.SUCCESS
    killed = instance.get_run_by_id(run.run_id)
    assert killed is not None and killed.status == DagsterRunStatus.FAILURE
    assert differences(sim.control.truth(), database_url, strict=True) == []
    gone = set(changes["deleted"])
    with psycopg.connect(database_url) as conn:
        inactive = {
            row[0] for row in conn.execute("SELECT id FROM carsync.cars WHERE NOT is_active")
        }
    assert inactive == gone
    print(f"{start}, {how}: healed in {took:.0f}s")
