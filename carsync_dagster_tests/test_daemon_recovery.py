"""What a person sees with `carsync ui` (webserver and daemon): a full sync started from the UI,
both ways (a backfill of every asset, as "Materialize all" launches it, and a launched
`full_sync` job), loses its run worker mid-merge (kill -9) after 1% of the source changed.
Without anyone touching anything the sync is finished under its own sync id, its closing steps
included: the warehouse ends exact, deleted listings deactivated, and no sync is left running.
One `carsync ui` serves the scenarios one after the other, as it would a night of them."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import psutil
import psycopg
import pytest
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

from carsync_dagster.orchestration.liveness import Worker
from carsync_dagster.orchestration.tags import RECOVERS_TAG, SYNC_ID_TAG, WORKER_TAG
from carsync_dagster.runner import dagster_postgres_url
from carsync_dagster.simulator.process import start_simulator
from carsync_dagster_tests.conftest import carsync_env, fresh_database, run_carsync
from carsync_dagster_tests.ui_process import carsync_ui, graphql, leftovers, wait_for
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
LINEAGE_QUERY = "{ assetNodes { assetKey { path } dependencyKeys { path } } }"
SENSOR_INTERVAL, STALE_AFTER = 5, 60
HEALED_WITHIN = 240  # seconds from the kill to an exact warehouse


@pytest.fixture(scope="module")
def ui(server_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One `carsync ui` for the module's scenarios, after last night's full sync: 20,000 cars in
    20 listing ranges; one request at a time with 40 ms latency takes ~8 s a sync."""
    tmp_path = tmp_path_factory.mktemp("ui")
    with (
        fresh_database(server_url) as database_url,
        start_simulator(cars=20_000, seed=61, args=["--latency-ms", "40"]) as sim,
    ):
        env = carsync_env(
            tmp_path, database_url, sim,
            CARSYNC_PARTITION_SIZE="1000", CARSYNC_CONCURRENCY="1",
            CARSYNC_SENSOR_INTERVAL=str(SENSOR_INTERVAL), CARSYNC_STALE_AFTER=str(STALE_AFTER),
        )  # fmt: skip
        first = run_carsync(["sync", "--json"], env, tmp_path)
        assert first.returncode == 0, first.stderr
        with carsync_ui(env, tmp_path) as (base, process):
            graphql(base, "mutation { setNuxSeen }")
            instance_env = {
                "DAGSTER_HOME": env["DAGSTER_HOME"],
                "CARSYNC_DAGSTER_PG_URL": dagster_postgres_url(database_url),
            }
            with pytest.MonkeyPatch.context() as patch:
                for name, value in instance_env.items():
                    patch.setenv(name, value)
                with DagsterInstance.get() as instance:
                    yield base, instance, sim, database_url
            process.terminate()  # SIGTERM to `carsync ui` alone: it must stop what it started
            process.wait(timeout=60)
            assert leftovers(int(base.rsplit(":", 1)[1])) == [], "dagster dev, webserver or daemon"


def test_the_ui_serves_the_asset_lineage(ui: Any) -> None:
    base = ui[0]
    nodes = graphql(base, LINEAGE_QUERY)["assetNodes"]
    upstream = {
        node["assetKey"]["path"][0]: [key["path"][0] for key in node["dependencyKeys"]]
        for node in nodes
    }
    assert upstream == {
        "pages": [],
        "normalised": ["pages"],
        "cars": ["normalised"],
        "recent_changes": ["cars"],
        "vanished_listings": ["recent_changes"],
    }


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


# A paused (SIGSTOP) worker is found by its silence: test_recovery.py pauses `carsync sync` and
# runs the same reconciler at a short CARSYNC_STALE_AFTER (here it would take 60 s more).
@pytest.mark.parametrize("start", ["backfill of every asset", "launched full_sync job"])
def test_a_ui_sync_whose_worker_dies_mid_merge_is_finished(start: str, ui: Any) -> None:
    base, instance, sim, database_url = ui
    syncs_before = len(_syncs(database_url))
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
    process.kill()
    sync_id = run.tags[SYNC_ID_TAG]

    def healed() -> bool:
        return _syncs(database_url)[-1] == (sync_id, "full", "succeeded") and not differences(
            sim.control.truth(), database_url, strict=True
        )

    wait_for("an exact warehouse", HEALED_WITHIN, healed)
    took = time.monotonic() - hit
    time.sleep(2 * SENSOR_INTERVAL)  # long enough for any second re-run to be requested
    statuses = [status for _, _, status in _syncs(database_url)]
    assert statuses == ["succeeded"] * (syncs_before + 1), "no sync left running"
    runs = instance.get_runs(RunsFilter(tags={SYNC_ID_TAG: sync_id}))
    recoveries = [r for r in runs if RECOVERS_TAG in r.tags]
    assert len(recoveries) == 1 and recoveries[0].job_name == "full_sync", [
        (r.job_name, r.status.value, dict(r.tags)) for r in runs
    ]
    assert recoveries[0].status == DagsterRunStatus.SUCCESS
    killed = instance.get_run_by_id(run.run_id)
    assert killed is not None and killed.status == DagsterRunStatus.FAILURE
    assert differences(sim.control.truth(), database_url, strict=True) == []
    with psycopg.connect(database_url) as conn:
        inactive = {
            row[0] for row in conn.execute("SELECT id FROM carsync.cars WHERE NOT is_active")
        }
    assert set(changes["deleted"]) <= inactive, "deleted at the source: deactivated"
    print(f"{start}: healed in {took:.0f}s")
