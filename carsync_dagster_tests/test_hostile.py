"""A hostile API: faults, rate limits, a wrong key, an outage, pathological values. Real
simulator (or a real HTTP server of hand-made records), real PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import psycopg

from carsync_dagster.simulator.process import start_simulator
from carsync_dagster_tests.conftest import carsync_env, run_carsync
from carsync_dagster_tests.warehouse_truth import differences, tables_holding

HOSTILE = [
    "--error-rate", "0.05", "--overload-429", "0.05", "--truncate-rate", "0.01",
    "--html-rate", "0.01", "--hang-rate", "0.01", "--hang-seconds", "30",
]  # fmt: skip


def _last_json(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stderr}"
    summary: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return summary


def test_hostile_profile_ends_exact_and_keeps_the_key_secret(
    database_url: str, tmp_path: Path
) -> None:
    with start_simulator(cars=20_000, seed=5, args=["--broken-rate", "0.01", *HOSTILE]) as sim:
        env = carsync_env(tmp_path, database_url, sim, CARSYNC_PAGES_PER_PARTITION="20")
        result = run_carsync(["sync", "--json"], env, tmp_path)
        summary = _last_json(result)
        assert differences(sim.control.truth(), database_url) == []
        errors = summary["errors"]
        for kind in ("5xx", "429", "truncated", "html"):
            assert errors.get(kind, 0) > 0, f"no {kind} seen: {errors}"
        assert summary["hedged"] > 0, "hung responses are raced by a second copy"
        assert summary["retries"] >= sum(errors.values())
        assert sim.api_key not in result.stdout + result.stderr
        assert tables_holding(database_url, sim.api_key) == []


def _server_errors(stats: dict[str, Any]) -> int:
    return sum(n for status, n in stats["by_status"].items() if status.startswith("5"))


def _server_counts(stats: dict[str, Any]) -> tuple[int, int, dict[int, int]]:
    per_second = {int(k): v for k, v in stats["admitted_per_second"].items()}
    return stats["by_status"].get("200", 0), stats["by_status"].get("429", 0), per_second


def test_adaptive_rate_finds_the_server_limit(database_url: str, tmp_path: Path) -> None:
    # 30 requests/s with a burst of 10; 700 pages take a little over 20 s at that rate.
    with start_simulator(
        cars=7_000, seed=3, args=["--rate-limit", "30", "--burst", "10", "--broken-rate", "0"]
    ) as sim:
        env = carsync_env(
            tmp_path, database_url, sim, CARSYNC_PAGE_SIZE="10", CARSYNC_PAGES_PER_PARTITION="100"
        )
        sim.control.reset_stats()
        _last_json(run_carsync(["sync", "--json"], env, tmp_path))
        admitted, rejected, per_second = _server_counts(sim.control.stats())
    busy = sorted(per_second)[1:-1]  # whole seconds only: the first and last are partial
    assert len(busy) >= 20, "measure over at least 20 s"
    achieved = sum(per_second[s] for s in busy) / len(busy)
    assert achieved >= 0.9 * 30, f"achieved {achieved:.1f} requests/s of 30"
    assert rejected <= 0.03 * (admitted + rejected), f"{rejected} 429s of {admitted + rejected}"


def test_a_rate_ceiling_is_never_exceeded(database_url: str, tmp_path: Path) -> None:
    with start_simulator(cars=2_000, seed=3, args=["--broken-rate", "0"]) as sim:
        env = carsync_env(
            tmp_path, database_url, sim, CARSYNC_PAGE_SIZE="10", CARSYNC_RPS="20",
            CARSYNC_PAGES_PER_PARTITION="50",
        )  # fmt: skip
        sim.control.reset_stats()
        _last_json(run_carsync(["sync", "--json"], env, tmp_path))
        _, _, per_second = _server_counts(sim.control.stats())
    assert len(per_second) >= 8
    assert max(per_second.values()) <= 20, per_second


def test_a_wrong_key_stops_at_once_without_retrying(database_url: str, tmp_path: Path) -> None:
    with start_simulator(cars=1_000, seed=3) as sim:
        env = carsync_env(tmp_path, database_url, sim, API_KEY="wrong-key-do-not-print")
        started = time.monotonic()
        result = run_carsync(["sync", "--json"], env, tmp_path, timeout=60)
        seconds = time.monotonic() - started
        stats = sim.control.stats()
    assert result.returncode != 0
    assert "401" in result.stderr and "API_KEY" in result.stderr
    assert stats["requests"] == 1 and stats["by_status"] == {"401": 1}, "a 401 is not retried"
    assert seconds < 10, f"took {seconds:.1f}s (process start included)"
    output = result.stdout + result.stderr
    assert "wrong-key-do-not-print" not in output and sim.api_key not in output


def test_circuit_breaker_pauses_during_an_outage_and_the_sync_completes(
    database_url: str, tmp_path: Path
) -> None:
    with start_simulator(cars=4_000, seed=9, args=["--latency-ms", "20"]) as sim:
        env = carsync_env(
            tmp_path, database_url, sim, CARSYNC_PAGES_PER_PARTITION="5",
            CARSYNC_CONCURRENCY="4", CARSYNC_BREAKER_COOLDOWN="1",
        )  # fmt: skip
        process = subprocess.Popen(
            [sys.executable, "-m", "carsync_dagster", "sync", "--json"],
            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        landing = tmp_path / "data" / "landing"
        deadline = time.monotonic() + 60
        while not list(landing.glob("*.json")):
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.05)
        sim.control.configure(error_rate=1.0)  # the outage
        while _server_errors(sim.control.stats()) < 10:
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.1)
        time.sleep(2.5)  # a few cool-downs and failed probes
        sim.control.configure(error_rate=0.0)  # healed
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr
        assert differences(sim.control.truth(), database_url) == []
    assert stderr.count("circuit open") == 1, stderr
    assert stderr.count("circuit closed") == 1, stderr
    assert json.loads(stdout.strip().splitlines()[-1])["errors"]["5xx"] >= 10


@dataclass(frozen=True)
class Feed:
    base_url: str
    api_key: str = "feed-key"


@contextmanager
def serving(records: list[bytes]) -> Iterator[Feed]:
    """The listings API on a loopback port, serving these JSON texts as its records: the
    simulator serves only records of its own making. `updated_since` is not needed here."""
    feed_key = Feed("").api_key

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urlsplit(self.path)
            if self.headers.get("X-API-Key") != feed_key:
                return self._send(401, b'{"error": "unknown key"}')
            if url.path != "/cars":
                return self._send(404, b'{"error": "no such listing"}')
            query = {key: int(values[0]) for key, values in parse_qs(url.query).items()}
            page, per_page = query.get("page", 1), query.get("per_page", 100)
            meta = {
                "current_page": page,
                "per_page": per_page,
                "last_page": max(1, -(-len(records) // per_page)),
                "total": len(records),
            }
            data = b",".join(records[(page - 1) * per_page : page * per_page])
            self._send(200, b'{"data":[' + data + b'],"meta":' + json.dumps(meta).encode() + b"}")

        def _send(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Feed(f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()


def _car(car_id: str, **changes: Any) -> dict[str, Any]:
    car = {
        "id": car_id,
        "lot_number": "47556665",
        "manufacturer": {"id": 6, "name": "Audi"},
        "model": {"id": 603, "name": "Q7"},
        "year": 2019,
        "mileage": {"value": 96743, "unit": "km"},
        "price": {"amount": 65500000, "currency": "KRW"},
        "fuel": "Gasoline",
        "engine_cc": 2999,
        "images": [f"https://img.example/{car_id}/0.jpg"],
        "status": "active",
        "updated_at": "2026-03-11T10:39:30Z",
    }
    return car | changes


BIG = 2**70  # 1180591620717411303424: beyond 64 bits, and not a double
FIVE_MB = "x" * 5_000_000
DIGITS = "1" + "0" * 5000  # more digits than Python's int() converts


def _nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


def test_pathological_values_cost_only_their_records(database_url: str, tmp_path: Path) -> None:
    """Through the real HTTP path into real PostgreSQL: a huge integer is stored exactly or
    rejected, never changed; text of any length is stored whole, but where it is indexed; NUL
    is stored as U+FFFD; a bad value costs its record only, every good one is merged."""
    valid = {  # by the id stored
        "price-big": _car("price-big", price={"amount": BIG, "currency": "KRW"}),
        "lot-big": _car("lot-big", lot_number=BIG, extra=[2**100, -(2**100)]),
        "extra-5mb": _car("extra-5mb", extra=FIVE_MB),
        "location-5mb": _car("location-5mb", location=FIVE_MB),
        "extra-deep": _car("extra-deep", extra=_nested(500)),
        "extra-nul": _car("extra-nul", extra="\x00", **{"ke\x00y": 1}),
        "model-nul": _car("model-nul", model={"name": "Q\x007"}),
        "id-\ufffd": _car("id-\x00"),
    }
    bad = {
        "mileage-big": (
            _car("mileage-big", mileage={"value": BIG, "unit": "km"}),
            f"mileage: value {BIG} is too",
        ),
        "year-big": (_car("year-big", year=BIG), f"year: {BIG} is outside 1950.."),
        "engine-big": (_car("engine-big", engine_cc=BIG), f"engine_cc: {BIG} is outside"),
        "price-digits": (_car("price-digits", price={"amount": "DIGITS"}), "price: amount 1000"),
        "model-5mb": (_car("model-5mb", model={"name": FIVE_MB}), "model: 'xxx"),  # indexed
        "deep": (_car("deep", year="x", extra=_nested(500)), "year: 'x' is not an integer"),
    }
    texts = [json.dumps(_car(f"KA{n:09d}")).encode() for n in range(20)]
    texts += [json.dumps(car).encode() for car in valid.values()]
    texts += [
        json.dumps(car).encode().replace(b'"DIGITS"', DIGITS.encode()) for car, _ in bad.values()
    ]
    # Rejected without an id: items that are not objects, and an id too long to index.
    without_id = [b"7", b'"a string"', b"null", b"[1, 2]", json.dumps(_car(FIVE_MB)).encode()]
    texts += without_id
    texts = texts[::2] + texts[1::2]  # the bad records among the good on every page
    with serving(texts) as feed:
        env = carsync_env(
            tmp_path, database_url, feed, CARSYNC_PAGE_SIZE="4", CARSYNC_PAGES_PER_PARTITION="2",
            CARSYNC_MAX_REJECTED="1",
        )  # fmt: skip
        summary = _last_json(run_carsync(["sync", "--json"], env, tmp_path))
    with psycopg.connect(database_url) as conn:
        cars: dict[str, str] = dict(
            conn.execute("SELECT id, price::text FROM carsync.cars").fetchall()
        )
        lot = conn.execute("SELECT lot_number FROM carsync.cars WHERE id = 'lot-big'").fetchone()
        location = conn.execute(
            "SELECT location FROM carsync.cars WHERE id = 'location-5mb'"
        ).fetchone()
        model = conn.execute("SELECT model FROM carsync.cars WHERE id = 'model-nul'").fetchone()
        rejected = conn.execute(
            "SELECT id, reason, raw FROM carsync.cars_rejected WHERE resolved_at IS NULL"
        ).fetchall()
    assert set(cars) == {f"KA{n:09d}" for n in range(20)} | set(valid)
    assert cars["price-big"] == "1180591620717411303424"
    assert lot == ("1180591620717411303424",)
    assert location == (FIVE_MB,) and model == ("Q\ufffd7",)
    reasons = {car_id: reason for car_id, reason, _ in rejected if car_id is not None}
    assert reasons.keys() == bad.keys()
    for car_id, (_, start) in bad.items():
        assert reasons[car_id].startswith(start), (car_id, reasons[car_id])
    raws = {car_id: raw for car_id, _, raw in rejected}
    assert raws["mileage-big"]["mileage"]["value"] == BIG  # jsonb keeps it exact
    assert raws["price-digits"]["price"]["amount"] == DIGITS
    assert raws["model-5mb"]["model"]["name"] == FIVE_MB
    assert raws["deep"]["extra"] == _nested(500)
    no_id = sorted(reason.split(":")[0] for car_id, reason, _ in rejected if car_id is None)
    assert no_id == ["id", "record", "record", "record", "record"]
    [(id_reason, id_raw)] = [(r, raw) for car_id, r, raw in rejected if r.startswith("id:")]
    assert id_reason.endswith("is longer than 1000 bytes") and id_raw["id"] == FIVE_MB
    assert summary["rejected"] == len(bad) + len(without_id), summary
