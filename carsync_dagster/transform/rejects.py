"""What a rejected record becomes: its raw JSON, the hash of it, and a one-line reason.

Only rejected records come here, so plain per-record Python is fine.
"""

import hashlib
import json
import math
from decimal import Decimal
from typing import Any

import orjson

from carsync_dagster.transform.flatten import (
    MAX_INDEXED_BYTES,
    as_integer,
    as_number,
    as_text,
    valid_unicode,
)

_MISSING = object()
_QUOTE_LIMIT = 80
# Non-finite floats have no JSON form (orjson would write null); keep them readable instead.
_NON_FINITE = {math.inf: "Infinity", -math.inf: "-Infinity"}


def raw_json(item: object) -> tuple[str, str]:
    """(raw, raw_hash): canonical JSON (sorted keys, compact) and its sha256 hex."""
    try:
        raw = _canonical_json(_storable(item))
    except RecursionError:  # nested deeper than the serialisers go
        raw = orjson.dumps(f"<not stored: nested too deeply> {quote(item)}").decode()
    return raw, hashlib.sha256(raw.encode()).hexdigest()


def undecodable(raw: bytes) -> tuple[str | None, str, str, str, str]:
    """(id, raw_hash, reason, raw, raw_bytes) of a record whose bytes are not UTF-8: raw is
    what it says with each bad byte as U+FFFD, raw_bytes the bytes themselves (bytea hex)."""
    try:
        raw.decode()
        where = ""
    except UnicodeDecodeError as error:
        where = f" (byte 0x{raw[error.start]:02x} at offset {error.start})"
    text = raw.decode(errors="replace")
    try:
        record = json.loads(text)
    except (ValueError, RecursionError):
        record = text
    car_id = as_text(record.get("id")) if type(record) is dict else None
    stored, _ = raw_json(record)
    reason = f"record: not valid UTF-8{where}"
    return _stored_id(car_id), hashlib.sha256(raw).hexdigest(), reason, stored, "\\x" + raw.hex()


def _stored_id(car_id: str | None) -> str | None:
    """The id as cars_rejected can hold it: NUL as U+FFFD, and None when too long to index."""
    text = None if car_id is None else _storable_text(car_id)
    return text if text is not None and len(text.encode()) <= MAX_INDEXED_BYTES else None


def _canonical_json(value: object) -> str:
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    except TypeError:  # orjson.JSONEncodeError, e.g. an int beyond 64 bits
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _storable(value: object) -> object:
    """The value with NUL in strings (keys too) as U+FFFD, since jsonb rejects \\u0000.

    Lone surrogates (which only the stdlib parser lets through) become U+FFFD too: they have
    no UTF-8 form. An integer of more digits than an int takes (a Decimal) is kept as the
    string of its digits.
    """
    if type(value) is str:
        return _storable_text(value)
    if type(value) is dict:
        # map, not comprehensions (a frame each): one frame a level, as deep as the parsers go
        return dict(zip(map(_storable, value), map(_storable, value.values()), strict=True))
    if type(value) is list:
        return list(map(_storable, value))
    if type(value) is float and not math.isfinite(value):
        return _NON_FINITE.get(value, "NaN")
    if type(value) is Decimal:
        return str(value)
    return value


def _storable_text(text: str) -> str:
    return valid_unicode(text.replace("\x00", "\ufffd"))


def quote(value: object) -> str:
    """repr of the value (JSON null as null), one line, cut to about 80 characters."""
    if value is None:
        return "null"
    try:
        text = str(value) if type(value) is Decimal else repr(value)
    except RecursionError:
        text = f"<deeply nested {type(value).__name__}>"
    return text if len(text) <= _QUOTE_LIMIT else text[: _QUOTE_LIMIT - 3] + "..."


def not_an_object_reason(item: object) -> str:
    kinds = {str: "a string", int: "a number", float: "a number", bool: "a boolean"}
    kind = "null" if item is None else kinds.get(type(item), "an array")
    return f"record: {quote(item)} is {kind}, not an object"


def reason(rule: str, record: dict[str, Any], this_year: int) -> str:
    """The text for the first failed rule, as named by the polars validation."""
    if rule == "id":
        return _id_reason(record.get("id", _MISSING))
    if rule == "year":
        return _year_reason(record.get("year", _MISSING), this_year)
    if rule == "mileage":
        return _number_reason("mileage: value", _nested(record, "mileage", "value"))
    if rule == "price":
        return _number_reason("price: amount", _nested(record, "price", "amount"))
    if rule == "engine_cc":
        return f"engine_cc: {quote(record.get('engine_cc'))} is outside the integer range"
    if rule.startswith("long:"):  # id, manufacturer or model: too long to index
        name = rule.removeprefix("long:")
        value = record.get("id") if name == "id" else _nested(record, name, "name")
        return f"{name}: {quote(value)} is longer than {MAX_INDEXED_BYTES} bytes"
    unit = _nested(record, "mileage", "unit")
    if unit is _MISSING:
        return "mileage: unit missing"
    return f"mileage: unit {quote(unit)} is not km or mi"


def _nested(record: dict[str, Any], key: str, inner: str) -> object:
    outer = record.get(key)
    return outer.get(inner, _MISSING) if type(outer) is dict else _MISSING


def _id_reason(value: object) -> str:
    if value is _MISSING:
        return "id: missing"
    if as_text(value) is None:
        return f"id: {quote(value)} is not a string"
    return f"id: {quote(value)} is empty"


def _year_reason(value: object, this_year: int) -> str:
    if value is _MISSING:
        return "year: missing"
    if as_integer(value) is None:
        return f"year: {quote(value)} is not an integer"
    return f"year: {quote(value)} is outside 1950..{this_year + 1}"


def _number_reason(name: str, value: object) -> str:
    if value is _MISSING:
        return f"{name} missing"
    number = as_number(value)
    if number is None:
        return f"{name} {quote(value)} is not a number"
    if number < 0:
        return f"{name} {quote(value)} is negative"
    return f"{name} {quote(value)} is too large"
