"""The `sync_runs` table: one row per sync, its progress, figures and outcome; the partitions
each sync merged; and the lock that makes one sync at a time the writer of a schema."""

from __future__ import annotations

import contextlib
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
import psycopg
from psycopg import sql

# What a sync's row can say. `running` until the lifecycle settles it (orchestration.lifecycle).
STATUSES = ("running", "succeeded", "partial", "failed", "blocked", "interrupted")


class SyncBusyError(RuntimeError):
    """Another sync holds the warehouse's writer lock."""


def _table(schema: str, name: str = "sync_runs") -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(name))


def writer_lock_key(schema: str) -> int:
    """Advisory-lock key of the one writer allowed per warehouse schema."""
    return zlib.crc32(f"carsync-writer:{schema}".encode())


_held: dict[tuple[str, str], tuple[psycopg.Connection, int]] = {}
_held_guard = threading.Lock()


@contextlib.contextmanager
def writer_lock(
    database_url: str,
    schema: str,
    *,
    wait: float = 0.0,
    on_wait: Callable[[float], None] | None = None,
) -> Iterator[None]:
    """Hold the schema's writer lock (a session advisory lock on a connection of its own) while
    the block runs. Re-entrant within a process: `carsync sync` takes it, then runs its Dagster
    run in process, and every run takes it too. Waits up to `wait` seconds (telling `on_wait`
    how long it has waited, every 10 s), then raises SyncBusyError."""
    key = (database_url, schema)
    with _held_guard:
        held = _held.get(key)
        if held is not None:
            _held[key] = (held[0], held[1] + 1)
    if held is None:
        conn = psycopg.connect(database_url, autocommit=True)
        try:
            _acquire(conn, schema, wait, on_wait)
        except BaseException:
            conn.close()
            raise
        with _held_guard:
            _held[key] = (conn, 1)
    try:
        yield
    finally:
        with _held_guard:
            conn, depth = _held[key]
            if depth > 1:
                _held[key] = (conn, depth - 1)
            else:
                del _held[key]
                conn.close()  # ends the session, and with it the lock


def _acquire(
    conn: psycopg.Connection, schema: str, wait: float, on_wait: Callable[[float], None] | None
) -> None:
    started = told = time.monotonic()
    while True:
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (writer_lock_key(schema),)).fetchone()
        if row and row[0]:
            return
        waited = time.monotonic() - started
        if waited >= wait:
            raise SyncBusyError(
                f"another sync is writing to schema {schema!r}; wait for it to finish"
            )
        if on_wait is not None and time.monotonic() - told >= 10:
            told = time.monotonic()
            on_wait(waited)
        time.sleep(min(0.5, wait - waited))


def begin_sync(
    conn: psycopg.Connection, schema: str, sync_id: str, kind: str, dagster_run_id: str
) -> None:
    """The sync's row, running again if a re-run continues it."""
    conn.execute(
        sql.SQL(
            "INSERT INTO {} (sync_id, kind, status, dagster_run_id) VALUES (%s, %s, 'running', %s)"
            " ON CONFLICT (sync_id) DO UPDATE SET status = 'running', finished_at = NULL,"
            " dagster_run_id = EXCLUDED.dagster_run_id, last_activity_at = now(),"
            " last_error = NULL, alerted_at = NULL"
        ).format(_table(schema)),
        (sync_id, kind, dagster_run_id),
    )


def plan_partitions(
    conn: psycopg.Connection, schema: str, sync_id: str, keys: Sequence[str]
) -> None:
    """The partitions the sync must merge before it may close (the feed's, as it begins)."""
    conn.execute(
        sql.SQL("UPDATE {} SET planned_partitions = %s WHERE sync_id = %s").format(_table(schema)),
        (list(keys), sync_id),
    )


def merged_partitions(conn: psycopg.Connection, schema: str, sync_id: str) -> dict[str, int]:
    """The partitions `sync_id` merged, with how many ids each recorded as seen."""
    rows = conn.execute(
        sql.SQL("SELECT partition_key, seen FROM {} WHERE sync_id = %s").format(
            _table(schema, "sync_partitions")
        ),
        (sync_id,),
    ).fetchall()
    return {str(key): int(seen) for key, seen in rows}


def forget_merged_partitions(conn: psycopg.Connection, schema: str, sync_id: str) -> None:
    """Its seen ids were lost (an UNLOGGED table after a crash): those partitions merge again."""
    conn.execute(
        sql.SQL("DELETE FROM {} WHERE sync_id = %s").format(_table(schema, "sync_partitions")),
        (sync_id,),
    )


def record_progress(
    conn: psycopg.Connection,
    schema: str,
    sync_id: str,
    *,
    stage: str,
    done: int,
    total: int,
    pages: int | None = None,
    records: int | None = None,
    requests: Mapping[str, Any] | None = None,
) -> None:
    progress = {"stage": stage, "done": done, "total": total, **(requests or {})}
    conn.execute(
        sql.SQL(
            "UPDATE {} SET last_activity_at = now(), summary = coalesce(summary, '{{}}') || %s,"
            " pages_done = coalesce(%s, pages_done), records_done = coalesce(%s, records_done)"
            " WHERE sync_id = %s"
        ).format(_table(schema)),
        (orjson.dumps({"progress": progress}).decode(), pages, records, sync_id),
    )


def set_pages_total(conn: psycopg.Connection, schema: str, sync_id: str, pages: int) -> None:
    conn.execute(
        sql.SQL("UPDATE {} SET pages_total = %s WHERE sync_id = %s").format(_table(schema)),
        (pages, sync_id),
    )


def add_figures(
    conn: psycopg.Connection,
    schema: str,
    sync_id: str,
    added: Mapping[str, Any],
    replaced: Mapping[str, Any] | None = None,
) -> None:
    """Add counts to the sync's summary (numbers add up, and so do dicts of numbers, across
    every run of the sync) and set the `replaced` figures. Only the writer of the schema
    (writer_lock) calls this, so the read and the write need no more locking."""
    with conn.transaction():
        row = conn.execute(
            sql.SQL("SELECT summary FROM {} WHERE sync_id = %s FOR UPDATE").format(_table(schema)),
            (sync_id,),
        ).fetchone()
        summary: dict[str, Any] = dict(row[0] or {}) if row else {}
        for name, value in added.items():
            if isinstance(value, Mapping):
                counts = dict(summary.get(name) or {})
                for inner, number in value.items():
                    counts[inner] = counts.get(inner, 0) + number
                summary[name] = counts
            else:
                summary[name] = summary.get(name, 0) + value
        summary.update(replaced or {})
        conn.execute(
            sql.SQL(
                "UPDATE {} SET summary = %s, last_activity_at = now() WHERE sync_id = %s"
            ).format(_table(schema)),
            (orjson.dumps(summary).decode(), sync_id),
        )


def close_sync(conn: psycopg.Connection, schema: str, sync_id: str) -> None:
    """Its closing steps finished: a full sync is complete."""
    conn.execute(
        sql.SQL("UPDATE {} SET closed_at = now() WHERE sync_id = %s").format(_table(schema)),
        (sync_id,),
    )


def settle_sync(
    conn: psycopg.Connection,
    schema: str,
    sync_id: str,
    *,
    status: str,
    error: str | None,
    resumable: bool,
    figures: Mapping[str, Any],
) -> bool:
    """Write the sync's outcome once: True when this call moved it out of `running`."""
    assert status in STATUSES and status != "running"
    row = conn.execute(
        sql.SQL(
            "UPDATE {} SET status = %s, finished_at = now(), last_error = %s, resumable = %s,"
            " summary = coalesce(summary, '{{}}') || %s"
            " WHERE sync_id = %s AND status = 'running' RETURNING sync_id"
        ).format(_table(schema)),
        (status, error, resumable, orjson.dumps(dict(figures)).decode(), sync_id),
    ).fetchone()
    return row is not None


def count_recovery(conn: psycopg.Connection, schema: str, sync_id: str) -> int:
    """One more re-run of the sync; returns how many there have been."""
    row = conn.execute(
        sql.SQL(
            "UPDATE {} SET recoveries = recoveries + 1 WHERE sync_id = %s RETURNING recoveries"
        ).format(_table(schema)),
        (sync_id,),
    ).fetchone()
    return int(row[0]) if row else 0


def mark_alerted(conn: psycopg.Connection, schema: str, sync_id: str) -> None:
    conn.execute(
        sql.SQL("UPDATE {} SET alerted_at = now() WHERE sync_id = %s").format(_table(schema)),
        (sync_id,),
    )


def sync_year(conn: psycopg.Connection, schema: str, sync_id: str) -> int:
    """ "This year" of the rejection rules: the UTC year when the sync started."""
    row = conn.execute(
        sql.SQL(
            "SELECT extract(year FROM started_at AT TIME ZONE 'UTC') FROM {} WHERE sync_id = %s"
        ).format(_table(schema)),
        (sync_id,),
    ).fetchone()
    return int(row[0]) if row else datetime.now(UTC).year


def read_sync(conn: psycopg.Connection, schema: str, sync_id: str) -> dict[str, Any] | None:
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        cur.execute(
            sql.SQL("SELECT * FROM {} WHERE sync_id = %s").format(_table(schema)), (sync_id,)
        )
        return cur.fetchone()


def syncs_where(
    conn: psycopg.Connection, schema: str, *, statuses: Sequence[str], alerted: bool | None = None
) -> list[dict[str, Any]]:
    """Syncs in one of `statuses` (and alerted or not), newest first."""
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        cur.execute(
            sql.SQL(
                "SELECT * FROM {} WHERE status = ANY(%s)"
                " AND (%s::boolean IS NULL OR (alerted_at IS NOT NULL) = %s)"
                " ORDER BY started_at DESC LIMIT 50"
            ).format(_table(schema)),
            (list(statuses), alerted, alerted),
        )
        return cur.fetchall()


def recent_syncs(conn: psycopg.Connection, schema: str, limit: int = 10) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        cur.execute(
            sql.SQL("SELECT * FROM {} ORDER BY started_at DESC LIMIT %s").format(_table(schema)),
            (limit,),
        )
        return cur.fetchall()


def latest_sync_id(conn: psycopg.Connection, schema: str, kind: str) -> str | None:
    row = conn.execute(
        sql.SQL("SELECT sync_id FROM {} WHERE kind = %s ORDER BY started_at DESC LIMIT 1").format(
            _table(schema)
        ),
        (kind,),
    ).fetchone()
    return str(row[0]) if row else None


def latest_full_sync(conn: psycopg.Connection, schema: str) -> dict[str, Any] | None:
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        cur.execute(
            sql.SQL(
                "SELECT *, extract(epoch FROM now() - started_at) AS age_seconds FROM {}"
                " WHERE kind = 'full' ORDER BY started_at DESC LIMIT 1"
            ).format(_table(schema))
        )
        return cur.fetchone()


def resumable_sync(
    conn: psycopg.Connection, schema: str, max_age: float, busy: Callable[[str], bool]
) -> str | None:
    """The latest full sync, when a new one may continue it: it failed on something transient
    (not a check, not a broken page), began within `max_age` seconds, and no run of it is
    active anywhere (`busy`). Its landed and merged partitions then count."""
    latest = latest_full_sync(conn, schema)
    if (
        latest is None
        or latest["status"] == "succeeded"
        or not latest["resumable"]
        or float(latest["age_seconds"]) > max_age
        or busy(str(latest["sync_id"]))
    ):
        return None
    return str(latest["sync_id"])


def raise_watermark(
    conn: psycopg.Connection, schema: str, sync_id: str, newest: datetime | None
) -> None:
    if newest is not None:
        conn.execute(
            sql.SQL("UPDATE {} SET watermark = GREATEST(watermark, %s) WHERE sync_id = %s").format(
                _table(schema)
            ),
            (newest, sync_id),
        )


def last_watermark(conn: psycopg.Connection, schema: str, other_than: str) -> datetime | None:
    """The newest source updated_at merged by a successful full or incremental sync (the
    source's clock, not ours): a sync of some listing ranges saw only part of the feed."""
    row = conn.execute(
        sql.SQL(
            "SELECT max(watermark) FROM {} WHERE status = 'succeeded'"
            " AND kind IN ('full', 'incremental') AND sync_id <> %s"
        ).format(_table(schema)),
        (other_than,),
    ).fetchone()
    return row[0] if row else None


def seconds_since_success(conn: psycopg.Connection, schema: str, kind: str | None) -> float | None:
    """Age of the last successful sync (of `kind`, or of any kind)."""
    row = conn.execute(
        sql.SQL(
            "SELECT extract(epoch FROM now() - max(finished_at)) FROM {}"
            " WHERE status = 'succeeded' AND (%s::text IS NULL OR kind = %s)"
        ).format(_table(schema)),
        (kind, kind),
    ).fetchone()
    return float(row[0]) if row and row[0] is not None else None
