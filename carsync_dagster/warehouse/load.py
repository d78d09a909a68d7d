"""COPY normalised frames into UNLOGGED staging and merge them into `cars`, one transaction each."""

from __future__ import annotations

import contextlib
import queue
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime

import polars as pl
import psycopg
from psycopg import sql

from carsync_dagster.warehouse.schema import read_sql, set_search_path

# Keeps a merge from waiting behind a stray lock for ever; readers never wait on us (no table
# locks on `cars`, row locks only on rows that really change).
_LOCK_TIMEOUT = "10s"
_STATEMENT_TIMEOUT = "5min"


@dataclass(frozen=True)
class MergeCounts:
    staged: int
    inserted: int
    updated: int
    rejected: int
    newest_update: datetime | None = None  # the batch's newest source updated_at

    @property
    def unchanged(self) -> int:
        return self.staged - self.inserted - self.updated

    @property
    def changed(self) -> int:
        return self.inserted + self.updated


def _copy_frame(cur: psycopg.Cursor, table: str, frame: pl.DataFrame) -> None:
    if frame.is_empty():
        return
    statement = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT csv)").format(
        sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, frame.columns))
    )
    # polars writes null as an empty field and "" quoted, which is exactly CSV COPY's convention.
    with cur.copy(statement) as copy:
        copy.write(frame.write_csv(include_header=False))


_KEY_COLUMNS = ("id", "data_hash", "source_updated_at")
_STAGING = ("cars_keys_staging", "cars_staging", "cars_rejected_staging")
_DEADLOCK_RETRIES = 3
_MOSTLY_CHANGED = 0.5  # share of a batch's rows that changed, above which whole rows are staged


def _session_staging(cur: psycopg.Cursor, schema: str) -> None:
    """This connection's own copies of the UNLOGGED staging tables (temporary tables are not
    logged either), so that merges on several connections run side by side. PostgreSQL looks
    up unqualified table names in the session's temporary schema first."""
    for table in _STAGING:
        cur.execute(
            sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} (LIKE {} INCLUDING DEFAULTS)").format(
                sql.Identifier(table), sql.Identifier(schema, table)
            )
        )


def _only(frame: pl.DataFrame, ids: list[str]) -> pl.DataFrame:
    # implode(): one list to look in (a one-element Series is ambiguous to polars).
    return frame.filter(pl.col("id").is_in(pl.Series(ids, dtype=pl.String).implode()))


def merge_batch(
    conn: psycopg.Connection,
    schema: str,
    cars: pl.DataFrame,
    rejected: pl.DataFrame,
    sync_id: str,
    *,
    mostly_changed: bool = False,
    partition_key: str | None = None,
) -> MergeCounts:
    """Stage and merge one batch of records in a single transaction, recording the ids as seen
    by `sync_id` and, for a partition, that `sync_id` merged it (sync_partitions): the merge and
    its checkpoint commit together. With `mostly_changed` (a first load, say) whole rows are
    staged at once instead of keys first: the merge checks every hash anyway, and keys would
    only be staged and compared to find that nearly all rows must be staged too."""
    with conn.transaction(), conn.cursor() as cur:
        set_search_path(conn, schema)
        cur.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(_LOCK_TIMEOUT)))
        cur.execute(
            sql.SQL("SET LOCAL statement_timeout = {}").format(sql.Literal(_STATEMENT_TIMEOUT))
        )
        _session_staging(cur, schema)
        cur.execute("TRUNCATE cars_keys_staging, cars_staging, cars_rejected_staging")
        if mostly_changed:
            _copy_frame(cur, "cars_staging", cars)
            cur.execute(read_sql("seen_staged_ids.sql").encode(), {"sync_id": sync_id})
        else:
            # Keys first: most listings of a re-sync are unchanged, and only the changed ones
            # need their whole row staged and merged.
            _copy_frame(cur, "cars_keys_staging", cars.select(_KEY_COLUMNS))
            cur.execute(read_sql("changed_ids.sql").encode(), {"sync_id": sync_id})
            changed_ids = [row[0] for row in cur.fetchall()]
            changed = cars if len(changed_ids) == cars.height else _only(cars, changed_ids)
            _copy_frame(cur, "cars_staging", changed)
        _copy_frame(cur, "cars_rejected_staging", rejected)
        cur.execute(read_sql("merge_cars.sql").encode(), {"sync_id": sync_id})
        row = cur.fetchone()
        assert row is not None
        inserted, updated = (int(value) for value in row)
        staged = cars.get_column("id").n_unique()
        if not rejected.is_empty():
            cur.execute(read_sql("merge_rejected.sql").encode())
        every_id = "cars_staging" if mostly_changed else "cars_keys_staging"
        resolve = sql.SQL(read_sql("resolve_rejected.sql"))
        cur.execute(resolve.format(staging=sql.Identifier(every_id)))
        if partition_key is not None:
            cur.execute(
                "INSERT INTO sync_partitions (sync_id, partition_key, seen) VALUES (%s, %s, %s)"
                " ON CONFLICT (sync_id, partition_key)"
                " DO UPDATE SET seen = EXCLUDED.seen, merged_at = now()",
                (sync_id, partition_key, staged),
            )
    newest = cars.get_column("source_updated_at").max()
    newest_update = newest if isinstance(newest, datetime) else None
    return MergeCounts(staged, inserted, updated, rejected.height, newest_update)


class ConcurrentMerge:
    """Merges partitions on `workers` connections at once (PostgreSQL does the work, on as many
    cores), in whatever order they are handed in. How the last merged batch went decides how
    the next is staged: a first load changes nearly every row, a re-sync few."""

    def __init__(
        self,
        connect: Callable[[], psycopg.Connection],
        schema: str,
        sync_id: str,
        workers: int = 2,
    ) -> None:
        self._connect, self._schema, self._sync_id = connect, schema, sync_id
        self._connections: queue.Queue[psycopg.Connection] = queue.Queue()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="merge")
        self._stack = contextlib.ExitStack()
        self._last_changed_share = 0.0
        for _ in range(workers):
            self._connections.put(self._stack.enter_context(connect()))

    def __enter__(self) -> ConcurrentMerge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Wait for the merges running, drop those waiting, close the connections."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._stack.close()

    def submit(
        self, key: str, cars: pl.DataFrame, rejected: pl.DataFrame
    ) -> Future[tuple[MergeCounts, float]]:
        """The partition's (counts, seconds) once merged and checkpointed."""
        return self._pool.submit(self._merge, key, cars, rejected)

    def _merge(
        self, key: str, cars: pl.DataFrame, rejected: pl.DataFrame
    ) -> tuple[MergeCounts, float]:
        conn = self._connections.get()
        try:
            began = time.perf_counter()
            mostly_changed = self._last_changed_share > _MOSTLY_CHANGED
            for attempt in range(1, _DEADLOCK_RETRIES + 1):
                try:
                    counts = merge_batch(
                        conn, self._schema, cars, rejected, self._sync_id,
                        mostly_changed=mostly_changed, partition_key=key,
                    )  # fmt: skip
                    break
                except psycopg.errors.DeadlockDetected:
                    # Two batches holding one listing (page drift) can lock it in turn; the
                    # loser's transaction was rolled back whole, so it merges again.
                    if attempt == _DEADLOCK_RETRIES:
                        raise
            self._last_changed_share = counts.changed / max(1, counts.staged)
            return counts, time.perf_counter() - began
        finally:
            self._connections.put(conn)
