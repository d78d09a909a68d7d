"""A sync's lifecycle on a real Postgres-backed instance, with the real simulator: a `carsync
sync` killed (kill -9) or paused (SIGSTOP) is failed and finished by the sync reconciler under
the same sync id; healing stops after CARSYNC_MAX_RECOVERIES with one alert; only a recent
sync that failed on something transient is resumed; a resumed sync never writes older data
over newer; and a listing range means the same listings whatever the page size."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from dagster import (
    AssetKey,
    DagsterInstance,
    DagsterRun,
    DagsterRunStatus,
    RunRequest,
    SensorResult,
    SkipReason,
    build_schedule_context,
    build_sensor_context,
)

from carsync_dagster.definitions import defs as load_definitions
from carsync_dagster.orchestration.automation import full_sync_tick, reconcile_syncs
from carsync_dagster.orchestration.lifecycle import RunFacts, Verdict, judge, kind_of
from carsync_dagster.orchestration.resources import WarehouseResource
from carsync_dagster.orchestration.tags import SYNC_ID_TAG, WORKER_TAG
from carsync_dagster.ranges import page_span
from carsync_dagster.runner import dagster_postgres_url
from carsync_dagster.simulator.process import RunningSimulator, start_simulator
from carsync_dagster.source.landing import Landing
from carsync_dagster.transform import normalise
from carsync_dagster.warehouse import syncs
from carsync_dagster.warehouse.schema import migrate
from carsync_dagster_tests.conftest import (
    WebhookReceiver,
    carsync_env,
    run_carsync,
    use_dagster_home,
)
from carsync_dagster_tests.warehouse_truth import cars_by_id, differences


@contextmanager
def _slow_feed(
    database_url: str, tmp_path: Path, seed: int, **settings: str
) -> Iterator[tuple[RunningSimulator, dict[str, str]]]:
    """6,000 cars, 30 ms a request, 2 in flight, ranges of 500: a sync slow enough to stop."""
    with start_simulator(cars=6_000, seed=seed, args=["--latency-ms", "30"]) as sim:
        yield sim, carsync_env(
            tmp_path, database_url, sim,
            CARSYNC_PARTITION_SIZE="500", CARSYNC_CONCURRENCY="2", **settings,
        )  # fmt: skip


def _start_sync(env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "carsync_dagster", "sync", "--json"],
        env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def _running_sync(database_url: str) -> str | None:
    with psycopg.connect(database_url) as conn:
        try:
            row = conn.execute(
                "SELECT sync_id FROM carsync.sync_runs WHERE status = 'running'"
            ).fetchone()
        except psycopg.errors.UndefinedTable:  # the sync has not created its tables yet
            return None
    return str(row[0]) if row else None


def _landed_by(cwd: Path, sync_id: str | None) -> list[str]:
    landing = Landing(cwd / "data" / "landing")
    keys = [path.stem for path in landing.root.glob("*.json")]
    return sorted(key for key in keys if (m := landing.manifest(key)) and m.sync_id == sync_id)


def _merged_by(database_url: str, sync_id: str | None) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM carsync.sync_partitions WHERE sync_id = %s", (sync_id,)
        ).fetchone()
    return int(row[0]) if row else 0


def _interrupt(
    process: subprocess.Popen[bytes],
    database_url: str,
    cwd: Path,
    how: str = "kill -9",
    *,
    landed: int = 0,
    merged: int = 0,
) -> str:
    """Kill (or pause) a running `carsync sync` once its sync has landed and merged that many
    listing ranges; returns the sync's id."""
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None, "the sync ended before it could be interrupted"
        assert time.monotonic() < deadline, "the sync did not get that far in time"
        sync_id = _running_sync(database_url)
        if (
            sync_id is not None
            and len(_landed_by(cwd, sync_id)) >= landed
            and _merged_by(database_url, sync_id) >= merged
        ):
            break
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL if how == "kill -9" else signal.SIGSTOP)
    if how == "kill -9":
        process.wait()
    return sync_id


def _sync(env: dict[str, str], cwd: Path, *flags: str) -> dict[str, Any]:
    result = run_carsync(["sync", "--json", *flags], env, cwd)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stderr}"
    summary: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return summary


TICK = datetime(2026, 12, 4, 3, 0, tzinfo=UTC)


def _sync_rows(database_url: str) -> list[tuple[str, str, bool, int]]:
    """(sync id, status, resumable, recoveries) of every sync, oldest first."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT sync_id, status, resumable, recoveries FROM carsync.sync_runs"
            " ORDER BY started_at"
        ).fetchall()
    return [(str(a), str(b), bool(c), int(d)) for a, b, c, d in rows]


@pytest.fixture
def daemon_env(monkeypatch: pytest.MonkeyPatch, database_url: str, tmp_path: Path) -> None:
    """This process as the daemon's sensor and run worker would see the instance."""
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    monkeypatch.setenv("CARSYNC_DAGSTER_PG_URL", dagster_postgres_url(database_url))


def _use_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for name in ("API_BASE_URL", "API_KEY", "DATABASE_URL", "CARSYNC_DATA_DIR"):
        monkeypatch.setenv(name, env[name])
    for name, value in env.items():
        if name.startswith("CARSYNC_"):
            monkeypatch.setenv(name, value)


def _reconcile(instance: DagsterInstance, database_url: str) -> SensorResult | SkipReason:
    warehouse = WarehouseResource(database_url=database_url)
    context = build_sensor_context(instance=instance, resources={"warehouse": warehouse})
    return reconcile_syncs(context, warehouse)


def _launch(instance: DagsterInstance, request: RunRequest, job_name: str = "") -> bool:
    """Run what a sensor or schedule requested, as the daemon's run worker would."""
    job = load_definitions().resolve_job_def(job_name or str(request.job_name))
    result = job.execute_in_process(instance=instance, tags=request.tags, raise_on_error=False)
    return result.success


@pytest.mark.usefixtures("daemon_env")
@pytest.mark.parametrize("how", ["kill -9", "SIGSTOP"])
def test_an_interrupted_sync_is_finished_under_its_own_sync_id(
    how: str, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with _slow_feed(database_url, tmp_path, 31, CARSYNC_STALE_AFTER="2") as (sim, env):
        _sync(env, tmp_path)
        changes = sim.control.mutate(update=60, insert=60, delete=60)  # 1% of the feed
        process = _start_sync(env, tmp_path)
        interrupted = _interrupt(process, database_url, tmp_path, how, merged=2)
        if how == "SIGSTOP":
            time.sleep(3)  # longer than CARSYNC_STALE_AFTER: silent
        landed = _landed_by(tmp_path, interrupted)
        _use_env(monkeypatch, env)
        with DagsterInstance.get() as instance:
            result = _reconcile(instance, database_url)
            assert isinstance(result, SensorResult), result
            [request] = result.run_requests or []
            assert request.run_key == f"recover:{interrupted}:1"
            assert request.tags[SYNC_ID_TAG] == interrupted, "the same sync, not a new one"
            if how == "SIGSTOP":
                assert process.wait(timeout=10) == -signal.SIGKILL, "a silent worker is ended"
            sim.control.reset_stats()
            assert _launch(instance, request)
            assert isinstance(_reconcile(instance, database_url), SkipReason)
        assert _sync_rows(database_url)[-1] == (interrupted, "succeeded", False, 1)
        fetched_again = {int(page) for page in sim.control.stats()["list_pages"]}
        landed_pages = {page for key in landed for page in page_span(key, 100).pages}
        assert fetched_again and not fetched_again & landed_pages, "landed ranges fetched again"
        # The closing steps ran: the deleted listings are gone, whatever ran the sync.
        assert differences(sim.control.truth(), database_url, strict=True) == []
        rows = cars_by_id(database_url)
        assert not any(rows[car_id]["is_active"] for car_id in changes["deleted"])


@pytest.mark.usefixtures("daemon_env")
def test_healing_stops_after_three_recoveries_with_one_alert(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, webhook: WebhookReceiver
) -> None:
    with start_simulator(cars=2_000, seed=32) as sim:
        env = carsync_env(
            tmp_path, database_url, sim, CARSYNC_PARTITION_SIZE="500", CARSYNC_MAX_ATTEMPTS="1",
            CARSYNC_ALERT_WEBHOOK=webhook.url,
        )  # fmt: skip
        _sync(env, tmp_path)  # sets the instance up; this one succeeds
        sim.control.configure(error_rate=1.0)  # from now on every request fails: 5xx
        _use_env(monkeypatch, env)
        with DagsterInstance.get() as instance:
            # The nightly schedule's run, as the daemon would launch it.
            context = build_schedule_context(instance=instance, scheduled_execution_time=TICK)
            tick = full_sync_tick(context, "carsync")
            assert isinstance(tick, RunRequest) and not _launch(instance, tick, "full_sync")
            result = _reconcile(instance, database_url)
            [_, (sync_id, status, resumable, recoveries)] = _sync_rows(database_url)
            assert (status, resumable, recoveries) == ("failed", True, 1), "transient: re-run"
            for attempt in (1, 2, 3):
                result = result if attempt == 1 else _reconcile(instance, database_url)
                assert isinstance(result, SensorResult), f"attempt {attempt}: {result}"
                [request] = result.run_requests or []
                assert request.run_key == f"recover:{sync_id}:{attempt}"
                assert not _launch(instance, request), "the API is still down"
            assert webhook.received == []
            stopped = _reconcile(instance, database_url)
            assert isinstance(stopped, SkipReason), "no fourth re-run"
            assert isinstance(_reconcile(instance, database_url), SkipReason)
    assert _sync_rows(database_url)[1:] == [(sync_id, "failed", True, 3)]
    [alert] = webhook.received
    assert alert["sync_id"] == sync_id and alert["status"] == "failed"
    assert "HTTP 5" in alert["error"] and "after 3 re-runs" in alert["text"], alert
    assert sim.api_key not in json.dumps(alert)


def test_a_failed_sync_older_than_the_resume_limit_starts_afresh(
    database_url: str, tmp_path: Path
) -> None:
    with _slow_feed(database_url, tmp_path, 33) as (sim, env):
        _interrupt(_start_sync(env, tmp_path), database_url, tmp_path, landed=3)
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("UPDATE carsync.sync_runs SET started_at = now() - interval '7 hours'")
        summary = _sync(env, tmp_path)  # CARSYNC_RESUME_MAX_AGE is 6 hours
        assert summary["partitions_resumed"] == 0 and summary["pages"] == 60
        [(old, old_status, _, _), (new, status, _, _)] = _sync_rows(database_url)
        assert old != new and (old_status, status) == ("failed", "succeeded")
        assert differences(sim.control.truth(), database_url, strict=True) == []


def test_kill_change_incremental_then_resume_never_writes_older_data(
    database_url: str, tmp_path: Path
) -> None:
    with _slow_feed(database_url, tmp_path, 34) as (sim, env):
        _sync(env, tmp_path)
        killed = _interrupt(_start_sync(env, tmp_path), database_url, tmp_path, landed=4)
        landing = Landing(tmp_path / "data" / "landing")
        landed = [record for key in _landed_by(tmp_path, killed) for record in landing.records(key)]
        landed_ids = set(normalise(landed, this_year=2026).cars.get_column("id"))
        changes = sim.control.mutate(update=300, delete=100)
        incremental = _sync(env, tmp_path, "--incremental")
        assert incremental["updated"] == 300
        resumed = _sync(env, tmp_path)
        assert resumed["partitions_resumed"] > 0, "the killed sync was continued"
        truth = sim.control.truth()
        rows = cars_by_id(database_url)
        for car in truth["cars"]:  # no listing holds older values than the source
            assert rows[car["id"]]["price"] == _price(car), car["id"]
        problems = differences(truth, database_url, strict=True)
        # Read (landed) before they were deleted: they go at the next full sync (README).
        still_active = {i for i in changes["deleted"] if rows[i]["is_active"]}
        assert still_active == set(changes["deleted"]) & landed_ids
        if still_active:
            example = sorted(still_active)[:3]
            assert problems == [f"{len(still_active)} active cars not in the feed, e.g. {example}"]
        else:
            assert problems == []
        _sync(env, tmp_path)
        assert differences(sim.control.truth(), database_url, strict=True) == []


def _price(car: dict[str, Any]) -> Any:
    from decimal import Decimal

    return Decimal(str(car["price"]))


def test_a_listing_range_means_the_same_listings_at_any_page_size(
    database_url: str, tmp_path: Path
) -> None:
    with _slow_feed(database_url, tmp_path, 35) as (sim, env):
        killed = _interrupt(_start_sync(env, tmp_path), database_url, tmp_path, landed=3)
        landed = len(_landed_by(tmp_path, killed))
        # Resumed at another page size: the landed ranges keep their meaning, and count.
        resumed = _sync({**env, "CARSYNC_PAGE_SIZE": "300"}, tmp_path)
        assert resumed["partitions_resumed"] == landed
        assert differences(sim.control.truth(), database_url, strict=True) == []
        sim.control.mutate(update=40, insert=25, delete=25)
        _sync({**env, "CARSYNC_PAGE_SIZE": "7"}, tmp_path)
        assert differences(sim.control.truth(), database_url, strict=True) == []


@pytest.mark.parametrize(
    ("runs", "verdict"),
    [
        ([], Verdict("running")),
        ([RunFacts(DagsterRunStatus.STARTED)], Verdict("running")),
        ([RunFacts(DagsterRunStatus.SUCCESS, backfill_active=True)], Verdict("running")),
        (
            [RunFacts(DagsterRunStatus.FAILURE), RunFacts(DagsterRunStatus.SUCCESS)],
            Verdict("partial", "its closing steps did not run", resumable=True),
        ),
        (
            [RunFacts(DagsterRunStatus.CANCELED)],
            Verdict("interrupted", "the run was canceled", True),
        ),
        (
            [RunFacts(DagsterRunStatus.FAILURE, Verdict("blocked", "check x failed"))],
            Verdict("blocked", "check x failed"),
        ),
        (
            [RunFacts(DagsterRunStatus.FAILURE)],
            Verdict("failed", "the run failed", resumable=True),
        ),
    ],
)
def test_a_full_sync_is_judged_by_its_last_run(runs: list[RunFacts], verdict: Verdict) -> None:
    assert judge("full", closed=False, runs=runs) == verdict


def test_a_closed_full_sync_succeeds_with_its_failed_checks_listed() -> None:
    last = RunFacts(DagsterRunStatus.SUCCESS, checks_failed=("rejected_fraction",))
    assert judge("full", True, [last]) == Verdict("succeeded", checks_failed=("rejected_fraction",))
    assert judge("ranges", False, [RunFacts(DagsterRunStatus.SUCCESS)]).status == "succeeded"


@pytest.fixture
def webhook() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as receiver:
        yield receiver


@pytest.mark.parametrize(
    ("job", "selection", "tags", "kind"),
    [
        ("full_sync", None, {}, "full"),
        ("full_sync", None, {"dagster/asset_partition_range_end": "0005001-0010000"}, "full"),
        ("full_sync", None, {"dagster/asset_partition_range_end": "0000001-0005000"}, "ranges"),
        ("incremental_sync", None, {}, "incremental"),
        ("__ASSET_JOB", ["pages", "normalised", "cars", "vanished_listings"], {}, "full"),
        ("__ASSET_JOB", ["vanished_listings"], {}, "ranges"),
        ("__ASSET_JOB", ["recent_changes"], {}, "incremental"),
        ("__ASSET_JOB", ["pages"], {}, "ranges"),
        ("__ASSET_JOB", ["pages"], {"carsync/kind": "full"}, "full"),
    ],
)
def test_what_a_run_syncs(
    job: str, selection: list[str] | None, tags: dict[str, str], kind: str
) -> None:
    """A run over every listing range that closes is a full sync, however it was launched;
    `vanished_listings` alone, or some ranges, are not."""
    keys = ["0000001-0005000", "0005001-0010000"]
    if "dagster/asset_partition_range_end" in tags:
        tags = {**tags, "dagster/asset_partition_range_start": keys[0]}
    run = DagsterRun(
        job_name=job,
        run_id="r",
        tags=tags,
        asset_selection={AssetKey(name) for name in selection} if selection else None,
    )
    with DagsterInstance.ephemeral() as instance:
        assert kind_of(instance, run, keys) == kind


def test_a_worker_is_judged_by_host_pid_and_start_time(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pid reused by another process (after a reboot, say) is not the worker: the run is
    failed and that process left alone. A worker on another host is never signalled: its run is
    failed only after CARSYNC_STALE_AFTER of silence."""
    from carsync_dagster.orchestration.lifecycle import fail_lost_runs
    from carsync_dagster.orchestration.liveness import Worker

    use_dagster_home(tmp_path / "dagster", database_url, monkeypatch)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        here = Worker.this_process()
        impostor = Worker(here.host, bystander.pid, here.started - 3600)  # the pid, not the process
        remote = Worker("another-host", os.getpid(), here.started)
        _use_env(
            monkeypatch,
            {"API_BASE_URL": "http://127.0.0.1:9", "API_KEY": "k", "DATABASE_URL": database_url}
            | {"CARSYNC_DATA_DIR": "data"},
        )
        job = load_definitions().resolve_job_def("full_sync")
        with DagsterInstance.get() as instance:
            runs = {
                name: instance.create_run_for_job(
                    job_def=job,
                    status=DagsterRunStatus.STARTED,
                    tags={SYNC_ID_TAG: name, WORKER_TAG: worker.tag},
                )
                for name, worker in (("impostor", impostor), ("remote", remote))
            }
            assert fail_lost_runs(instance, stale_after=3600, log=print) == [
                runs["impostor"].run_id
            ], "a live remote worker is left alone"
            assert bystander.poll() is None, "the process that has the pid now is not signalled"
            time.sleep(0.1)
            assert fail_lost_runs(instance, stale_after=0.05, log=print) == [runs["remote"].run_id]
            remote_run = instance.get_run_by_id(runs["remote"].run_id)
            assert remote_run is not None and remote_run.status == DagsterRunStatus.FAILURE
    finally:
        bystander.kill()
        bystander.wait()


def test_only_a_recent_transient_failure_of_the_latest_full_sync_is_resumed(
    database_url: str,
) -> None:
    migrate(database_url, "carsync")
    with psycopg.connect(database_url, autocommit=True) as conn:

        def add(sync_id: str, kind: str, status: str, resumable: bool, hours_ago: float) -> None:
            conn.execute(
                "INSERT INTO carsync.sync_runs (sync_id, kind, status, resumable, started_at)"
                " VALUES (%s, %s, %s, %s, now() - %s * interval '1 hour')",
                (sync_id, kind, status, resumable, hours_ago),
            )

        def resumable(busy: frozenset[str] = frozenset()) -> str | None:
            return syncs.resumable_sync(conn, "carsync", 6 * 3600, busy.__contains__)

        add("old-failure", "full", "failed", True, 7)
        assert resumable() is None, "older than CARSYNC_RESUME_MAX_AGE"
        add("blocked", "full", "blocked", False, 3)
        assert resumable() is None, "never into the same failure"
        add("incremental", "incremental", "failed", True, 2.5)
        add("died", "full", "failed", True, 2)
        assert resumable() == "died"
        assert resumable(frozenset({"died"})) is None, "a run of it is queued or running"
        add("done", "full", "succeeded", False, 1)
        assert resumable() is None, "a newer full sync succeeded"
