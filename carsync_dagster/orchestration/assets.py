"""The sync's partitioned assets: pages → normalised → cars, over listing ranges, in one step.

One step runs the three as a pipeline (carsync_dagster.partition_flow): each listing range is
normalised as soon as it lands and merged as soon as it is normalised, and each can still be
materialised alone. What landed, was normalised or merged is marked per partition when the
pipeline stops, so the UI shows the checkpoints a re-run resumes from; a range whose page stayed
broken gets no mark, the step fails once every other range is merged, and Dagster shows exactly
that range failed.
"""

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import sqlalchemy.exc
from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetMaterialization,
    AssetSpec,
    BackfillPolicy,
    DagsterInstance,
    Failure,
    MaterializeResult,
    MetadataValue,
    multi_asset,
)

from carsync_dagster import interrupts
from carsync_dagster.orchestration.lifecycle import sync_failure
from carsync_dagster.orchestration.partitions import listing_ranges
from carsync_dagster.orchestration.resources import (
    ListingsApiResource,
    SyncRunResource,
    WarehouseResource,
)
from carsync_dagster.partition_flow import (
    FetchSettings,
    PartitionDone,
    PartitionFailed,
    PartitionFlow,
    Stages,
)
from carsync_dagster.ranges import in_order
from carsync_dagster.source.client import RequestStats
from carsync_dagster.warehouse import syncs, vanished
from carsync_dagster.warehouse.load import ConcurrentMerge
from carsync_dagster.warehouse.normalised_store import NormalisedStore

GROUP = "carsync"
PAGES, NORMALISED, CARS = AssetKey("pages"), AssetKey("normalised"), AssetKey("cars")
# Every step that calls the API claims the one slot of this pool (dagster.yaml sets its limit), so
# one step at a time uses the API across all runs and workers, and CARSYNC_RPS holds globally.
API_POOL = "carsync_api"
_PROGRESS_EVERY, _HEARTBEAT_EVERY = 1.0, 30.0
_STAGE_NAMES = {"landed": "fetch", "normalised": "normalise", "merged": "merge"}


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


@multi_asset(
    name="sync_partitions",
    specs=[
        AssetSpec(
            PAGES,
            description="Raw page bodies of each listing range, landed on disk until the next "
            "sync lands it again.",
            group_name=GROUP,
            skippable=True,
        ),
        AssetSpec(
            NORMALISED,
            deps=[PAGES],
            description="Records normalised, validated and hashed with polars (Parquet per "
            "listing range).",
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
    partitions_def=listing_ranges,
    # A backfill of many listing ranges is one run: a sync is one run over the whole range.
    backfill_policy=BackfillPolicy.single_run(),
    can_subset=True,
    pool=API_POOL,
    description="Fetch, normalise and merge each listing range, each as soon as the one before "
    "is ready, so the network, polars and PostgreSQL work at once.",
)
def sync_partitions(
    context: AssetExecutionContext,
    api: ListingsApiResource,
    warehouse: WarehouseResource,
    sync: SyncRunResource,
) -> Iterator[AssetMaterialization | MaterializeResult[None]]:
    selected = context.selected_asset_keys
    stages = Stages(
        fetch=PAGES in selected,
        # Fresh pages are always normalised before they are merged.
        normalise=NORMALISED in selected or {PAGES, CARS} <= selected,
        merge=CARS in selected,
    )
    settings, schema, sync_id = api.settings(), warehouse.schema_name, sync.sync_id
    keys = in_order(context.partition_keys)
    tally = _Tally()
    # Collected, and handed to Dagster when the pipeline has stopped: while this generator
    # yields, Dagster's own signal handling is back and would interrupt it at any line.
    marks: list[AssetMaterialization] = []
    with warehouse.connect(autocommit=True) as conn, contextlib.ExitStack() as stack:
        # SIGINT/SIGTERM stop the pipeline at its next event, never inside a statement.
        stop = stack.enter_context(interrupts.deferred())
        this_year = syncs.sync_year(conn, schema, sync_id)
        flow = PartitionFlow(
            keys,
            stages,
            sync_id,
            api.landing(),
            NormalisedStore(api.normalised_dir()),
            this_year,
            fetch=FetchSettings(api.client, settings.page_size, settings.concurrency),
            merge=(
                stack.enter_context(ConcurrentMerge(warehouse.connect, schema, sync_id))
                if stages.merge
                else None
            ),
            merged_before=_merged_before(conn, schema, sync_id) if stages.merge else {},
            interrupt=stop,
        )
        progress = _Progress(context, conn, schema, sync_id, stages, len(keys))
        for event in flow.run():
            progress.tick(flow)
            if isinstance(event, PartitionFailed):
                tally.failed[event.key] = event
                context.log.error(f"listing range {event.key} not merged: {event.error}")
            elif isinstance(event, PartitionDone):
                marks.extend(tally.partition_done(conn, schema, sync_id, event))
        progress.tick(flow, force=True)
        # A step that fetched nothing (all landed before, or no `pages` selected) asked nothing.
        stats = flow.client.stats if flow.client else RequestStats()
        latency = {"p95_latency_ms": round(stats.percentile(0.95) * 1000, 1)}
        syncs.add_figures(
            conn,
            schema,
            sync_id,
            {
                "requests": stats.requests,
                "retries": stats.retries,
                "hedged": stats.hedged,
                "errors": dict(stats.by_class),
            },
            {
                "partitions": len(keys),
                "partitions_resumed": tally.resumed,
                "partitions_unchanged": tally.unchanged,
                "partitions_failed": len(tally.failed),
                **({"feed_total": flow.feed_total} if flow.feed_total is not None else {}),
                **(latency if stats.latencies else {}),
            },
        )
        merged_now = len(syncs.merged_partitions(conn, schema, sync_id)) if stop.is_set() else 0
    yield from marks
    if stop.is_set():
        yield from tally.merged_marks()
        raise sync_failure(
            f"interrupted: {merged_now} of {len(keys)} listing ranges merged",
            outcome="interrupted",
            resumable=True,
        )
    if tally.failed:
        yield from tally.merged_marks()
        raise tally.failure(len(keys))
    if stages.merge:
        for key, metadata in tally.merged.items():
            context.add_asset_metadata(metadata, asset_key=CARS, partition_key=key)
        yield MaterializeResult(asset_key=CARS, metadata=tally.cars_totals())


def _merged_before(conn: Any, schema: str, sync_id: str) -> dict[str, int]:
    """The listing ranges this sync merged in earlier runs, unless a crash recovery of
    PostgreSQL emptied the UNLOGGED seen_ids since: then they are merged again (unchanged rows
    are not rewritten), so the ids the vanished-listings step judges from are complete."""
    merged = syncs.merged_partitions(conn, schema, sync_id)
    if merged and not vanished.seen_ids_intact(conn, schema, sync_id, sum(merged.values())):
        syncs.forget_merged_partitions(conn, schema, sync_id)
        return {}
    return merged


class _Tally:
    """What the step's partitions did: per-partition metadata, and the sync's figures."""

    def __init__(self) -> None:
        self.merged: dict[str, dict[str, Any]] = {}
        self.failed: dict[str, PartitionFailed] = {}
        self.merged_earlier: list[str] = []  # by an earlier run of this sync
        self.resumed = 0  # landed or merged by this sync before: not again
        self.unchanged = 0  # landed with the same records as last normalised: files kept

    def partition_done(
        self, conn: Any, schema: str, sync_id: str, event: PartitionDone
    ) -> Iterator[AssetMaterialization]:
        figures = dict(event.figures)
        if figures.pop("resumed", False):
            self.resumed += 1
            if event.stage == "merged":
                self.merged_earlier.append(event.key)
            return
        if event.stage == "landed":
            syncs.add_figures(
                conn, schema, sync_id, {"pages": figures["pages"], "fetched": figures["records"]}
            )
            yield AssetMaterialization(PAGES, partition=event.key, metadata=figures)
        elif event.stage == "normalised":
            self.unchanged += bool(figures["reused"])
            yield AssetMaterialization(NORMALISED, partition=event.key, metadata=figures)
        else:
            syncs.raise_watermark(conn, schema, sync_id, figures.pop("newest_update"))
            counts = {name: figures[name] for name in ("inserted", "updated", "unchanged")}
            syncs.add_figures(conn, schema, sync_id, {**counts, "rejected": figures["rejected"]})
            self.merged[event.key] = figures

    def merged_marks(self) -> Iterator[AssetMaterialization]:
        """The merged listing ranges of a step that fails: marked one by one, so the failed
        ones alone show failed."""
        for key in self.merged_earlier:
            yield AssetMaterialization(CARS, partition=key, metadata={"resumed": True})
        for key, metadata in self.merged.items():
            yield AssetMaterialization(CARS, partition=key, metadata=metadata)

    def cars_totals(self) -> dict[str, Any]:
        names = ("rows", "inserted", "updated", "unchanged", "rejected")
        totals: dict[str, Any] = {
            name: sum(int(row[name]) for row in self.merged.values()) for name in names
        }
        totals["partitions_merged"] = len(self.merged)
        return totals

    def failure(self, total: int) -> Failure:
        permanent = any(failed.permanent for failed in self.failed.values())
        key, first = next(iter(self.failed.items()))
        what = "fetched again by the next sync" if permanent else "resumed by a re-run"
        return sync_failure(
            f"{len(self.failed)} of {total} listing ranges not merged ({what}); "
            f"listing range {key}: {first.error}",
            outcome="partial" if permanent else "failed",
            resumable=not permanent,
            metadata={
                "failed_ranges": MetadataValue.json(
                    {key: failed.error for key, failed in self.failed.items()}
                )
            },
        )


class _Progress:
    """The sync's progress row (for `carsync sync` and apps), once a second, and a line in the
    run's log every 30 s: the heartbeat the stale-run check listens for."""

    def __init__(
        self,
        context: AssetExecutionContext,
        conn: Any,
        schema: str,
        sync_id: str,
        stages: Stages,
        partitions: int,
    ) -> None:
        self._context, self._conn, self._schema, self._sync_id = context, conn, schema, sync_id
        self._stages, self._partitions = stages, partitions
        self._written = self._heartbeat = time.monotonic()
        self._pages_total = 0

    def tick(self, flow: PartitionFlow, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._written < _PROGRESS_EVERY:
            return
        self._written = now
        pages_total = flow.pages_expected
        if self._stages.fetch and pages_total != self._pages_total:
            self._pages_total = pages_total
            syncs.set_pages_total(self._conn, self._schema, self._sync_id, pages_total)
        fetching = self._stages.fetch and flow.pages_done < pages_total and not force
        done = flow.pages_done if fetching else flow.partitions_done
        total = pages_total if fetching else self._partitions
        stage = "fetch" if fetching else _STAGE_NAMES[self._stages.last]
        client = flow.client
        requests = (
            {
                "retries": client.stats.retries,
                "rate_limited": client.stats.by_class.get("429", 0),
                "p95_ms": round(client.stats.percentile(0.95, recent=True) * 1000, 1),
            }
            if client
            else {}
        )
        syncs.record_progress(
            self._conn,
            self._schema,
            self._sync_id,
            stage=stage,
            done=done,
            total=total,
            pages=flow.pages_done,
            records=flow.records_done,
            requests=requests,
        )
        if now - self._heartbeat >= _HEARTBEAT_EVERY:
            self._heartbeat = now
            self._context.log.info(f"{stage}: {done}/{total}")
