"""Jobs: a full sync is one run over the whole range of listing-range partitions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from dagster import AssetCheckKey, AssetSelection, define_asset_job

from carsync_dagster.orchestration.assets import CARS, sync_partitions
from carsync_dagster.orchestration.changes import recent_changes, vanished_listings
from carsync_dagster.orchestration.lifecycle import (
    FULL_SYNC_JOB,
    INCREMENTAL_SYNC_JOB,
    RANGES_JOB,
)
from carsync_dagster.orchestration.tags import SCHEMA_TAG

if TYPE_CHECKING:  # what define_asset_job returns; Dagster does not export the name
    from dagster._core.definitions.unresolved_asset_job_definition import (
        UnresolvedAssetJobDefinition,
    )

# Freshness is about the time between syncs: checked on its own schedule, not inside one.
FRESHNESS = AssetSelection.checks(AssetCheckKey(CARS, "sync_freshness"))


@dataclass(frozen=True)
class SyncJobs:
    full: UnresolvedAssetJobDefinition
    incremental: UnresolvedAssetJobDefinition
    ranges: UnresolvedAssetJobDefinition
    freshness: UnresolvedAssetJobDefinition

    @property
    def syncs(self) -> list[UnresolvedAssetJobDefinition]:
        return [self.full, self.incremental, self.ranges]


def sync_jobs(schema: str) -> SyncJobs:
    """The jobs, their runs tagged with the warehouse schema: dagster.yaml queues runs of one
    schema one at a time."""
    tags = {SCHEMA_TAG: schema}
    return SyncJobs(
        full=define_asset_job(
            FULL_SYNC_JOB,
            selection=AssetSelection.assets(sync_partitions, recent_changes, vanished_listings)
            - FRESHNESS,
            tags=tags,
            description=(
                "Fetch, normalise and merge every listing range in one run, catch up on changes "
                "made meanwhile, then confirm and mark the listings that left the feed."
            ),
        ),
        incremental=define_asset_job(
            INCREMENTAL_SYNC_JOB,
            selection=AssetSelection.assets(recent_changes),
            tags=tags,
            description="Merge the listings created or updated since the last successful sync.",
        ),
        ranges=define_asset_job(
            RANGES_JOB,
            selection=AssetSelection.assets(sync_partitions) - FRESHNESS,
            tags=tags,
            description="Some listing ranges only, without the closing steps.",
        ),
        freshness=define_asset_job(
            "sync_freshness_check",
            selection=FRESHNESS,
            description="Is the last full sync under a day old, and some sync recent?",
        ),
    )
