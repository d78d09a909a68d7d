"""Sensors and schedules: keep the partitions matched to the feed, run syncs, settle and heal
them, raise alerts."""

import asyncio
import logging
import os
from datetime import datetime
from typing import Any

import httpx
from dagster import (
    AddDynamicPartitionsRequest,
    DagsterInstance,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    DeleteDynamicPartitionsRequest,
    RunRequest,
    RunsFilter,
    ScheduleDefinition,
    ScheduleEvaluationContext,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    schedule,
    sensor,
)

from carsync_dagster.orchestration.jobs import SyncJobs
from carsync_dagster.orchestration.lifecycle import ACTIVE, JOB_KINDS, full_range, reconcile
from carsync_dagster.orchestration.partitions import listing_ranges
from carsync_dagster.orchestration.resources import ListingsApiResource, WarehouseResource
from carsync_dagster.orchestration.tags import (
    RANGE_END_TAG,
    RANGE_START_TAG,
    SCHEMA_TAG,
    SYNC_ID_TAG,
    SYNC_KIND_TAG,
)
from carsync_dagster.ranges import partition_keys
from carsync_dagster.settings import Settings, load_settings
from carsync_dagster.source.extract import feed_total

logger = logging.getLogger("carsync.alerts")
ALERT_WEBHOOK_ENV = "CARSYNC_ALERT_WEBHOOK"


def discover_listing_ranges(
    context: SensorEvaluationContext, api: ListingsApiResource
) -> SensorResult | SkipReason:
    """Adds and removes listing ranges so the partitions match meta.total."""
    settings = api.settings()
    client = api.client()

    async def total() -> int:
        async with client:
            return await feed_total(client)

    listings = asyncio.run(total())
    wanted = partition_keys(listings, settings.listings_per_partition)
    existing = set(context.instance.get_dynamic_partitions(str(listing_ranges.name)))
    added = [key for key in wanted if key not in existing]
    removed = sorted(existing - set(wanted))
    if not added and not removed:
        return SkipReason(f"the feed still has {listings} listings in {len(wanted)} ranges")
    requests: list[AddDynamicPartitionsRequest | DeleteDynamicPartitionsRequest] = []
    if added:
        requests.append(listing_ranges.build_add_request(added))
    if removed:
        requests.append(listing_ranges.build_delete_request(removed))
    context.log.info(f"{listings} listings: {len(added)} ranges added, {len(removed)} removed")
    return SensorResult(dynamic_partitions_requests=requests)


def sync_in_progress(instance: DagsterInstance) -> bool:
    runs = instance.get_runs(RunsFilter(statuses=ACTIVE), limit=50)
    return any(run.job_name in JOB_KINDS or SYNC_ID_TAG in run.tags for run in runs)


def full_sync_tick(context: ScheduleEvaluationContext, schema: str) -> RunRequest | SkipReason:
    keys = full_range(context.instance)
    if not keys:
        return SkipReason("no listing ranges yet: the discovery sensor adds them")
    tags = {RANGE_START_TAG: keys[0], RANGE_END_TAG: keys[-1], SYNC_KIND_TAG: "full"}
    return _sync_tick(context, {**tags, SCHEMA_TAG: schema})


def incremental_sync_tick(
    context: ScheduleEvaluationContext, schema: str
) -> RunRequest | SkipReason:
    return _sync_tick(context, {SYNC_KIND_TAG: "incremental", SCHEMA_TAG: schema})


def _sync_tick(context: ScheduleEvaluationContext, tags: dict[str, str]) -> RunRequest | SkipReason:
    """One run per tick (the tick time is its run key), and none while any sync runs."""
    if sync_in_progress(context.instance):
        return SkipReason("another sync is running; the next tick tries again")
    return RunRequest(run_key=_tick_key(context.scheduled_execution_time), tags=tags)


def freshness_tick(context: ScheduleEvaluationContext) -> RunRequest:
    return RunRequest(run_key=_tick_key(context.scheduled_execution_time))


def _tick_key(scheduled: datetime | None) -> str | None:
    return scheduled.isoformat() if scheduled else None


def send_alert(message: dict[str, Any], webhook: str | None) -> None:
    """Always log; POST the JSON too when a webhook is configured."""
    logger.error(message["text"])
    if webhook:
        try:
            httpx.post(webhook, json=message, timeout=10).raise_for_status()
        except httpx.HTTPError as error:
            logger.error("could not deliver the alert to CARSYNC_ALERT_WEBHOOK: %s", type(error))


def reconcile_syncs(
    context: SensorEvaluationContext, warehouse: WarehouseResource
) -> SensorResult | SkipReason:
    """Settle every running sync against its runs, re-run the ones that failed on something
    transient, alert on the ones that stay failed."""
    settings = load_settings(os.environ)
    with warehouse.connect(autocommit=True) as conn:
        done = reconcile(
            context.instance,
            conn,
            warehouse.schema_name,
            settings,
            follow_up=True,
            log=context.log.warning,
        )
    for message in done.alerts:
        send_alert(message, os.environ.get(ALERT_WEBHOOK_ENV))
    for sync_id, verdict in done.settled.items():
        context.log.info(f"sync {sync_id}: {verdict.status}")
    if not done.recoveries:
        return SkipReason(
            f"{len(done.settled)} syncs settled, {len(done.alerts)} alerts, nothing to re-run"
        )
    return SensorResult(run_requests=done.recoveries)


def sync_schedules(settings: Settings, jobs: SyncJobs) -> list[ScheduleDefinition]:
    """The schedules, with the cron strings of CARSYNC_FULL_SYNC_CRON and
    CARSYNC_INCREMENTAL_SYNC_CRON. Syncs start STOPPED: turn them on in the UI."""
    schema = settings.schema_name

    def full_sync_schedule(context: ScheduleEvaluationContext) -> RunRequest | SkipReason:
        return full_sync_tick(context, schema)

    def incremental_sync_schedule(context: ScheduleEvaluationContext) -> RunRequest | SkipReason:
        return incremental_sync_tick(context, schema)

    return [
        schedule(
            cron_schedule=settings.full_sync_cron,
            job=jobs.full,
            default_status=DefaultScheduleStatus.STOPPED,
            description=f"A full sync ({settings.full_sync_cron}): one run over every range.",
        )(full_sync_schedule),
        schedule(
            cron_schedule=settings.incremental_sync_cron,
            job=jobs.incremental,
            default_status=DefaultScheduleStatus.STOPPED,
            description=f"An incremental sync ({settings.incremental_sync_cron}): the listings "
            "updated since the last watermark.",
        )(incremental_sync_schedule),
        schedule(
            name="freshness_schedule",
            cron_schedule="*/30 * * * *",
            job=jobs.freshness,
            default_status=DefaultScheduleStatus.RUNNING,
            description="Checks every 30 minutes that syncs keep happening (sync_freshness).",
        )(freshness_tick),
    ]


def sync_sensors(settings: Settings, jobs: SyncJobs) -> list[SensorDefinition]:
    return [
        sensor(
            name="discovery_sensor",
            minimum_interval_seconds=settings.sensor_interval,
            default_status=DefaultSensorStatus.RUNNING,
            description="Keeps the listing-range partitions matched to meta.total. It syncs "
            "nothing itself: the feed is newest first and moves, so new listings arrive with the "
            "next sync.",
        )(discover_listing_ranges),
        sensor(
            name="sync_reconciler",
            minimum_interval_seconds=settings.sensor_interval,
            default_status=DefaultSensorStatus.RUNNING,
            jobs=[jobs.full],
            description=f"Fails sync runs whose worker is gone or that are silent for "
            f"{settings.stale_after:.0f}s (CARSYNC_STALE_AFTER), settles every running sync, "
            f"runs a full sync that failed on something transient again (it resumes from its "
            f"landed and merged ranges; at most {settings.max_recoveries} times, "
            "CARSYNC_MAX_RECOVERIES) and alerts CARSYNC_ALERT_WEBHOOK about a sync that stays "
            "failed.",
        )(reconcile_syncs),
    ]
