"""Normalising partitions in worker processes. No Dagster here: a worker imports only this.

Normalising is Python-heavy (JSON into objects, then columns), so one process uses one core
while the machine may have more.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from carsync_dagster.source.landing import Landing
from carsync_dagster.transform import normalise
from carsync_dagster.warehouse.normalised_store import NormalisedStore

# A worker's start (an interpreter importing polars) costs about what a few partitions take,
# so a range gets one worker per this many partitions, up to one per core.
PARTITIONS_PER_WORKER = 8


def normalise_partition(
    landing_root: Path, store_root: Path, key: str, *, this_year: int
) -> dict[str, Any]:
    """Landed pages → normalised Parquet for one partition; its figures for metadata."""
    began = time.perf_counter()
    batch = normalise(Landing(landing_root).records(key), this_year=this_year)
    NormalisedStore(store_root).write(key, batch.cars, batch.rejected)
    return {
        "partition": key,
        "rows": batch.cars.height,
        "rejected": batch.rejected.height,
        "seconds": round(time.perf_counter() - began, 3),
    }


def partition_pool(
    partitions: int, cores: int | None = None
) -> contextlib.AbstractContextManager[ProcessPoolExecutor | None]:
    """Worker processes for `partitions` partitions, or None where they would not pay off."""
    workers = min(cores or os.cpu_count() or 1, partitions // PARTITIONS_PER_WORKER)
    if workers < 2:
        return contextlib.nullcontext()
    # Spawned, not forked: the run's process holds threads (Dagster's, polars') and connections.
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
