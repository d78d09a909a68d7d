"""Records as parsed JSON → one typed polars column per source field.

This is the only per-record Python work of the transform. The values that already have the
expected Python type become a column in one polars conversion; only the others (a string year, a
float price: a few per page) are converted one by one, and patched in.
"""

import math
import re
from decimal import ROUND_HALF_UP, Decimal
from itertools import chain, repeat
from typing import Any

import orjson
import polars as pl

# Integers beyond this are clamped to it: still out of every allowed range, but safe to
# multiply by 1,609,344 in Int64.
BEYOND_RANGE = 2**40
# A price beyond this is rejected as too large: numeric holds it, but not its btree index.
PRICE_LIMIT = 10**1000
# Longer text in an indexed column (id; manufacturer with model) is rejected: btree entries
# must fit in a page (2704 bytes an entry), and no real listing comes near. Other text is
# stored whatever its length.
MAX_INDEXED_BYTES = 1000
MILE_IN_KM = Decimal("1.609344")

_NONE = type(None)
_EMPTY: dict[str, object] = {}
_INTEGER_TEXT = re.compile(r"[+-]?[0-9]+")
_SURROGATE = re.compile("[\ud800-\udfff]")

TEXT_FIELDS = (
    "id",
    "lot_number",
    "vin",
    "fuel",
    "transmission",
    "body_type",
    "color",
    "location",
    "status",
    "created_at",
    "updated_at",
)


def flatten(records: list[dict[str, Any]]) -> pl.DataFrame:
    """Raw-typed columns: text not yet cleaned, numbers checked for type and sign only.

    Columns: the TEXT_FIELDS, manufacturer, model, generation (the nested names), year and
    engine_cc (Int64, null unless an integer), price (String text, null unless a number >= 0),
    currency, mileage_unit, km_as_km and km_from_mi (Int64, null unless a number >= 0), images
    (List(String) of the string items, null unless a list).
    """
    columns = {key: text_series(field(records, key)) for key in TEXT_FIELDS}
    for key in ("manufacturer", "model", "generation"):
        columns[key] = text_series(field(objects(field(records, key)), "name"))
    columns["year"] = integer_series(field(records, "year"))
    columns["engine_cc"] = integer_series(field(records, "engine_cc"))
    price = objects(field(records, "price"))
    columns["price"] = price_series(field(price, "amount"))
    columns["currency"] = text_series(field(price, "currency"))
    mileage = objects(field(records, "mileage"))
    columns["km_as_km"], columns["km_from_mi"] = mileage_series(field(mileage, "value"))
    columns["mileage_unit"] = text_series(field(mileage, "unit"))
    columns["images"] = images_series(field(records, "images"))
    return pl.DataFrame(columns)


def field(records: list[dict[str, Any]], key: str) -> list[object]:
    return list(map(dict.get, records, repeat(key)))


def objects(values: list[object]) -> list[dict[str, Any]]:
    """Non-objects become an empty object, so that their fields read as missing."""
    return [value if type(value) is dict else _EMPTY for value in values]


def text_series(values: list[object]) -> pl.Series:
    if not set(map(type, values)) <= {str, _NONE}:
        values = [value if type(value) is str else as_text(value) for value in values]
    try:
        return pl.Series(values, dtype=pl.String)
    except UnicodeEncodeError:  # lone surrogates, which the stdlib json parser lets through
        texts = [None if text is None else valid_unicode(str(text)) for text in values]
        return pl.Series(texts, dtype=pl.String)


def integer_series(values: list[object]) -> pl.Series:
    ints, others = _plain_ints(values)
    return _patched(ints, others, [as_integer(values[i]) for i in others])


def price_series(values: list[object]) -> pl.Series:
    ints, others = _plain_ints(values)
    texts = _where(ints >= 0, ints.cast(pl.String))
    return _patched(texts, others, [as_price_text(values[i]) for i in others])


def mileage_series(values: list[object]) -> tuple[pl.Series, pl.Series]:
    """Kilometres if the unit is km, and if it is mi; both null unless a number >= 0."""
    ints, others = _plain_ints(values)
    km = _where(ints >= 0, ints)
    from_miles = (km * 1_609_344 + 500_000) // 1_000_000
    pairs = [as_kilometres(values[i]) for i in others]
    return (
        _patched(km, others, [km for km, _ in pairs]),
        _patched(from_miles, others, [km for _, km in pairs]),
    )


def images_series(values: list[object]) -> pl.Series:
    """The string items of each list, null for a non-list."""
    lists: list[Any] = [value if type(value) is list else None for value in values]
    if not set(map(type, chain.from_iterable(filter(None, lists)))) <= {str}:
        lists = [None if items is None else [x for x in items if type(x) is str] for items in lists]
    # Building a List series from Python lists is slow (~3 µs a row); one JSON text is not.
    try:
        text = orjson.dumps(lists).decode()
    except TypeError:  # lone surrogates
        text = orjson.dumps(_valid_unicode_lists(lists)).decode()
    nested = pl.Series([text]).str.json_decode(pl.List(pl.List(pl.String)))
    return nested.explode() if lists else pl.Series([], dtype=pl.List(pl.String))


def valid_unicode(text: str) -> str:
    return _SURROGATE.sub("\ufffd", text)


def _valid_unicode_lists(lists: list[Any]) -> list[Any]:
    return [None if items is None else list(map(valid_unicode, items)) for items in lists]


def _plain_ints(values: list[object]) -> tuple[pl.Series, list[int]]:
    """Int64 of the values that are ints (not bools) within ±BEYOND_RANGE, null elsewhere, and
    the positions of the other values that are not None: few, so only they take the slow path."""
    others = [
        i
        for i, value in enumerate(values)
        if not (value is None or (type(value) is int and -BEYOND_RANGE <= value <= BEYOND_RANGE))
    ]
    if others:
        values = values.copy()
        for i in others:
            values[i] = None
    return pl.Series(values, dtype=pl.Int64), others


def _patched(series: pl.Series, positions: list[int], values: list[Any]) -> pl.Series:
    """series with values put at positions."""
    if not positions:
        return series
    return series.scatter(positions, pl.Series(values, dtype=series.dtype))


def _where(keep: pl.Series, values: pl.Series) -> pl.Series:
    """values where keep is true, else null."""
    return pl.select(pl.when(keep).then(values)).to_series()


def as_text(value: object) -> str | None:
    """A string as it is, a number as its JSON text, anything else None."""
    if type(value) is str:
        return value
    if type(value) is int or type(value) is Decimal:
        return str(value)
    if type(value) is float and math.isfinite(value):
        return repr(value)
    return None


def as_integer(value: object) -> int | None:
    """An integer given as an int, a float holding an integer, or a string of digits.

    Clamped to ±BEYOND_RANGE, so it fits Int64 and a huge value still fails every range check.
    A Decimal is an integer of more digits than an int takes (source.client.parse_json).
    """
    if type(value) is int:
        return _clamp(value)
    if type(value) is Decimal:
        return BEYOND_RANGE if value > 0 else -BEYOND_RANGE
    if type(value) is float:
        return _clamp(int(value)) if value.is_integer() else None
    if type(value) is str:
        text = value.strip()
        if not _INTEGER_TEXT.fullmatch(text):
            return None
        # Count digits without int(), which refuses strings of more than 4300 digits.
        digits = text.lstrip("+-").lstrip("0") or "0"
        magnitude = BEYOND_RANGE if len(digits) > 15 else int(digits)
        return _clamp(-magnitude if text.startswith("-") else magnitude)
    return None


def as_number(value: object) -> int | float | Decimal | None:
    """A JSON number (not a boolean, not nan or infinite), else None."""
    if type(value) is int or type(value) is Decimal:
        return value
    if type(value) is float and math.isfinite(value):
        return value
    return None


def as_price_text(value: object) -> str | None:
    """The number as given, for numeric: None if it is not a number, negative or too large."""
    number = as_number(value)
    return None if number is None or not 0 <= number < PRICE_LIMIT else as_text(number)


def as_kilometres(value: object) -> tuple[int | None, int | None]:
    number = as_number(value)
    if number is None or number < 0:
        return None, None
    if number >= BEYOND_RANGE:
        return BEYOND_RANGE, BEYOND_RANGE
    if type(number) is int:
        return number, (number * 1_609_344 + 500_000) // 1_000_000
    exact = Decimal(str(number))  # the value as given in the JSON text
    return _round(exact), _round(exact * MILE_IN_KM)


def _round(value: Decimal) -> int:
    return int(value.quantize(Decimal(1), rounding=ROUND_HALF_UP))  # half away from zero


def _clamp(value: int) -> int:
    return max(-BEYOND_RANGE, min(BEYOND_RANGE, value))
