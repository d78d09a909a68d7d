"""The stale-run sensor: a sync run that is STARTED but silent, or whose worker is gone, is marked
failed and requested again. It is the one mechanism that re-runs interrupted work: Dagster's run
retries are off (dagster.yaml), and a re-run of the same sync skips the partitions it landed."""

import os
import signal
import socket
import time

from dagster import (
    DagsterEventType,
    DagsterInstance,
    DagsterRun,
    DagsterRunStatus,
    DefaultSensorStatus,
    RunRequest,
    RunsFilter,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from carsync_dagster.orchestration.assets import HOST_TAG, PID_TAG
from carsync_dagster.orchestration.jobs import full_sync_job, incremental_sync_job

STALE_AFTER_ENV = "CARSYNC_STALE_AFTER"
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


def _worker_pid(instance: DagsterInstance, run: DagsterRun) -> int | None:
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


def why_stale(instance: DagsterInstance, run: DagsterRun, stale_after: float) -> str | None:
    """Why a STARTED run should be failed, or None while it looks healthy."""
    local = run.tags.get(HOST_TAG, socket.gethostname()) == socket.gethostname()
    pid = _worker_pid(instance, run)
    if local and pid is not None and not _alive(pid):
        return f"its worker process {pid} is gone"
    last = _last_event_time(instance, run.run_id)
    silent = time.time() - last if last is not None else 0.0
    if silent > stale_after:
        return f"it logged nothing for {silent:.0f}s (CARSYNC_STALE_AFTER={stale_after:.0f})"
    return None


def _stop_worker(run: DagsterRun, pid: int | None) -> None:
    """A silent worker may wake up later and write again: end it, so only the re-run writes."""
    local = run.tags.get(HOST_TAG, socket.gethostname()) == socket.gethostname()
    if local and pid is not None and pid != os.getpid() and _alive(pid):
        os.kill(pid, signal.SIGKILL)


@sensor(
    jobs=[full_sync_job, incremental_sync_job],
    minimum_interval_seconds=30,
    default_status=DefaultSensorStatus.RUNNING,
    description="Fails sync runs that are silent for CARSYNC_STALE_AFTER (default 300 s) or whose "
    "worker is gone, and requests the same sync again (it resumes from landed partitions).",
)
def stale_run_sensor(context: SensorEvaluationContext) -> SensorResult | SkipReason:
    stale_after = float(os.environ.get(STALE_AFTER_ENV, "300"))
    records = context.instance.get_run_records(
        RunsFilter(
            job_name=None,
            statuses=[DagsterRunStatus.STARTED],
        ),
        limit=50,
    )
    requests = []
    for record in records:
        run = record.dagster_run
        if run.job_name not in (full_sync_job.name, incremental_sync_job.name):
            continue
        reason = why_stale(context.instance, run, stale_after)
        if reason is None:
            continue
        _stop_worker(run, _worker_pid(context.instance, run))
        context.instance.report_run_failed(run, f"carsync stale-run sensor: {reason}")
        context.log.warning(f"run {run.run_id} marked failed: {reason}; requested again")
        tags = {key: run.tags[key] for key in _KEEP_TAGS if key in run.tags}
        requests.append(
            RunRequest(
                run_key=f"stale:{run.run_id}",  # sensor run keys never repeat: one re-run each
                job_name=run.job_name,
                tags={**tags, "carsync/recovers": run.run_id},
            )
        )
    if not requests:
        return SkipReason("no stale sync runs")
    return SensorResult(run_requests=requests)
