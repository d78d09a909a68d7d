"""The script a user would write instead of carsync (issue 7's "seed" peer).

Fetches every page of GET /cars concurrently (16 in flight, 100 per page) and upserts each record
into <schema>.cars with INSERT ... ON CONFLICT (id) DO UPDATE in batches of 500 rows: no staging
table and no hash guard, so an unchanged re-sync rewrites every row. Run as its own process:

    API_KEY=... API_BASE_URL=http://... DATABASE_URL=postgresql://... \
        python seed_script.py --schema seed

The key is read from API_KEY only, so it never shows in a process list. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from typing import Any

import httpx
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

IN_FLIGHT, PER_PAGE, BATCH, ATTEMPTS = 16, 100, 500, 8
TEXT = ("lot_number", "vin", "fuel", "transmission", "body_type", "color", "location", "status")
COLUMNS = ("id", *TEXT, "year", "engine_cc", "created_at", "updated_at", "raw")
DDL = """
CREATE SCHEMA IF NOT EXISTS {schema};
CREATE TABLE IF NOT EXISTS {schema}.cars (
    id text PRIMARY KEY, lot_number text, vin text, fuel text, transmission text,
    body_type text, color text, location text, status text, year integer, engine_cc integer,
    created_at timestamptz, updated_at timestamptz, raw jsonb NOT NULL
)"""


def as_int(value: Any) -> int | None:
    # A real feed sends "nineteen-ninety" or 2019.5 now and then: keep those in raw only.
    return value if isinstance(value, int) and abs(value) < 2**31 else None


def as_text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def to_row(record: dict[str, Any]) -> tuple[Any, ...]:
    return (
        record["id"],
        *(as_text(record.get(name)) for name in TEXT),
        as_int(record.get("year")),
        as_int(record.get("engine_cc")),
        as_text(record.get("created_at")),
        as_text(record.get("updated_at")),
        Jsonb(record),
    )


async def get_page(client: httpx.AsyncClient, page: int, counts: dict[str, int]) -> Any:
    """One page as parsed JSON, retrying 429 (after Retry-After), 5xx and broken responses."""
    for attempt in range(ATTEMPTS):
        delay = min(8.0, 0.25 * 2**attempt) * random.uniform(0.5, 1.0)
        try:
            response = await client.get("/cars", params={"page": page, "per_page": PER_PAGE})
            if response.status_code == 429:
                delay = float(response.headers.get("Retry-After", delay))
            elif response.status_code < 500:
                response.raise_for_status()  # 401/403/400 are not worth retrying
                return response.json()  # a cut-short or HTML body raises ValueError: retried
        except (httpx.TransportError, ValueError):
            pass
        counts["retries"] += 1
        await asyncio.sleep(delay)
    raise RuntimeError(f"page {page} failed {ATTEMPTS} times")


async def sync(base_url: str, database_url: str, schema: str) -> dict[str, int]:
    counts = {"pages": 0, "fetched": 0, "skipped": 0, "retries": 0}
    ident = sql.Identifier(schema)
    upsert = sql.SQL(
        "INSERT INTO {}.cars ({}) VALUES ({}) ON CONFLICT (id) DO UPDATE SET {}"
    ).format(
        ident,
        sql.SQL(", ").join(map(sql.Identifier, COLUMNS)),
        sql.SQL(", ").join(sql.Placeholder() * len(COLUMNS)),
        sql.SQL(", ").join(
            sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in COLUMNS[1:]
        ),
    )
    # A bounded queue: when PostgreSQL is slower than the API, fetching waits instead of piling up.
    pages: asyncio.Queue[list[Any] | None] = asyncio.Queue(maxsize=2 * IN_FLIGHT)
    limit = asyncio.Semaphore(IN_FLIGHT)
    headers = {"X-API-Key": os.environ["API_KEY"]}
    timeout = httpx.Timeout(30.0, connect=5.0)  # a response that never finishes must end

    async def fetch(client: httpx.AsyncClient, page: int) -> Any:
        async with limit:  # held until the page is queued: a full queue stops new requests
            body = await get_page(client, page, counts)
            await pages.put(body["data"])
        return body["meta"]  # not the page: gather() keeps what every fetch returns

    async def fetch_all(client: httpx.AsyncClient) -> None:
        meta = await fetch(client, 1)  # page 1 tells how many pages there are
        await asyncio.gather(*(fetch(client, p) for p in range(2, meta["last_page"] + 1)))
        await pages.put(None)

    async def upsert_batch(conn: psycopg.AsyncConnection[Any], rows: list[Any]) -> None:
        async with conn.transaction(), conn.cursor() as cursor:
            await cursor.executemany(upsert, rows)

    async def write(conn: psycopg.AsyncConnection[Any]) -> None:
        batch: list[tuple[Any, ...]] = []
        while (data := await pages.get()) is not None:
            counts["pages"] += 1
            for record in data:
                counts["fetched"] += 1
                # Without a usable id a record cannot be upserted; a user would log and skip it.
                if isinstance(record, dict) and isinstance(record.get("id"), str) and record["id"]:
                    batch.append(to_row(record))
                else:
                    counts["skipped"] += 1
            if len(batch) >= BATCH:
                await upsert_batch(conn, batch)
                batch = []
        if batch:
            await upsert_batch(conn, batch)

    async with (
        await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn,
        httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout) as client,
    ):
        await conn.execute(sql.SQL(DDL).format(schema=ident))
        # A task group: if writing fails, fetching stops too (and the other way round).
        async with asyncio.TaskGroup() as group:
            group.create_task(write(conn))
            group.create_task(fetch_all(client))
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default=os.environ.get("API_BASE_URL"))
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL"))
    parser.add_argument("--schema", default="seed")
    args = parser.parse_args()
    if not (args.base_url and args.database_url and os.environ.get("API_KEY")):
        parser.error("API_BASE_URL, DATABASE_URL and API_KEY are required")
    started = time.perf_counter()
    counts = asyncio.run(sync(args.base_url, args.database_url, args.schema))
    print(json.dumps({**counts, "seconds": round(time.perf_counter() - started, 2)}), flush=True)


if __name__ == "__main__":
    main()
