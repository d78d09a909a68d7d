"""Jobs: a full sync is one run over the whole range of page-range partitions."""

from __future__ import annotations

from dagster import AssetCheckKey, AssetSelection, define_asset_job

from carsync_dagster.orchestration.assets import CARS, normalised_and_cars, pages
from carsync_dagster.orchestration.changes import recent_changes, vanished_listings

# Freshness is about the time between syncs: checked on its own schedule, not inside one.
FRESHNESS = AssetSelection.checks(AssetCheckKey(CARS, "sync_freshness"))

full_sync_job = define_asset_job(
    "full_sync",
    selection=AssetSelection.assets(pages, normalised_and_cars, recent_changes, vanished_listings)
    - FRESHNESS,
    description=(
        "Fetch, normalise and merge every page range in one run, catch up on changes made "
        "meanwhile, then confirm and mark the listings that left the feed."
    ),
)

incremental_sync_job = define_asset_job(
    "incremental_sync",
    selection=AssetSelection.assets(recent_changes),
    description="Merge the listings created or updated since the last successful sync.",
)

page_ranges_job = define_asset_job(
    "page_ranges_sync",
    selection=AssetSelection.assets(pages, normalised_and_cars) - FRESHNESS,
    description="Some page ranges only, without the closing steps: what failed-partition "
    "retries run.",
)

freshness_job = define_asset_job(
    "sync_freshness_check",
    selection=FRESHNESS,
    description="Is the last full sync under a day old, and some sync recent?",
)
