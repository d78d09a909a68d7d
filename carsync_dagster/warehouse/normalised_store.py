"""Normalised partitions on disk (Parquet), between the polars asset and the merge.

Beside each partition's two files, a small record of what they were made from (the landed pages'
digest, the rules' year and code) written last: a partition landed again with the same pages
need not be normalised again.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import polars as pl

from carsync_dagster.files import replacing


class NormalisedStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str, part: str) -> Path:
        return self.root / f"{key}.{part}.parquet"

    def _source_path(self, key: str) -> Path:
        return self.root / f"{key}.source.json"

    def write(self, key: str, cars: pl.DataFrame, rejected: pl.DataFrame, source: str) -> None:
        """`source` names what the frames were made from; `reusable` compares it."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._source_path(key).unlink(missing_ok=True)
        for part, frame in (("cars", cars), ("rejected", rejected)):
            with replacing(self._path(key, part)) as tmp:
                # Uncompressed: these files live minutes and are read once; speed beats size.
                frame.write_parquet(tmp, compression="uncompressed", statistics=False)
        made = {"source": source, "rows": cars.height, "rejected": rejected.height}
        with replacing(self._source_path(key)) as tmp:
            tmp.write_bytes(orjson.dumps(made))

    def reusable(self, key: str, source: str) -> tuple[int, int] | None:
        """(rows, rejected) of the partition when it was made from `source`, else None."""
        try:
            made = orjson.loads(self._source_path(key).read_bytes())
        except FileNotFoundError:
            return None
        files = all(self._path(key, part).exists() for part in ("cars", "rejected"))
        if not files or made.get("source") != source:
            return None
        return int(made["rows"]), int(made["rejected"])

    def read(self, key: str) -> tuple[pl.DataFrame, pl.DataFrame]:
        try:
            return (
                pl.read_parquet(self._path(key, "cars")),
                pl.read_parquet(self._path(key, "rejected")),
            )
        except FileNotFoundError:
            raise FileNotFoundError(
                f"partition {key} is not normalised yet: materialise `normalised` for it first"
            ) from None
