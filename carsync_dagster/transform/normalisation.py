"""A page of Car records → normalised cars and rejected records (warehouse.md, Normalisation)."""

import re
from collections.abc import Sequence
from dataclasses import dataclass

import polars as pl
import polars_hash as plh

from carsync_dagster.transform.flatten import MAX_INDEXED_BYTES, flatten
from carsync_dagster.transform.rejects import not_an_object_reason, raw_json, reason, undecodable

CARS_SCHEMA: dict[str, pl.DataType] = {
    "id": pl.String(),
    "manufacturer": pl.String(),
    "model": pl.String(),
    "year": pl.Int32(),
    "mileage_km": pl.Int32(),
    "price": pl.String(),
    "currency": pl.String(),
    "fuel": pl.String(),
    "status": pl.String(),
    "source_updated_at": pl.Datetime("us", "UTC"),
    "lot_number": pl.String(),
    "vin": pl.String(),
    "generation": pl.String(),
    "transmission": pl.String(),
    "body_type": pl.String(),
    "color": pl.String(),
    "engine_cc": pl.Int32(),
    "location": pl.String(),
    "images": pl.String(),
    "source_created_at": pl.Datetime("us", "UTC"),
    "data_hash": pl.String(),
}
CARS_COLUMNS: tuple[str, ...] = tuple(CARS_SCHEMA)
SOURCE_COLUMNS = CARS_COLUMNS[:-1]
# raw_bytes: the record's own bytes (bytea hex), only when they are not UTF-8.
REJECTED_COLUMNS: tuple[str, ...] = ("id", "raw_hash", "reason", "raw", "raw_bytes")
REJECTED_SCHEMA: dict[str, pl.DataType] = dict.fromkeys(REJECTED_COLUMNS, pl.String())

MANUFACTURERS = (
    "Hyundai",
    "Kia",
    "Genesis",
    "BMW",
    "Mercedes-Benz",
    "Audi",
    "Volkswagen",
    "Chevrolet",
    "Toyota",
    "Renault Korea",
    "KG Mobility",
    "Ford",
    "Volvo",
    "Porsche",
    "Lexus",
    "Honda",
    "Nissan",
    "Tesla",
    "MINI",
    "Land Rover",
    "Jeep",
    "Peugeot",
)
MANUFACTURER_ALIASES = {"VW": "Volkswagen", "SsangYong": "KG Mobility"}
FUELS = {
    "gasoline": "gasoline",
    "petrol": "gasoline",
    "ev": "electric",
    "bev": "electric",
    "electric": "electric",
    "diesel": "diesel",
    "lpg": "lpg",
}
FIRST_YEAR = 1950
INT32_MAX = 2**31 - 1
_PLAIN_TEXT = (
    "id",
    "model",
    "generation",
    "lot_number",
    "vin",
    "transmission",
    "body_type",
    "color",
    "location",
)
# The text columns of cars in a btree index (the primary key, cars_active_maker_model).
_INDEXED_TEXT = ("id", "manufacturer", "model")
_MAKER_SEPARATORS = r"[\s-]+"  # "-" and white space are alike when matching makers
_RFC3339 = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})$"
)


Rejected = tuple[str | None, str, str, str, str | None]  # a row of REJECTED_COLUMNS


@dataclass(frozen=True)
class Batch:
    cars: pl.DataFrame  # valid records, normalised, columns CARS_COLUMNS in order
    rejected: pl.DataFrame  # one row per distinct rejected record, columns REJECTED_COLUMNS


def normalise(records: Sequence[object], *, this_year: int) -> Batch:
    """Normalise one page of records; `this_year` is the UTC year when the sync started."""
    objects = [item for item in records if type(item) is dict]
    checked = (
        flatten(objects)
        .lazy()
        .with_row_index("position")
        .with_columns(_cleaned())
        .with_columns(_kilometres().alias("mileage_km"), _first_too_long().alias("too_long"))
        .with_columns(_first_failed_rule(this_year).alias("rule"))
        # Out of Int32 range only where a rule failed.
        .with_columns(pl.col("year", "mileage_km", "engine_cc").cast(pl.Int32, strict=False))
        .collect()
    )
    cars = checked.filter(pl.col("rule").is_null()).select(SOURCE_COLUMNS)
    cars = cars.with_columns(data_hash=data_hash_of(cars))

    rejected: dict[tuple[str | None, str], Rejected] = {}
    # An id too long for cars_rejected's index is left out: the raw record holds it.
    indexable_id = pl.when(pl.col("id").str.len_bytes() <= MAX_INDEXED_BYTES).then(pl.col("id"))
    failures = checked.filter(pl.col("rule").is_not_null()).select("position", indexable_id, "rule")
    for position, car_id, rule in failures.iter_rows():
        record = objects[position]
        _add_rejected(rejected, car_id, record, reason(rule, record, this_year))
    for item in records:
        if type(item) is bytes:  # its bytes are not UTF-8 (source.landing)
            row = undecodable(item)
            rejected.setdefault((row[0], row[1]), row)
        elif type(item) is not dict:
            _add_rejected(rejected, None, item, not_an_object_reason(item))
    return Batch(cars, pl.DataFrame(list(rejected.values()), schema=REJECTED_SCHEMA, orient="row"))


def data_hash_of(frame: pl.DataFrame) -> pl.Series:
    """sha256 hex of each row's stored source columns, in the versioned polars-hash encoding.

    The encoding (hash_rows version 1) keeps nulls, types and column boundaries apart, so the
    hash changes if and only if a stored value changes.
    """
    row = plh.hash_rows([pl.col(name) for name in SOURCE_COLUMNS], version=1)
    return frame.select(row.chash.sha2_256().alias("data_hash")).to_series()


def _add_rejected(
    rejected: dict[tuple[str | None, str], Rejected],
    car_id: str | None,
    record: object,
    why: str,
) -> None:
    raw, raw_hash = raw_json(record)
    rejected.setdefault((car_id, raw_hash), (car_id, raw_hash, why, raw, None))


def _cleaned() -> list[pl.Expr]:
    col = pl.col
    return [
        *(_clean(col(name)) for name in _PLAIN_TEXT),
        _manufacturer(col("manufacturer")).alias("manufacturer"),
        _clean(col("currency")).str.to_uppercase(),
        _clean(col("status")).str.to_lowercase(),
        _fuel(col("fuel")).alias("fuel"),
        _clean(col("mileage_unit")).str.to_lowercase(),
        _timestamp(col("updated_at")).alias("source_updated_at"),
        _timestamp(col("created_at")).alias("source_created_at"),
        _images_json(col("images")).alias("images"),
    ]


def _kilometres() -> pl.Expr:
    """Int64 kilometres in the unit given, so far as the unit is known."""
    from_miles = pl.col("mileage_unit") == "mi"
    return pl.when(from_miles).then(pl.col("km_from_mi")).otherwise(pl.col("km_as_km"))


def _first_failed_rule(this_year: int) -> pl.Expr:
    return (
        pl.when(pl.col("id").is_null())
        .then(pl.lit("id"))
        .when(~pl.col("year").is_between(FIRST_YEAR, this_year + 1).fill_null(False))
        .then(pl.lit("year"))
        .when(~pl.col("mileage_km").is_between(0, INT32_MAX).fill_null(False))
        .then(pl.lit("mileage"))
        .when(pl.col("price").is_null())
        .then(pl.lit("price"))
        .when(~pl.col("mileage_unit").is_in(["km", "mi"]).fill_null(False))
        .then(pl.lit("unit"))
        .when(~pl.col("engine_cc").is_between(-INT32_MAX - 1, INT32_MAX).fill_null(True))
        .then(pl.lit("engine_cc"))
        .when(pl.col("too_long").is_not_null())
        .then(pl.concat_str(pl.lit("long:"), pl.col("too_long")))
        .otherwise(None)
    )


def _first_too_long() -> pl.Expr:
    """The first indexed text column, as cleaned, of more than MAX_INDEXED_BYTES of UTF-8:
    PostgreSQL could not index it, and the whole merge would fail."""
    too_long = (
        pl.when(pl.col(name).str.len_bytes() > MAX_INDEXED_BYTES).then(pl.lit(name))
        for name in _INDEXED_TEXT
    )
    return pl.coalesce(*too_long)


def _clean(text: pl.Expr) -> pl.Expr:
    """Trimmed, white space runs as one space, empty as null; NUL as U+FFFD (text rejects it)."""
    return pl.when(text.str.contains(r"\S")).then(_collapse_spaces(text))


def _collapse_spaces(text: pl.Expr) -> pl.Expr:
    text = text.str.replace_all("\x00", "\ufffd", literal=True)
    return text.str.replace_all(r"\s+", " ").str.strip_chars(" ")


def _manufacturer_key(name: str) -> str:
    return re.sub(_MAKER_SEPARATORS, " ", name.lower()).strip()


_MANUFACTURER_BY_KEY = {_manufacturer_key(name): name for name in MANUFACTURERS} | {
    _manufacturer_key(alias): name for alias, name in MANUFACTURER_ALIASES.items()
}


def _manufacturer(name: pl.Expr) -> pl.Expr:
    cleaned = _clean(name)
    key = cleaned.str.to_lowercase().str.replace_all(_MAKER_SEPARATORS, " ").str.strip_chars(" ")
    return key.replace_strict(_MANUFACTURER_BY_KEY, default=cleaned, return_dtype=pl.String)


def _fuel(fuel: pl.Expr) -> pl.Expr:
    cleaned = _clean(fuel).str.to_lowercase()
    hybrid = cleaned.str.contains("hybrid", literal=True) | cleaned.is_in(["phev", "hev"])
    return (
        pl.when(hybrid.fill_null(False))
        .then(pl.lit("hybrid"))
        .otherwise(cleaned.replace_strict(FUELS, default="other", return_dtype=pl.String))
    )


def _timestamp(text: pl.Expr) -> pl.Expr:
    """RFC 3339 text as a UTC timestamp; anything else null."""
    cleaned = _clean(text)
    parsed = (
        cleaned.str.to_uppercase()
        .str.replace("Z", "+00:00", literal=True)
        .str.to_datetime("%Y-%m-%dT%H:%M:%S%.f%z", strict=False, time_unit="us", time_zone="UTC")
    )
    return pl.when(cleaned.str.contains(_RFC3339)).then(parsed)


def _images_json(images: pl.Expr) -> pl.Expr:
    """A JSON array text of the cleaned image strings; null when images was not a list."""
    collapsed = images.list.eval(_collapse_spaces(pl.element()))
    cleaned = collapsed.list.eval(pl.element().filter(pl.element() != ""))
    # json_encode only encodes structs: '{"i":[...]}' and the array is cut out of it.
    wrapped = pl.struct(cleaned.alias("i")).struct.json_encode()
    return pl.when(images.is_not_null()).then(wrapped.str.slice(5, wrapped.str.len_chars() - 6))
