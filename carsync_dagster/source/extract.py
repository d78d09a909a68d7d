"""Fetch the pages of many partitions concurrently and hand each partition over when complete."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from carsync_dagster.source.client import ListingsClient, Page


@dataclass(frozen=True)
class PartitionPages:
    key: str
    first_page: int
    last_page: int


async def fetch_partitions(
    client: ListingsClient,
    partitions: Sequence[PartitionPages],
    per_page: int,
    on_complete: Callable[[PartitionPages, list[Page], float], None],
    on_page: Callable[[Page], None] | None = None,
) -> None:
    """Fetch every page of `partitions`; pages are requested in partition order, so at most a
    few partitions are in memory at once. The first error that is not retried cancels the rest."""
    started: dict[str, float] = {}
    pending = {p.key: p.last_page - p.first_page + 1 for p in partitions}
    pages: dict[str, list[Page]] = {p.key: [] for p in partitions}

    async def fetch(partition: PartitionPages, number: int) -> None:
        started.setdefault(partition.key, time.perf_counter())
        page = await client.get_page(number, per_page)
        if on_page is not None:
            on_page(page)
        pages[partition.key].append(page)
        pending[partition.key] -= 1
        if pending[partition.key] == 0:
            on_complete(
                partition,
                pages.pop(partition.key),
                time.perf_counter() - started[partition.key],
            )

    async with asyncio.TaskGroup() as group:
        for partition in partitions:
            for number in range(partition.first_page, partition.last_page + 1):
                group.create_task(fetch(partition, number))
    for partition in partitions:
        if partition.first_page > partition.last_page:
            on_complete(partition, [], 0.0)
