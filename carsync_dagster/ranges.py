"""Listing ranges, the partitions of a sync: a key names listing positions (1-based, in the
feed's order), the same listings whatever page size fetches them. Key ↔ range ↔ pages, as
small pure functions."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

_KEY = re.compile(r"^(\d{7,})-(\d{7,})$")


def partition_key(first: int, last: int) -> str:
    """`0000001-0005000`: listing positions, zero-padded so keys of a feed sort in order."""
    if not 1 <= first <= last:
        raise ValueError(f"bad listing range {first}..{last}")
    return f"{first:07d}-{last:07d}"


def listing_range(key: str) -> tuple[int, int]:
    """The inclusive (first, last) listing positions a partition key names."""
    match = _KEY.match(key)
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise ValueError(f"not a listing-range partition key: {key!r}")
    return int(match[1]), int(match[2])


def partition_keys(total: int, size: int) -> list[str]:
    """Keys covering listings 1..total in blocks of `size`, so a growing feed only adds keys."""
    if size < 1:
        raise ValueError("the partition size must be at least 1")
    return [partition_key(first, first + size - 1) for first in range(1, total + 1, size)]


def in_order(keys: Iterable[str]) -> list[str]:
    """Keys by their first listing (plain sorting would misplace keys past 9,999,999)."""
    return sorted(keys, key=listing_range)


@dataclass(frozen=True)
class PageSpan:
    """The pages that hold a listing range at one page size, and which of their records it is."""

    first_page: int
    last_page: int
    skip: int  # records of the first page before the range starts
    take: int  # records of the range

    @property
    def pages(self) -> range:
        return range(self.first_page, self.last_page + 1)


def page_span(key: str, per_page: int) -> PageSpan:
    first, last = listing_range(key)
    first_page = (first - 1) // per_page + 1
    return PageSpan(
        first_page=first_page,
        last_page=(last - 1) // per_page + 1,
        skip=first - 1 - (first_page - 1) * per_page,
        take=last - first + 1,
    )
