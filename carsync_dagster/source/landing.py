"""Landed pages: the raw page bodies of one partition, kept until the next sync lands it again.

One file per partition, one page body per line, plus a small manifest written last (by rename),
so a partition either is landed completely or not at all. Pages are spooled to disk as they
arrive, so a partition that waits on a slow page holds none of its bodies in memory. A page that
reaches past the partition's listings is landed whole; the manifest says which of its records
(`skip`, `take`) are the partition's.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson

from carsync_dagster.files import replacing
from carsync_dagster.source.client import Page, page_records


@dataclass(frozen=True)
class LandedPartition:
    partition_key: str
    sync_id: str
    pages: int
    records: int
    seconds: float
    digest: str = ""  # of the landed bytes and the cut: equal digests, equal records
    skip: int = 0  # records of the first page before the partition's first listing
    take: int | None = None  # the partition's records from there (None: all)


class Landing:
    def __init__(self, root: Path) -> None:
        self.root = root

    def data_path(self, key: str) -> Path:
        return self.root / f"{key}.ndjson"

    def manifest_path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def manifest(self, key: str) -> LandedPartition | None:
        try:
            return LandedPartition(**orjson.loads(self.manifest_path(key).read_bytes()))
        except FileNotFoundError:
            return None

    def writer(
        self,
        key: str,
        sync_id: str,
        on_landed: Callable[[LandedPartition], None] | None = None,
        *,
        skip: int = 0,
        take: int | None = None,
    ) -> LandingWriter:
        return LandingWriter(self, key, sync_id, on_landed, skip=skip, take=take)

    def write(
        self, key: str, sync_id: str, pages: Sequence[Page], seconds: float
    ) -> LandedPartition:
        writer = self.writer(key, sync_id)
        for page in pages:
            writer.add(page)
        return writer.complete(seconds)

    def records(self, key: str) -> list[Any]:
        """The partition's records, in page order. A record whose bytes are not UTF-8 comes as
        those bytes (`bytes`, which no JSON value is), for the quarantine to keep."""
        landed = self.manifest(key)
        if landed is None:
            raise FileNotFoundError(
                f"partition {key} has no landed pages: materialise `pages` for it first"
            )
        records: list[Any] = []
        for line in self._lines(key):
            records.extend(page_records(line))
        end = None if landed.take is None else landed.skip + landed.take
        return records[landed.skip : end]

    def _lines(self, key: str) -> Iterator[bytes]:
        with self.data_path(key).open("rb") as landed:
            for line in landed:
                if line.strip():
                    yield line


class LandingWriter:
    """One partition's pages, spooled in the order they arrive and landed in page order."""

    def __init__(
        self,
        landing: Landing,
        key: str,
        sync_id: str,
        on_landed: Callable[[LandedPartition], None] | None,
        *,
        skip: int = 0,
        take: int | None = None,
    ) -> None:
        landing.root.mkdir(parents=True, exist_ok=True)
        self._landing, self._key, self._sync_id, self._on_landed = landing, key, sync_id, on_landed
        self._skip, self._take = skip, take
        # One spool per process: a second writer of the key (which the writer lock should
        # prevent) could otherwise interleave its pages with these.
        self._spool_path = landing.root / f"{key}.{os.getpid()}.spool"
        for left in landing.root.glob(f"{key}.*.spool"):  # by a writer that was killed
            left.unlink(missing_ok=True)
        self._spool = self._spool_path.open("w+b")
        self._spooled: list[tuple[int, int, int]] = []  # (page number, offset, length)
        self._records = 0

    def add(self, page: Page) -> None:
        # A raw newline can only be white space between JSON tokens (inside strings it is
        # escaped), so replacing it keeps the body's meaning and makes it one line.
        line = page.body.replace(b"\r", b" ").replace(b"\n", b" ") + b"\n"
        self._spooled.append((page.number, self._spool.tell(), len(line)))
        self._spool.write(line)
        self._records += page.record_count

    def complete(self, seconds: float) -> LandedPartition:
        landing, key = self._landing, self._key
        self._spool.flush()
        landing.manifest_path(key).unlink(missing_ok=True)
        digest = hashlib.blake2b(f"{self._skip}:{self._take}".encode(), digest_size=16)
        with replacing(landing.data_path(key)) as tmp, tmp.open("wb") as out:
            for _, offset, length in sorted(self._spooled):
                line = os.pread(self._spool.fileno(), length, offset)
                out.write(line)
                digest.update(line)
        records = max(0, self._records - self._skip)
        landed = LandedPartition(
            key,
            self._sync_id,
            len(self._spooled),
            records if self._take is None else min(records, self._take),
            seconds,
            digest.hexdigest(),
            self._skip,
            self._take,
        )
        with replacing(landing.manifest_path(key)) as tmp:
            tmp.write_bytes(orjson.dumps(asdict(landed)))
        self.discard()
        if self._on_landed is not None:
            self._on_landed(landed)
        return landed

    def discard(self) -> None:
        """Drop the spool: the partition was landed, or its fetch failed."""
        self._spool.close()
        self._spool_path.unlink(missing_ok=True)
