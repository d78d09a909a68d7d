"""Page-range partitions: key ↔ pages, as small pure functions."""

from __future__ import annotations

import re

from dagster import DynamicPartitionsDefinition

page_ranges = DynamicPartitionsDefinition(name="page_ranges")

_KEY = re.compile(r"^p(\d{5,})-(\d{5,})$")


def partition_key(first_page: int, last_page: int) -> str:
    """`p00001-00050`: zero-padded so keys sort in page order."""
    if not 1 <= first_page <= last_page:
        raise ValueError(f"bad page range {first_page}..{last_page}")
    return f"p{first_page:05d}-{last_page:05d}"


def page_range(key: str) -> tuple[int, int]:
    """The inclusive (first, last) pages a partition key names."""
    match = _KEY.match(key)
    if not match:
        raise ValueError(f"not a page-range partition key: {key!r}")
    first, last = int(match[1]), int(match[2])
    if not 1 <= first <= last:
        raise ValueError(f"not a page-range partition key: {key!r}")
    return first, last


def partition_keys(last_page: int, pages_per_partition: int) -> list[str]:
    """Keys covering pages 1..last_page in fixed blocks, so a growing feed only adds keys."""
    if pages_per_partition < 1:
        raise ValueError("pages_per_partition must be at least 1")
    return [
        partition_key(first, first + pages_per_partition - 1)
        for first in range(1, last_page + 1, pages_per_partition)
    ]
