"""The Dagster code location: one thin Definitions object, built when the location loads (not at
import), so schedules and sensors follow the settings in the environment."""

import os

from dagster import Definitions, EnvVar, definitions, in_process_executor

from carsync_dagster.orchestration.assets import sync_partitions
from carsync_dagster.orchestration.automation import sync_schedules, sync_sensors
from carsync_dagster.orchestration.changes import recent_changes, vanished_listings
from carsync_dagster.orchestration.checks import (
    active_rows_match_feed,
    cars_ids_unique,
    partitions_healthy,
    rejected_fraction,
    sync_freshness,
)
from carsync_dagster.orchestration.jobs import sync_jobs
from carsync_dagster.orchestration.resources import (
    ListingsApiResource,
    SyncRunResource,
    WarehouseResource,
)
from carsync_dagster.settings import load_settings


@definitions
def defs() -> Definitions:
    settings = load_settings(os.environ)
    jobs = sync_jobs(settings.schema_name)
    return Definitions(
        assets=[sync_partitions, recent_changes, vanished_listings],
        asset_checks=[
            cars_ids_unique,
            active_rows_match_feed,
            rejected_fraction,
            sync_freshness,
            partitions_healthy,
        ],
        jobs=[*jobs.syncs, jobs.freshness],
        schedules=sync_schedules(settings, jobs),
        sensors=sync_sensors(settings, jobs),
        # Every step of a run in the run worker's own process, as `carsync sync` runs them: a
        # process per step (Dagster's default) costs its imports and a new instance each time,
        # and made a UI or scheduled full sync twice as long. A killed worker leaves no step behind.
        executor=in_process_executor,
        resources={
            "api": ListingsApiResource(base_url=EnvVar("API_BASE_URL"), api_key=EnvVar("API_KEY")),
            "warehouse": WarehouseResource(database_url=EnvVar("DATABASE_URL")),
            "sync": SyncRunResource(database_url=EnvVar("DATABASE_URL")),
        },
    )
