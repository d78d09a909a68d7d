"""Migrations and the merge, against a real PostgreSQL."""

from __future__ import annotations

import copy
import functools
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from carsync_dagster.transform import normalise
from carsync_dagster.warehouse.load import ConcurrentMerge, merge_batch
from carsync_dagster.warehouse.normalised_store import NormalisedStore
from carsync_dagster.warehouse.schema import MIGRATIONS, migrate
from carsync_dagster_tests.conftest import errors_when_started_together


def _car(number: int, **changes: Any) -> dict[str, Any]:
    car: dict[str, Any] = {
        "id": f"KA{number:09d}",
        "lot_number": str(number),
        "vin": None,
        "manufacturer": {"id": 1, "name": "Kia"},
        "model": {"id": 2, "name": "K5"},
        "generation": None,
        "year": 2020,
        "mileage": {"value": 1000 + number, "unit": "km"},
        "price": {"amount": 20_000_000 + number, "currency": "KRW"},
        "fuel": "Gasoline",
        "transmission": "automatic",
        "body_type": "Sedan",
        "color": "White",
        "engine_cc": 1999,
        "location": "Seoul",
        "images": [f"https://img.example/{number}/0.jpg"],
        "status": "active",
        "created_at": "2026-01-01T00:00:00Z",
        "updated_at": "2026-01-02T00:00:00Z",
    }
    car.update(changes)
    return car


def _merge(
    conn: psycopg.Connection, records: list[Any], *, mostly_changed: bool = False
) -> tuple[int, int, int, int]:
    batch = normalise(records, this_year=2026)
    counts = merge_batch(
        conn, "carsync", batch.cars, batch.rejected, "test-sync", mostly_changed=mostly_changed
    )
    return counts.inserted, counts.updated, counts.unchanged, counts.rejected


def _xmins(conn: psycopg.Connection) -> dict[str, str]:
    return dict(conn.execute("SELECT id, xmin::text FROM carsync.cars").fetchall())


# Both ways of staging (keys first, or whole rows at once) must merge exactly alike.
BOTH_STAGINGS = pytest.mark.parametrize("whole", [False, True], ids=["keys_first", "whole_rows"])


@pytest.fixture
def conn(database_url: str) -> Any:
    migrate(database_url, "carsync")
    with psycopg.connect(database_url) as connection:
        yield connection


def test_carsyncs_starting_together_create_their_schemas_once(database_url: str) -> None:
    """Two `carsync sync` started at once both create the schemas; one used to fail with a
    unique violation of pg_namespace (seen in 3 of 19 tries), not with "another sync"."""
    errors: list[BaseException] = []
    for round_ in range(5):
        start_up = functools.partial(
            migrate, database_url, f"carsync_{round_}", other_schemas=[f"dagster_{round_}"]
        )
        errors += errors_when_started_together([start_up] * 6)
    assert errors == []
    with psycopg.connect(database_url) as conn:
        names = {row[0] for row in conn.execute("SELECT nspname FROM pg_namespace")}
    assert {f"dagster_{round_}" for round_ in range(5)} <= names


def test_migrations_are_idempotent(database_url: str) -> None:
    assert migrate(database_url, "carsync") == [version for version, _ in MIGRATIONS]
    assert migrate(database_url, "carsync") == []
    with psycopg.connect(database_url) as conn:
        persistence = conn.execute(
            "SELECT relpersistence FROM pg_class WHERE relname = 'cars_staging'"
        ).fetchone()
    assert persistence == ("u",), "staging must be UNLOGGED"


@BOTH_STAGINGS
def test_merge_inserts_then_leaves_unchanged_rows_untouched(
    conn: psycopg.Connection, whole: bool
) -> None:
    records = [_car(n) for n in range(50)]
    assert _merge(conn, records, mostly_changed=whole) == (50, 0, 0, 0)
    before = _xmins(conn)
    assert _merge(conn, copy.deepcopy(records), mostly_changed=whole) == (0, 0, 50, 0)
    assert _xmins(conn) == before
    seen = conn.execute("SELECT count(DISTINCT id) FROM carsync.seen_ids").fetchone()
    assert seen == (50,)


def test_only_changed_listings_are_staged_whole(conn: psycopg.Connection) -> None:
    records = [_car(n) for n in range(30)]
    _merge(conn, records)
    records[5] = _car(5, status="sold")
    assert _merge(conn, records) == (0, 1, 29, 0)
    staged = conn.execute("SELECT id FROM pg_temp.cars_staging").fetchall()  # this session's
    assert staged == [("KA000000005",)], "unchanged listings go through the narrow keys only"
    seen = conn.execute("SELECT count(DISTINCT id) FROM carsync.seen_ids").fetchone()
    assert seen == (30,), "every id received is recorded as seen, changed or not"


def test_batches_merge_side_by_side(conn: psycopg.Connection, database_url: str) -> None:
    # Four batches on two connections at once; batches 1 and 2 both hold listing 12 (page drift).
    batches = {
        f"b{n}": normalise([_car(i) for i in range(10 * n, 10 * n + 10)], this_year=2026)
        for n in range(4)
    }
    batches["b2"] = normalise(
        [_car(i) for i in range(20, 30)] + [_car(12, price={"amount": 9, "currency": "KRW"})],
        this_year=2026,
    )
    with ConcurrentMerge(lambda: psycopg.connect(database_url), "carsync", "side-by-side") as merge:
        futures = [merge.submit(key, batch.cars, batch.rejected) for key, batch in batches.items()]
        merged = [future.result()[0] for future in futures]
    assert sum(counts.inserted + counts.updated for counts in merged) >= 40
    checkpoints = conn.execute(
        "SELECT partition_key, seen FROM carsync.sync_partitions ORDER BY 1"
    ).fetchall()
    assert checkpoints == [("b0", 10), ("b1", 10), ("b2", 11), ("b3", 10)], (
        "merged, in its own transaction"
    )
    rows = conn.execute("SELECT count(*), count(DISTINCT id) FROM carsync.cars").fetchone()
    assert rows == (40, 40)
    seen = conn.execute(
        "SELECT count(DISTINCT id) FROM carsync.seen_ids WHERE sync_id = 'side-by-side'"
    ).fetchone()
    assert seen == (40,)
    staging = conn.execute("SELECT count(*) FROM carsync.cars_staging").fetchone()
    assert staging == (0,), "each connection stages into its own temporary tables"


@BOTH_STAGINGS
def test_merge_updates_exactly_the_changed_rows(conn: psycopg.Connection, whole: bool) -> None:
    records = [_car(n) for n in range(20)]
    _merge(conn, records)
    before = _xmins(conn)
    records[3] = _car(3, price={"amount": 1, "currency": "KRW"})
    records[7] = _car(7, status="reserved")
    assert _merge(conn, records, mostly_changed=whole) == (0, 2, 18, 0)
    after = _xmins(conn)
    assert {car_id for car_id in after if after[car_id] != before[car_id]} == {
        "KA000000003",
        "KA000000007",
    }
    price, changed_at, first_seen = conn.execute(
        "SELECT price, changed_at, first_seen_at FROM carsync.cars WHERE id = 'KA000000003'"
    ).fetchone() or (None, None, None)
    assert price == 1 and changed_at >= first_seen


@BOTH_STAGINGS
def test_a_listing_served_twice_in_one_partition_is_merged_once(
    conn: psycopg.Connection, whole: bool
) -> None:
    old = _car(1, updated_at="2026-01-02T00:00:00Z")
    new = _car(1, updated_at="2026-01-03T00:00:00Z", price={"amount": 5, "currency": "KRW"})
    assert _merge(conn, [old, new], mostly_changed=whole) == (1, 0, 0, 0)
    assert conn.execute("SELECT price FROM carsync.cars").fetchone() == (5,)


def test_rejected_records_keep_one_row_each(conn: psycopg.Connection) -> None:
    bad = [_car(1, year="nineteen-ninety"), _car(2, id=""), "not an object", {"id": "x\u0000y"}]
    assert _merge(conn, bad)[3] == 4
    first = conn.execute(
        "SELECT id, reason, last_seen_at FROM carsync.cars_rejected ORDER BY id"
    ).fetchall()
    assert len(first) == 4
    _merge(conn, copy.deepcopy(bad))
    again = conn.execute("SELECT count(*), min(last_seen_at) FROM carsync.cars_rejected").fetchone()
    assert again is not None and again[0] == 4
    assert conn.execute("SELECT count(*) FROM carsync.cars").fetchone() == (0,)
    reasons = {row[0]: row[1] for row in first}
    assert reasons["KA000000001"].startswith("year:")


@BOTH_STAGINGS
def test_a_fixed_record_resolves_its_quarantine_row(conn: psycopg.Connection, whole: bool) -> None:
    _merge(conn, [_car(1, year="nineteen-ninety"), _car(2, year="nineteen-ninety")])
    _merge(conn, [_car(1)], mostly_changed=whole)
    rows = conn.execute(
        "SELECT id, resolved_at IS NOT NULL FROM carsync.cars_rejected ORDER BY id"
    ).fetchall()
    assert rows == [("KA000000001", True), ("KA000000002", False)]


def test_normalised_files_are_reused_only_when_made_from_the_same_source(tmp_path: Path) -> None:
    store = NormalisedStore(tmp_path)
    batch = normalise([_car(1), _car(2, year="nineteen-ninety")], this_year=2026)
    assert store.reusable("p1", "pages-a") is None, "nothing written yet"
    store.write("p1", batch.cars, batch.rejected, "pages-a")
    assert store.reusable("p1", "pages-a") == (1, 1)
    assert store.reusable("p1", "pages-b") is None, "other pages, other rules or another year"
    assert store.reusable("p2", "pages-a") is None
    (tmp_path / "p1.cars.parquet").unlink()
    assert store.reusable("p1", "pages-a") is None, "a missing file is made again"


@pytest.mark.parametrize("newer_first", [True, False], ids=["newer_commits_first", "older_first"])
def test_the_newer_version_wins_whatever_the_commit_order(
    conn: psycopg.Connection, database_url: str, newer_first: bool
) -> None:
    """Two batches hold one listing (page drift, a resumed sync's landed pages). The first
    merge holds its transaction open while the second starts: the second waits on the row,
    then finds it committed. Either way round, the newer source_updated_at is what stays."""
    _merge(conn, [_car(1), _car(2)])
    conn.commit()
    older = _car(1, updated_at="2026-01-03T00:00:00Z", price={"amount": 3, "currency": "KRW"})
    newer = _car(1, updated_at="2026-01-04T00:00:00Z", price={"amount": 4, "currency": "KRW"})
    first, second = (newer, older) if newer_first else (older, newer)
    waiting: list[str] = []
    with psycopg.connect(database_url) as holder, psycopg.connect(database_url) as other:
        holder_pid = holder.info.backend_pid
        with holder.transaction():
            _merge(holder, [first, _car(2)])  # merged, not committed: its row lock stays

            def merge_second() -> None:
                _merge(other, [second])

            thread = threading.Thread(target=merge_second)
            thread.start()
            deadline = time.monotonic() + 30
            while not waiting and time.monotonic() < deadline:
                waiting = [
                    row[0]
                    for row in conn.execute(
                        "SELECT wait_event_type FROM pg_stat_activity"
                        " WHERE pid = %s AND wait_event_type = 'Lock'"
                        " AND %s = ANY(pg_blocking_pids(pid))",
                        (other.info.backend_pid, holder_pid),
                    )
                ]
                conn.commit()
                time.sleep(0.05)
            assert waiting == ["Lock"], "the two merges overlap: the second waits on the row"
        thread.join(timeout=30)
        assert not thread.is_alive()
    row = conn.execute(
        "SELECT price, source_updated_at FROM carsync.cars WHERE id = 'KA000000001'"
    ).fetchone()
    assert row is not None and row[0] == 4, "the newer version of the listing stays"
    history = conn.execute(
        "SELECT old_value, new_value FROM carsync.car_changes"
        " WHERE id = 'KA000000001' AND field = 'price' ORDER BY changed_at"
    ).fetchall()
    assert history[-1][1] == "4"
