from __future__ import annotations

import pytest

from carsync_dagster.orchestration.partitions import page_range, partition_key, partition_keys


@pytest.mark.parametrize(
    ("first", "last", "key"),
    [(1, 50, "p00001-00050"), (51, 100, "p00051-00100"), (1, 1, "p00001-00001")],
)
def test_key_and_range_round_trip(first: int, last: int, key: str) -> None:
    assert partition_key(first, last) == key
    assert page_range(key) == (first, last)


def test_keys_cover_every_page_once_in_fixed_blocks() -> None:
    keys = partition_keys(2001, 50)
    assert keys[0] == "p00001-00050" and keys[-1] == "p02001-02050"
    pages = [p for key in keys for p in range(page_range(key)[0], page_range(key)[1] + 1)]
    assert pages == list(range(1, 2051))
    assert keys == sorted(keys)


def test_a_growing_feed_only_adds_keys() -> None:
    assert set(partition_keys(120, 50)) <= set(partition_keys(260, 50))


def test_empty_feed_has_no_partitions() -> None:
    assert partition_keys(0, 50) == []


@pytest.mark.parametrize("bad", ["", "p1-2", "p00002-00001", "x00001-00050", "p00000-00001"])
def test_bad_keys_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="partition key"):
        page_range(bad)


def test_bad_ranges_are_refused() -> None:
    with pytest.raises(ValueError):
        partition_key(0, 3)
    with pytest.raises(ValueError):
        partition_keys(10, 0)
