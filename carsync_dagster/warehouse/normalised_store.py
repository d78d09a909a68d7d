"""Normalised partitions on disk (Parquet), between the polars asset and the merge."""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl


class NormalisedStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str, part: str) -> Path:
        return self.root / f"{key}.{part}.parquet"

    def write(self, key: str, cars: pl.DataFrame, rejected: pl.DataFrame) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for part, frame in (("cars", cars), ("rejected", rejected)):
            tmp = self._path(key, part).with_name(f"{key}.{part}.parquet.tmp")
            # Uncompressed: these files live minutes and are read once; speed beats size here.
            frame.write_parquet(tmp, compression="uncompressed", statistics=False)
            os.replace(tmp, self._path(key, part))

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
