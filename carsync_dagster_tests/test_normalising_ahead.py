"""Normalising a few partitions ahead of the merge (one step for `normalised` and `cars`): the
merge gets every partition's frames in order, and a partition that cannot be normalised fails
the merge waiting for it instead of leaving it waiting for ever."""

from __future__ import annotations

from concurrent.futures import CancelledError
from pathlib import Path
from typing import Any

import orjson
import pytest

from carsync_dagster.orchestration.assets import _NormalisingAhead
from carsync_dagster.source.client import Page
from carsync_dagster.source.landing import Landing
from carsync_dagster.warehouse.normalised_store import NormalisedStore


def _land(landing: Landing, key: str, ids: range) -> None:
    records: list[dict[str, Any]] = [{"id": f"KA{n:09d}", "year": 2020} for n in ids]
    body = orjson.dumps({"data": records, "meta": {"last_page": 1, "total": len(records)}})
    landing.write(key, "sync", [Page(1, [], 1, len(records), body, 0.1, len(records))], 0.1)


def test_every_partition_reaches_the_merge_in_order(tmp_path: Path) -> None:
    landing, store = Landing(tmp_path / "landing"), NormalisedStore(tmp_path / "normalised")
    keys = [f"p{n}" for n in range(5)]
    for n, key in enumerate(keys):
        _land(landing, key, range(10 * n, 10 * n + 10))
    with _NormalisingAhead(landing, store, keys, 2026) as ahead:
        ids = [ahead.frames(key)[1].get_column("id").to_list() for key in keys]
    # Every record lacks mileage and price: all rejected, none lost, each in its own partition.
    assert ids == [[f"KA{n:09d}" for n in range(10 * k, 10 * k + 10)] for k in range(5)]
    assert [row["partition"] for row in ahead.rows] == keys
    assert all(store.reusable(key, "") is None for key in keys), "written, not from source ''"


def test_a_partition_that_cannot_be_normalised_fails_its_merge(tmp_path: Path) -> None:
    landing, store = Landing(tmp_path / "landing"), NormalisedStore(tmp_path / "normalised")
    _land(landing, "p0", range(3))  # p1 was never landed
    with _NormalisingAhead(landing, store, ["p0", "p1", "p2"], 2026) as ahead:
        assert ahead.frames("p0")[1].height == 3
        with pytest.raises(FileNotFoundError, match="partition p1 has no landed pages"):
            ahead.frames("p1")
        with pytest.raises(CancelledError):
            ahead.frames("p2")  # never reached: no merge waits for it for ever
