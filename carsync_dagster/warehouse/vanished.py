"""Listings that left the feed: candidates after a complete full sync, and deactivation."""

from __future__ import annotations

import psycopg

from carsync_dagster.warehouse.schema import read_sql, set_search_path


def candidates(conn: psycopg.Connection, schema: str, sync_id: str) -> list[str]:
    """Active listings the sync did not receive."""
    with conn.transaction():
        set_search_path(conn, schema)
        # seen_ids was refilled by this sync, long before autovacuum would analyse it: with fresh
        # statistics the query below is a hash anti-join, 4x faster than the plan without.
        conn.execute("ANALYZE seen_ids")
        rows = conn.execute(read_sql("vanished.sql").encode(), {"sync_id": sync_id}).fetchall()
    return [str(row[0]) for row in rows]


def active_count(conn: psycopg.Connection, schema: str) -> int:
    with conn.transaction():
        set_search_path(conn, schema)
        row = conn.execute("SELECT count(*) FROM cars WHERE is_active").fetchone()
    return int(row[0]) if row else 0


def deactivate(conn: psycopg.Connection, schema: str, ids: list[str], sync_id: str) -> int:
    """Mark confirmed-gone listings inactive; returns how many were."""
    if not ids:
        return 0
    with conn.transaction(), conn.cursor() as cur:
        set_search_path(conn, schema)
        cur.execute(read_sql("deactivate.sql").encode(), {"ids": ids, "sync_id": sync_id})
        return cur.rowcount


def forget_other_syncs(conn: psycopg.Connection, schema: str, sync_id: str) -> None:
    """After a complete full sync, only its own seen ids are worth keeping."""
    with conn.transaction():
        set_search_path(conn, schema)
        conn.execute("DELETE FROM seen_ids WHERE sync_id <> %s", (sync_id,))
