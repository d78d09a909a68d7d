"""The Dagster code location: one thin Definitions object, built when the location loads (not at
import), so schedules and sensors follow the settings in the environment."""

import os

from dagster import Definitions, EnvVar, definitions, in_process_executor

from carsync_dagster.orchestration.assets import normalised_and_cars, pages
from carsync_dagster.orchestration.automation import (
    discovery_sensor,
    sync_failure_alert,
    sync_schedules,
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
from carsync_dagster.orchestration.recovery import partitions_healthy, recovery_sensors
from carsync_dagster.orchestration.resources import ListingsApiResource, WarehouseResource
from carsync_dagster.settings import load_settings


@definitions
def defs() -> Definitions:
    settings = load_settings(os.environ)
    return Definitions(
        assets=[pages, normalised_and_cars, recent_changes, vanished_listings],
        asset_checks=[
            cars_ids_unique,
            active_rows_match_feed,
            rejected_fraction,
            sync_freshness,
            partitions_healthy,
        ],
        jobs=[full_sync_job, incremental_sync_job, page_ranges_job, freshness_job],
        schedules=sync_schedules(settings),
        sensors=[discovery_sensor(settings), *recovery_sensors(settings), sync_failure_alert],
        # Every step of a run in the run worker's own process, as `carsync sync` runs them: a
        # process per step (Dagster's default) costs its imports and a new instance each time,
        # and made a UI or scheduled full sync twice as long. A killed worker leaves no step behind.
        executor=in_process_executor,
        resources={
            "api": ListingsApiResource(base_url=EnvVar("API_BASE_URL"), api_key=EnvVar("API_KEY")),
            "warehouse": WarehouseResource(database_url=EnvVar("DATABASE_URL")),
        },
    )
