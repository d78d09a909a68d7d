"""The Dagster code location: one thin Definitions object."""

from dagster import Definitions, EnvVar

from carsync_dagster.orchestration.assets import cars, normalised, pages
from carsync_dagster.orchestration.automation import (
    discovery_sensor,
    freshness_schedule,
    full_sync_schedule,
    incremental_sync_schedule,
    sync_failure_alert,
)
from carsync_dagster.orchestration.changes import (
    active_rows_match_feed,
    cars_ids_unique,
    recent_changes,
    rejected_fraction,
    sync_freshness,
    vanished_listings,
)
from carsync_dagster.orchestration.jobs import (
    freshness_job,
    full_sync_job,
    incremental_sync_job,
    page_ranges_job,
)
from carsync_dagster.orchestration.recovery import (
    failed_partition_sensor,
    partitions_healthy,
    stale_run_sensor,
)
from carsync_dagster.orchestration.resources import ListingsApiResource, WarehouseResource

defs = Definitions(
    assets=[pages, normalised, cars, recent_changes, vanished_listings],
    asset_checks=[
        cars_ids_unique,
        active_rows_match_feed,
        rejected_fraction,
        sync_freshness,
        partitions_healthy,
    ],
    jobs=[full_sync_job, incremental_sync_job, page_ranges_job, freshness_job],
    schedules=[full_sync_schedule, incremental_sync_schedule, freshness_schedule],
    sensors=[discovery_sensor, stale_run_sensor, failed_partition_sensor, sync_failure_alert],
    resources={
        "api": ListingsApiResource(base_url=EnvVar("API_BASE_URL"), api_key=EnvVar("API_KEY")),
        "warehouse": WarehouseResource(database_url=EnvVar("DATABASE_URL")),
    },
)
