"""Self-healing. Two sensors, each the only owner of one kind of re-run (Dagster's own run
retries are off in dagster.yaml):
- the stale-run sensor fails a sync run that is STARTED but silent, or whose worker is gone, and
  requests that same sync again (run key `stale:<run>`), which skips the partitions it landed;
- the failed-partition sensor re-runs blocks of page ranges whose last materialization failed
  (run key `retry:<first>..<last>:<attempt>`, at most CARSYNC_PARTITION_RETRIES times), never
  while any sync runs nor while a stale run's re-run is pending, so it cannot race a recovery
  that is already redoing those partitions.
Sensor run keys are never reused, so neither can request the same re-run twice."""

import contextlib
import functools
import json
import os
import socket
import time
from datetime import UTC, datetime, timedelta

import psutil
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetPartitionStatus,
    DagsterEventType,
    DagsterInstance,
    DagsterRun,
    DagsterRunStatus,
    DefaultSensorStatus,
    RunRequest,
    RunsFilter,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    asset_check,
    sensor,
)

from carsync_dagster.orchestration.assets import (
    CARS,
    HOST_TAG,
    NORMALISED,
    PID_TAG,
    SYNC_KIND_TAG,
    pages,
)
from carsync_dagster.orchestration.automation import SYNC_JOBS, sync_in_progress
from carsync_dagster.orchestration.jobs import full_sync_job, incremental_sync_job, page_ranges_job
from carsync_dagster.orchestration.partitions import page_ranges
from carsync_dagster.settings import Settings

STALE_TAG = "carsync/failed_as_stale"
RECOVERS_TAG = "carsync/recovers"
_KEEP_TAGS = (
    "carsync/sync_id",
    "carsync/kind",
    "carsync/allow_mass_deactivation",
    "dagster/asset_partition_range_start",
    "dagster/asset_partition_range_end",
)


def _last_event_time(instance: DagsterInstance, run_id: str) -> float | None:
    records = instance.get_records_for_run(run_id, limit=1, ascending=False).records
    return records[0].timestamp if records else None


def worker_pid(instance: DagsterInstance, run: DagsterRun) -> int | None:
    if PID_TAG in run.tags:
        return int(run.tags[PID_TAG])
    engine_events = instance.get_records_for_run(
        run.run_id, of_type=DagsterEventType.ENGINE_EVENT, limit=20
    ).records
    for record in engine_events:
        metadata = record.event_log_entry.dagster_event.engine_event_data.metadata  # type: ignore[union-attr]
        if "pid" in metadata:
            return int(str(metadata["pid"].value))
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (killed, not yet reaped by its parent) is gone too.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _on_this_host(run: DagsterRun) -> bool:
    return run.tags.get(HOST_TAG, socket.gethostname()) == socket.gethostname()


def _started_sync_runs(instance: DagsterInstance) -> list[DagsterRun]:
    records = instance.get_run_records(RunsFilter(statuses=[DagsterRunStatus.STARTED]), limit=50)
    return [r.dagster_run for r in records if r.dagster_run.job_name in SYNC_JOBS]


def _worker_gone(run: DagsterRun, pid: int | None) -> bool:
    return _on_this_host(run) and pid is not None and not _alive(pid)


def why_stale(
    instance: DagsterInstance, run: DagsterRun, stale_after: float, pid: int | None
) -> str | None:
    """Why a STARTED run should be failed, or None while it looks healthy; `pid` is its
    worker's (worker_pid)."""
    if _worker_gone(run, pid):
        return f"its worker process {pid} is gone"
    last = _last_event_time(instance, run.run_id)
    silent = time.time() - last if last is not None else 0.0
    if silent > stale_after:
        return f"it logged nothing for {silent:.0f}s (CARSYNC_STALE_AFTER={stale_after:.0f})"
    return None


def fail_run(instance: DagsterInstance, run: DagsterRun, message: str) -> None:
    instance.report_run_failed(run, message)
    # Give back its API pool slot now: the daemon would take a while, and may not be running.
    instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)


def fail_dead_runs(instance: DagsterInstance) -> list[str]:
    """Fails the STARTED sync runs whose worker on this host is gone (without re-running them:
    the caller is about to sync), so they hold no pool slot. Returns their run ids."""
    failed = []
    for run in _started_sync_runs(instance):
        reason = why_stale(instance, run, float("inf"), worker_pid(instance, run))
        if reason is not None:
            fail_run(instance, run, f"carsync: {reason}")
            failed.append(run.run_id)
    return failed


def _stop_worker(run: DagsterRun, pid: int | None) -> None:
    """A silent worker (and the step processes it started) may wake up later and write again:
    end them all, so only the re-run writes."""
    if not _on_this_host(run) or pid is None or pid == os.getpid():
        return
    try:
        worker = psutil.Process(pid)
        family = [*worker.children(recursive=True), worker]
    except psutil.NoSuchProcess:
        return
    for process in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def recover_stale_runs(
    context: SensorEvaluationContext, stale_after: float
) -> SensorResult | SkipReason:
    """Fails stale sync runs and requests each of them again.

    A run whose worker is gone is left one tick: the gRPC code server fails the runs of workers
    it launched and lost within a second or so, and then the failed-partition sensor re-runs
    only what failed. Acting in that second too would recover the same run twice."""
    requests = []
    seen_gone: list[str] = json.loads(context.cursor or "[]")
    gone_now: list[str] = []
    for run in _started_sync_runs(context.instance):
        pid = worker_pid(context.instance, run)
        reason = why_stale(context.instance, run, stale_after, pid)
        if reason is None:
            continue
        if _worker_gone(run, pid) and run.run_id not in seen_gone:
            gone_now.append(run.run_id)
            continue
        _stop_worker(run, pid)
        # Tagged first: the failed-partition sensor leaves this run's partitions to its re-run.
        context.instance.add_run_tags(run.run_id, {STALE_TAG: "true"})
        fail_run(context.instance, run, f"carsync stale-run sensor: {reason}")
        context.log.warning(f"run {run.run_id} marked failed: {reason}; requested again")
        tags = {key: run.tags[key] for key in _KEEP_TAGS if key in run.tags}
        requests.append(
            RunRequest(
                run_key=f"stale:{run.run_id}",  # sensor run keys never repeat: one re-run each
                job_name=run.job_name,
                tags={**tags, RECOVERS_TAG: run.run_id},
            )
        )
    cursor = json.dumps(gone_now)
    if not requests:
        return SensorResult(skip_reason="no stale sync runs", cursor=cursor)
    return SensorResult(run_requests=requests, cursor=cursor)


def contiguous_blocks(keys: list[str], order: list[str]) -> list[list[str]]:
    """`keys` split into runs of neighbours in `order` (all keys, sorted)."""
    position = {key: index for index, key in enumerate(order)}
    blocks: list[list[str]] = []
    for key in sorted(keys, key=position.__getitem__):
        if blocks and position[key] == position[blocks[-1][-1]] + 1:
            blocks[-1].append(key)
        else:
            blocks.append([key])
    return blocks


def failed_partitions(instance: DagsterInstance) -> list[str]:
    """Page ranges whose latest attempt at any asset of the chain failed."""
    keys = sorted(instance.get_dynamic_partitions(str(page_ranges.name)))
    failed: set[str] = set()
    for asset_key in (pages.key, NORMALISED, CARS):
        statuses = instance.get_status_by_partition(asset_key, keys, page_ranges) or {}
        failed |= {key for key, status in statuses.items() if status == AssetPartitionStatus.FAILED}
    return sorted(failed)


def stale_recovery_pending(instance: DagsterInstance) -> bool:
    """A run the stale-run sensor failed lately whose re-run does not exist yet: between the
    two (one sensor tick), its partitions look failed but already have an owner."""
    lately = datetime.now(UTC) - timedelta(minutes=10)
    stale = RunsFilter(
        statuses=[DagsterRunStatus.FAILURE], tags={STALE_TAG: "true"}, updated_after=lately
    )
    failed = instance.get_run_records(stale, limit=20)
    return any(
        not instance.get_run_records(RunsFilter(tags={RECOVERS_TAG: r.dagster_run.run_id}), limit=1)
        for r in failed
    )


def retry_failed_partitions(
    context: SensorEvaluationContext, limit: int
) -> SensorResult | SkipReason:
    """One run per block of failed page ranges that has attempts left."""
    if sync_in_progress(context.instance):
        return SkipReason("a sync is running: it may redo these partitions itself")
    if stale_recovery_pending(context.instance):
        return SkipReason("the stale-run sensor's re-run of a failed sync is about to start")
    attempts: dict[str, int] = json.loads(context.cursor or "{}")
    failed = failed_partitions(context.instance)
    attempts = {key: count for key, count in attempts.items() if key in failed}
    due = [key for key in failed if attempts.get(key, 0) < limit]
    requests = []
    # One run per block of neighbouring page ranges, not one per range: a run costs seconds.
    for block in contiguous_blocks(
        due, sorted(context.instance.get_dynamic_partitions(str(page_ranges.name)))
    ):
        attempt = 1 + max(attempts.get(key, 0) for key in block)
        attempts.update(dict.fromkeys(block, attempt))
        requests.append(
            RunRequest(
                run_key=f"retry:{block[0]}..{block[-1]}:{attempt}",
                tags={
                    SYNC_KIND_TAG: "retry",
                    "dagster/asset_partition_range_start": block[0],
                    "dagster/asset_partition_range_end": block[-1],
                },
            )
        )
    cursor = json.dumps(attempts, sort_keys=True)
    if not requests:
        return SensorResult(
            skip_reason=f"{len(failed)} failed page ranges, none due", cursor=cursor
        )
    return SensorResult(run_requests=requests, cursor=cursor)


@asset_check(asset=CARS, description="No page range is left failed.")
def partitions_healthy(context: AssetCheckExecutionContext) -> AssetCheckResult:
    failed = failed_partitions(context.instance)
    return AssetCheckResult(
        passed=not failed,
        metadata={"failed_page_ranges": len(failed)},
        description=f"failed page ranges: {', '.join(failed)}" if failed else "all page ranges ok",
    )


def recovery_sensors(settings: Settings) -> list[SensorDefinition]:
    def stale_run_sensor(context: SensorEvaluationContext) -> SensorResult | SkipReason:
        return recover_stale_runs(context, settings.stale_after)

    def failed_partition_sensor(context: SensorEvaluationContext) -> SensorResult | SkipReason:
        return retry_failed_partitions(context, settings.partition_retries)

    running_sensor = functools.partial(
        sensor,
        minimum_interval_seconds=settings.sensor_interval,
        default_status=DefaultSensorStatus.RUNNING,
    )
    return [
        running_sensor(
            jobs=[full_sync_job, incremental_sync_job, page_ranges_job],
            description=f"Fails sync runs silent for {settings.stale_after:.0f}s "
            "(CARSYNC_STALE_AFTER) or whose worker is gone, and requests the same sync again "
            "(it resumes from landed partitions).",
        )(stale_run_sensor),
        running_sensor(
            job=page_ranges_job,
            description=f"Re-runs failed page ranges, at most {settings.partition_retries} times "
            "each (CARSYNC_PARTITION_RETRIES); after that they stay failed and the "
            "`partitions_healthy` check says so.",
        )(failed_partition_sensor),
    ]
