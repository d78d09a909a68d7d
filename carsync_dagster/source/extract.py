"""Fetch the pages of many partitions concurrently and hand each partition over when complete."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from carsync_dagster.source.client import ListingsClient, Page


@dataclass(frozen=True)
class PartitionPages:
    key: str
    first_page: int
    last_page: int


class PartitionSink(Protocol):
    """Where a partition's pages go as they arrive (a `LandingWriter`)."""

    def add(self, page: Page) -> object: ...
    def complete(self, seconds: float) -> object: ...
    def discard(self) -> object: ...


# Pages asked for and not yet answered, per request slot: enough that pages waiting out a
# Retry-After or a hedged hang never leave the slots idle.
_UNANSWERED_PER_SLOT = 8


async def fetch_partitions(
    client: ListingsClient,
    partitions: Sequence[PartitionPages],
    per_page: int,
    open_sink: Callable[[PartitionPages], PartitionSink],
    on_page: Callable[[Page], None] | None = None,
    concurrency: int = 16,
) -> None:
    """Fetch every page of `partitions` into a sink each, completing each partition as soon as
    its last page arrives.

    Partitions start in order while fewer than `_UNANSWERED_PER_SLOT * concurrency` pages are
    unanswered, however many partitions that spans: a partition waiting on one slow page holds
    back nothing but itself, and its other pages wait in its sink (on disk), not in memory.
    The first error that is not retried cancels the rest; the sinks of unfinished partitions
    are discarded."""
    unanswered = asyncio.Semaphore(_UNANSWERED_PER_SLOT * concurrency)
    open_sinks: dict[str, PartitionSink] = {}
    remaining: dict[str, int] = {}

    async def fetch_page(partition: PartitionPages, number: int, started: float) -> None:
        try:
            page = await client.get_page(number, per_page, with_records=False)
        finally:
            unanswered.release()
        open_sinks[partition.key].add(page)
        if on_page is not None:
            on_page(page)
        remaining[partition.key] -= 1
        if remaining[partition.key] == 0:
            open_sinks.pop(partition.key).complete(time.perf_counter() - started)

    try:
        async with asyncio.TaskGroup() as group:
            for partition in partitions:
                numbers = range(partition.first_page, partition.last_page + 1)
                sink = open_sink(partition)
                if not numbers:  # past the feed's last page: landed empty
                    sink.complete(0.0)
                    continue
                open_sinks[partition.key], remaining[partition.key] = sink, len(numbers)
                started = time.perf_counter()
                for number in numbers:
                    await unanswered.acquire()
                    group.create_task(fetch_page(partition, number, started))
    finally:
        for sink in open_sinks.values():
            sink.discard()


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
