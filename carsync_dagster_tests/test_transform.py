"""Tests of carsync_dagster.transform: normalisation, rejection and the data hash."""

import copy
import datetime as dt
import hashlib
import json
import random
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import polars as pl
import pytest

from carsync_dagster.source.client import check_page, page_records, parse_json
from carsync_dagster.source.errors import RetryableApiError
from carsync_dagster.transform import (
    CARS_COLUMNS,
    CARS_SCHEMA,
    REJECTED_COLUMNS,
    Batch,
    data_hash_of,
    normalise,
)
from carsync_dagster.transform.rejects import quote

# The repository's own copy of the contract (docs/contract/), so a clone needs nothing beside it.
EXAMPLES_PATH = Path(__file__).resolve().parents[1] / "docs/contract/normalisation-examples.json"
EXAMPLES: list[dict[str, Any]] = json.loads(EXAMPLES_PATH.read_text())["examples"]
THIS_YEARS = (2026, 2060)  # the examples hold for any sync year from 2026 to 2060
YEAR = 2026

Record = dict[str, Any]


def clean_record() -> Record:
    return copy.deepcopy(EXAMPLES[0]["input"])


def only_car(record: object, this_year: int = YEAR) -> dict[str, Any]:
    batch = normalise([record], this_year=this_year)
    assert batch.rejected.is_empty(), batch.rejected.to_dicts()
    assert batch.cars.height == 1
    return batch.cars.row(0, named=True)


def only_reason(record: object, this_year: int = YEAR) -> str:
    batch = normalise([record], this_year=this_year)
    assert batch.cars.is_empty()
    assert batch.rejected.height == 1
    reason: str = batch.rejected["reason"][0]
    return reason


def rfc3339(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


def price_text(amount: object) -> object:
    return repr(amount) if isinstance(amount, int | float) else amount


# --- the contract's examples ------------------------------------------------------------------


@pytest.mark.parametrize("this_year", THIS_YEARS)
@pytest.mark.parametrize("example", EXAMPLES, ids=[example["note"] for example in EXAMPLES])
def test_contract_example(example: dict[str, Any], this_year: int) -> None:
    if "reject" in example:
        assert only_reason(example["input"], this_year).startswith(example["reject"] + ":")
        return
    car = only_car(example["input"], this_year)
    car["source_updated_at"] = rfc3339(car["source_updated_at"])
    expected = dict(example["expect"], price=price_text(example["expect"]["price"]))
    assert {column: car[column] for column in expected} == expected


def test_frames_have_the_public_columns_and_dtypes() -> None:
    batch = normalise([example["input"] for example in EXAMPLES], this_year=YEAR)
    assert tuple(CARS_SCHEMA) == CARS_COLUMNS
    assert batch.cars.schema == pl.Schema(CARS_SCHEMA)
    assert batch.rejected.columns == list(REJECTED_COLUMNS)
    assert set(batch.rejected.schema.dtypes()) == {pl.String()}


def test_empty_page_gives_empty_frames_with_the_schema() -> None:
    batch = normalise([], this_year=YEAR)
    assert batch.cars.is_empty() and batch.rejected.is_empty()
    assert batch.cars.schema == pl.Schema(CARS_SCHEMA)
    assert batch.rejected.columns == list(REJECTED_COLUMNS)


def test_clean_record_keeps_every_other_field() -> None:
    car = only_car(clean_record())
    assert car == {
        **car,
        "lot_number": "47556665",
        "vin": "TH0X5M5H6NB6WGLRB",
        "generation": "Gen 5",
        "transmission": "automatic",
        "body_type": "SUV",
        "color": "Pearl",
        "engine_cc": 2999,
        "location": "Busan",
        "images": '["https://img.example/KA001000040/0.jpg"]',
        "source_created_at": dt.datetime(2026, 3, 11, 10, 39, 30, tzinfo=dt.UTC),
    }


# --- field rules ------------------------------------------------------------------------------


def with_changes(**changes: object) -> Record:
    record = clean_record()
    record.update(changes)
    return record


@pytest.mark.parametrize(
    ("year", "this_year", "stored"),
    [
        (2027, 2026, 2027),
        (1950, 2026, 1950),
        (" 2019 ", 2026, 2019),
        ("+2019", 2026, 2019),
        ("0002019", 2026, 2019),
        (2019.0, 2026, 2019),
    ],
)
def test_year_accepted(year: object, this_year: int, stored: int) -> None:
    assert only_car(with_changes(year=year), this_year)["year"] == stored


@pytest.mark.parametrize(
    "year",
    [
        2028,
        1949,
        True,
        None,
        "2019.0",
        "\uff12\uff10\uff11\uff19",  # 2019 in full-width digits
        2019.5,
        float("nan"),
        10**30,
        "9" * 5000,
        [2019],
    ],
)
def test_year_rejected(year: object) -> None:
    assert only_reason(with_changes(year=year)).startswith("year:")


def test_year_reasons_quote_the_value() -> None:
    assert only_reason(with_changes(year="nineteen-ninety")) == (
        "year: 'nineteen-ninety' is not an integer"
    )
    assert only_reason(with_changes(year=2028)) == "year: 2028 is outside 1950..2027"
    assert only_reason(with_changes(year=None)) == "year: null is not an integer"
    long_reason = only_reason(with_changes(year="x" * 500 + "\n"))
    assert long_reason == f"year: '{'x' * 76}... is not an integer"


@pytest.mark.parametrize(
    ("mileage", "km"),
    [
        ({"value": 1000, "unit": "mi"}, 1609),
        ({"value": 1, "unit": "mi"}, 2),
        ({"value": 976.5625, "unit": "mi"}, 1572),  # exactly 1571.5 km: half away from zero
        ({"value": 0.3107, "unit": "mi"}, 1),  # 0.50002 km
        ({"value": 0.5, "unit": "km"}, 1),
        ({"value": 2.5, "unit": "km"}, 3),
        ({"value": 0, "unit": "km"}, 0),
        ({"value": 1334384474, "unit": "mi"}, 2147483647),
        ({"value": 2147483647, "unit": "km"}, 2147483647),
        ({"value": 100, "unit": " KM "}, 100),  # the unit is cleaned and case-insensitive
        ({"value": 100, "unit": "Mi"}, 161),
    ],
)
def test_mileage_in_km(mileage: object, km: int) -> None:
    assert only_car(with_changes(mileage=mileage))["mileage_km"] == km


@pytest.mark.parametrize(
    "mileage",
    [
        {"value": "100", "unit": "km"},
        {"value": True, "unit": "km"},
        {"value": None, "unit": "km"},
        {"unit": "km"},
        {"value": -1, "unit": "km"},
        {"value": -0.5, "unit": "km"},
        {"value": float("inf"), "unit": "km"},
        {"value": float("nan"), "unit": "mi"},
        {"value": 2147483648, "unit": "km"},  # beyond the integer column
        {"value": 1334384475, "unit": "mi"},  # 2147483649 km
        {"value": 10**30, "unit": "km"},
        {"value": 1e300, "unit": "mi"},
        None,
        "96743 km",
    ],
)
def test_mileage_value_rejected(mileage: object) -> None:
    assert only_reason(with_changes(mileage=mileage)).startswith("mileage: value")


@pytest.mark.parametrize("unit", ["furlong", None, "", "k m", 1])
def test_mileage_unit_rejected(unit: object) -> None:
    assert only_reason(with_changes(mileage={"value": 1, "unit": unit})).startswith("mileage: unit")


@pytest.mark.parametrize(
    ("amount", "stored"),
    [
        (65500000, "65500000"),
        (0, "0"),
        (15000.5, "15000.5"),
        (1e20, "1e+20"),
        (10**30, str(10**30)),
    ],
)
def test_price_as_given(amount: object, stored: str) -> None:
    assert only_car(with_changes(price={"amount": amount, "currency": " krw "}))["price"] == stored


@pytest.mark.parametrize("amount", [-5, -0.01, "65500000", True, None, float("nan"), [1]])
def test_price_rejected(amount: object) -> None:
    assert only_reason(with_changes(price={"amount": amount, "currency": "KRW"})).startswith(
        "price: amount"
    )


@pytest.mark.parametrize("price", [None, 65500000, "free"])
def test_price_not_an_object_rejected(price: object) -> None:
    assert only_reason(with_changes(price=price)) == "price: amount missing"


@pytest.mark.parametrize(
    ("record", "field"),
    [
        (with_changes(id="", year="x", price=None), "id"),
        (with_changes(year="x", mileage=None, price=None), "year"),
        (with_changes(mileage={"value": -1, "unit": "furlong"}, price=None), "mileage"),
        (with_changes(mileage={"value": 1, "unit": "furlong"}, price=None), "price"),
    ],
)
def test_reason_names_the_first_failed_rule(record: Record, field: str) -> None:
    assert only_reason(record).startswith(field + ":")


@pytest.mark.parametrize(
    ("car_id", "stored"), [("  KA 1\t2 ", "KA 1 2"), (123, "123"), (1.5, "1.5")]
)
def test_id_cleaned(car_id: object, stored: str) -> None:
    assert only_car(with_changes(id=car_id))["id"] == stored


@pytest.mark.parametrize("car_id", [None, True, {"id": 1}, "\u3000\n", float("nan")])
def test_id_rejected(car_id: object) -> None:
    assert only_reason(with_changes(id=car_id)).startswith("id:")


@pytest.mark.parametrize(
    ("fuel", "stored"),
    [
        ("Plug-in HYBRID", "hybrid"),
        ("hev", "hybrid"),
        (" Petrol ", "gasoline"),
        ("BEV", "electric"),
        ("Electric", "electric"),
        ("Diesel Turbo", "other"),
        ("", "other"),
        (None, "other"),
        (7, "other"),
    ],
)
def test_fuel(fuel: object, stored: str) -> None:
    assert only_car(with_changes(fuel=fuel))["fuel"] == stored


@pytest.mark.parametrize(
    ("maker", "stored"),
    [
        ({"name": "mercedes - benz"}, "Mercedes-Benz"),
        ({"name": "land-rover"}, "Land Rover"),
        ({"name": "KG-MOBILITY"}, "KG Mobility"),
        ({"name": "vw"}, "Volkswagen"),
        ({"name": "bmw"}, "BMW"),
        ({"name": " \t "}, None),
        ({"id": 6}, None),
        ("Audi", None),  # not an object
        ({"name": 42}, "42"),
    ],
)
def test_manufacturer(maker: object, stored: str | None) -> None:
    assert only_car(with_changes(manufacturer=maker))["manufacturer"] == stored


def test_other_fields_are_cleaned() -> None:
    car = only_car(
        with_changes(
            lot_number=47556665,
            vin=True,
            generation={"name": "  Gen\n5 "},
            model=None,
            transmission=["automatic"],
            color="",
            engine_cc="2999",
            status=" Reserved ",
            location=" Busan\x00 ",
            images=["  a  b ", "", None, 3, "c"],
            created_at="2026-03-11t19:39:30.123456789+09:00",
            updated_at="2026-03-11 10:39:30Z",
        )
    )
    assert {key: car[key] for key in ("lot_number", "vin", "generation", "model")} == {
        "lot_number": "47556665",
        "vin": None,
        "generation": "Gen 5",
        "model": None,
    }
    assert car["transmission"] is None and car["color"] is None
    assert car["engine_cc"] == 2999 and car["status"] == "reserved"
    assert car["location"] == "Busan\ufffd"  # text cannot hold NUL
    assert car["images"] == '["a b","c"]'
    assert car["source_created_at"] == dt.datetime(2026, 3, 11, 10, 39, 30, 123456, tzinfo=dt.UTC)
    assert car["source_updated_at"] is None  # not RFC 3339; never a rejection


@pytest.mark.parametrize(
    ("images", "stored"),
    [
        ([], "[]"),
        ("https://x/0.jpg", None),
        (None, None),
        ([{"url": "x"}], "[]"),
        (['q"\\'], '["q\\"\\\\"]'),
    ],
)
def test_images(images: object, stored: str | None) -> None:
    assert only_car(with_changes(images=images))["images"] == stored


@pytest.mark.parametrize("engine_cc", [2999.5, "2.9L", True, None])
def test_engine_cc_that_is_not_an_integer_is_null(engine_cc: object) -> None:
    assert only_car(with_changes(engine_cc=engine_cc))["engine_cc"] is None


@pytest.mark.parametrize("engine_cc", [2**31, 10**30, -(2**31) - 1, "2147483648"])
def test_engine_cc_beyond_the_integer_column_is_rejected(engine_cc: object) -> None:
    """Never null (lost) nor wrapped: the record waits in cars_rejected."""
    assert only_reason(with_changes(engine_cc=engine_cc)) == (
        f"engine_cc: {engine_cc!r} is outside the integer range"
    )


@pytest.mark.parametrize(
    ("text", "utc"),
    [
        ("2026-03-11T10:39:30+09:00", dt.datetime(2026, 3, 11, 1, 39, 30, tzinfo=dt.UTC)),
        ("2026-03-11T10:39:30.5-05:30", dt.datetime(2026, 3, 11, 16, 9, 30, 500000, tzinfo=dt.UTC)),
        ("2026-03-11T10:39:30z", dt.datetime(2026, 3, 11, 10, 39, 30, tzinfo=dt.UTC)),
        ("2026-03-11T10:39:30", None),
        ("2026-02-30T10:39:30Z", None),
        ("2026-3-11T10:39:30Z", None),
        ("yesterday", None),
        (1773225570, None),
    ],
)
def test_updated_at(text: object, utc: dt.datetime | None) -> None:
    assert only_car(with_changes(updated_at=text))["source_updated_at"] == utc


# --- the data hash ----------------------------------------------------------------------------


def test_data_hash_known_answers() -> None:
    # Hard-coded so that an upgrade of polars or polars-hash that changes them is caught: every
    # stored car would otherwise look changed and be rewritten once.
    sparse = {"id": "X1", "year": 2000, "mileage": {"value": 1, "unit": "mi"}}
    sparse["price"] = {"amount": 0.5}
    unusual = with_changes(model={"name": "Café 한국"}, images=[], engine_cc=None, vin="")
    cars = normalise([clean_record(), sparse, unusual], this_year=YEAR).cars
    assert cars["data_hash"].to_list() == [
        "68de8f81a07406ba86a208cc82dfcf5260e6c490663e933fd4738db1e6d78834",
        "2e7d5f59c7c45f64ef689437aeaaf5802077269a53e313b31f88a221255cbbb5",
        "75c6ce0241320558b1377dc42e2e9756d75a47a9803f66f3e26c07f0a477975c",
    ]


def test_data_hash_of_is_the_stored_hash() -> None:
    cars = normalise([example["input"] for example in EXAMPLES], this_year=YEAR).cars
    assert data_hash_of(cars.drop("data_hash")).to_list() == cars["data_hash"].to_list()


def change(path: str, value: object) -> Callable[[Record], None]:
    def apply(record: Record) -> None:
        *outer, last = path.split(".")
        target = record
        for key in outer:
            target = target[key]
        target[last] = value

    return apply


ONE_FIELD_CHANGES: dict[str, Callable[[Record], None]] = {
    "id": change("id", "KA001000041"),
    "manufacturer": change("manufacturer.name", "BMW"),
    "model": change("model.name", "Q5"),
    "year": change("year", 2020),
    "mileage_km": change("mileage.value", 96744),
    "price": change("price.amount", 65500000.5),
    "currency": change("price.currency", "USD"),
    "fuel": change("fuel", "Diesel"),
    "status": change("status", "reserved"),
    "source_updated_at": change("updated_at", "2026-03-11T10:39:30.000001Z"),
    "lot_number": change("lot_number", None),
    "vin": change("vin", "TH0X5M5H6NB6WGLR"),
    "generation": change("generation.name", "Gen 6"),
    "transmission": change("transmission", "manual"),
    "body_type": change("body_type", "Sedan"),
    "color": change("color", "pearl"),
    "engine_cc": change("engine_cc", 3000),
    "location": change("location", "Seoul"),
    "images": change("images", ["https://img.example/KA001000040/0.jpg"] * 2),
    "source_created_at": change("created_at", None),
}


def test_every_stored_source_field_has_a_change() -> None:
    assert set(ONE_FIELD_CHANGES) == set(CARS_COLUMNS) - {"data_hash"}


@pytest.mark.parametrize("column", ONE_FIELD_CHANGES)
def test_changing_one_stored_field_changes_the_hash(column: str) -> None:
    record = clean_record()
    ONE_FIELD_CHANGES[column](record)
    before, after = normalise([clean_record(), record], this_year=YEAR).cars.to_dicts()
    assert {key for key in before if before[key] != after[key]} == {column, "data_hash"}


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ({"lot_number": "12", "vin": "3X"}, {"lot_number": "123", "vin": "X"}),
        ({"vin": None}, {"vin": "None"}),
        ({"vin": None, "color": "x"}, {"vin": "x", "color": None}),
        ({"images": None}, {"images": []}),
    ],
)
def test_hash_keeps_neighbouring_values_apart(first: Record, second: Record) -> None:
    cars = normalise([with_changes(**first), with_changes(**second)], this_year=YEAR).cars
    assert cars["data_hash"][0] != cars["data_hash"][1]


def reversed_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: reversed_keys(value[key]) for key in reversed(value)}
    return value


def test_hash_is_stable_across_calls_and_key_order() -> None:
    first = normalise([clean_record()], this_year=YEAR).cars
    again = normalise([clean_record()], this_year=2060).cars
    reordered = normalise([reversed_keys(clean_record())], this_year=YEAR).cars
    assert list(reversed_keys(clean_record())) != list(clean_record())
    assert first["data_hash"][0] == again["data_hash"][0] == reordered["data_hash"][0]
    # Spelling that cleans to the same stored values is no change either.
    respelled = with_changes(manufacturer={"id": 1, "name": " AUDI "}, fuel="gasoline")
    assert normalise([respelled], this_year=YEAR).cars.equals(first)


# --- rejected records -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("item", "kind"),
    [
        ("KA001000040", "a string"),
        (7, "a number"),
        (7.5, "a number"),
        (True, "a boolean"),
        (None, "null"),
        ([{"id": "KA001000040"}], "an array"),
    ],
)
def test_non_object_items_are_rejected(item: object, kind: str) -> None:
    batch = normalise([item, clean_record()], this_year=YEAR)
    assert batch.cars.height == 1
    rejected = batch.rejected.row(0, named=True)
    assert rejected["id"] is None
    assert (
        rejected["reason"].startswith("record:")
        and f"is {kind}, not an object" in rejected["reason"]
    )
    assert orjson.loads(rejected["raw"]) == item


def test_rejected_row_holds_id_raw_and_hash() -> None:
    record = with_changes(id=" KA9 ", year="nineteen-ninety")
    rejected = normalise([record], this_year=YEAR).rejected.row(0, named=True)
    canonical = orjson.dumps(record, option=orjson.OPT_SORT_KEYS)
    assert rejected == {
        "id": "KA9",
        "raw_hash": hashlib.sha256(canonical).hexdigest(),
        "reason": "year: 'nineteen-ninety' is not an integer",
        "raw": canonical.decode(),
        "raw_bytes": None,  # only for a record whose bytes are not UTF-8
    }


def test_a_record_whose_bytes_are_not_utf8_is_quarantined_with_them() -> None:
    """The landing hands such a record over as its bytes (source.client.page_records)."""
    raw = b'{"id": "KA7", "color": "Bl\xffue", "year": 2020}'
    valid = with_changes(id="KA8")
    batch = normalise([raw, valid], this_year=YEAR)
    assert batch.cars.get_column("id").to_list() == ["KA8"], "the rest of the page is kept"
    rejected = batch.rejected.row(0, named=True)
    assert rejected["id"] == "KA7"
    assert rejected["reason"] == "record: not valid UTF-8 (byte 0xff at offset 26)"
    assert orjson.loads(rejected["raw"]) == {"id": "KA7", "color": "Bl\ufffdue", "year": 2020}
    assert bytes.fromhex(rejected["raw_bytes"].removeprefix("\\x")) == raw
    assert rejected["raw_hash"] == hashlib.sha256(raw).hexdigest()


def test_nul_characters_become_replacement_characters_in_raw() -> None:
    record = with_changes(year="19\x0090", **{"ke\x00y": ["a\x00", {"\x00": "\x00"}]})
    rejected = normalise([record], this_year=YEAR).rejected.row(0, named=True)
    assert "\x00" not in rejected["raw"] and "\\u0000" not in rejected["raw"]
    raw = orjson.loads(rejected["raw"])
    assert raw["year"] == "19\ufffd90"
    assert raw["ke\ufffdy"] == ["a\ufffd", {"\ufffd": "\ufffd"}]
    assert rejected["reason"] == "year: '19\\x0090' is not an integer"


def test_big_ints_and_non_finite_floats_do_not_crash() -> None:
    records = [
        with_changes(id="big-year", year=10**30),
        with_changes(id="nan-year", year=float("nan")),
        with_changes(id="big-mileage", mileage={"value": -(10**40), "unit": "km"}),
        with_changes(id="inf-price", price={"amount": float("inf"), "currency": "KRW"}),
        with_changes(id="ok", lot_number=10**25, engine_cc=2**31 - 1, extra=[10**50, float("nan")]),
        with_changes(id="", extra=[10**50, float("-inf")]),
    ]
    batch = normalise(records, this_year=YEAR)
    assert batch.cars["id"].to_list() == ["ok"]
    assert batch.cars["lot_number"][0] == str(10**25)
    reasons = dict(zip(batch.rejected["id"], batch.rejected["reason"], strict=True))
    assert reasons == {
        "big-year": f"year: {10**30} is outside 1950..2027",
        "nan-year": "year: nan is not an integer",
        "big-mileage": f"mileage: value {-(10**40)} is negative",
        "inf-price": "price: amount inf is not a number",
        None: "id: '' is empty",
    }
    no_id = batch.rejected.filter(pl.col("id").is_null()).row(0, named=True)
    assert json.loads(no_id["raw"])["extra"] == [10**50, "-Infinity"]
    assert no_id["raw_hash"] == hashlib.sha256(no_id["raw"].encode()).hexdigest()


def test_lone_surrogates_from_the_stdlib_parser_do_not_crash() -> None:
    record = json.loads(
        json.dumps(with_changes(model={"name": "\ud800x"}, images=["\udfff"], id="\ud800"))
    )
    assert only_car(record)["model"] == "\ufffdx"
    bad = json.loads(json.dumps(with_changes(year="\ud800", id="\ud800")))
    rejected = normalise([bad], this_year=YEAR).rejected.row(0, named=True)
    assert rejected["id"] == "\ufffd" and orjson.loads(rejected["raw"])["year"] == "\ufffd"


def nested_lists(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("depth", [300, 5000])
def test_deeply_nested_values_do_not_crash(depth: int) -> None:
    records = [with_changes(year="x", extra=nested_lists(depth)), nested_lists(depth)]
    records.append(with_changes(images=nested_lists(depth), lot_number=nested_lists(depth)))
    batch = normalise(records, this_year=YEAR)
    assert batch.cars.height == 1 and batch.cars["images"][0] == "[]"
    assert [reason.split(":")[0] for reason in batch.rejected["reason"]] == ["year", "record"]


def test_duplicate_bad_records_collapse_and_valid_ones_stay() -> None:
    bad = with_changes(year="nineteen-ninety")
    other_bad = with_changes(year="nineteen-ninety-one")
    records = [bad, copy.deepcopy(bad), reversed_keys(bad), other_bad, "x", "x", None, None]
    records += [clean_record(), clean_record()]
    batch = normalise(records, this_year=YEAR)
    assert batch.cars.height == 2
    assert batch.rejected.height == 4
    assert batch.rejected.select("id", "raw_hash").is_unique().all()


# --- a large mixed batch ----------------------------------------------------------------------

BREAKAGES: list[Callable[[Record, random.Random], None]] = [
    lambda r, rng: r.update(year=rng.choice(["19x0", 1800, 2019.5, None, True, 10**20])),
    lambda r, rng: r.update(mileage=rng.choice([None, {"value": "lots"}, {"value": -1}])),
    lambda r, rng: r.update(mileage={"value": 5, "unit": rng.choice(["furlong", None])}),
    lambda r, rng: r.update(price={"amount": rng.choice([-5, None, "5", float("nan")])}),
    lambda r, rng: r.update(id=rng.choice(["", "  ", None, [1]])),
    lambda r, rng: r.pop(rng.choice(["id", "year", "price", "mileage"])),
    lambda r, rng: r.update(engine_cc=10**30),
]
ODDITIES: list[Callable[[Record, random.Random], None]] = [
    lambda r, rng: r.update(lot_number=rng.choice([123, 1.5, None, True, {"a": 1}])),
    lambda r, rng: r.update(images=rng.choice([None, "x", [1, " a "], [], [" b\x00 "]])),
    lambda r, rng: r.update(engine_cc=rng.choice(["2999", 2999.0, 2999.5, None, 2**31 - 1])),
    lambda r, rng: r.update(mileage={"value": rng.random() * 1000, "unit": "mi"}),
    lambda r, rng: r.update(price={"amount": rng.random() * 1000, "currency": None}),
    lambda r, rng: r.update(year=str(rng.randrange(1950, 2027))),
    lambda r, rng: r.update(manufacturer=rng.choice([None, {"name": " bmw "}, "VW"])),
    lambda r, rng: r.update(updated_at=rng.choice([None, "junk", "2026-01-01T00:00:00+14:00"])),
]


def mixed_records(count: int, seed: int = 7) -> list[object]:
    rng = random.Random(seed)
    records: list[object] = []
    for index in range(count):
        if index % 97 == 0:
            item = rng.choice([f"item-{index}", index, [index], index + 0.5])
            records.append(None if index == 0 else item)
            continue
        record = with_changes(id=f"KA{index:09d}", year=rng.randrange(1990, 2027))
        record["mileage"] = {"value": rng.randrange(300_000), "unit": rng.choice(["km", "mi"])}
        for oddity in rng.sample(ODDITIES, rng.randrange(3)):
            oddity(record, rng)
        if rng.random() < 0.1:
            rng.choice(BREAKAGES)(record, rng)
            record["serial"] = index  # keeps broken records distinct
        records.append(record)
    return records


def test_large_mixed_batch_keeps_every_record() -> None:
    records = mixed_records(5000)
    assert len({json.dumps(record, sort_keys=True) for record in records}) == len(records)
    batch = normalise(records, this_year=YEAR)
    assert batch.cars.height + batch.rejected.height == len(records)
    assert batch.cars.height > 4000 and batch.rejected.height > 300
    assert batch.cars.schema == pl.Schema(CARS_SCHEMA)
    # A record comes out the same alone (the fast paths) as among odd ones (the slow paths).
    alone = [normalise([record], this_year=YEAR) for record in records[:300]]
    in_batch = normalise(records[:300], this_year=YEAR)
    assert pl.concat([batch.cars for batch in alone]).equals(in_batch.cars)
    assert (
        pl.concat([batch.rejected for batch in alone])
        .sort("raw")
        .equals(in_batch.rejected.sort("raw"))
    )
    reasons = r"^(record|id|year|mileage|price|engine_cc): "
    assert batch.rejected["reason"].str.contains(reasons).all()


def test_batch_is_frozen() -> None:
    batch = normalise([], this_year=YEAR)
    with pytest.raises(AttributeError):
        batch.cars = pl.DataFrame()  # type: ignore[misc]
    assert isinstance(batch, Batch)


# --- pathological values, parsed from JSON text as the landing hands them over -----------------

BIG = 2**70  # 1180591620717411303424: beyond 64 bits, and not a double


def page_text(*records: bytes) -> bytes:
    return b'{"data":[' + b",".join(records) + b'],"meta":{"last_page":1,"total":1}}'


def json_text(record: object) -> bytes:
    return json.dumps(record).encode()


def parsed(*records: object) -> list[Any]:
    """Records through the real parser: JSON text in, what page_records makes of it out."""
    texts = [record if isinstance(record, bytes) else json_text(record) for record in records]
    return page_records(page_text(*texts))


def reasons_by_id(batch: Batch) -> dict[str | None, str]:
    return dict(zip(batch.rejected["id"], batch.rejected["reason"], strict=True))


@pytest.mark.parametrize(
    "value", [2**63 - 1, 2**63, 2**64 - 1, 2**64, BIG, -(2**63) - 1, -BIG, 10**4300 - 1]
)
def test_parse_json_keeps_every_integer_exact(value: int) -> None:
    parsed_value = parse_json(str(value).encode())
    assert type(parsed_value) is int and parsed_value == value


def test_parse_json_keeps_an_integer_of_more_digits_than_int_takes_as_a_decimal() -> None:
    text = "-" + "7" * 5000
    assert parse_json(f"[{text}, NaN, 0.1]".encode())[0] == Decimal(text)


def test_huge_integers_are_stored_exactly_or_rejected() -> None:
    price = {"amount": BIG, "currency": "KRW"}
    batch = normalise(
        parsed(
            with_changes(id="price", price=price),
            with_changes(id="price-2^64", price={"amount": 2**64, "currency": "KRW"}),
            with_changes(id="lot", lot_number=BIG, extra=[2**100, -(2**100)]),
            with_changes(id=BIG),
            with_changes(id="km", mileage={"value": BIG, "unit": "km"}),
            with_changes(id="int32-km", mileage={"value": 2**31, "unit": "km"}),
            with_changes(id="mi", mileage={"value": BIG, "unit": "mi"}),
            with_changes(id="year", year=BIG),
            with_changes(id="negative-year", year=-BIG),
            with_changes(id="engine", engine_cc=BIG),
            with_changes(id="negative-price", price={"amount": -BIG, "currency": "KRW"}),
        ),
        this_year=YEAR,
    )
    cars = {car["id"]: car for car in batch.cars.to_dicts()}
    assert cars["price"]["price"] == "1180591620717411303424"
    assert cars["price-2^64"]["price"] == "18446744073709551616"
    assert cars["lot"]["lot_number"] == "1180591620717411303424"
    assert set(cars) == {"price", "price-2^64", "lot", "1180591620717411303424"}
    assert reasons_by_id(batch) == {
        "km": f"mileage: value {BIG} is too large",
        "int32-km": f"mileage: value {2**31} is too large",
        "mi": f"mileage: value {BIG} is too large",
        "year": f"year: {BIG} is outside 1950..2027",
        "negative-year": f"year: {-BIG} is outside 1950..2027",
        "engine": f"engine_cc: {BIG} is outside the integer range",
        "negative-price": f"price: amount {-BIG} is negative",
    }
    raws = {row["id"]: json.loads(row["raw"]) for row in batch.rejected.to_dicts()}
    assert raws["mi"]["mileage"]["value"] == BIG, "raw holds the number as given"
    assert raws["negative-year"]["year"] == -BIG and raws["engine"]["engine_cc"] == BIG


def test_an_integer_of_more_digits_than_int_takes_costs_only_its_record() -> None:
    digits = "1" + "0" * 5000
    records = [
        json_text(with_changes(id=name, **{field: "HUGE"})).replace(b'"HUGE"', digits.encode())
        for name, field in [("year", "year"), ("lot", "lot_number"), ("extra", "extra")]
    ]
    price = json_text(with_changes(id="price", price={"amount": "HUGE", "currency": "KRW"}))
    records.append(price.replace(b'"HUGE"', digits.encode()))
    batch = normalise(parsed(*records, clean_record()), this_year=YEAR)
    assert batch.cars["id"].to_list() == ["lot", "extra", "KA001000040"]
    assert batch.cars["lot_number"][0] == digits  # text: any length, exact
    reasons = reasons_by_id(batch)
    assert reasons.keys() == {"year", "price"}
    assert reasons["year"].startswith("year: 10000") and reasons["year"].endswith("2027")
    assert reasons["price"].startswith("price: amount 10000") and reasons["price"].endswith(
        "... is too large"
    )
    price_row = batch.rejected.filter(pl.col("id") == "price").row(0, named=True)
    assert json.loads(price_row["raw"])["price"]["amount"] == digits  # its digits, as text


def test_a_5mb_string_is_stored_whole_unless_its_column_is_indexed() -> None:
    huge = "x" * 5_000_000
    batch = normalise(
        parsed(
            with_changes(id="location", location=huge),
            with_changes(id="vin", vin=huge, color=huge),
            with_changes(id="images", images=[huge]),
            with_changes(id="model", model={"id": 1, "name": huge}),
            with_changes(id="maker", manufacturer={"id": 1, "name": huge}),
            with_changes(id=huge),
            with_changes(id="extra", extra=huge, **{huge: 1}),  # not stored: kept
            with_changes(id="white-space", vin=" " * 5_000_000),  # cleans to nothing
            "x" * 5_000_000,
        ),
        this_year=YEAR,
    )
    cars = {car["id"]: car for car in batch.cars.to_dicts()}
    assert list(cars) == ["location", "vin", "images", "extra", "white-space"]
    assert cars["location"]["location"] == huge
    assert cars["vin"]["vin"] == huge and cars["vin"]["color"] == huge
    assert cars["images"]["images"] == f'["{huge}"]'
    assert cars["white-space"]["vin"] is None
    rows = batch.rejected.to_dicts()
    assert sorted((row["id"] or "", row["reason"]) for row in rows) == [
        ("", f"id: {quote(huge)} is longer than 1000 bytes"),  # too long for the index
        ("", f"record: {quote(huge)} is a string, not an object"),
        ("maker", f"manufacturer: {quote(huge)} is longer than 1000 bytes"),
        ("model", f"model: {quote(huge)} is longer than 1000 bytes"),
    ]
    assert all(len(row["raw"]) > 5_000_000 for row in rows), "raw keeps every value whole"


def test_indexed_text_is_limited_in_utf8_bytes_as_cleaned() -> None:
    fits, too_long = "\u00e9" * 500, "\u00e9" * 500 + "x"  # 1000 and 1001 bytes
    batch = normalise(
        parsed(
            with_changes(id=f"  {fits}  ", manufacturer={"name": fits}, model={"name": fits}),
            with_changes(id="maker", manufacturer={"name": too_long}),
            with_changes(id="model", model={"name": too_long}),
            with_changes(id=too_long),
        ),
        this_year=YEAR,
    )
    assert batch.cars["id"].to_list() == [fits]
    assert batch.cars["model"].to_list() == [fits]
    assert reasons_by_id(batch) == {
        "maker": f"manufacturer: {quote(too_long)} is longer than 1000 bytes",
        "model": f"model: {quote(too_long)} is longer than 1000 bytes",
        None: f"id: {quote(too_long)} is longer than 1000 bytes",
    }


def test_nul_in_stored_text_is_stored_as_a_replacement_character() -> None:
    """text and jsonb cannot hold NUL: U+FFFD in its place, as in raw; never a rejection."""
    batch = normalise(
        parsed(
            with_changes(id="model", model={"id": 1, "name": "Q\x007"}),
            with_changes(id="images", images=["a", "b\x00"]),
            with_changes(id="currency", price={"amount": 5, "currency": "kr\x00w"}),
            with_changes(id="K\x00A"),
            with_changes(id="extra", extra="\x00", **{"ke\x00y": ["\x00"]}),  # not stored
            with_changes(id="B\x00D", year="x"),
        ),
        this_year=YEAR,
    )
    cars = {car["id"]: car for car in batch.cars.to_dicts()}
    assert list(cars) == ["model", "images", "currency", "K\ufffdA", "extra"]
    assert cars["model"]["model"] == "Q\ufffd7"
    assert json.loads(cars["images"]["images"]) == ["a", "b\ufffd"]
    assert cars["currency"]["currency"] == "KR\ufffdW"
    assert reasons_by_id(batch) == {"B\ufffdD": "year: 'x' is not an integer"}
    raw = batch.rejected.row(0, named=True)["raw"]
    assert json.loads(raw)["id"] == "B\ufffdD"


@pytest.mark.parametrize("depth", [500, 800])
def test_nesting_deep_costs_only_its_record(depth: int) -> None:
    nested = nested_lists(depth)
    batch = normalise(
        parsed(
            with_changes(id="bad", year="x", extra=nested),
            with_changes(id="extra", extra=nested),
            with_changes(id="images", images=nested, model={"name": nested}),
            nested,
        ),
        this_year=YEAR,
    )
    assert batch.cars["id"].to_list() == ["extra", "images"]
    assert batch.cars["images"].to_list() == ['["https://img.example/KA001000040/0.jpg"]', "[]"]
    assert batch.cars["model"].to_list() == ["Q7", None]
    reasons = reasons_by_id(batch)
    assert reasons["bad"] == "year: 'x' is not an integer"
    assert reasons[None].startswith("record: [[[[") and reasons[None].endswith(
        "is an array, not an object"
    )
    bad = batch.rejected.filter(pl.col("id") == "bad").row(0, named=True)
    assert json.loads(bad["raw"])["extra"] == nested


def test_a_page_nested_deeper_than_the_parser_goes_is_a_bad_body_not_a_crash() -> None:
    body = page_text(json_text(clean_record()), b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(RetryableApiError, match="nests deeper") as raised:
        check_page(1, body, 0.0)
    assert raised.value.kind == "bad_body"


def test_a_non_utf8_record_keeps_an_id_cars_rejected_can_hold() -> None:
    nul = b'{"id": "K\\u0000A", "color": "Bl\xffue"}'
    long = b'{"id": "' + b"x" * 2000 + b'", "color": "Bl\xffue"}'
    batch = normalise(page_records(page_text(nul, long)), this_year=YEAR)
    assert sorted(batch.rejected["id"].to_list(), key=str) == ["K\ufffdA", None]
