"""The simulator's car store: listings generated on demand from (seed, index), and their truth.

Car ``i`` has id ``KA{i:09d}``. Everything stable about it comes from an integer hash of
(seed, i); price, mileage and status also from its version. The only state kept per listing is
a few array slots (updated_at, version, alive), so a million listings cost a few tens of MB;
broken listings fixed at the source since start are a small set of indices.
Truth rows are built from the generated values, never by normalising the served spellings.
"""

from __future__ import annotations

import bisect
import copy
import json
import random
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import orjson

MASK = (1 << 64) - 1
ANCHOR = 1773225570  # 2026-03-11T10:39:30Z, around when the newest initial listing was created
STEP = 180  # seconds between two initial listings; created jitter + update delay stay below it
CACHE_ENTRIES = 32


def mix(x: int) -> int:
    """splitmix64 finaliser: a cheap, well-spread 64-bit integer hash."""
    x = (x + 0x9E3779B97F4A7C15) & MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


def iso(ts: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def car_id(i: int) -> str:
    return f"KA{i:09d}"


def parse_id(raw: str) -> int | None:
    s = raw.strip()
    if len(s) == 11 and s.startswith("KA") and s[2:].isdigit():
        return int(s[2:])
    return None


def messy(s: str) -> str:
    """Extra white space that cleaning (trim, collapse runs) must undo."""
    return "  " + s.replace(" ", "   ") + " "


class Maker(NamedTuple):
    name: str  # canonical spelling, also what truth says
    id: int
    wmi: str  # first three VIN characters
    spellings: tuple[str, ...]  # served spellings besides the canonical one
    price: int  # typical price of a young car, in 10,000 KRW
    models: tuple[tuple[str, str, bool], ...]  # (name, body type, electric)


def _models(spec: str) -> tuple[tuple[str, str, bool], ...]:
    """ "Santa Fe:SUV, Ioniq 5:SUV:ev" -> (("Santa Fe", "SUV", False), ("Ioniq 5", "SUV", True))"""
    parts = [item.strip().split(":") for item in spec.split(",")]
    return tuple((p[0], p[1], len(p) > 2) for p in parts)


# (maker, weight per mille); a null maker takes the rest of the thousand.
# fmt: off
MAKERS: tuple[tuple[Maker, int], ...] = (
    (Maker("Hyundai", 1, "KMH", ("HYUNDAI", " Hyundai"), 3200, _models(
        "Avante:Sedan, Sonata:Sedan, Grandeur:Sedan, Santa Fe:SUV, Tucson:SUV, Ioniq 5:SUV:ev")),
     200),
    (Maker("Kia", 2, "KNA", ("KIA", "kia "), 3000, _models(
        "Morning:Hatchback, K5:Sedan, K8:Sedan, Sorento:SUV, Sportage:SUV, EV6:SUV:ev")), 170),
    (Maker("Genesis", 3, "KMT", ("GENESIS",), 6500, _models(
        "G70:Sedan, G80:Sedan, G90:Sedan, GV70:SUV, GV80:SUV")), 50),
    (Maker("BMW", 4, "WBA", ("bmw", " BMW "), 7000, _models(
        "320d:Sedan, 520i:Sedan, X3:SUV, X5:SUV, i4:Sedan:ev")), 60),
    (Maker("Mercedes-Benz", 5, "WDD", ("Mercedes Benz", "MERCEDES-BENZ", "mercedes benz"), 8000,
           _models("C 200:Sedan, E 300:Sedan, S 500:Sedan, GLC 300:SUV, EQE:Sedan:ev")), 60),
    (Maker("Audi", 6, "WAU", ("AUDI",), 7000, _models(
        "A4:Sedan, A6:Sedan, Q5:SUV, Q7:SUV, e-tron:SUV:ev")), 35),
    (Maker("Volkswagen", 7, "WVW", ("VW", "VOLKSWAGEN"), 4500, _models(
        "Golf:Hatchback, Jetta:Sedan, Tiguan:SUV, Passat:Sedan, ID.4:SUV:ev")), 25),
    (Maker("Chevrolet", 8, "KL1", ("CHEVROLET",), 2800, _models(
        "Spark:Hatchback, Malibu:Sedan, Trax:SUV, Trailblazer:SUV, Bolt EV:Hatchback:ev")), 50),
    (Maker("Toyota", 9, "JTD", ("TOYOTA",), 4200, _models(
        "Camry:Sedan, Corolla:Sedan, RAV4:SUV, Prius:Hatchback, Sienna:Van")), 25),
    (Maker("Renault Korea", 10, "KNM", ("  Renault   Korea ", "Renault-Korea", "RENAULT KOREA"),
           2800, _models("SM6:Sedan, QM6:SUV, XM3:SUV, Arkana:SUV")), 45),
    (Maker("KG Mobility", 11, "KPT", ("SsangYong", "KG-Mobility", "KG MOBILITY"), 3000, _models(
        "Tivoli:SUV, Korando:SUV, Rexton:SUV, Torres:SUV")), 45),
    (Maker("Ford", 12, "1FA", ("FORD",), 5000, _models(
        "Mustang:Coupe, Explorer:SUV, Focus:Hatchback, Ranger:Truck")), 15),
    (Maker("Volvo", 13, "YV1", ("VOLVO",), 6000, _models(
        "XC40:SUV, XC60:SUV, XC90:SUV, S60:Sedan, S90:Sedan")), 20),
    (Maker("Porsche", 14, "WP0", ("PORSCHE",), 15000, _models(
        "911:Coupe, Cayenne:SUV, Macan:SUV, Panamera:Sedan, Taycan:Sedan:ev")), 10),
    (Maker("Lexus", 15, "JTH", ("LEXUS",), 6500, _models(
        "ES 300h:Sedan, NX 350h:SUV, RX 450h:SUV, LS 500:Sedan")), 15),
    (Maker("Honda", 16, "JHM", ("HONDA",), 4000, _models(
        "Accord:Sedan, Civic:Sedan, CR-V:SUV, Odyssey:Van")), 10),
    (Maker("Nissan", 17, "JN1", ("NISSAN",), 3800, _models(
        "Altima:Sedan, Leaf:Hatchback:ev, Qashqai:SUV, X-Trail:SUV")), 10),
    (Maker("Tesla", 18, "5YJ", ("TESLA",), 6000, _models(
        "Model 3:Sedan:ev, Model Y:SUV:ev, Model S:Sedan:ev, Model X:SUV:ev")), 30),
    (Maker("MINI", 19, "WMW", ("Mini", "mini"), 4000, _models(
        "Cooper:Hatchback, Countryman:SUV, Clubman:Wagon")), 20),
    (Maker("Land Rover", 20, "SAL", ("Land-Rover", "LAND ROVER"), 12000, _models(
        "Range Rover:SUV, Discovery:SUV, Defender:SUV, Evoque:SUV")), 15),
    (Maker("Jeep", 21, "1C4", ("JEEP",), 5000, _models(
        "Wrangler:SUV, Cherokee:SUV, Compass:SUV, Renegade:SUV")), 15),
    (Maker("Peugeot", 22, "VF3", ("PEUGEOT",), 3500, _models(
        "208:Hatchback, 308:Hatchback, 3008:SUV, 5008:SUV")), 15),
    # Not on the warehouse's list: truth keeps the cleaned spelling, so only white space varies.
    (Maker("Lynk & Co", 90, "LB1", ("  Lynk  &  Co ",), 4000, _models("01:SUV, 05:SUV")), 10),
    (Maker("Polestar", 91, "LPS", (" Polestar",), 6000, _models("2:Sedan:ev, 4:SUV:ev")), 10),
    (Maker("BYD", 92, "LGX", ("BYD ",), 4000, _models("Atto 3:SUV:ev, Seal:Sedan:ev")), 10),
    (Maker("Cupra", 93, "VSS", ("  Cupra",), 4500, _models("Born:Hatchback:ev, Formentor:SUV")),
     10),
)
# fmt: on
NULL_MAKER = len(MAKERS)  # maker code of a listing served with "manufacturer": null
MAKER_TABLE: tuple[int, ...] = tuple(
    [code for code, (_, weight) in enumerate(MAKERS) for _ in range(weight)]
    + [NULL_MAKER] * (1000 - sum(weight for _, weight in MAKERS))
)
MAKER_CODES: dict[str, int] = {m.name.casefold(): code for code, (m, _) in enumerate(MAKERS)}

# Per fuel class: served spellings, the first one most often; None leaves the key out.
FUEL_CLASSES = ("gasoline", "diesel", "hybrid", "electric", "lpg", "other")
FUEL_TABLE: tuple[int, ...] = (0,) * 48 + (1,) * 25 + (2,) * 13 + (3,) * 3 + (4,) * 8 + (5,) * 3
FUEL_SPELLINGS: tuple[tuple[str | None, ...], ...] = (
    ("Gasoline", "Petrol", "GASOLINE", " gasoline "),
    ("Diesel", "DIESEL", "diesel "),
    ("Gasoline Hybrid", "PHEV", "HEV", "Hybrid", "Diesel Hybrid", "hybrid"),
    ("Electric", "EV", "BEV", "ELECTRIC"),
    ("LPG", " lpg "),
    ("Hydrogen", "CNG", None),
)
COLORS = ("White", "Black", "Silver", "Gray", "Pearl", "Blue", "Red", "Dark Gray", "Beige")
CITIES = ("Seoul", "Busan", "Incheon", "Daegu", "Daejeon", "Gwangju", "Ulsan", "Suwon",
          "Seongnam", "Goyang", "Jeju", "Changwon")  # fmt: skip
ENGINES = (998, 1353, 1598, 1999, 2151, 2497, 2999, 3342, 3982)
CURRENCIES = (("KRW", 1), ("USD", 1400), ("EUR", 1500))  # (code, KRW per unit)

# Broken kinds: (field whose rule rejects it, whether the cleaned id survives).
BROKEN: tuple[tuple[str, bool], ...] = (
    ("id", False), ("id", False), ("id", False), ("id", False),  # "", "   ", missing, null
    ("year", True), ("year", True), ("year", True), ("year", True), ("year", True),
    ("price", True), ("price", True), ("price", True),  # negative, null, text
    ("mileage", True), ("mileage", True), ("mileage", True),  # text, unit furlong, missing
    ("record", False), ("record", False), ("record", False), ("record", False),
)  # fmt: skip


# Pathological kinds (--pathological N): values no sane source sends, each breaking one rule.
PATHOLOGICAL: tuple[tuple[str, bool], ...] = (
    ("year", True),  # a 5 MB string
    ("mileage", True),  # mileage.value a list nested 500 deep
    ("mileage", True),  # mileage.unit "km" and a NUL character
    ("record", False),  # the item is `true`, not an object
    ("year", True),  # 2**70, an integer past 64 bits
    ("price", True),  # -(2**64 + 1)
)  # fmt: skip
KINDS = BROKEN + PATHOLOGICAL


def _pathological(kind: int, rec: dict[str, Any], as_stored: bool) -> Any:
    """`as_stored`: as cars_rejected.raw keeps it (jsonb holds no NUL: U+FFFD instead)."""
    if kind == 0:
        rec["year"] = "x" * 5_000_000
    elif kind == 1:
        nested: Any = 1
        for _ in range(500):
            nested = [nested]
        rec["mileage"]["value"] = nested
    elif kind == 2:
        rec["mileage"]["unit"] = "km\ufffd" if as_stored else "km\x00"
    elif kind == 3:
        return True
    elif kind == 4:
        rec["year"] = 2**70
    else:
        rec["price"]["amount"] = -(2**64 + 1)
    return rec


def dumps(value: Any) -> bytes:
    """orjson, or the standard library for what orjson refuses (integers past 64 bits,
    nesting deeper than 254)."""
    try:
        return orjson.dumps(value)
    except TypeError:  # orjson.JSONEncodeError
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def _break(kind: int, rec: dict[str, Any], cid: str, i: int, as_stored: bool = False) -> Any:
    """Spoil one rule of a valid record (and only that one)."""
    if kind >= len(BROKEN):
        return _pathological(kind - len(BROKEN), rec, as_stored)
    if kind >= 15:
        return (cid, i, None, [cid, "withdrawn"])[kind - 15]
    if kind < 4:
        if kind == 2:
            del rec["id"]
        else:
            rec["id"] = ("", "   ", "", None)[kind]
    elif kind < 9:
        if kind == 8:
            del rec["year"]
        else:
            year = rec["year"]
            rec["year"] = ("nineteen-ninety", 1890, 2999, float(int(year)) + 0.5)[kind - 4]
    elif kind < 12:
        price = rec["price"]
        price["amount"] = (-price["amount"], None, "on request")[kind - 9]
    elif kind == 12:
        rec["mileage"]["value"] = "lots"
    elif kind == 13:
        rec["mileage"]["unit"] = "furlong"
    else:
        del rec["mileage"]
    return rec


class Store:
    """All listings, live or deleted, and the operations the API and control endpoints need."""

    def __init__(self, cars: int, seed: int, broken_rate: float, pathological: int = 0) -> None:
        self.n0 = cars
        base = mix(seed & MASK)
        self.k_car, self.k_time, self.k_ver, self.k_broken = (mix(base ^ s) for s in range(1, 5))
        self.broken_ppm = round(broken_rate * 1_000_000)
        # Listing index → pathological kind: spread evenly over the feed, the kinds in turn.
        count = min(pathological, cars)
        self.pathological = {
            (2 * k + 1) * cars // (2 * count): k % len(PATHOLOGICAL) for k in range(count)
        }
        self.live = array("q", range(cars))  # sorted live indices: newest listing last
        self.alive = bytearray(b"\x01") * cars
        self.updated = array("q", bytes(8 * cars))  # 0: unchanged since start, see _initial_times
        self.version = array("I", bytes(4 * cars))
        self.created_new = array("q")  # created_at of listings inserted after start
        # updated_at and index of every change after start, in that order; an entry whose
        # updated_at no longer matches self.updated is stale. Every index < total that is not
        # alive has been deleted.
        self.touched_at = array("q")
        self.touched = array("q")
        self.clock = self._initial_times(cars - 1)[1] if cars else ANCHOR
        self.rng = random.Random(mix(base ^ 5))
        self.fixed: set[int] = set()  # broken at start, valid since a fix() at the source
        self._codes: bytearray | None = None
        self._fixable: array[int] | None = None  # broken at start with a usable id, sorted
        self._cache: dict[tuple[Any, ...], array[int]] = {}

    # ---- per-listing values -------------------------------------------------------------

    @property
    def total(self) -> int:
        return self.n0 + len(self.created_new)

    def _initial_times(self, i: int) -> tuple[int, int]:
        # Both strictly increase with i, so unchanged listings stay in (updated_at, id) order.
        h = mix(self.k_time ^ i)
        created = ANCHOR - (self.n0 - 1 - i) * STEP + h % 60
        h >>= 8
        return created, created + (0 if h & 1 else (h >> 1) % 100)

    def times(self, i: int) -> tuple[int, int]:
        if i >= self.n0:
            return self.created_new[i - self.n0], self.updated[i]
        created, updated = self._initial_times(i)
        return created, self.updated[i] or updated

    def broken_kind(self, i: int) -> int:
        """-1 for a valid listing; listings inserted after start are always valid."""
        if i >= self.n0:
            return -1
        if (odd := self.pathological.get(i)) is not None:
            return len(BROKEN) + odd
        if not self.broken_ppm:
            return -1
        h = mix(self.k_broken ^ i)
        if h % 1_000_000 >= self.broken_ppm or i in self.fixed:
            return -1
        return (h >> 32) % len(BROKEN)

    def maker_code(self, i: int) -> int:
        return MAKER_TABLE[mix(self.k_car ^ i) % 1000]

    def record(self, i: int) -> Any:
        """The listing exactly as served."""
        kind = self.broken_kind(i)
        rec = self._build(i, False)[0]
        return rec if kind < 0 else _break(kind, rec, car_id(i), i)

    def truth(self, i: int) -> tuple[bool, dict[str, Any]]:
        """(True, expected cars row) or (False, expected rejection) for a live listing."""
        kind = self.broken_kind(i)
        rec, row = self._build(i, kind < 0)
        if row is not None:
            return True, row
        field, keeps_id = KINDS[kind]
        raw = _break(kind, rec, car_id(i), i, as_stored=True)
        return False, {"id": car_id(i) if keeps_id else None, "field": field, "raw": raw}

    def _build(self, i: int, want_truth: bool) -> tuple[dict[str, Any], dict[str, Any] | None]:
        h0 = h = mix(self.k_car ^ i)  # what the car is
        h, msel = divmod(h, 1000)
        code = MAKER_TABLE[msel]
        maker = MAKERS[code][0] if code < NULL_MAKER else MAKERS[(msel >> 3) % 22][0]
        h, msub = divmod(h, 64)
        model_name, body, ev = maker.models[msub % len(maker.models)]
        model_id = maker.id * 100 + msub % len(maker.models)
        h, gen = divmod(h, 8)
        h, age = divmod(h, 31)
        h, fsel = divmod(h, 100)
        h, psel = divmod(h, 100)
        h, csel = divmod(h, 100)
        h, colsel = divmod(h, len(COLORS))
        h, city = divmod(h, len(CITIES))
        h, eng = divmod(h, len(ENGINES))
        m0 = m = mix(h0)  # how it is spelled: one percent slot per choice
        m, p_maker = divmod(m, 100)
        m, p_model = divmod(m, 100)
        m, p_year = divmod(m, 100)
        m, p_id = divmod(m, 100)
        m, p_unit = divmod(m, 100)
        m, p_cur = divmod(m, 100)
        m, p_fuel = divmod(m, 100)
        m, p_null = divmod(m, 100)
        m, p_pad = divmod(m, 100)
        z = mix(m0)  # identifiers and rates
        w = mix(z)
        w, lot_no = divmod(w, 100_000_000)
        w, km_rate = divmod(w, 17_000)
        w, mi_rate = divmod(w, 950)
        fuel = 3 if ev else FUEL_TABLE[fsel]
        year = 2025 - age

        cid = car_id(i)
        v = self.version[i]
        created, updated = self.times(i)
        status = "reserved" if mix(self.k_ver ^ (i << 24) ^ v) % 10 == 0 else "active"

        currency, per_unit = CURRENCIES[0 if csel < 90 else 1 if csel < 97 else 2]
        won = maker.price * (40 + psel % 80) * max(20, 100 - 4 * age)
        unit = 10_000 if per_unit == 1 else 10
        amount = max(won // per_unit // unit, 5) * unit
        amount = max(amount - v * unit * (1 + w % 20), amount // 2)  # updates lower the price
        in_miles = p_unit < 5
        distance = (age + 1) * (3000 + km_rate) + v * (50 + mi_rate)  # updates add distance
        if in_miles:
            distance = distance * 5 // 8
            km = (distance * 1609344 + 500_000) // 1_000_000  # round half up, exact in integers
        else:
            km = distance

        gen_name = None if gen == 0 else f"Gen {1 + gen % 5}"
        fuel_spellings = FUEL_SPELLINGS[fuel]
        fuel_served = fuel_spellings[0 if p_fuel < 70 else 1 + p_fuel % (len(fuel_spellings) - 1)]
        color = None if p_null % 20 == 1 else COLORS[colsel]
        location = None if p_null % 20 == 2 else CITIES[city]
        transmission = None if p_null % 20 == 3 else "manual" if z >> 61 == 0 else "automatic"
        body_type = None if p_null % 20 == 4 else body
        engine = None if fuel == 3 or p_null % 20 == 5 else ENGINES[eng]
        vin = None if p_null % 20 == 6 else f"{maker.wmi}{z % 16**14:014X}"
        lot = f"{lot_no:08d}"
        images = [f"https://img.example/{cid}/{k}.jpg" for k in range((z >> 56) % 6)]

        if code == NULL_MAKER:
            manufacturer: dict[str, Any] | None = None
        else:
            name = maker.name
            if p_maker >= 70:
                name = maker.spellings[p_maker % len(maker.spellings)]
            manufacturer = {"id": maker.id, "name": name}
        rec: dict[str, Any] = {
            "id": messy(cid) if p_id < 3 else cid,
            "lot_number": lot,
            "vin": vin,
            "manufacturer": manufacturer,
            "model": {"id": model_id, "name": messy(model_name) if p_model < 8 else model_name},
            "generation": None
            if gen_name is None
            else {"id": model_id * 10 + gen, "name": gen_name + " " if p_pad < 5 else gen_name},
            "year": str(year) if p_year < 3 else float(year) if p_year < 6 else year,
            "mileage": {"value": distance, "unit": "mi" if in_miles else "km"},
            "price": {"amount": amount, "currency": currency.lower() if p_cur < 10 else currency},
            "fuel": fuel_served,
            "transmission": transmission,
            "body_type": body_type,
            "color": "" if color is None and p_pad < 50 else color,  # "" cleans to null too
            "engine_cc": engine,
            "location": messy(location) if location and p_pad >= 95 else location,
            "images": images,
            "status": status,
            "created_at": iso(created),
            "updated_at": iso(updated),
        }
        if fuel_served is None:
            del rec["fuel"]
        if not want_truth:
            return rec, None
        row = {
            "id": cid,
            "manufacturer": None if code == NULL_MAKER else maker.name,
            "model": model_name,
            "year": year,
            "mileage_km": km,
            "price": amount,
            "currency": currency,
            "fuel": FUEL_CLASSES[fuel],
            "status": status,
            "source_updated_at": rec["updated_at"],
            "lot_number": lot,
            "vin": vin,
            "generation": gen_name,
            "transmission": transmission,
            "body_type": body_type,
            "color": color,
            "engine_cc": engine,
            "location": location,
            "images": images,
            "source_created_at": rec["created_at"],
        }
        return rec, row

    # ---- queries ------------------------------------------------------------------------

    def get(self, raw_id: str) -> tuple[bool, Any]:
        i = parse_id(raw_id)
        if i is None or i >= self.total or not self.alive[i]:
            return False, None
        return True, self.record(i)

    def page(
        self, page: int, per_page: int, since: int | None, maker: str | None
    ) -> tuple[list[Any], int]:
        """One page of records and the total number of matching listings."""
        code = None if maker is None else MAKER_CODES.get(maker.casefold(), -1)
        if since is None:
            seq = self.live if code is None else self._cached(("maker", code), self._by_maker)
            hi = len(seq) - (page - 1) * per_page  # newest first: read the sorted array backwards
            idx = seq[max(hi - per_page, 0) : hi][::-1] if hi > 0 else ()
        else:
            seq = self._cached(("since", since, code), self._since)
            idx = seq[(page - 1) * per_page : page * per_page]
        return [self.record(i) for i in idx], len(seq)

    def _cached(self, key: tuple[Any, ...], build: Callable[..., array[int]]) -> array[int]:
        hit = self._cache.get(key)
        if hit is None:
            if len(self._cache) >= CACHE_ENTRIES:
                self._cache.clear()
            hit = self._cache[key] = build(*key[1:])
        return hit

    def _codes_all(self) -> bytearray:
        if self._codes is None:
            k, table = self.k_car, MAKER_TABLE
            self._codes = bytearray(table[mix(k ^ i) % 1000] for i in range(self.total))
        return self._codes

    def _by_maker(self, code: int) -> array[int]:
        codes = self._codes_all()
        return array("q", [i for i in self.live if codes[i] == code])

    def _since(self, since: int, code: int | None) -> array[int]:
        """Live listings updated after `since`, in (updated_at, id) order."""
        upd, alive = self.updated, self.alive
        first = bisect.bisect_right(range(self.n0), since, key=lambda j: self._initial_times(j)[1])
        lo = bisect.bisect_left(self.live, first)
        hi = bisect.bisect_left(self.live, self.n0)
        out = array("q", [i for i in self.live[lo:hi] if not upd[i]])
        k = bisect.bisect_right(self.touched_at, since)
        changes = zip(self.touched_at[k:], self.touched[k:], strict=True)
        out.extend(i for ts, i in changes if upd[i] == ts and alive[i])
        if code is None:
            return out
        codes = self._codes_all()
        return array("q", [i for i in out if codes[i] == code])

    # ---- changes ------------------------------------------------------------------------

    def _changed(self) -> None:
        self._cache.clear()

    def _tick(self) -> int:
        # Later than every updated_at so far, and never behind the wall clock (as a real
        # feed's would be), so both "max seen" and "time of last sync" clients find changes.
        self.clock = max(self.clock + 1, int(time.time()))
        return self.clock

    def _pick(self, rng: random.Random, n: int) -> list[int]:
        """Up to n distinct random live valid listings."""
        out: list[int] = []
        seen: set[int] = set()
        live = self.live
        tries = 0
        while live and len(out) < n and tries < 20 * n + 100:
            tries += 1
            i = live[rng.randrange(len(live))]
            if i not in seen and self.broken_kind(i) < 0:
                seen.add(i)
                out.append(i)
        if len(out) < n:  # a small or mostly picked store: finish from a full scan
            rest = [i for i in live if i not in seen and self.broken_kind(i) < 0]
            rng.shuffle(rest)
            out += rest[: n - len(out)]
        return out

    def _touch(self, i: int, ts: int) -> None:
        self.updated[i] = ts
        self.touched_at.append(ts)
        self.touched.append(i)

    def _insert(self, n: int, ts: int) -> list[int]:
        new = list(range(self.total, self.total + n))
        for i in new:
            self.created_new.append(ts)
            self.updated.append(0)
            self.version.append(0)
            self.alive.append(1)
            self.live.append(i)
            self._touch(i, ts)
            if self._codes is not None:
                self._codes.append(self.maker_code(i))
        return new

    def _delete(self, idx: Sequence[int]) -> None:
        for i in idx:
            del self.live[bisect.bisect_left(self.live, i)]
            self.alive[i] = 0

    def mutate(
        self, update: int = 0, insert: int = 0, delete: int = 0, seed: int | None = None
    ) -> dict[str, list[str]]:
        rng = self.rng if seed is None else random.Random(seed)
        picked = self._pick(rng, update + delete)
        updated, deleted = sorted(picked[:update]), sorted(picked[update:])
        ts = self._tick() if updated or insert else 0
        for i in updated:
            self.version[i] += 1
            self._touch(i, ts)
        inserted = self._insert(insert, ts)
        self._delete(deleted)
        self._changed()
        return {
            "updated": [car_id(i) for i in updated],
            "inserted": [car_id(i) for i in inserted],
            "deleted": [car_id(i) for i in deleted],
        }

    def drift(self, inserts: int, deletes: int) -> None:
        """Page drift: new listings at the front, random ones gone, as between two requests."""
        if inserts:
            self._insert(inserts, self._tick())
        if deletes:
            self._delete(sorted(self._pick(self.rng, deletes)))
        if inserts or deletes:
            self._changed()

    def undelete(self, ids: Sequence[str]) -> list[str]:
        back = []
        for raw in ids:
            i = parse_id(raw)
            if i is not None and i < self.total and not self.alive[i]:
                bisect.insort(self.live, i)
                self.alive[i] = 1
                back.append(car_id(i))
        if back:
            self._changed()
        return back

    def _fixable_all(self) -> array[int]:
        """Listings broken at start in a way that keeps their id (year, price, mileage kinds)."""
        if self._fixable is None:
            k, ppm, kinds = self.k_broken, self.broken_ppm, len(BROKEN)
            self._fixable = array(
                "q",
                [
                    i
                    for i in range(self.n0 if ppm else 0)
                    if (h := mix(k ^ i)) % 1_000_000 < ppm
                    and BROKEN[(h >> 32) % kinds][1]
                    and i not in self.pathological
                ],
            )
        return self._fixable

    def fix(self, count: int = 0, ids: Sequence[str] = (), seed: int | None = None) -> list[str]:
        """Fix broken listings at the source: from now on they are served valid.

        Fixes the listed ids that name a live broken listing with a usable id, then up to
        `count` more such listings picked at random. Fixed listings get one fresh updated_at
        (later than every other), so an updated_since sync finds them. Returns the fixed ids.
        """
        rng = self.rng if seed is None else random.Random(seed)
        fixable, alive, fixed = self._fixable_all(), self.alive, self.fixed
        chosen: set[int] = set()
        for raw in ids:
            i = parse_id(raw)
            if i is None or i >= self.total or not alive[i] or i in fixed:
                continue
            k = bisect.bisect_left(fixable, i)
            if k < len(fixable) and fixable[k] == i:
                chosen.add(i)
        if count:
            rest = [i for i in fixable if alive[i] and i not in fixed and i not in chosen]
            chosen.update(rng.sample(rest, min(count, len(rest))))
        if not chosen:
            return []
        ts = self._tick()
        done = sorted(chosen)
        for i in done:
            fixed.add(i)
            self._touch(i, ts)
        self._changed()
        return [car_id(i) for i in done]

    def truth_json(self, chunk: int = 2000) -> Iterator[bytes]:
        """The truth as JSON in pieces: {"cars": [...], "rejected": [...], "deleted": [...]}.

        Built from a copy of the per-listing state taken first (a few MB even for a million
        listings), so changes made while it is sent do not show in it, and memory stays small.
        """
        snap = copy.copy(self)
        snap.live, snap.alive = array("q", self.live), bytearray(self.alive)
        snap.updated, snap.version = array("q", self.updated), array("I", self.version)
        snap.created_new = array("q", self.created_new)
        snap.fixed = set(self.fixed)
        gone, i = [], self.alive.find(0)
        while i >= 0:
            gone.append(car_id(i))
            i = self.alive.find(0, i + 1)
        rejected: list[Any] = []
        sep = b""
        yield b'{"cars":['
        for start in range(0, len(snap.live), chunk):
            cars: list[Any] = []
            for i in snap.live[start : start + chunk]:
                ok, row = snap.truth(i)
                (cars if ok else rejected).append(row)
            if cars:
                yield sep + dumps(cars)[1:-1]
                sep = b","
        yield b'],"rejected":%s,"deleted":%s}' % (dumps(rejected), orjson.dumps(gone))
