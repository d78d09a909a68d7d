"""What `carsync status` reads from the Dagster instance and the definitions."""

import time
from datetime import UTC, datetime

from dagster import DagsterInstance
from dagster._utils.schedules import cron_string_iterator

from carsync_dagster.orchestration.partitions import page_ranges
from carsync_dagster.settings import Settings


def page_range_count(instance: DagsterInstance) -> int:
    return len(instance.get_dynamic_partitions(str(page_ranges.name)))


def next_ticks(settings: Settings) -> dict[str, datetime]:
    """When each sync schedule would next run, from its cron string (UTC)."""
    crons = {
        "full_sync_schedule": settings.full_sync_cron,
        "incremental_sync_schedule": settings.incremental_sync_cron,
    }
    return {
        name: next(cron_string_iterator(time.time(), cron, "UTC")).astimezone(UTC)
        for name, cron in crons.items()
    }
