"""A sync's partitions as a pipeline: fetch → normalise → merge. Each partition goes on to the
next stage as soon as it is ready, so the network, polars and PostgreSQL work at the same time.

Plain Python (threads and queues): the Dagster asset that runs it turns its events into
materializations. A partition whose page stays broken fails alone; any other error stops the
whole flow and is raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import gc
import hashlib
import queue
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import polars as pl

from carsync_dagster import transform
from carsync_dagster.ranges import page_span
from carsync_dagster.source.client import ListingsClient, Page
from carsync_dagster.source.errors import PageUnavailableError
from carsync_dagster.source.extract import PartitionPages, fetch_partitions
from carsync_dagster.source.landing import LandedPartition, Landing
from carsync_dagster.transform import normalise
from carsync_dagster.warehouse.load import ConcurrentMerge, MergeCounts
from carsync_dagster.warehouse.normalised_store import NormalisedStore

# Partitions normalised ahead of the merge, at most: each waits as polars frames in memory.
_NORMALISED_AHEAD = 2
# How often `run` hands back control while nothing happens (progress, heartbeats).
_TICK_SECONDS = 1.0


@dataclass(frozen=True)
class Stages:
    fetch: bool
    normalise: bool
    merge: bool

    @property
    def last(self) -> str:
        return "merged" if self.merge else "normalised" if self.normalise else "landed"


@dataclass(frozen=True)
class PartitionDone:
    key: str
    stage: str  # "landed", "normalised" or "merged"
    figures: dict[str, Any]


@dataclass(frozen=True)
class PartitionFailed:
    key: str
    error: str  # one line: the page and the cause
    permanent: bool  # the page itself is broken: fetching it again the same way fails again


@dataclass(frozen=True)
class _Abort:
    error: BaseException


@dataclass
class FetchSettings:
    client: Callable[[], ListingsClient]  # made on the fetching thread, for its event loop
    per_page: int
    concurrency: int


@dataclass
class PartitionFlow:
    """Runs `stages` for `keys` of one sync. Partitions this sync already landed are not
    fetched again, and those it already merged (`merged_before`) are skipped altogether."""

    keys: Sequence[str]
    stages: Stages
    sync_id: str
    landing: Landing
    store: NormalisedStore
    this_year: int
    fetch: FetchSettings | None = None
    merge: ConcurrentMerge | None = None
    merged_before: Collection[str] = ()
    interrupt: threading.Event | None = None  # set: stop, keeping what is merged by then
    pages_done: int = 0
    records_done: int = 0
    partitions_done: int = 0  # at their last stage, or failed
    feed_total: int | None = None  # meta.total, as the latest page said
    feed_last_page: int | None = None  # meta.last_page, as the latest page said
    client: ListingsClient | None = None
    _to_fetch: list[PartitionPages] = field(default_factory=list)
    _events: queue.Queue[PartitionDone | PartitionFailed | _Abort] = field(
        default_factory=queue.Queue
    )
    _to_normalise: queue.Queue[str | None] = field(default_factory=queue.Queue)
    _stop: threading.Event = field(default_factory=threading.Event)
    _merge_room: threading.Semaphore = field(
        default_factory=lambda: threading.Semaphore(_NORMALISED_AHEAD)
    )
    _fetch_loop: tuple[asyncio.AbstractEventLoop, asyncio.Task[None]] | None = None

    def run(self) -> Iterator[PartitionDone | PartitionFailed | None]:
        """Events as partitions move on; None when a tick passed without one."""
        pending = {key for key in self.keys if not self._merged_already(key)}
        for key in self.keys:
            if key not in pending:
                self.partitions_done += 1
                yield PartitionDone(key, "merged", {"resumed": True})
        threads = [threading.Thread(target=self._guarded(self._normalise_all), daemon=True)]
        if self.stages.fetch:
            threads.append(threading.Thread(target=self._guarded(self._fetch_all), daemon=True))
        else:
            for key in self.keys:
                if key in pending:
                    self._to_normalise.put(key)
            self._to_normalise.put(None)
        for thread in threads:
            thread.start()
        try:
            while pending:
                if self.interrupt is not None and self.interrupt.is_set():
                    yield from self._wind_down(threads)
                    return
                try:
                    event = self._events.get(timeout=_TICK_SECONDS)
                except queue.Empty:
                    yield None
                    continue
                if isinstance(event, _Abort):
                    if self.interrupt is not None and self.interrupt.is_set():
                        continue  # stopping anyway: the stop is the story (Ctrl+C in a shell
                        # also ends the bundled simulator, and every request then fails)
                    raise event.error
                _give_back_freed_memory()  # a stage ended: what it held is free
                if isinstance(event, PartitionFailed) or event.stage == self.stages.last:
                    pending.discard(event.key)
                    self.partitions_done += 1
                yield event
        finally:
            self._stop_everything()
            for thread in threads:
                thread.join()

    def _wind_down(self, threads: list[threading.Thread]) -> Iterator[PartitionDone]:
        """Stop fetching and normalising, let the merges in flight commit, and hand back what
        finished meanwhile: a partition merged is checkpointed, and its figures count."""
        self._stop_everything()
        for thread in threads:
            thread.join()
        if self.merge is not None:
            self.merge.close()
        while not self._events.empty():
            event = self._events.get()
            if isinstance(event, PartitionDone):
                yield event

    def _merged_already(self, key: str) -> bool:
        return self.stages.merge and key in self.merged_before

    def _guarded(self, work: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                work()
            except BaseException as error:
                self._events.put(_Abort(error))

        return run

    def _stop_everything(self) -> None:
        self._stop.set()
        self._to_normalise.put(None)
        self._merge_room.release()  # a normaliser waiting for room wakes and sees the stop
        if self._fetch_loop is not None:
            loop, task = self._fetch_loop
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(task.cancel)

    # ---- fetch ------------------------------------------------------------------------

    def _fetch_all(self) -> None:
        try:
            todo = []
            for key in self.keys:
                if self._merged_already(key):
                    continue
                landed = self.landing.manifest(key)
                if landed is not None and landed.sync_id == self.sync_id:
                    # Landed by this sync before it was interrupted: not fetched again.
                    self._landed(landed, resumed=True)
                else:
                    todo.append(key)
            asyncio.run(self._fetch(todo))
        finally:
            self._to_normalise.put(None)

    async def _fetch(self, keys: list[str]) -> None:
        assert self.fetch is not None
        current = asyncio.current_task()
        assert current is not None
        self._fetch_loop = (asyncio.get_running_loop(), current)
        if self._stop.is_set():
            return
        settings = self.fetch
        partitions = []
        for key in keys:
            span = page_span(key, settings.per_page)
            partitions.append(
                PartitionPages(key, span.first_page, span.last_page, span.skip, span.take)
            )
        self._to_fetch = partitions
        self.client = settings.client()
        async with self.client as client:
            await fetch_partitions(
                client,
                partitions,
                settings.per_page,
                lambda part: self.landing.writer(
                    part.key, self.sync_id, self._landed, skip=part.skip, take=part.take
                ),
                on_page=self._page_done,
                concurrency=settings.concurrency,
                on_failed=self._fetch_failed,
            )

    @property
    def pages_expected(self) -> int:
        """Pages to fetch: those of the ranges to fetch, up to the feed's last page once known."""
        last = self.feed_last_page
        return sum(
            len(
                range(
                    part.first_page,
                    part.last_page + 1 if last is None else min(part.last_page, last) + 1,
                )
            )
            for part in self._to_fetch
        )

    def _page_done(self, page: Page) -> None:
        self.feed_total, self.feed_last_page = page.total, page.last_page
        self.pages_done += 1
        self.records_done += page.record_count

    def _landed(self, landed: LandedPartition, resumed: bool = False) -> None:
        figures = {
            "pages": landed.pages,
            "records": landed.records,
            "seconds": round(landed.seconds, 3),
            "resumed": resumed,
        }
        self._events.put(PartitionDone(landed.partition_key, "landed", figures))
        if self.stages.normalise or self.stages.merge:
            self._to_normalise.put(landed.partition_key)

    def _fetch_failed(self, partition: PartitionPages, error: PageUnavailableError) -> None:
        self._events.put(PartitionFailed(partition.key, str(error), error.permanent))

    # ---- normalise, then hand over to the merge ---------------------------------------

    def _normalise_all(self) -> None:
        for key in iter(self._to_normalise.get, None):
            if self._stop.is_set():
                return
            if not self.stages.normalise:  # merging what was normalised before
                self._merge_frames(key, *self.store.read(key))
                continue
            began = time.perf_counter()
            batch, rows, rejected = normalise_partition(
                self.landing, self.store, key, self.this_year
            )
            figures = {
                "rows": rows,
                "rejected": rejected,
                "reused": batch is None,
                "seconds": round(time.perf_counter() - began, 3),
            }
            self._events.put(PartitionDone(key, "normalised", figures))
            if self.stages.merge:
                frames = self.store.read(key) if batch is None else (batch.cars, batch.rejected)
                self._merge_frames(key, *frames)

    def _merge_frames(self, key: str, cars: pl.DataFrame, rejected: pl.DataFrame) -> None:
        assert self.merge is not None
        self._merge_room.acquire()
        if self._stop.is_set():
            return
        future = self.merge.submit(key, cars, rejected)
        future.add_done_callback(functools.partial(self._merged, key))

    def _merged(self, key: str, future: Future[tuple[MergeCounts, float]]) -> None:
        self._merge_room.release()
        if future.cancelled():
            return
        error = future.exception()
        if error is not None:
            self._events.put(_Abort(error))
            return
        counts, seconds = future.result()
        figures = {
            "rows": counts.staged,
            "inserted": counts.inserted,
            "updated": counts.updated,
            "unchanged": counts.unchanged,
            "rejected": counts.rejected,
            "seconds": round(seconds, 3),
            "resumed": False,
            "newest_update": counts.newest_update,
        }
        self._events.put(PartitionDone(key, "merged", figures))


def normalise_partition(
    landing: Landing, store: NormalisedStore, key: str, this_year: int
) -> tuple[transform.Batch | None, int, int]:
    """(batch, rows, rejected) of the partition, normalised and stored. The batch is None when
    the partition was landed with the same records as when it was last normalised, under the
    same rules: its files are kept (an unchanged re-sync normalises nothing)."""
    landed = landing.manifest(key)
    source = f"{landed.digest}:{this_year}:{_rules_version()}" if landed and landed.digest else ""
    made = store.reusable(key, source) if source else None
    if made is not None:
        return None, *made
    with _collector_paused():
        batch = normalise(landing.records(key), this_year=this_year)
    store.write(key, batch.cars, batch.rejected, source)
    return batch, batch.cars.height, batch.rejected.height


@functools.cache
def _rules_version() -> str:
    """The normalisation code and polars version: files made by other rules are made again."""
    digest = hashlib.blake2b(pl.__version__.encode(), digest_size=8)
    code = resources.files(transform)
    for name in sorted(entry.name for entry in code.iterdir() if entry.name.endswith(".py")):
        digest.update((code / name).read_bytes())
    return digest.hexdigest()


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    return trim


def _give_back_freed_memory() -> None:
    """A partition's frames and records were freed, but glibc keeps the pages in its arenas
    (one per thread that allocated them): over a long sync the process would grow with them."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Parsed JSON holds no reference cycles, yet Python's cycle collector would scan the
    objects of a partition's records again and again while they are built (0.8 s a sync)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
