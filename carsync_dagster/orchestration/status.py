"""What `carsync status` reads from the Dagster instance and the definitions."""

import time
from datetime import UTC, datetime

from dagster import DagsterInstance
from dagster._utils.schedules import cron_string_iterator

from carsync_dagster.orchestration.automation import full_sync_schedule, incremental_sync_schedule
from carsync_dagster.orchestration.partitions import page_ranges


def page_range_count(instance: DagsterInstance) -> int:
    return len(instance.get_dynamic_partitions(str(page_ranges.name)))


def next_ticks() -> dict[str, datetime]:
    """When each sync schedule would next run, from its cron string (UTC)."""
    ticks = {}
    for schedule in (full_sync_schedule, incremental_sync_schedule):
        cron = schedule.cron_schedule
        assert isinstance(cron, str)
        upcoming = next(cron_string_iterator(time.time(), cron, "UTC"))
        ticks[schedule.name] = upcoming.astimezone(UTC)
    return ticks
