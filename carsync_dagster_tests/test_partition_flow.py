"""The partition flow (fetch → normalise → merge as a pipeline) against the real simulator and a
real PostgreSQL: every listing range reaches the warehouse once, a broken page costs only its
range, a re-run of the sync fetches and merges only what it had not, and the same keys name the
same listings at any page size."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import psycopg
import pytest

from carsync_dagster.partition_flow import (
    FetchSettings,
    PartitionDone,
    PartitionFailed,
    PartitionFlow,
    Stages,
)
from carsync_dagster.ranges import listing_range, partition_keys
from carsync_dagster.simulator.process import RunningSimulator, start_simulator
from carsync_dagster.source.client import ListingsClient, RetryPolicy
from carsync_dagster.source.landing import Landing
from carsync_dagster.warehouse import syncs
from carsync_dagster.warehouse.load import ConcurrentMerge
from carsync_dagster.warehouse.normalised_store import NormalisedStore
from carsync_dagster.warehouse.schema import migrate

EVERY_STAGE = Stages(fetch=True, normalise=True, merge=True)


@pytest.fixture(scope="module")
def sim() -> Iterator[RunningSimulator]:
    with start_simulator(cars=2_400, seed=12, args=["--broken-rate", "0.02"]) as simulator:
        yield simulator


def _flow(
    sim: RunningSimulator,
    database_url: str,
    tmp_path: Path,
    *,
    sync_id: str = "sync-1",
    per_page: int = 100,
    stages: Stages = EVERY_STAGE,
    merge: ConcurrentMerge | None = None,
) -> tuple[PartitionFlow, list[PartitionDone | PartitionFailed]]:
    """Run a flow over the whole feed in ranges of 500 listings; its events, Nones left out."""
    client = functools.partial(
        ListingsClient,
        sim.base_url,
        sim.api_key,
        concurrency=4,
        policy=RetryPolicy(max_attempts=2, max_backoff=0.05),
    )
    with psycopg.connect(database_url) as conn:
        merged_before = syncs.merged_partitions(conn, "carsync", sync_id)
    flow = PartitionFlow(
        partition_keys(2_400, 500),
        stages,
        sync_id,
        Landing(tmp_path / "landing"),
        NormalisedStore(tmp_path / "normalised"),
        2026,
        fetch=FetchSettings(client, per_page, 4),
        merge=merge,
        merged_before=merged_before,
    )
    return flow, [event for event in flow.run() if event is not None]


@pytest.fixture
def warehouse(database_url: str) -> str:
    migrate(database_url, "carsync")
    return database_url


def _merge(database_url: str, sync_id: str = "sync-1") -> ConcurrentMerge:
    return ConcurrentMerge(lambda: psycopg.connect(database_url), "carsync", sync_id)


def _stored_ids(database_url: str) -> list[str]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT id FROM carsync.cars ORDER BY id").fetchall()
    return [row[0] for row in rows]


def test_every_range_goes_through_every_stage_once(
    sim: RunningSimulator, warehouse: str, tmp_path: Path
) -> None:
    sim.control.reset_stats()
    with _merge(warehouse) as merge:
        flow, events = _flow(sim, warehouse, tmp_path, merge=merge)
    keys = partition_keys(2_400, 500)
    assert all(isinstance(event, PartitionDone) for event in events)
    stages = {
        key: [e.stage for e in events if isinstance(e, PartitionDone) and e.key == key]
        for key in keys
    }
    assert all(stages[key] == ["landed", "normalised", "merged"] for key in keys), stages
    truth = sim.control.truth()
    assert _stored_ids(warehouse) == sorted(car["id"] for car in truth["cars"])
    assert flow.records_done == 2_400 and flow.feed_total == 2_400
    # The last range reaches past the feed (2,001..2,500 of 2,400): page 25 is not asked for.
    assert sim.control.stats()["list_pages"] == {str(page): 1 for page in range(1, 25)}
    assert flow.pages_done == flow.pages_expected == 24
    with psycopg.connect(warehouse) as conn:
        assert set(syncs.merged_partitions(conn, "carsync", "sync-1")) == set(keys)


def test_a_broken_page_costs_only_its_range(
    sim: RunningSimulator, warehouse: str, tmp_path: Path
) -> None:
    sim.control.break_pages({7: "no_data"})  # listings 601..700: range 0000501-0001000
    try:
        with _merge(warehouse) as merge:
            _, events = _flow(sim, warehouse, tmp_path, merge=merge)
    finally:
        sim.control.break_pages({7: "mend"})
    failed = [event for event in events if isinstance(event, PartitionFailed)]
    assert [(f.key, f.permanent) for f in failed] == [("0000501-0001000", True)]
    assert "page 7" in failed[0].error and "no data list" in failed[0].error
    merged = {e.key for e in events if isinstance(e, PartitionDone) and e.stage == "merged"}
    assert merged == set(partition_keys(2_400, 500)) - {"0000501-0001000"}
    assert Landing(tmp_path / "landing").manifest("0000501-0001000") is None, "nothing landed"


def test_a_rerun_fetches_and_merges_only_what_it_had_not(
    sim: RunningSimulator, warehouse: str, tmp_path: Path
) -> None:
    keys = partition_keys(2_400, 500)
    # The first run landed everything but merged nothing (its worker died, say).
    _flow(sim, warehouse, tmp_path, stages=Stages(fetch=True, normalise=False, merge=False))
    with _merge(warehouse) as merge:
        future = merge.submit(keys[0], *_normalised(tmp_path, keys[0]))
        future.result()  # and one range was merged
    sim.control.reset_stats()
    with _merge(warehouse) as merge:
        _, events = _flow(sim, warehouse, tmp_path, merge=merge)
    assert sim.control.stats()["list_pages"] == {}, "nothing fetched again"
    resumed = [e.key for e in events if isinstance(e, PartitionDone) and e.figures.get("resumed")]
    assert resumed[0] == keys[0] and sorted(resumed[1:]) == keys[1:]
    merged_now = [e.key for e in events if isinstance(e, PartitionDone) and e.stage == "merged"]
    assert sorted(merged_now) == keys, "the range merged before is reported, not merged again"
    assert len(_stored_ids(warehouse)) == len(sim.control.truth()["cars"])


def _normalised(tmp_path: Path, key: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    from carsync_dagster.partition_flow import normalise_partition

    landing, store = Landing(tmp_path / "landing"), NormalisedStore(tmp_path / "normalised")
    normalise_partition(landing, store, key, 2026)
    return store.read(key)


@pytest.mark.parametrize("per_page", [7, 300, 1000])
def test_a_range_holds_the_same_listings_at_any_page_size(
    sim: RunningSimulator, warehouse: str, tmp_path: Path, per_page: int
) -> None:
    _flow(
        sim,
        warehouse,
        tmp_path / "reference",
        sync_id="reference",
        stages=Stages(True, False, False),
    )
    _flow(
        sim,
        warehouse,
        tmp_path / "other",
        sync_id="other",
        per_page=per_page,
        stages=Stages(True, False, False),
    )
    for key in partition_keys(2_400, 500):
        reference = Landing(tmp_path / "reference" / "landing").records(key)
        assert Landing(tmp_path / "other" / "landing").records(key) == reference
        first, last = listing_range(key)
        assert len(reference) == min(last, 2_400) - first + 1


def test_an_error_that_is_not_a_page_stops_the_flow(
    sim: RunningSimulator, warehouse: str, tmp_path: Path
) -> None:
    flow = PartitionFlow(
        partition_keys(2_400, 500),
        Stages(fetch=False, normalise=True, merge=False),
        "sync-1",
        Landing(tmp_path / "landing"),  # nothing landed
        NormalisedStore(tmp_path / "normalised"),
        2026,
    )
    with pytest.raises(FileNotFoundError, match="has no landed pages"):
        list(flow.run())
