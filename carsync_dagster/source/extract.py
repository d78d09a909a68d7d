"""Fetch the pages of many partitions concurrently and hand each partition over when complete."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from carsync_dagster.source.client import ListingsClient, Page
from carsync_dagster.source.errors import PageUnavailableError


@dataclass(frozen=True)
class PartitionPages:
    """A partition's pages, and which of their records are its own: listings `skip`.. of the
    first page on, `take` of them (all of them when None)."""

    key: str
    first_page: int
    last_page: int
    skip: int = 0
    take: int | None = None


class PartitionSink(Protocol):
    """Where a partition's pages go as they arrive (a `LandingWriter`)."""

    def add(self, page: Page) -> object: ...
    def complete(self, seconds: float) -> object: ...
    def discard(self) -> object: ...


# Pages asked for and not yet answered, per request slot: enough that pages waiting out a
# Retry-After or a hedged hang never leave the slots idle.
_UNANSWERED_PER_SLOT = 8


@dataclass
class _Fetching:
    sink: PartitionSink
    remaining: int
    started: float
    failed: bool = False


async def fetch_partitions(
    client: ListingsClient,
    partitions: Sequence[PartitionPages],
    per_page: int,
    open_sink: Callable[[PartitionPages], PartitionSink],
    on_page: Callable[[Page], None] | None = None,
    concurrency: int = 16,
    on_failed: Callable[[PartitionPages, PageUnavailableError], None] | None = None,
) -> None:
    """Fetch every page of `partitions` into a sink each, completing each partition as soon as
    its last page arrives.

    Partitions start in order while fewer than `_UNANSWERED_PER_SLOT * concurrency` pages are
    unanswered, however many partitions that spans: a partition waiting on one slow page holds
    back nothing but itself, and its other pages wait in its sink (on disk), not in memory.
    A page that fails all its attempts costs its partition only: its sink is discarded, the
    rest of it is not asked for, and `on_failed` hears of it. Any other error cancels the rest;
    the sinks of unfinished partitions are discarded."""
    unanswered = asyncio.Semaphore(_UNANSWERED_PER_SLOT * concurrency)
    fetching: dict[str, _Fetching] = {}
    feed_last_page: list[int] = []  # as the answers said (the feed moves)
    ended = asyncio.Event()  # a page got its answer, or failed for good
    asked = [0]  # pages asked for and not yet ended

    async def fetch_page(partition: PartitionPages, number: int) -> None:
        state = fetching[partition.key]
        try:
            if state.failed:
                return
            page = await client.get_page(number, per_page, with_records=False)
        except PageUnavailableError as error:
            if not state.failed:
                state.failed = True
                state.sink.discard()
                if on_failed is not None:
                    on_failed(partition, error)
            return
        finally:
            unanswered.release()
            asked[0] -= 1
            ended.set()
        feed_last_page.append(page.last_page)
        if state.failed:
            return
        state.sink.add(page)
        if on_page is not None:
            on_page(page)
        count_down(partition.key, state, 1)

    def count_down(key: str, state: _Fetching, pages: int) -> None:
        state.remaining -= pages
        if state.remaining == 0:
            del fetching[key]
            state.sink.complete(time.perf_counter() - state.started)

    async def where_the_feed_ends() -> None:
        """Wait for an answer while pages are out: it says where the feed ends."""
        while not feed_last_page and asked[0]:
            ended.clear()
            await ended.wait()

    try:
        async with _first_error_raised(), asyncio.TaskGroup() as group:
            for partition in partitions:
                numbers = range(partition.first_page, partition.last_page + 1)
                state = _Fetching(open_sink(partition), len(numbers), time.perf_counter())
                fetching[partition.key] = state
                if not numbers:
                    count_down(partition.key, state, 0)
                for number in numbers:
                    if state.failed:
                        break
                    if partition is partitions[-1] and number > partition.first_page:
                        # Only the last range reaches past the end of the feed (by up to its
                        # size): ask for none of its pages past the end.
                        await where_the_feed_ends()
                    if feed_last_page and number > max(feed_last_page):
                        count_down(partition.key, state, numbers[-1] - number + 1)
                        break
                    await unanswered.acquire()
                    asked[0] += 1
                    group.create_task(fetch_page(partition, number))
    finally:
        for state in fetching.values():
            if not state.failed:
                state.sink.discard()


@contextlib.asynccontextmanager
async def _first_error_raised() -> AsyncIterator[None]:
    """A TaskGroup's errors come wrapped in an ExceptionGroup whose text says nothing; the first
    one is what went wrong (the others are usually the same, on other pages)."""
    try:
        yield
    except BaseExceptionGroup as group:
        first: BaseException = group
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None


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
        async with _first_error_raised(), asyncio.TaskGroup() as group:
            tasks = [group.create_task(client.get_page(n, per_page, since)) for n in chunk]
        on_batch([task.result() for task in tasks])
    return first.last_page if first.records else 1


async def feed_total(client: ListingsClient) -> int:
    """How many listings the feed has (meta.total), from a page of one listing."""
    return (await client.get_page(1, 1, with_records=False)).total
