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
    concurrency: int = 16,
) -> None:
    """Fetch every page of `partitions`, handing each partition over as soon as it is complete.

    Only a few partitions are in flight at once (enough to keep `concurrency` requests busy
    while some wait on retries), so a slow page holds back its own partition, never the whole
    feed in memory; pages are checked and kept as raw bodies only.
    The first error that is not retried cancels the rest."""
    pages_each = max(1, max((p.last_page - p.first_page + 1 for p in partitions), default=1))
    in_flight = asyncio.Semaphore(max(8, -(-8 * concurrency // pages_each)))

    async def fetch_page(number: int) -> Page:
        page = await client.get_page(number, per_page, with_records=False)
        if on_page is not None:
            on_page(page)
        return page

    async def fetch_partition(partition: PartitionPages) -> None:
        async with in_flight:
            started = time.perf_counter()
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(fetch_page(number))
                    for number in range(partition.first_page, partition.last_page + 1)
                ]
            pages = [task.result() for task in tasks]
            on_complete(partition, pages, time.perf_counter() - started)

    async with asyncio.TaskGroup() as group:
        for partition in partitions:
            group.create_task(fetch_partition(partition))


async def fetch_updated_since(
    client: ListingsClient,
    since: str,
    per_page: int,
    on_batch: Callable[[list[Page]], None],
    batch_pages: int = 50,
) -> int:
    """Every page of `/cars?updated_since=…`, handed over `batch_pages` at a time in page order;
    returns the number of pages. The order is by (updated_at, id), so a listing updated while
    we page moves to the end, where this pass or the next incremental finds it."""
    first = await client.get_page(1, per_page, updated_since=since)
    on_batch([first])
    numbers = list(range(2, first.last_page + 1))
    for start in range(0, len(numbers), batch_pages):
        chunk = numbers[start : start + batch_pages]
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(client.get_page(n, per_page, since)) for n in chunk]
        on_batch([task.result() for task in tasks])
    return first.last_page if first.records else 1
