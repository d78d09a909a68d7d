"""The `sync_runs` table: one row per sync, its progress, outcome and summary."""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import orjson
import psycopg
from psycopg import sql


def _table(schema: str) -> sql.Composed:
    return sql.SQL("{}.sync_runs").format(sql.Identifier(schema))


def writer_lock_key(schema: str) -> int:
    """Advisory-lock key of the one writer allowed per warehouse schema."""
    return zlib.crc32(f"carsync-writer:{schema}".encode())


def try_writer_lock(conn: psycopg.Connection, schema: str) -> bool:
    """Take the session-level writer lock; False when another sync holds it."""
    row = conn.execute("SELECT pg_try_advisory_lock(%s)", (writer_lock_key(schema),)).fetchone()
    return bool(row and row[0])


def resumable_sync(conn: psycopg.Connection, schema: str) -> str | None:
    """The latest full sync if it did not succeed (it died or failed): its landed pages count."""
    row = conn.execute(
        sql.SQL(
            "SELECT sync_id, status FROM {} WHERE kind = 'full' ORDER BY started_at DESC LIMIT 1"
        ).format(_table(schema))
    ).fetchone()
    return str(row[0]) if row and row[1] != "succeeded" else None


def begin_sync(
    conn: psycopg.Connection, schema: str, sync_id: str, kind: str, dagster_run_id: str
) -> None:
    conn.execute(
        sql.SQL(
            "INSERT INTO {} (sync_id, kind, status, dagster_run_id) VALUES (%s, %s, 'running', %s)"
            " ON CONFLICT (sync_id) DO UPDATE SET status = 'running', finished_at = NULL,"
            " dagster_run_id = EXCLUDED.dagster_run_id, last_activity_at = now(),"
            " last_error = NULL"
        ).format(_table(schema)),
        (sync_id, kind, dagster_run_id),
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


def finish_sync(
    conn: psycopg.Connection,
    schema: str,
    sync_id: str,
    *,
    status: str,
    summary: Mapping[str, Any] | None = None,
    error: str | None = None,
) -> None:
    conn.execute(
        sql.SQL(
            "UPDATE {} SET status = %s, finished_at = now(), last_activity_at = now(),"
            " summary = coalesce(summary, '{{}}') || %s, last_error = %s WHERE sync_id = %s"
        ).format(_table(schema)),
        (status, orjson.dumps(dict(summary or {})).decode(), error, sync_id),
    )


def read_sync(conn: psycopg.Connection, schema: str, sync_id: str) -> dict[str, Any] | None:
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        cur.execute(
            sql.SQL("SELECT * FROM {} WHERE sync_id = %s").format(_table(schema)), (sync_id,)
        )
        return cur.fetchone()


def recent_syncs(conn: psycopg.Connection, schema: str, limit: int = 10) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        cur.execute(
            sql.SQL("SELECT * FROM {} ORDER BY started_at DESC LIMIT %s").format(_table(schema)),
            (limit,),
        )
        return cur.fetchall()


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
    """The newest source updated_at merged by a successful sync (the source's clock, not ours)."""
    row = conn.execute(
        sql.SQL(
            "SELECT max(watermark) FROM {} WHERE status = 'succeeded' AND sync_id <> %s"
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
