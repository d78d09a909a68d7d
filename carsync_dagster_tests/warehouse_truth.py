"""Compare the warehouse with the simulator's own truth, field by field."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

TIMESTAMP_COLUMNS = ("source_updated_at", "source_created_at")


def _expected_value(column: str, value: Any) -> Any:
    if value is None:
        return None
    if column in TIMESTAMP_COLUMNS:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    if column == "price":
        return Decimal(str(value))
    return value


def cars_by_id(database_url: str, schema: str = "carsync") -> dict[str, dict[str, Any]]:
    with psycopg.connect(database_url) as conn, conn.cursor(row_factory=dict_row) as cur:
        cur.execute(f"SELECT * FROM {schema}.cars")  # test code: schema is a literal
        return {row["id"]: row for row in cur.fetchall()}


def rejected_rows(database_url: str, schema: str = "carsync") -> list[dict[str, Any]]:
    with psycopg.connect(database_url) as conn, conn.cursor(row_factory=dict_row) as cur:
        cur.execute(f"SELECT * FROM {schema}.cars_rejected")
        return cur.fetchall()


def differences(
    truth: dict[str, Any], database_url: str, schema: str = "carsync", *, strict: bool = False
) -> list[str]:
    """Every way the warehouse differs from the truth (empty when exact). Listings deleted at
    the source may still be active unless `strict`: a sync marks them gone by the next one."""
    problems: list[str] = []
    rows = cars_by_id(database_url, schema)
    expected = {car["id"]: car for car in truth["cars"]}
    active = {car_id for car_id, row in rows.items() if row["is_active"]}
    if missing := sorted(expected.keys() - rows.keys()):
        problems.append(f"{len(missing)} cars missing, e.g. {missing[:3]}")
    allowed = set() if strict else set(truth.get("deleted", []))
    if extra := sorted(active - expected.keys() - allowed):
        problems.append(f"{len(extra)} active cars not in the feed, e.g. {extra[:3]}")
    for car_id, car in expected.items():
        row = rows.get(car_id)
        if row is None:
            continue
        for column, value in car.items():
            if row[column] != _expected_value(column, value):
                problems.append(f"{car_id}.{column}: warehouse {row[column]!r} != truth {value!r}")
        if not row["is_active"]:
            problems.append(f"{car_id}: inactive but in the feed")
    stored = rejected_rows(database_url, schema)
    stored_raw = [(row["id"], row["raw"]) for row in stored]
    for bad in truth["rejected"]:
        if (bad["id"], bad["raw"]) not in stored_raw:
            problems.append(f"rejected record not in cars_rejected: {bad}")
        elif bad["id"] is not None and bad["id"] in rows:
            problems.append(f"rejected record {bad['id']} reached cars")
    return problems


def tables_holding(database_url: str, text: str) -> list[str]:
    """Every table (warehouse and Dagster storage) with a row whose text contains `text`."""
    with psycopg.connect(database_url) as conn:
        tables = conn.execute(
            "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables"
            " WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"
        ).fetchall()
        return [
            table
            for (table,) in tables
            if conn.execute(
                sql.SQL("SELECT EXISTS (SELECT FROM {} AS t WHERE t::text LIKE %s)").format(
                    sql.SQL(table)
                ),
                (f"%{text}%",),
            ).fetchone()
            != (False,)
        ]
