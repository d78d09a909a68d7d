"""The closing steps of a sync, unpartitioned: catch up on recent changes, then confirm and mark
listings that left the feed. `recent_changes` alone is also the incremental sync."""

import asyncio
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import psycopg
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    Failure,
    MaterializeResult,
    asset,
    asset_check,
)
from psycopg import sql

from carsync_dagster.orchestration.assets import (
    API_POOL,
    CARS,
    GROUP,
    PID_TAG,
    SYNC_KIND_TAG,
    pages,
    sync_id_of,
    sync_year,
)
from carsync_dagster.orchestration.partitions import page_ranges
from carsync_dagster.orchestration.resources import ListingsApiResource, WarehouseResource
from carsync_dagster.source.client import Page
from carsync_dagster.source.extract import fetch_updated_since
from carsync_dagster.transform import normalise
from carsync_dagster.warehouse import syncs, vanished
from carsync_dagster.warehouse.load import MergeCounts, merge_batch

ALLOW_MASS_DEACTIVATION_TAG = "carsync/allow_mass_deactivation"
GUARD = "mass_deactivation_guard"


class _Totals:
    def __init__(self) -> None:
        self.values = {"fetched": 0, "inserted": 0, "updated": 0, "unchanged": 0, "rejected": 0}

    def add(self, counts: MergeCounts) -> None:
        self.values["fetched"] += counts.staged + counts.rejected
        self.values["inserted"] += counts.inserted
        self.values["updated"] += counts.updated
        self.values["unchanged"] += counts.unchanged
        self.values["rejected"] += counts.rejected


def _merge_records(
    conn: psycopg.Connection, schema: str, sync_id: str, records: list[Any], this_year: int
) -> MergeCounts:
    batch = normalise(records, this_year=this_year)
    counts = merge_batch(conn, schema, batch.cars, batch.rejected, sync_id)
    syncs.raise_watermark(conn, schema, sync_id, counts.newest_update)
    return counts


def _is_complete_full_sync(context: AssetExecutionContext) -> bool:
    """Only a run over every page range has seen the whole feed."""
    tags = context.run.tags
    keys = sorted(context.instance.get_dynamic_partitions(str(page_ranges.name)))
    return bool(keys) and (
        tags.get("dagster/asset_partition_range_start"),
        tags.get("dagster/asset_partition_range_end"),
    ) == (keys[0], keys[-1])


@asset(
    deps=[CARS],
    group_name=GROUP,
    pool=API_POOL,
    description=(
        "Listings created or updated since the last successful sync (updated_since = its "
        "watermark minus a margin), merged. Closes a full sync against page drift; run alone "
        "it is the incremental sync."
    ),
)
def recent_changes(
    context: AssetExecutionContext, api: ListingsApiResource, warehouse: WarehouseResource
) -> MaterializeResult[None]:
    settings, schema, sync_id = api.settings(), warehouse.schema_name, sync_id_of(context)
    kind = context.run.tags.get(SYNC_KIND_TAG, "manual")
    started = time.perf_counter()
    with warehouse.connect(autocommit=True) as conn:
        syncs.begin_sync(conn, schema, sync_id, kind, context.run.run_id)
        watermark = syncs.last_watermark(conn, schema, other_than=sync_id)
        if watermark is None:
            if kind == "incremental":
                raise Failure("no earlier successful sync to continue from: run a full sync first")
            return MaterializeResult(metadata={"skipped": "no earlier successful sync"})
        since = watermark - timedelta(seconds=settings.watermark_margin)
        this_year = sync_year(warehouse, sync_id)
        totals, client = _Totals(), api.client()

        def merge(pages: list[Page]) -> None:
            records = [record for page in pages for record in page.records]
            totals.add(_merge_records(conn, schema, sync_id, records, this_year))

        async def fetch() -> int:
            async with client:
                return await fetch_updated_since(
                    client,
                    since.isoformat(),
                    settings.page_size,
                    merge,
                    settings.pages_per_partition,
                )

        pages = asyncio.run(fetch())
        selection = context.run.asset_selection or set()
        if PID_TAG not in context.run.tags and vanished_listings.key not in selection:
            # An incremental run without `carsync sync` around it ends here; close it.
            syncs.finish_sync(conn, schema, sync_id, status="succeeded", summary=totals.values)
    seconds = time.perf_counter() - started
    return MaterializeResult(
        metadata={
            "since": since.isoformat(),
            "pages": pages,
            **totals.values,
            "retries": client.stats.retries,
            "p95_latency_ms": round(client.stats.percentile(0.95) * 1000, 1),
            "seconds": round(seconds, 2),
        }
    )


@asset(
    deps=[recent_changes],
    group_name=GROUP,
    pool=API_POOL,
    check_specs=[
        AssetCheckSpec(
            GUARD,
            asset="vanished_listings",
            blocking=True,
            description=(
                "Fails, deactivating nothing, when more active listings than "
                "CARSYNC_MAX_DEACTIVATION were missing from a full sync."
            ),
        )
    ],
    description=(
        "After a complete full sync: active listings it did not receive are confirmed one by "
        "one with GET /cars/{id}; 404 marks them gone, 200 refreshes them."
    ),
)
def vanished_listings(
    context: AssetExecutionContext, api: ListingsApiResource, warehouse: WarehouseResource
) -> Iterator[MaterializeResult[None] | AssetCheckResult]:
    settings, schema, sync_id = api.settings(), warehouse.schema_name, sync_id_of(context)
    if not _is_complete_full_sync(context):
        yield MaterializeResult(metadata={"skipped": "not a run over every page range"})
        yield AssetCheckResult(check_name=GUARD, passed=True, description="skipped")
        return
    with warehouse.connect(autocommit=True) as conn:
        missing = vanished.candidates(conn, schema, sync_id)
        active = vanished.active_count(conn, schema)
        allowed = context.run.tags.get(ALLOW_MASS_DEACTIVATION_TAG) == "true"
        limit = settings.max_deactivation * active
        if len(missing) > limit and not allowed:
            yield MaterializeResult(metadata={"candidates": len(missing), "deactivated": 0})
            yield AssetCheckResult(
                check_name=GUARD,
                passed=False,
                description=(
                    f"{len(missing)} of {active} active listings ({len(missing) / active:.1%}) "
                    f"were not in the feed, more than CARSYNC_MAX_DEACTIVATION "
                    f"({settings.max_deactivation:.0%}): nothing was deactivated. If the feed "
                    "really lost them, run `carsync sync --allow-mass-deactivation` once."
                ),
            )
            return
        gone, present, requests = [], [], 0
        if missing:
            client = api.client()

            async def confirm() -> list[Any | None]:
                async with client:
                    return await asyncio.gather(*(client.get_car(car_id) for car_id in missing))

            answers = asyncio.run(confirm())
            gone = [car_id for car_id, car in zip(missing, answers, strict=True) if car is None]
            present = [car for car in answers if car is not None]
            requests = client.stats.requests
        refreshed = (
            _merge_records(conn, schema, sync_id, present, sync_year(warehouse, sync_id)).changed
            if present
            else 0
        )
        deactivated = vanished.deactivate(conn, schema, gone, sync_id)
        vanished.forget_other_syncs(conn, schema, sync_id)
        if PID_TAG not in context.run.tags:
            # No `carsync sync` process around this run (UI, schedule, recovery): close it here.
            syncs.finish_sync(conn, schema, sync_id, status="succeeded")
    yield MaterializeResult(
        metadata={
            "candidates": len(missing),
            "deactivated": deactivated,
            "still_listed": len(present),
            "refreshed": refreshed,
            "confirm_requests": requests,
        }
    )
    yield AssetCheckResult(
        check_name=GUARD,
        passed=True,
        description=f"{len(missing)} candidates of {active} active listings",
    )


# Checks of the warehouse as a sync leaves it: they run after the vanished-listings step.


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
    context: AssetCheckExecutionContext, api: ListingsApiResource, warehouse: WarehouseResource
) -> AssetCheckResult:
    # meta.total as the pages step saw it: asking the API again would be one more request to a
    # feed that moves, and no more exact.
    event = context.instance.get_latest_materialization_event(pages.key)
    materialization = event.asset_materialization if event else None
    entry = materialization.metadata.get("feed_total") if materialization else None
    if entry is None:
        return AssetCheckResult(passed=True, description="no pages materialized yet")
    total = int(str(entry.value))
    with warehouse.connect(autocommit=True) as conn:
        active = _scalar(conn, warehouse.schema_name, "SELECT count(*) FROM cars WHERE is_active")
    off = abs(active - total) / max(total, 1)
    return AssetCheckResult(
        passed=off <= api.settings().total_tolerance,
        metadata={"active": active, "feed_total": total, "difference": round(off, 4)},
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
