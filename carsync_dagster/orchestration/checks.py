"""Checks of the warehouse as a sync leaves it (they run after the vanished-listings step), and
of the time between syncs (on a schedule of their own)."""

import psycopg
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetPartitionStatus,
    DagsterInstance,
    asset_check,
)
from psycopg import sql

from carsync_dagster.orchestration.assets import CARS, NORMALISED, PAGES
from carsync_dagster.orchestration.changes import vanished_listings
from carsync_dagster.orchestration.lifecycle import full_range
from carsync_dagster.orchestration.partitions import listing_ranges
from carsync_dagster.orchestration.resources import ListingsApiResource, WarehouseResource
from carsync_dagster.warehouse import syncs


def _scalar(conn: psycopg.Connection, schema: str, query: str, *params: object) -> int:
    with conn.transaction():
        conn.execute(sql.SQL("SET LOCAL search_path TO {}").format(sql.Identifier(schema)))
        row = conn.execute(query.encode(), params).fetchone()
    return int(row[0] or 0) if row else 0


@asset_check(asset=CARS, additional_deps=[vanished_listings], description="Every id once.")
def cars_ids_unique(warehouse: WarehouseResource) -> AssetCheckResult:
    with warehouse.connect(autocommit=True) as conn:
        duplicates = _scalar(
            conn, warehouse.schema_name, "SELECT count(*) - count(DISTINCT id) FROM cars"
        )
    return AssetCheckResult(passed=duplicates == 0, metadata={"duplicate_ids": duplicates})


@asset_check(
    asset=CARS,
    additional_deps=[vanished_listings],
    description="Active listings within CARSYNC_TOTAL_TOLERANCE of the feed's meta.total.",
)
def active_rows_match_feed(
    api: ListingsApiResource, warehouse: WarehouseResource
) -> AssetCheckResult:
    with warehouse.connect(autocommit=True) as conn:
        # meta.total as the last full sync's pages saw it: asking the API again would be one
        # more request to a feed that moves, and no more exact.
        latest = syncs.latest_full_sync(conn, warehouse.schema_name)
        total = (latest["summary"] or {}).get("feed_total") if latest else None
        if total is None:
            return AssetCheckResult(passed=True, description="no full sync has fetched pages yet")
        active = _scalar(conn, warehouse.schema_name, "SELECT count(*) FROM cars WHERE is_active")
    off = abs(active - int(total)) / max(int(total), 1)
    return AssetCheckResult(
        passed=off <= api.settings().total_tolerance,
        metadata={"active": active, "feed_total": int(total), "difference": round(off, 4)},
        description=f"{active} active listings, the feed said {total} ({off:.2%} apart)",
    )


@asset_check(
    asset=CARS,
    additional_deps=[vanished_listings],
    description="Unresolved rejected records under CARSYNC_MAX_REJECTED of what the feed serves.",
)
def rejected_fraction(api: ListingsApiResource, warehouse: WarehouseResource) -> AssetCheckResult:
    limit = api.settings().max_rejected
    with warehouse.connect(autocommit=True) as conn:
        schema = warehouse.schema_name
        rejected = _scalar(
            conn, schema, "SELECT count(*) FROM cars_rejected WHERE resolved_at IS NULL"
        )
        active = _scalar(conn, schema, "SELECT count(*) FROM cars WHERE is_active")
    fraction = rejected / max(1, rejected + active)
    return AssetCheckResult(
        passed=fraction <= limit,
        metadata={"rejected": rejected, "fraction": round(fraction, 4)},
        description=f"{rejected} unresolved rejected records ({fraction:.2%}, limit {limit:.0%})",
    )


@asset_check(
    asset=CARS,
    description="The last successful full sync is under a day old, and some sync is recent.",
)
def sync_freshness(api: ListingsApiResource, warehouse: WarehouseResource) -> AssetCheckResult:
    settings = api.settings()
    with warehouse.connect(autocommit=True) as conn:
        ages = {
            kind: syncs.seconds_since_success(conn, warehouse.schema_name, kind)
            for kind in ("full", None)
        }
    full_age, any_age = ages["full"], ages[None]
    fresh = (
        full_age is not None
        and full_age <= settings.full_sync_max_age
        and any_age is not None
        and any_age <= settings.any_sync_max_age
    )
    return AssetCheckResult(
        passed=fresh,
        severity=AssetCheckSeverity.WARN,
        metadata={
            "full_sync_age_s": round(full_age or -1.0, 1),
            "any_sync_age_s": round(any_age or -1.0, 1),
        },
    )


def failed_partitions(instance: DagsterInstance) -> list[str]:
    """Listing ranges whose latest attempt at any asset of the chain failed."""
    keys = full_range(instance)
    failed: set[str] = set()
    for asset_key in (PAGES, NORMALISED, CARS):
        statuses = instance.get_status_by_partition(asset_key, keys, listing_ranges) or {}
        failed |= {key for key, status in statuses.items() if status == AssetPartitionStatus.FAILED}
    return [key for key in keys if key in failed]


@asset_check(asset=CARS, description="No listing range is left failed.")
def partitions_healthy(context: AssetCheckExecutionContext) -> AssetCheckResult:
    failed = failed_partitions(context.instance)
    return AssetCheckResult(
        passed=not failed,
        metadata={"failed_listing_ranges": len(failed)},
        description=(
            f"failed listing ranges: {', '.join(failed)}" if failed else "all listing ranges ok"
        ),
    )
