"""What `carsync status` reads from the Dagster instance and the definitions."""

import time
from datetime import UTC, datetime

from dagster._utils.schedules import cron_string_iterator

from carsync_dagster.settings import Settings


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
