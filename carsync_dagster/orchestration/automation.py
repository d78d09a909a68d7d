"""Sensors and schedules: keep the partitions matched to the feed, run syncs, raise alerts."""

import asyncio
import logging
import os
from datetime import datetime

import httpx
from dagster import (
    AddDynamicPartitionsRequest,
    DagsterInstance,
    DagsterRunStatus,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    DeleteDynamicPartitionsRequest,
    RunFailureSensorContext,
    RunRequest,
    RunsFilter,
    ScheduleDefinition,
    ScheduleEvaluationContext,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    run_failure_sensor,
    schedule,
    sensor,
)

from carsync_dagster.orchestration.assets import SYNC_KIND_TAG
from carsync_dagster.orchestration.jobs import (
    freshness_job,
    full_sync_job,
    incremental_sync_job,
    page_ranges_job,
)
from carsync_dagster.orchestration.partitions import page_ranges, partition_keys
from carsync_dagster.orchestration.resources import ListingsApiResource
from carsync_dagster.settings import Settings, SettingsError, load_settings, redact

logger = logging.getLogger("carsync.alerts")
ALERT_WEBHOOK_ENV = "CARSYNC_ALERT_WEBHOOK"
_ACTIVE = [DagsterRunStatus.QUEUED, DagsterRunStatus.STARTING, DagsterRunStatus.STARTED]
SYNC_JOBS = (full_sync_job.name, incremental_sync_job.name, page_ranges_job.name)


def discover_page_ranges(
    context: SensorEvaluationContext, api: ListingsApiResource
) -> SensorResult | SkipReason:
    """Adds and removes page ranges so the partitions match meta.last_page."""
    settings = api.settings()
    client = api.client()

    async def last_page() -> int:
        async with client:
            return (await client.get_page(1, settings.page_size)).last_page

    pages = asyncio.run(last_page())
    wanted = partition_keys(pages, settings.pages_per_partition)
    name = str(page_ranges.name)
    existing = set(context.instance.get_dynamic_partitions(name))
    added = [key for key in wanted if key not in existing]
    removed = sorted(existing - set(wanted))
    if not added and not removed:
        return SkipReason(f"the feed still has {pages} pages in {len(wanted)} page ranges")
    requests: list[AddDynamicPartitionsRequest | DeleteDynamicPartitionsRequest] = []
    if added:
        requests.append(page_ranges.build_add_request(added))
    if removed:
        requests.append(page_ranges.build_delete_request(removed))
    context.log.info(f"{pages} pages: {len(added)} page ranges added, {len(removed)} removed")
    return SensorResult(dynamic_partitions_requests=requests)


def sync_in_progress(instance: DagsterInstance) -> bool:
    runs = instance.get_run_records(RunsFilter(job_name=None, statuses=_ACTIVE), limit=20)
    return any(record.dagster_run.job_name in SYNC_JOBS for record in runs)


def full_sync_tick(context: ScheduleEvaluationContext) -> RunRequest | SkipReason:
    keys = sorted(context.instance.get_dynamic_partitions(str(page_ranges.name)))
    if not keys:
        return SkipReason("no page ranges yet: the discovery sensor adds them")
    return _sync_tick(
        context,
        {
            "dagster/asset_partition_range_start": keys[0],
            "dagster/asset_partition_range_end": keys[-1],
            SYNC_KIND_TAG: "full",
        },
    )


def incremental_sync_tick(context: ScheduleEvaluationContext) -> RunRequest | SkipReason:
    return _sync_tick(context, {SYNC_KIND_TAG: "incremental"})


def _sync_tick(context: ScheduleEvaluationContext, tags: dict[str, str]) -> RunRequest | SkipReason:
    """One run per tick (the tick time is its run key), and none while any sync runs."""
    if sync_in_progress(context.instance):
        return SkipReason("another sync is running; the next tick tries again")
    return RunRequest(run_key=_tick_key(context.scheduled_execution_time), tags=tags)


def freshness_tick(context: ScheduleEvaluationContext) -> RunRequest:
    return RunRequest(run_key=_tick_key(context.scheduled_execution_time))


def _tick_key(scheduled: datetime | None) -> str | None:
    return scheduled.isoformat() if scheduled else None


def alert_message(job: str, run_id: str, error: str) -> dict[str, str]:
    return {
        "text": f"carsync: {job} run {run_id} failed: {error}",
        "job": job,
        "run_id": run_id,
        "error": error,
        "where": f"Dagster UI → Runs → {run_id}; `carsync status` for the warehouse side",
    }


def send_alert(message: dict[str, str], webhook: str | None) -> None:
    """Always log; POST the JSON too when a webhook is configured."""
    logger.error(message["text"])
    if webhook:
        try:
            httpx.post(webhook, json=message, timeout=10).raise_for_status()
        except httpx.HTTPError as error:
            logger.error("could not deliver the alert to CARSYNC_ALERT_WEBHOOK: %s", type(error))


@run_failure_sensor(
    monitored_jobs=[full_sync_job, incremental_sync_job, page_ranges_job],
    default_status=DefaultSensorStatus.RUNNING,
    description="A failed sync (a failed blocking check included) alerts CARSYNC_ALERT_WEBHOOK.",
)
def sync_failure_alert(context: RunFailureSensorContext) -> None:
    error = context.failure_event.message or "failed"
    for step in context.get_step_failure_events():
        cause = step.step_failure_data.error
        if cause is not None:
            error = f"{step.step_key}: {(cause.cause or cause).message.strip().splitlines()[-1]}"
            break
    try:
        secrets = load_settings(os.environ).secrets()
    except SettingsError:
        secrets = []
    message = alert_message(
        context.dagster_run.job_name, context.dagster_run.run_id, redact(error, secrets)
    )
    send_alert(message, os.environ.get(ALERT_WEBHOOK_ENV))


def sync_schedules(settings: Settings) -> list[ScheduleDefinition]:
    """The schedules, with the cron strings of CARSYNC_FULL_SYNC_CRON and
    CARSYNC_INCREMENTAL_SYNC_CRON. Syncs start STOPPED: turn them on in the UI."""
    return [
        schedule(
            name="full_sync_schedule",
            cron_schedule=settings.full_sync_cron,
            job=full_sync_job,
            default_status=DefaultScheduleStatus.STOPPED,
            description=f"A full sync ({settings.full_sync_cron}): one run over every page range.",
        )(full_sync_tick),
        schedule(
            name="incremental_sync_schedule",
            cron_schedule=settings.incremental_sync_cron,
            job=incremental_sync_job,
            default_status=DefaultScheduleStatus.STOPPED,
            description=f"An incremental sync ({settings.incremental_sync_cron}): the listings "
            "updated since the last watermark.",
        )(incremental_sync_tick),
        schedule(
            name="freshness_schedule",
            cron_schedule="*/30 * * * *",
            job=freshness_job,
            default_status=DefaultScheduleStatus.RUNNING,
            description="Checks every 30 minutes that syncs keep happening (sync_freshness).",
        )(freshness_tick),
    ]


def discovery_sensor(settings: Settings) -> SensorDefinition:
    return sensor(
        name="discovery_sensor",
        minimum_interval_seconds=settings.sensor_interval,
        default_status=DefaultSensorStatus.RUNNING,
        description="Keeps the page-range partitions matched to meta.last_page. It syncs nothing "
        "itself: page ranges do not identify listings, so new ones arrive with the next sync.",
    )(discover_page_ranges)
