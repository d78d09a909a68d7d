"""Landed pages: the raw page bodies of one partition, kept until the next sync lands it again.

One file per partition, one page body per line, plus a small manifest written last (by rename),
so a partition either is landed completely or not at all.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson

from carsync_dagster.source.client import Page, parse_json


@dataclass(frozen=True)
class LandedPartition:
    partition_key: str
    sync_id: str
    pages: int
    records: int
    seconds: float
    digest: str = ""  # of the landed bytes: partitions with equal digests hold equal pages


class Landing:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _data_path(self, key: str) -> Path:
        return self.root / f"{key}.ndjson"

    def _manifest_path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def manifest(self, key: str) -> LandedPartition | None:
        try:
            return LandedPartition(**orjson.loads(self._manifest_path(key).read_bytes()))
        except FileNotFoundError:
            return None

    def write(
        self, key: str, sync_id: str, pages: Sequence[Page], seconds: float
    ) -> LandedPartition:
        self.root.mkdir(parents=True, exist_ok=True)
        self._manifest_path(key).unlink(missing_ok=True)
        tmp = self._data_path(key).with_name(f"{key}.ndjson.tmp")
        digest = hashlib.blake2b(digest_size=16)
        with tmp.open("wb") as out:
            for page in sorted(pages, key=lambda p: p.number):
                # A raw newline can only be white space between JSON tokens (inside strings it is
                # escaped), so replacing it keeps the body's meaning and makes it one line.
                line = page.body.replace(b"\r", b" ").replace(b"\n", b" ") + b"\n"
                out.write(line)
                digest.update(line)
        os.replace(tmp, self._data_path(key))
        records = sum(p.record_count for p in pages)
        landed = LandedPartition(key, sync_id, len(pages), records, seconds, digest.hexdigest())
        _atomic_write(self._manifest_path(key), orjson.dumps(asdict(landed)))
        return landed

    def records(self, key: str) -> list[Any]:
        """Every record of the partition's landed pages, in page order."""
        if self.manifest(key) is None:
            raise FileNotFoundError(
                f"partition {key} has no landed pages: materialise `pages` for it first"
            )
        records: list[Any] = []
        for line in self._lines(key):
            records.extend(parse_json(line)["data"])
        return records

    def _lines(self, key: str) -> Iterator[bytes]:
        with self._data_path(key).open("rb") as landed:
            for line in landed:
                if line.strip():
                    yield line


def _atomic_write(path: Path, payload: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(payload)
    os.replace(tmp, path)
