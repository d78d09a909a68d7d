"""Versioned, idempotent schema migrations, applied under an advisory lock."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from importlib import resources

import psycopg
from psycopg import sql

# Any constant works; it only has to be the same for every carsync process.
_MIGRATION_LOCK = 0x6361_7273_796E_6301  # "carsync" + 1

# (version, file): append only; never edit a migration that has shipped.
MIGRATIONS: tuple[tuple[int, str], ...] = (
    (1, "0001_initial.sql"),
    (2, "0002_history_seen_watermark.sql"),
    (3, "0003_key_staging.sql"),
    (4, "0004_seen_ids_unindexed.sql"),
    (5, "0005_sync_lifecycle.sql"),
)


@cache
def read_sql(name: str) -> str:
    return (resources.files("carsync_dagster.warehouse") / "sql" / name).read_text()


def set_search_path(conn: psycopg.Connection, schema: str) -> None:
    """Point unqualified table names at the carsync schema for this transaction."""
    conn.execute(sql.SQL("SET LOCAL search_path TO {}").format(sql.Identifier(schema)))


def migrate(conninfo: str, schema: str, *, other_schemas: Sequence[str] = ()) -> list[int]:
    """Bring `schema` up to date; returns the versions applied now (empty when current).
    `other_schemas` (Dagster's storage) are created under the same lock: two concurrent
    `CREATE SCHEMA IF NOT EXISTS` can both find it missing, and one then fails."""
    applied: list[int] = []
    with psycopg.connect(conninfo, autocommit=True) as conn:
        # Session lock: concurrent starts wait here instead of racing on CREATE.
        conn.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK,))
        try:
            for name in (schema, *other_schemas):
                conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(name)))
            conn.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {}.schema_migrations ("
                    " version integer PRIMARY KEY, name text NOT NULL,"
                    " applied_at timestamptz NOT NULL DEFAULT now())"
                ).format(sql.Identifier(schema))
            )
            done = {
                row[0]
                for row in conn.execute(
                    sql.SQL("SELECT version FROM {}.schema_migrations").format(
                        sql.Identifier(schema)
                    )
                )
            }
            for version, name in MIGRATIONS:
                if version in done:
                    continue
                with conn.transaction():
                    set_search_path(conn, schema)
                    conn.execute(read_sql(name).encode())
                    conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                        (version, name),
                    )
                applied.append(version)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK,))
    return applied
