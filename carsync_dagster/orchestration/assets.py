"""The sync's assets over page-range partitions: pages → normalised → cars.

Each asset stores its own data (landing files, Parquet, the warehouse) and returns metadata.
A range run gives every partition the same materialization metadata, so per-partition figures
go into a table in that metadata and, for `cars`, into one observation per partition.
"""

import asyncio
import contextlib
import functools
import gc
import hashlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import polars as pl
import psycopg
import sqlalchemy.exc
from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetObservation,
    AssetSpec,
    BackfillPolicy,
    DagsterInstance,
    MaterializeResult,
    MetadataValue,
    OpExecutionContext,
    Out,
    Output,
    TableColumn,
    TableRecord,
    TableSchema,
    graph_asset,
    multi_asset,
    op,
)

from carsync_dagster import transform
from carsync_dagster.orchestration.partitions import page_range, page_ranges
from carsync_dagster.orchestration.progress import Progress, throughput_chart
from carsync_dagster.orchestration.resources import ListingsApiResource, WarehouseResource
from carsync_dagster.source.extract import PartitionPages, fetch_partitions
from carsync_dagster.source.landing import LandedPartition, Landing
from carsync_dagster.transform import Batch, normalise
from carsync_dagster.warehouse import syncs
from carsync_dagster.warehouse.load import merge_batches
from carsync_dagster.warehouse.normalised_store import NormalisedStore

SYNC_ID_TAG = "carsync/sync_id"
SYNC_KIND_TAG = "carsync/kind"
# Set by `carsync sync` on the run it executes in process: it closes the sync itself.
HOST_TAG = "carsync/host"
PID_TAG = "carsync/pid"
GROUP = "carsync"
# Every step that calls the API claims the one slot of this pool (dagster.yaml sets its limit), so
# one step at a time uses the API across all runs and workers, and CARSYNC_RPS holds globally.
API_POOL = "carsync_api"


def ensure_api_pool(instance: DagsterInstance) -> None:
    """Create the pool's row at dagster.yaml's default limit before any run needs it: two runs
    starting together on a new instance would otherwise both insert it, and one would fail."""
    storage = instance.event_log_storage

    def exists() -> bool:
        return any(pool.name == API_POOL for pool in storage.get_pool_limits())

    # Only when missing: on Postgres, Dagster's initialiser fails on an existing row.
    if exists():
        return
    try:
        storage.initialize_concurrency_limit_to_default(API_POOL)
    except sqlalchemy.exc.DBAPIError:
        # Another process (`carsync ui`, a sync of another schema) created it meanwhile: its
        # insert committed first and aborted this one, which changed nothing.
        if not exists():
            raise


# Every asset of the sync has page-range partitions, and a backfill of a range is one run.
_SINGLE_RUN = BackfillPolicy.single_run()


def sync_id_of(context: OpExecutionContext | AssetExecutionContext) -> str:
    """The sync a run belongs to: set by `carsync sync`; a UI run (and its re-executions,
    which share a root run) is a sync of its own."""
    tags = context.run.tags
    return tags.get(SYNC_ID_TAG) or tags.get("dagster/root_run_id") or context.run.run_id


def _table(rows: Sequence[dict[str, Any]]) -> MetadataValue:
    columns = list(rows[0]) if rows else ["partition"]
    return MetadataValue.table(
        records=[TableRecord(row) for row in rows],
        schema=TableSchema(
            columns=[
                TableColumn(name, "string" if name == "partition" else "float") for name in columns
            ]
        ),
    )


@op(
    out=Out(dagster_type=type(None)),
    pool=API_POOL,
    description="Fetch the range's pages and land them.",
)
def fetch_pages(
    context: OpExecutionContext, api: ListingsApiResource, warehouse: WarehouseResource
) -> Output[None]:
    keys = context.partition_keys
    sync_id = sync_id_of(context)
    settings = api.settings()
    landing = api.landing()
    started = time.perf_counter()
    with warehouse.connect(autocommit=True) as conn:
        syncs.begin_sync(
            conn,
            warehouse.schema_name,
            sync_id,
            context.run.tags.get(SYNC_KIND_TAG, "manual"),
            context.run.run_id,
        )
        client = api.client()

        async def fetch() -> tuple[int, list[dict[str, Any]], dict[int, int], int]:
            async with client:
                first = await client.get_page(1, settings.page_size, with_records=False)
                todo, skipped = [], 0
                for key in keys:
                    landed = landing.manifest(key)
                    if landed is not None and landed.sync_id == sync_id:
                        skipped += 1  # landed by this sync before it was interrupted
                        continue
                    first_page, last_page = page_range(key)
                    todo.append(PartitionPages(key, first_page, min(last_page, first.last_page)))
                total_pages = sum(max(0, p.last_page - p.first_page + 1) for p in todo)
                syncs.set_pages_total(conn, warehouse.schema_name, sync_id, total_pages)
                progress = Progress(
                    conn,
                    warehouse.schema_name,
                    sync_id,
                    "fetch",
                    total_pages,
                    client.stats,
                    context.log.info,
                )
                rows: list[dict[str, Any]] = []

                def land(landed: LandedPartition) -> None:
                    rows.append(
                        {
                            "partition": landed.partition_key,
                            "pages": landed.pages,
                            "records": landed.records,
                            "seconds": round(landed.seconds, 3),
                        }
                    )

                await fetch_partitions(
                    client,
                    todo,
                    settings.page_size,
                    lambda partition: landing.writer(partition.key, sync_id, on_landed=land),
                    on_page=progress.page_done,
                    concurrency=settings.concurrency,
                )
                progress.flush()
                return skipped, rows, progress.pages_per_second, first.total

        skipped, rows, per_second, feed_total = asyncio.run(fetch())
    seconds = time.perf_counter() - started
    stats = client.stats
    pages = sum(int(r["pages"]) for r in rows)
    context.log.info(
        f"landed {len(rows)} partitions ({pages} pages) in {seconds:.1f}s; "
        f"{skipped} already landed by this sync"
    )
    return Output(
        None,
        metadata={
            "feed_total": feed_total,  # meta.total when the sync began
            "partitions_fetched": len(rows),
            "partitions_skipped": skipped,
            "pages": pages,
            "records": sum(int(r["records"]) for r in rows),
            "requests": stats.requests,
            "retries": stats.retries,
            "hedged_requests": stats.hedged,
            "rate_limited_429": stats.by_class.get("429", 0),
            "errors_by_class": MetadataValue.json(stats.by_class),
            "circuit_breaker_opened": client.breaker.opened,
            "paced_rps": round(client.rate.rate or 0.0, 1),
            "pages_per_second": round(pages / seconds, 1) if seconds else 0.0,
            "p50_latency_ms": round(stats.percentile(0.5) * 1000, 1),
            "p95_latency_ms": round(stats.percentile(0.95) * 1000, 1),
            "seconds": round(seconds, 2),
            "per_partition": _table(sorted(rows, key=lambda r: str(r["partition"]))),
            "throughput": MetadataValue.md(throughput_chart(per_second)),
        },
    )


@graph_asset(
    description="Raw page bodies of each page range, landed on disk until the next sync.",
    partitions_def=page_ranges,
    backfill_policy=_SINGLE_RUN,
    group_name=GROUP,
)
def pages() -> Any:
    return fetch_pages()


NORMALISED, CARS = AssetKey("normalised"), AssetKey("cars")
# Partitions normalised ahead of the merge, at most: each waits as polars frames in memory.
_NORMALISED_AHEAD = 2


@multi_asset(
    name="normalise_and_merge",
    specs=[
        AssetSpec(
            NORMALISED,
            deps=[pages],
            description="Records normalised, validated and hashed with polars (Parquet per "
            "partition).",
            group_name=GROUP,
            skippable=True,
        ),
        AssetSpec(
            CARS,
            deps=[NORMALISED],
            description="The warehouse table: staged with COPY, merged without rewriting "
            "unchanged rows.",
            group_name=GROUP,
            skippable=True,
        ),
    ],
    partitions_def=page_ranges,
    backfill_policy=_SINGLE_RUN,
    can_subset=True,
    description="Each partition is merged while the next is normalised: PostgreSQL merges on "
    "other cores while polars works (either asset can also be materialised alone).",
)
def normalised_and_cars(
    context: AssetExecutionContext, api: ListingsApiResource, warehouse: WarehouseResource
) -> Iterator[MaterializeResult[None]]:
    selected = context.selected_asset_keys
    landing, store = api.landing(), NormalisedStore(api.normalised_dir())
    keys = context.partition_keys
    if NORMALISED not in selected:
        yield _merge(context, warehouse, store.read)
        return
    this_year = sync_year(warehouse, sync_id_of(context))
    started = time.perf_counter()
    if CARS not in selected:
        rows = []
        with warehouse.connect(autocommit=True) as conn:
            progress = _partition_progress(
                context, conn, warehouse, sync_id_of(context), "normalise"
            )
            for key in keys:
                rows.append(_normalise_timed(landing, store, key, this_year)[0])
                progress.step_done()  # also the heartbeat the stale-run sensor listens for
            progress.flush()
        yield _normalised_result(rows, time.perf_counter() - started)
        return
    with _NormalisingAhead(landing, store, keys, this_year) as ahead:
        merged = _merge(context, warehouse, ahead.frames)
        rows = ahead.rows
    yield _normalised_result(rows, ahead.seconds)
    yield merged


def _normalise_timed(
    landing: Landing, store: NormalisedStore, key: str, this_year: int
) -> tuple[dict[str, Any], Batch | None]:
    """The partition's metadata row, and its frames unless they were reused from disk."""
    began = time.perf_counter()
    batch, made, rejected = _normalise_partition(landing, store, key, this_year)
    row = {
        "partition": key,
        "rows": made,
        "rejected": rejected,
        "reused": float(batch is None),
        "seconds": round(time.perf_counter() - began, 3),
    }
    return row, batch


class _NormalisingAhead:
    """Normalises the partitions in order on a thread of its own, a few ahead of the merge that
    takes their frames: polars works while PostgreSQL merges the previous ones on other cores."""

    def __init__(
        self, landing: Landing, store: NormalisedStore, keys: Sequence[str], this_year: int
    ) -> None:
        self._landing, self._store, self._this_year = landing, store, this_year
        self._frames: dict[str, Future[Batch | None]] = {key: Future() for key in keys}
        self._room = threading.Semaphore(_NORMALISED_AHEAD)
        self._stop = threading.Event()
        self.rows: list[dict[str, Any]] = []
        self.seconds = 0.0
        self._thread = threading.Thread(target=self._run, args=(list(keys),), daemon=True)

    def __enter__(self) -> "_NormalisingAhead":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._room.release()  # wake the thread if it waits for room
        self._thread.join()

    def _run(self, keys: list[str]) -> None:
        started = time.perf_counter()
        try:
            for key in keys:
                self._room.acquire()
                if self._stop.is_set():
                    return
                try:
                    row, batch = _normalise_timed(self._landing, self._store, key, self._this_year)
                except BaseException as error:  # handed to the merge: it fails the step with it
                    self._frames[key].set_exception(error)
                    return
                self.rows.append(row)
                self._frames[key].set_result(batch)
        finally:
            self.seconds = time.perf_counter() - started
            for future in list(self._frames.values()):
                future.cancel()  # a partition never reached: a merge waiting on it stops

    def frames(self, key: str) -> tuple[pl.DataFrame, pl.DataFrame]:
        batch = self._frames[key].result()
        del self._frames[key]  # the merge holds the frames now
        self._room.release()
        return self._store.read(key) if batch is None else (batch.cars, batch.rejected)


def _normalised_result(rows: list[dict[str, Any]], seconds: float) -> MaterializeResult[None]:
    total = sum(int(r["rows"]) for r in rows)
    return MaterializeResult(
        asset_key=NORMALISED,
        metadata={
            "rows": total,
            "rejected": sum(int(r["rejected"]) for r in rows),
            "partitions_reused": sum(int(r["reused"]) for r in rows),
            "rows_per_second": round(total / seconds, 1) if seconds else 0.0,
            "seconds": round(seconds, 2),
            "per_partition": _table(rows),
        },
    )


def _merge(
    context: AssetExecutionContext,
    warehouse: WarehouseResource,
    read: Callable[[str], tuple[pl.DataFrame, pl.DataFrame]],
) -> MaterializeResult[None]:
    sync_id = sync_id_of(context)
    totals = {"rows": 0, "inserted": 0, "updated": 0, "unchanged": 0, "rejected": 0}
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    with warehouse.connect(autocommit=True) as status_conn:
        progress = _partition_progress(context, status_conn, warehouse, sync_id, "merge")
        merged = merge_batches(
            warehouse.connect, warehouse.schema_name, context.partition_keys, read, sync_id
        )
        for key, counts, merge_seconds in merged:
            syncs.raise_watermark(status_conn, warehouse.schema_name, sync_id, counts.newest_update)
            row: dict[str, Any] = {
                "partition": key,
                "rows": counts.staged,
                "inserted": counts.inserted,
                "updated": counts.updated,
                "unchanged": counts.unchanged,
                "rejected": counts.rejected,
                "seconds": round(merge_seconds, 3),
            }
            rows.append(row)
            for name in totals:
                totals[name] += int(row[name])
            context.log_event(AssetObservation(asset_key=CARS, partition=key, metadata=row))
            progress.step_done()
        progress.flush()
        selection = context.run.asset_selection or set()
        if PID_TAG not in context.run.tags and AssetKey("recent_changes") not in selection:
            # Page ranges re-run on their own (retries, the UI): nothing after this closes them.
            syncs.finish_sync(
                status_conn, warehouse.schema_name, sync_id, status="partial", summary=totals
            )
    seconds = time.perf_counter() - started
    return MaterializeResult(
        asset_key=CARS,
        metadata={
            **totals,
            "rows_per_second": round(totals["rows"] / seconds, 1) if seconds else 0.0,
            "seconds": round(seconds, 2),
            "per_partition": _table(rows),
        },
    )


def _normalise_partition(
    landing: Landing, store: NormalisedStore, key: str, this_year: int
) -> tuple[Batch | None, int, int]:
    """(batch, rows, rejected) of the partition, normalised and stored. The batch is None when
    the partition was landed with the same pages as when it was last normalised, under the same
    rules: its files are kept (an unchanged re-sync normalises nothing)."""
    landed = landing.manifest(key)
    source = f"{landed.digest}:{this_year}:{_rules_version()}" if landed and landed.digest else ""
    made = store.reusable(key, source) if source else None
    if made is not None:
        return None, *made
    with _collector_paused():
        batch = normalise(landing.records(key), this_year=this_year)
    store.write(key, batch.cars, batch.rejected, source)
    return batch, batch.cars.height, batch.rejected.height


@functools.cache
def _rules_version() -> str:
    """The normalisation code and polars version: files made by other rules are made again."""
    digest = hashlib.blake2b(pl.__version__.encode(), digest_size=8)
    code = resources.files(transform)
    for name in sorted(entry.name for entry in code.iterdir() if entry.name.endswith(".py")):
        digest.update((code / name).read_bytes())
    return digest.hexdigest()


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Parsed JSON holds no reference cycles, yet Python's cycle collector would scan the
    objects of a partition's records again and again while they are built (0.8 s a sync)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _partition_progress(
    context: AssetExecutionContext,
    conn: psycopg.Connection,
    warehouse: WarehouseResource,
    sync_id: str,
    stage: str,
) -> Progress:
    """Progress of a stage that goes partition by partition."""
    total = len(context.partition_keys)
    schema = warehouse.schema_name
    return Progress(conn, schema, sync_id, stage, total, heartbeat=context.log.info)


def sync_year(warehouse: WarehouseResource, sync_id: str) -> int:
    """ "This year" of the rejection rules: the UTC year when the sync started."""
    with warehouse.connect(autocommit=True) as conn:
        row = syncs.read_sync(conn, warehouse.schema_name, sync_id)
    started = row["started_at"] if row else datetime.now(UTC)
    return int(started.astimezone(UTC).year)
