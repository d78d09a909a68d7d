"""The closing steps of a sync, unpartitioned: catch up on recent changes, then confirm and mark
listings that left the feed. `recent_changes` alone is also the incremental sync."""

import asyncio
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import psycopg
from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    MaterializeResult,
    asset,
)

from carsync_dagster.orchestration.assets import API_POOL, CARS, GROUP
from carsync_dagster.orchestration.lifecycle import sync_failure
from carsync_dagster.orchestration.resources import (
    ListingsApiResource,
    SyncRunResource,
    WarehouseResource,
)
from carsync_dagster.orchestration.tags import ALLOW_MASS_DEACTIVATION_TAG
from carsync_dagster.source.client import ListingsClient, Page
from carsync_dagster.source.extract import fetch_updated_since
from carsync_dagster.transform import normalise
from carsync_dagster.warehouse import syncs, vanished
from carsync_dagster.warehouse.load import MergeCounts, merge_batch

GUARD = "mass_deactivation_guard"


def _merge_records(
    conn: psycopg.Connection, schema: str, sync_id: str, records: list[Any], this_year: int
) -> MergeCounts:
    batch = normalise(records, this_year=this_year)
    counts = merge_batch(conn, schema, batch.cars, batch.rejected, sync_id)
    syncs.raise_watermark(conn, schema, sync_id, counts.newest_update)
    return counts


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
    api: ListingsApiResource, warehouse: WarehouseResource, sync: SyncRunResource
) -> MaterializeResult[None]:
    settings, schema, sync_id = api.settings(), warehouse.schema_name, sync.sync_id
    started = time.perf_counter()
    with warehouse.connect(autocommit=True) as conn:
        watermark = syncs.last_watermark(conn, schema, other_than=sync_id)
        if watermark is None:
            if sync.kind == "incremental":
                raise sync_failure(
                    "no earlier successful sync to continue from: run a full sync first",
                    resumable=False,
                )
            return MaterializeResult(metadata={"skipped": "no earlier successful sync"})
        since = watermark - timedelta(seconds=settings.watermark_margin)
        this_year = syncs.sync_year(conn, schema, sync_id)
        totals = {"pages": 0, "fetched": 0, "inserted": 0, "updated": 0, "unchanged": 0}
        totals["rejected"] = 0
        client = api.client()

        def merge(pages: list[Page]) -> None:
            records = [record for page in pages for record in page.records]
            counts = _merge_records(conn, schema, sync_id, records, this_year)
            totals["fetched"] += counts.staged + counts.rejected
            for name in ("inserted", "updated", "unchanged", "rejected"):
                totals[name] += getattr(counts, name)

        async def fetch() -> int:
            async with client:
                return await fetch_updated_since(
                    client, since.isoformat(), settings.page_size, merge
                )

        totals["pages"] = asyncio.run(fetch())
        requests = {"requests": client.stats.requests, "retries": client.stats.retries}
        if sync.kind == "incremental":
            syncs.add_figures(conn, schema, sync_id, {**totals, **requests})
        else:
            # Closing a full sync: the pages counted every listing already; what the catch-up
            # found new or changed adds to the merge's counts.
            caught_up = {name: totals[name] for name in ("inserted", "updated")}
            catchup = {"catchup_pages": totals["pages"], "catchup_fetched": totals["fetched"]}
            syncs.add_figures(conn, schema, sync_id, {**caught_up, **catchup, **requests})
    seconds = time.perf_counter() - started
    return MaterializeResult(
        metadata={
            "since": since.isoformat(),
            **totals,
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
                "CARSYNC_MAX_DEACTIVATION are confirmed gone (GET /cars/{id} → 404)."
            ),
        )
    ],
    description=(
        "After a full sync merged every listing range: active listings it did not receive are "
        "confirmed with GET /cars/{id}; 404 marks them gone, 200 refreshes them."
    ),
)
def vanished_listings(
    context: AssetExecutionContext,
    api: ListingsApiResource,
    warehouse: WarehouseResource,
    sync: SyncRunResource,
) -> Iterator[MaterializeResult[None] | AssetCheckResult]:
    settings, schema, sync_id = api.settings(), warehouse.schema_name, sync.sync_id
    if sync.kind != "full":
        yield MaterializeResult(metadata={"skipped": f"a {sync.kind} sync, not a full one"})
        yield AssetCheckResult(check_name=GUARD, passed=True, description="skipped")
        return
    with warehouse.connect(autocommit=True) as conn:
        _check_every_range_merged(conn, schema, sync_id)
        missing = vanished.candidates(conn, schema, sync_id)
        active = vanished.active_count(conn, schema)
        allowed = context.run.tags.get(ALLOW_MASS_DEACTIVATION_TAG) == "true"
        limit = settings.max_deactivation * active
        client = api.client()
        confirmed = asyncio.run(
            _confirm(client, missing, None if allowed else limit, random.Random(sync_id))
        )
        blocked = None
        if not allowed and confirmed.sampled and not confirmed.complete:
            share = len(confirmed.gone) / confirmed.sampled
            blocked = (
                f"{len(confirmed.gone)} of {confirmed.sampled} random candidates were "
                f"confirmed gone: about {share * len(missing):.0f} of {active} active listings"
            )
        elif not allowed and len(confirmed.gone) > limit:
            blocked = f"{len(confirmed.gone)} of {active} active listings were confirmed gone"
        this_year = syncs.sync_year(conn, schema, sync_id)
        refreshed = (
            _merge_records(conn, schema, sync_id, confirmed.present, this_year).changed
            if confirmed.present
            else 0
        )
        figures = {
            "vanished_candidates": len(missing),
            "confirm_requests": client.stats.requests,
            "confirmed_gone": len(confirmed.gone),
            "still_listed": len(confirmed.present),
            "refreshed": refreshed,
        }
        if blocked is not None:
            syncs.add_figures(conn, schema, sync_id, {}, {**figures, "deactivated": 0})
            yield MaterializeResult(metadata={**figures, "deactivated": 0})
            yield AssetCheckResult(
                check_name=GUARD,
                passed=False,
                description=(
                    f"{blocked}, more than CARSYNC_MAX_DEACTIVATION "
                    f"({settings.max_deactivation:.0%}): nothing was deactivated. If the feed "
                    "really lost them, run `carsync sync --allow-mass-deactivation` once."
                ),
            )
            return
        deactivated = vanished.deactivate(conn, schema, confirmed.gone, sync_id)
        vanished.forget_other_syncs(conn, schema, sync_id)
        syncs.add_figures(conn, schema, sync_id, {}, {**figures, "deactivated": deactivated})
        syncs.close_sync(conn, schema, sync_id)
    yield MaterializeResult(metadata={**figures, "deactivated": deactivated})
    yield AssetCheckResult(
        check_name=GUARD,
        passed=True,
        description=f"{deactivated} of {active} active listings confirmed gone and deactivated",
    )


def _check_every_range_merged(conn: psycopg.Connection, schema: str, sync_id: str) -> None:
    """Vanished listings are judged only from a sync that merged every listing range of the
    feed, with its seen ids intact; otherwise a re-run of the sync must finish it first."""
    row = syncs.read_sync(conn, schema, sync_id)
    planned = list(row["planned_partitions"] or []) if row else []
    merged = syncs.merged_partitions(conn, schema, sync_id)
    unmerged = [key for key in planned if key not in merged]
    if not planned or unmerged:
        raise sync_failure(
            f"{len(unmerged)} of {len(planned)} listing ranges of this sync are not merged "
            f"yet (first: {unmerged[0] if unmerged else 'none planned'}); a re-run of the sync "
            "merges them, then closes it",
            resumable=True,
        )
    if not vanished.seen_ids_intact(conn, schema, sync_id, sum(merged.values())):
        syncs.forget_merged_partitions(conn, schema, sync_id)
        raise sync_failure(
            "the ids this sync received were lost (PostgreSQL recovered from a crash and "
            "emptied the UNLOGGED seen_ids): a re-run of the sync merges its listing ranges "
            "again",
            resumable=True,
        )


@dataclass
class _Confirmed:
    gone: list[str] = field(default_factory=list)  # 404
    present: list[Any] = field(default_factory=list)  # still listed, as served now
    sampled: int = 0  # candidates asked first, at random
    complete: bool = True  # every candidate was asked


async def _confirm(
    client: ListingsClient, candidates: list[str], limit: float | None, rng: random.Random
) -> _Confirmed:
    """Ask for each candidate (GET /cars/{id}). When there are more than `limit`, a random
    sample first: if it shows beyond doubt that more than `limit` are gone, the rest are not
    asked (the guard blocks anyway); otherwise, drift or an unmerged range, all are asked."""
    confirmed = _Confirmed()

    async def ask(ids: list[str]) -> None:
        answers = await asyncio.gather(*(client.get_car(car_id) for car_id in ids))
        for car_id, car in zip(ids, answers, strict=True):
            if car is None:
                confirmed.gone.append(car_id)
            else:
                confirmed.present.append(car)

    async with client:
        rest = candidates
        if limit is not None and len(candidates) > limit:
            sample = rng.sample(candidates, min(len(candidates), vanished.CONFIRM_SAMPLE))
            await ask(sample)
            confirmed.sampled = len(sample)
            if vanished.surely_more_than(len(confirmed.gone), len(sample), len(candidates), limit):
                confirmed.complete = False
                return confirmed
            asked = set(sample)
            rest = [car_id for car_id in candidates if car_id not in asked]
        await ask(rest)
    return confirmed
