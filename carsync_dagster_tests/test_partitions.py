from __future__ import annotations

import pytest

from carsync_dagster.ranges import (
    in_order,
    listing_range,
    page_span,
    partition_key,
    partition_keys,
)


@pytest.mark.parametrize(
    ("first", "last", "key"),
    [(1, 5000, "0000001-0005000"), (5001, 10000, "0005001-0010000"), (1, 1, "0000001-0000001")],
)
def test_key_and_range_round_trip(first: int, last: int, key: str) -> None:
    assert partition_key(first, last) == key
    assert listing_range(key) == (first, last)


def test_keys_cover_every_listing_once_in_fixed_blocks() -> None:
    keys = partition_keys(200_001, 5000)
    assert keys[0] == "0000001-0005000" and keys[-1] == "0200001-0205000"
    listings = [n for key in keys for n in range(listing_range(key)[0], listing_range(key)[1] + 1)]
    assert listings == list(range(1, 205_001))
    assert keys == sorted(keys) == in_order(keys)


def test_keys_past_ten_million_listings_still_go_in_order() -> None:
    keys = partition_keys(12_000_000, 5_000_000)
    assert (
        in_order(reversed(keys))
        == keys
        == [
            "0000001-5000000",
            "5000001-10000000",
            "10000001-15000000",
        ]
    )


def test_a_growing_feed_only_adds_keys() -> None:
    assert set(partition_keys(120, 50)) <= set(partition_keys(260, 50))


def test_empty_feed_has_no_partitions() -> None:
    assert partition_keys(0, 50) == []


@pytest.mark.parametrize(
    "bad", ["", "1-2", "0000002-0000001", "p00001-00050", "0000000-0000001", "x0000001-0000002"]
)
def test_bad_keys_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="partition key"):
        listing_range(bad)


def test_bad_ranges_are_refused() -> None:
    with pytest.raises(ValueError):
        partition_key(0, 3)
    with pytest.raises(ValueError):
        partition_keys(10, 0)


@pytest.mark.parametrize("per_page", [1, 7, 100, 300, 1000, 5000, 7000])
def test_a_key_names_the_same_listings_at_any_page_size(per_page: int) -> None:
    """The pages of a span, cut at `skip` and `take`, hold exactly the key's listings."""
    for key in ("0000001-0005000", "0005001-0010000", "0010001-0015000"):
        first, last = listing_range(key)
        span = page_span(key, per_page)
        positions = [
            position
            for page in span.pages
            for position in range((page - 1) * per_page + 1, page * per_page + 1)
        ]
        assert positions[span.skip : span.skip + span.take] == list(range(first, last + 1))
        assert span.first_page == (first - 1) // per_page + 1  # no page before the range
        assert span.last_page * per_page >= last > (span.last_page - 1) * per_page
