"""The bundled simulator, over real HTTP against a started simulator process."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import httpx
import orjson
import pytest

from carsync_dagster.simulator.data import Store
from carsync_dagster.simulator.process import RunningSimulator, start_simulator
from carsync_dagster.simulator.server import main

CARS = 3000
NO_FAULTS = {
    "rate_limit": 0,
    "burst": 10,
    "overload_429": 0,
    "error_rate": 0,
    "hang_rate": 0,
    "hang_seconds": 30,
    "truncate_rate": 0,
    "html_rate": 0,
    "latency_ms": 0,
    "drift_inserts": 0,
    "drift_deletes": 0,
}


@pytest.fixture(scope="module")
def sim() -> Iterator[RunningSimulator]:
    with start_simulator(cars=CARS, seed=7, args=["--broken-rate", "0.05"]) as running:
        yield running


@pytest.fixture(scope="module")
def client(sim: RunningSimulator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim.base_url, headers={"X-API-Key": sim.api_key}) as c:
        yield c


@pytest.fixture
def faults(sim: RunningSimulator) -> Iterator[Callable[..., Any]]:
    """Set faults for one test; they go back to none afterwards."""
    yield sim.control.configure
    sim.control.configure(**NO_FAULTS)


def all_pages(client: httpx.Client, per_page: int = 500, **params: Any) -> list[Any]:
    items: list[Any] = []
    page = 1
    while True:
        r = client.get("/cars", params={"page": page, "per_page": per_page, **params})
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/json"
        body = r.json()
        items += body["data"]
        if page >= body["meta"]["last_page"]:
            assert len(items) == body["meta"]["total"]
            return items
        page += 1


# ---- a reference normaliser written from warehouse.md alone, to check the simulator's truth

MAKERS = ("Hyundai", "Kia", "Genesis", "BMW", "Mercedes-Benz", "Audi", "Volkswagen", "Chevrolet",
          "Toyota", "Renault Korea", "KG Mobility", "Ford", "Volvo", "Porsche", "Lexus", "Honda",
          "Nissan", "Tesla", "MINI", "Land Rover", "Jeep", "Peugeot")  # fmt: skip


def maker_key(name: str) -> str:
    return " ".join(name.replace("-", " ").split()).casefold()


CANONICAL = {maker_key(m): m for m in MAKERS} | {"vw": "Volkswagen", "ssangyong": "KG Mobility"}


def clean(value: Any) -> Any:
    return (" ".join(value.split()) or None) if isinstance(value, str) else value


def fuel_class(value: Any) -> str:
    s = (clean(value) or "").casefold()
    if "hybrid" in s or s in ("phev", "hev"):
        return "hybrid"
    classes = {"gasoline": "gasoline", "petrol": "gasoline", "diesel": "diesel", "lpg": "lpg"}
    classes |= {"ev": "electric", "bev": "electric", "electric": "electric"}
    return classes.get(s, "other")


def as_year(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and clean(value) and clean(value).lstrip("-").isdigit():
        return int(value)
    return value if isinstance(value, int) else None


def is_amount(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0


def reference(item: Any) -> tuple[str, str | None, dict[str, Any] | None]:
    """(rejecting field or "ok", cleaned id, expected row)."""
    if not isinstance(item, dict):
        return "record", None, None
    cid = clean_id(item)
    if not cid:
        return "id", None, None
    year = as_year(item.get("year"))
    if year is None or not 1950 <= year <= datetime.now(UTC).year + 1:
        return "year", cid, None
    mileage, price = item.get("mileage") or {}, item.get("price") or {}
    if not is_amount(mileage.get("value")):
        return "mileage", cid, None
    if not is_amount(price.get("amount")):
        return "price", cid, None
    if mileage.get("unit") not in ("km", "mi"):
        return "mileage", cid, None
    km = Decimal(mileage["value"])
    if mileage["unit"] == "mi":
        km = (km * Decimal("1.609344")).quantize(Decimal(1), ROUND_HALF_UP)
    maker = clean((item.get("manufacturer") or {}).get("name"))
    row = {
        "id": cid,
        "manufacturer": maker and CANONICAL.get(maker_key(maker), maker),
        "model": clean(item["model"]["name"]),
        "year": year,
        "mileage_km": int(km),
        "price": price["amount"],
        "currency": price["currency"].strip().upper(),
        "fuel": fuel_class(item.get("fuel")),
        "status": item["status"],
        "source_updated_at": item["updated_at"],
        "generation": clean((item.get("generation") or {}).get("name")),
        "images": item["images"],
        "source_created_at": item["created_at"],
    }
    for key in ("lot_number", "vin", "transmission", "body_type", "color", "location"):
        row[key] = clean(item[key])
    row["engine_cc"] = item["engine_cc"]
    return "ok", cid, row


def clean_id(item: Any) -> str | None:
    return (
        clean(item.get("id"))
        if isinstance(item, dict) and isinstance(item.get("id"), str)
        else None
    )


def canon(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


# ---- the API --------------------------------------------------------------------------------


def test_a_missing_or_wrong_key_gets_401(sim: RunningSimulator) -> None:
    for headers in ({}, {"X-API-Key": "wrong"}, {"X-API-Key": sim.api_key + "x"}):
        for path in ("/cars", "/cars/KA000000001", "/_sim/truth"):
            r = httpx.get(sim.base_url + path, headers=headers)
            assert r.status_code == 401
            assert r.headers["content-type"] == "application/json"
            assert "error" in r.json()


@pytest.mark.parametrize(
    "params",
    [
        {"page": "abc"},
        {"page": "0"},
        {"page": "-1"},
        {"page": "1.5"},
        {"per_page": "0"},
        {"per_page": "1001"},
        {"per_page": "ten"},
        {"updated_since": "yesterday"},
        {"updated_since": "2026-03-11T10:39:30"},  # no offset: not RFC 3339
        {"updated_since": ""},
    ],
)
def test_bad_parameters_get_400(client: httpx.Client, params: dict[str, str]) -> None:
    r = client.get("/cars", params=params)
    assert r.status_code == 400
    assert r.headers["content-type"] == "application/json"
    assert isinstance(r.json()["error"], str)


def test_per_page_bounds_and_meta(client: httpx.Client) -> None:
    one = client.get("/cars", params={"per_page": 1}).json()
    total = one["meta"]["total"]
    assert len(one["data"]) == 1
    assert one["meta"] == {"current_page": 1, "per_page": 1, "last_page": total, "total": total}
    big = client.get("/cars", params={"per_page": 1000, "page": 2}).json()
    assert len(big["data"]) == 1000
    assert big["meta"] == {
        "current_page": 2,
        "per_page": 1000,
        "last_page": math.ceil(total / 1000),
        "total": total,
    }
    default = client.get("/cars").json()
    assert len(default["data"]) == 100
    assert default["meta"]["per_page"] == 100
    assert default["meta"]["current_page"] == 1


def test_a_page_past_the_last_is_empty(client: httpx.Client) -> None:
    meta = client.get("/cars", params={"per_page": 700}).json()["meta"]
    past = client.get("/cars", params={"per_page": 700, "page": meta["last_page"] + 1}).json()
    assert past["data"] == []
    assert past["meta"]["total"] == meta["total"]


def test_pages_cover_every_listing_once_newest_first_and_match_truth(
    sim: RunningSimulator, client: httpx.Client
) -> None:
    truth = sim.control.truth()
    items = all_pages(client, per_page=300)
    assert len(items) == len(truth["cars"]) + len(truth["rejected"])

    rows, rejected, order = [], [], []
    for item in items:
        field, cid, row = reference(item)
        if row is not None:
            rows.append(row)
        else:
            rejected.append({"id": cid, "field": field, "raw": item})
        if cid is not None and isinstance(item, dict) and "created_at" in item:
            order.append((item["created_at"], cid))
    assert len({r["id"] for r in rows}) == len(rows)  # no listing twice
    assert sorted(map(canon, rows)) == sorted(map(canon, truth["cars"]))
    assert sorted(map(canon, rejected)) == sorted(map(canon, truth["rejected"]))
    assert order == sorted(order, reverse=True)  # newest listing first
    assert order[0][1] == f"KA{CARS - 1:09d}"


def test_served_records_are_messy_and_broken_in_every_way(client: httpx.Client) -> None:
    items = all_pages(client, per_page=1000)
    objects = [i for i in items if isinstance(i, dict)]
    makers = {(i.get("manufacturer") or {}).get("name") for i in objects}
    assert {
        "VW",
        "SsangYong",
        "Mercedes Benz",
        "MERCEDES-BENZ",
        "Mini",
        "  Renault   Korea ",
    } <= makers
    assert {"Lynk & Co", "  Lynk  &  Co ", None} <= makers
    fuels = {i.get("fuel", "<missing>") for i in objects}
    assert {"Gasoline", "Petrol", "DIESEL", "EV", "PHEV", " lpg ", "Hydrogen", "<missing>"} <= fuels
    assert {type(i.get("year")) for i in objects} >= {int, str, float}
    assert any(i.get("mileage", {}).get("unit") == "mi" for i in objects)
    assert any(i["price"]["currency"].islower() for i in objects)
    assert any(isinstance(i.get("id"), str) and i["id"] != i["id"].strip() for i in objects)
    for key in ("generation", "vin", "transmission", "body_type", "color", "engine_cc", "location"):
        assert any(i.get(key) is None for i in objects), key

    fields = {reference(i)[0] for i in items}
    assert fields == {"ok", "id", "year", "price", "mileage", "record"}
    assert {type(i) for i in items} == {dict, str, int, type(None), list}
    years = {i.get("year", "<missing>") for i in objects if reference(i)[0] == "year"}
    assert {"nineteen-ninety", 1890, 2999, "<missing>"} <= years
    assert any(isinstance(y, float) and not y.is_integer() for y in years)


def test_updated_since_filters_and_orders(sim: RunningSimulator, client: httpx.Client) -> None:
    cars = sim.control.truth()["cars"]
    stamps = sorted(c["source_updated_at"] for c in cars)
    since = stamps[len(stamps) // 2]
    items = all_pages(client, per_page=200, updated_since=since)
    valid = [row for _, _, row in map(reference, items) if row is not None]
    assert {r["id"] for r in valid} == {c["id"] for c in cars if c["source_updated_at"] > since}
    keys = [(i["updated_at"], cid) for i in items if (cid := clean_id(i))]
    assert all(k[0] > since for k in keys)
    assert keys == sorted(keys)
    # The same moment written with an offset and with a fraction selects the same listings.
    kst = datetime.fromisoformat(since).astimezone(timezone(timedelta(hours=9))).isoformat()
    for other in (kst, since.replace("Z", ".250Z")):
        meta = client.get("/cars", params={"updated_since": other}).json()["meta"]
        assert meta["total"] == len(items)


def test_manufacturer_filter_is_case_insensitive(
    sim: RunningSimulator, client: httpx.Client
) -> None:
    cars = sim.control.truth()["cars"]
    for name, canonical in (("mercedes-benz", "Mercedes-Benz"), ("LYNK & CO", "Lynk & Co")):
        items = all_pages(client, manufacturer=name)
        expected = {c["id"] for c in cars if c["manufacturer"] == canonical}
        assert expected
        rows = [row for _, _, row in map(reference, items) if row]
        assert {row["id"] for row in rows} == expected
        assert {row["manufacturer"] for row in rows} == {canonical}
    nothing = client.get("/cars", params={"manufacturer": "Trabant"}).json()
    assert nothing == {
        "data": [],
        "meta": {"current_page": 1, "per_page": 100, "last_page": 1, "total": 0},
    }


def test_one_car_by_id(client: httpx.Client) -> None:
    listed = client.get("/cars", params={"page": 2}).json()["data"]
    car = next(
        i
        for i in listed
        if isinstance(i, dict) and isinstance(i.get("id"), str) and i["id"].strip()
    )
    r = client.get(f"/cars/{car['id'].strip()}")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert r.json() == car
    for missing in ("KA999999999", "nonsense", f"KA{CARS + 10_000:09d}"):
        r = client.get(f"/cars/{missing}")
        assert r.status_code == 404
        assert "error" in r.json()


def test_mutate_changes_exactly_what_it_says(sim: RunningSimulator, client: httpx.Client) -> None:
    before = {c["id"]: c for c in sim.control.truth()["cars"]}
    latest = max(c["source_updated_at"] for c in before.values())
    done = sim.control.mutate(update=3, insert=2, delete=2)
    assert [len(done[k]) for k in ("updated", "inserted", "deleted")] == [3, 2, 2]
    truth = sim.control.truth()
    after = {c["id"]: c for c in truth["cars"]}

    assert after.keys() == (before.keys() - set(done["deleted"])) | set(done["inserted"])
    assert set(done["deleted"]) <= set(truth["deleted"])
    for cid in done["updated"]:
        assert after[cid]["source_updated_at"] > latest
        assert after[cid]["mileage_km"] > before[cid]["mileage_km"]
    for cid in done["inserted"]:
        assert after[cid]["source_updated_at"] > latest
    untouched = before.keys() - set(done["updated"]) - set(done["deleted"])
    assert all(before[cid] == after[cid] for cid in untouched)

    newest = client.get("/cars", params={"per_page": 2}).json()["data"]
    assert [c["id"] for c in newest] == sorted(done["inserted"], reverse=True)
    changed = all_pages(client, updated_since=latest)
    assert [c["id"] for c in changed] == sorted(done["updated"]) + sorted(done["inserted"])
    for cid in done["deleted"]:
        assert client.get(f"/cars/{cid}").status_code == 404

    assert sorted(sim.control.undelete(done["deleted"])) == sorted(done["deleted"])
    back = {c["id"]: c for c in sim.control.truth()["cars"]}
    assert all(back[cid] == before[cid] for cid in done["deleted"])
    assert all(client.get(f"/cars/{cid}").status_code == 200 for cid in done["deleted"])
    assert not set(done["deleted"]) & set(sim.control.truth()["deleted"])


def test_fix_at_the_source_makes_broken_records_valid(
    sim: RunningSimulator, client: httpx.Client
) -> None:
    before = sim.control.truth()
    cars = {c["id"]: c for c in before["cars"]}
    latest = max(c["source_updated_at"] for c in cars.values())
    fixable = {r["id"] for r in before["rejected"] if r["id"] and isinstance(r["raw"], dict)}
    assert len(fixable) > 4

    fixed = sim.control.fix(count=3)
    assert len(fixed) == 3
    assert set(fixed) <= fixable
    assert fixed == sorted(fixed)
    # By id: only live broken listings with a usable id, not yet fixed, are fixed.
    pick = min(fixable - set(fixed))
    others = [fixed[0], next(iter(cars)), "nonsense", f"KA{CARS + 10_000:09d}"]
    assert sim.control.fix(ids=[f" {pick} ", *others]) == [pick]
    assert sim.control.fix() == []
    for bad in ({"count": -1}, {"count": "3"}, {"ids": "KA000000001"}):
        assert client.post("/_sim/fix", json=bad).status_code == 400
    fixed.append(pick)

    truth = sim.control.truth()
    after = {c["id"]: c for c in truth["cars"]}
    assert after.keys() == cars.keys() | set(fixed)
    assert all(after[cid] == cars[cid] for cid in cars)
    still = [canon(r) for r in before["rejected"] if r["id"] not in fixed]
    assert sorted(map(canon, truth["rejected"])) == sorted(still)
    for cid in fixed:
        r = client.get(f"/cars/{cid}")
        assert r.status_code == 200
        assert reference(r.json()) == ("ok", cid, after[cid])
        assert after[cid]["source_updated_at"] > latest

    changed = all_pages(client, updated_since=latest)
    assert [clean_id(i) for i in changed] == fixed  # two fixes, so (updated_at, id) order
    assert [reference(i)[2] for i in changed] == [after[cid] for cid in fixed]


def test_fix_is_deterministic_and_runs_out() -> None:
    one, two = Store(2000, 7, 0.05), Store(2000, 7, 0.05)
    first = one.fix(5)
    assert first == two.fix(5)
    assert len(first) == 5
    rest = one.fix(10**6)
    assert rest
    assert not set(rest) & set(first)
    assert one.fix(1) == []
    fixed = set(first + rest)
    for i in range(one.total):
        ok, row = one.truth(i)
        assert ok or row["id"] is None  # only the broken kinds without a usable id are left
        assert ok or row["id"] not in fixed


def test_drift_shifts_pages(sim: RunningSimulator, client: httpx.Client, faults: Any) -> None:
    faults(drift_inserts=5, drift_deletes=5)
    sim.control.reset_stats()
    first = client.get("/cars", params={"per_page": 20}).json()
    second = client.get("/cars", params={"per_page": 20, "page": 2}).json()
    again = client.get("/cars", params={"per_page": 20}).json()
    assert {canon(i) for i in first["data"]} & {canon(i) for i in second["data"]}  # pushed down
    seen = [cid for i in first["data"] if (cid := clean_id(i))]
    newer = [clean_id(i) for i in again["data"][:10]]  # two list calls later: ten new listings
    assert all(cid and cid > max(seen) for cid in newer)
    assert first["meta"]["total"] == second["meta"]["total"] == again["meta"]["total"]
    assert sim.control.stats()["list_pages"] == {"1": 2, "2": 1}


# ---- faults ---------------------------------------------------------------------------------


def test_error_rate_gives_5xx(sim: RunningSimulator, client: httpx.Client, faults: Any) -> None:
    faults(error_rate=1.0)
    statuses = {client.get("/cars").status_code for _ in range(40)}
    assert statuses <= {500, 502, 503, 504}
    assert len(statuses) > 1
    assert client.get("/cars/KA000000001").status_code >= 500
    assert sim.control.stats()["requests"] > 0  # control endpoints are never faulted


def test_overload_gives_429_with_retry_after(client: httpx.Client, faults: Any) -> None:
    faults(overload_429=1.0)
    r = client.get("/cars")
    assert r.status_code == 429
    assert int(r.headers["retry-after"]) >= 1
    assert "error" in r.json()


def test_truncated_body_is_not_json(client: httpx.Client, faults: Any) -> None:
    faults(truncate_rate=1.0)
    r = client.get("/cars")  # the response itself ends properly
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert r.content.startswith(b'{"data":[')
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(r.content)


def test_html_maintenance_page(client: httpx.Client, faults: Any) -> None:
    faults(html_rate=1.0)
    r = client.get("/cars")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert b"maintenance" in r.content


def test_hang_outlasts_a_client_timeout(client: httpx.Client, faults: Any) -> None:
    faults(hang_rate=1.0, hang_seconds=5)
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        client.get("/cars", timeout=0.3)
    assert time.monotonic() - started < 2


def test_latency_is_added(client: httpx.Client, faults: Any) -> None:
    faults(latency_ms=200)
    started = time.monotonic()
    assert client.get("/cars", params={"per_page": 1}).status_code == 200
    assert time.monotonic() - started >= 0.1


def test_rate_limit_admits_about_the_rate_after_the_burst(
    sim: RunningSimulator, client: httpx.Client, faults: Any
) -> None:
    faults(rate_limit=20, burst=5)
    started = time.monotonic()
    admitted, limited = 0, []
    while time.monotonic() - started < 1.0:
        r = client.get("/cars", params={"per_page": 1})
        if r.status_code == 200:
            admitted += 1
        else:
            assert r.status_code == 429
            limited.append(int(r.headers["retry-after"]))
    elapsed = time.monotonic() - started
    assert 5 + 20 * elapsed - 3 <= admitted <= 5 + 20 * elapsed + 2
    assert limited
    assert min(limited) >= 1


# ---- determinism, launcher, command line ------------------------------------------------------


def test_same_seed_serves_the_same_bytes() -> None:
    def fetch(sim: RunningSimulator, path: str) -> bytes:
        return httpx.get(sim.base_url + path, headers={"X-API-Key": sim.api_key}).content

    with (
        start_simulator(cars=500, seed=3) as one,
        start_simulator(cars=500, seed=3) as two,
        start_simulator(cars=500, seed=4) as other,
    ):
        for path in ("/cars?page=2", "/cars/KA000000042", "/cars?updated_since=2025-01-01T00:00Z"):
            assert fetch(one, path) == fetch(two, path)
            assert fetch(one, path) != fetch(other, path)
        assert fetch(one, "/_sim/truth") == fetch(two, "/_sim/truth")


def test_the_simulator_dies_with_its_parent(tmp_path: Any) -> None:
    script = (
        "from carsync_dagster.simulator.process import start_simulator\n"
        "sim = start_simulator(cars=10)\n"
        "print(sim.process.pid, flush=True)\n"
        "import time; time.sleep(60)\n"
    )
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE) as parent:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        parent.kill()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:  # gone, or a zombie that nobody reaped yet
            with open(f"/proc/{child}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return
        except FileNotFoundError:
            return
        time.sleep(0.05)
    os.kill(child, signal.SIGKILL)
    pytest.fail("the simulator outlived its parent")


def test_a_failed_start_reports_the_childs_error() -> None:
    with pytest.raises(RuntimeError, match="--cars"):
        start_simulator(cars=-1)


def test_main_rejects_bad_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--broken-rate", "2"]) == 2
    assert "--broken-rate" in capsys.readouterr().err
