"""`python -m benchmarks`: time carsync's full sync and unchanged re-sync against the simulator.

Prints seconds, rows/s and peak memory (PSS, summed over carsync's own processes: the CLI and
anything it forks, the simulator and PostgreSQL excluded) and writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import psycopg
from psycopg import sql

from carsync_dagster.simulator.process import RunningSimulator, start_simulator
from carsync_dagster.warehouse.embedded import embedded_database_url, start_embedded_postgres

RESULTS = Path(__file__).parent / "results"


def _pss(process: psutil.Process) -> int:
    try:
        return int(process.memory_full_info().pss)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0


def run_measured(command: list[str], env: dict[str, str], cwd: Path) -> dict[str, Any]:
    """Run a command; sample the PSS of it and its children every 50 ms."""
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, text=True)
    root = psutil.Process(process.pid)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            try:
                family = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            peak = max(peak, sum(_pss(p) for p in family))
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, _ = process.communicate()
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed with exit code {process.returncode}")
    summary = json.loads(stdout.strip().splitlines()[-1])
    return {"seconds": round(seconds, 2), "peak_pss_mb": round(peak / 2**20, 1), **summary}


HOSTILE = (
    "--error-rate", "0.05", "--overload-429", "0.05", "--truncate-rate", "0.01",
    "--html-rate", "0.01", "--hang-rate", "0.01", "--hang-seconds", "30",
)  # fmt: skip
LIMIT_RPS = 30


class Bench:
    """Runs `carsync sync --json` as a separate process against simulators it starts."""

    def __init__(self, workdir: Path, database_url: str) -> None:
        self.workdir, self.database_url = workdir, database_url

    def sync(
        self, simulator: RunningSimulator, schema: str, *flags: str, **settings: str
    ) -> dict[str, Any]:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("CARSYNC_")},
            "API_BASE_URL": simulator.base_url,
            "API_KEY": simulator.api_key,
            "DATABASE_URL": self.database_url,
            "CARSYNC_SCHEMA": schema,
            "CARSYNC_DATA_DIR": str(self.workdir / schema),
            "DAGSTER_HOME": str(self.workdir / "dagster"),
            **settings,
        }
        command = [sys.executable, "-m", "carsync_dagster", "sync", "--json", *flags]
        return run_measured(command, env, self.workdir)

    def cold(self, schema: str) -> str:
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
        return schema

    def row_versions(self, schema: str) -> dict[str, str]:
        """id → xmin of every row of cars: a row rewritten in any way gets a new xmin."""
        with psycopg.connect(self.database_url) as conn:
            query = sql.SQL("SELECT id, xmin::text FROM {}.cars").format(sql.Identifier(schema))
            return dict(conn.execute(query).fetchall())


class ReaderLoop:
    """The web app meanwhile: point and range queries on cars, latencies kept."""

    def __init__(self, database_url: str, schema: str) -> None:
        self.database_url, self.schema = database_url, schema
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ReaderLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        point = sql.SQL("SELECT * FROM {}.cars WHERE id = %s").format(sql.Identifier(self.schema))
        range_query = sql.SQL(
            "SELECT count(*), avg(price) FROM {}.cars_active"
            " WHERE manufacturer = 'Kia' AND year BETWEEN 2015 AND 2020"
        ).format(sql.Identifier(self.schema))
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            number = 0
            while not self._stop.wait(0.005):
                number += 1
                started = time.perf_counter()
                try:
                    conn.execute(point, (f"KA{number * 7919 % 200_000:09d}",)).fetchone()
                    conn.execute(range_query).fetchone()
                except psycopg.errors.UndefinedTable:
                    continue  # the schema is created by the sync's first migration
                self.latencies.append(time.perf_counter() - started)

    def p99_ms(self) -> float:
        ordered = sorted(self.latencies)
        return round(ordered[int(0.99 * (len(ordered) - 1))] * 1000, 1) if ordered else 0.0


def server_limited(bench: Bench, seconds: float) -> dict[str, Any]:
    """A sync against a 30 requests/s limit (burst 10): the rate the server admitted."""
    pages = max(20, int(LIMIT_RPS * seconds))
    args = ["--rate-limit", str(LIMIT_RPS), "--burst", "10", "--broken-rate", "0"]
    with start_simulator(cars=pages * 10, seed=2, args=args) as simulator:
        run = bench.sync(simulator, bench.cold("carsync_bench_limited"), CARSYNC_PAGE_SIZE="10")
        stats = simulator.control.stats()
    per_second = {int(k): v for k, v in stats["admitted_per_second"].items()}
    whole = sorted(per_second)[1:-1] or sorted(per_second)  # first and last are partial
    admitted = stats["by_status"].get("200", 0)
    rejected = stats["by_status"].get("429", 0)
    achieved = sum(per_second[s] for s in whole) / len(whole)
    return {
        **run,
        "limit_rps": LIMIT_RPS,
        "achieved_rps": round(achieved, 1),
        "fraction_of_limit": round(achieved / LIMIT_RPS, 3),
        "fraction_429": round(rejected / max(1, admitted + rejected), 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--cars", type=int, default=200_000)
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL"))
    parser.add_argument("--limit-seconds", type=float, default=25.0)
    parser.add_argument("--output", type=Path, default=RESULTS / "benchmark.json")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="carsync-bench-") as tmp:
        workdir = Path(tmp)
        server = None
        database_url = args.database_url
        if not database_url:
            server = start_embedded_postgres(workdir)
            database_url = embedded_database_url(server)
        bench = Bench(workdir, database_url)
        try:
            results: dict[str, Any] = {"cars": args.cars}
            with start_simulator(cars=args.cars, seed=1) as simulator:
                schema = bench.cold("carsync_bench")
                with ReaderLoop(database_url, schema) as reader:
                    results["full_sync"] = bench.sync(simulator, schema)
                results["full_sync"]["reader_p99_ms"] = reader.p99_ms()
                results["full_sync"]["reader_queries"] = len(reader.latencies)
                before = bench.row_versions(schema)
                results["unchanged_resync"] = bench.sync(simulator, schema)
                after = bench.row_versions(schema)
                results["unchanged_resync"]["cars_rows_written"] = sum(
                    before.get(car_id) != xmin for car_id, xmin in after.items()
                )
                simulator.control.mutate(update=args.cars // 100)
                results["incremental_1pct"] = bench.sync(simulator, schema, "--incremental")
            with start_simulator(cars=args.cars, seed=1, args=HOSTILE) as simulator:
                results["hostile_sync"] = bench.sync(simulator, bench.cold("carsync_bench_hostile"))
            results["server_limited"] = server_limited(bench, args.limit_seconds)
        finally:
            if server is not None:
                server.cleanup()

    report(results)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2))
    print(f"results: {args.output}")
    return 0


def report(results: dict[str, Any]) -> None:
    rows = results["cars"]
    line = "{:<18}{:>9}{:>10}{:>13}{:>10}{:>11}{:>9}"
    print(
        line.format("run", "seconds", "rows/s", "peak PSS MB", "inserted", "unchanged", "retries")
    )
    for name in ("full_sync", "unchanged_resync", "incremental_1pct", "hostile_sync"):
        run = results[name]
        print(
            line.format(
                name,
                f"{run['seconds']:.2f}",
                f"{rows / run['seconds']:,.0f}",
                f"{run['peak_pss_mb']:.1f}",
                f"{run['inserted']:,}",
                f"{run['unchanged']:,}",
                f"{run['retries']:,}",
            )
        )
    full, unchanged = results["full_sync"], results["unchanged_resync"]
    print(
        f"reader p99 during the full sync's merge: {full['reader_p99_ms']} ms over "
        f"{full['reader_queries']} point+range queries (target <= 50 ms)"
    )
    print(
        f"unchanged re-sync: {unchanged['cars_rows_written']} rows of cars written (by xmin); "
        f"1% incremental: {results['incremental_1pct']['seconds']:.2f} s (target <= 3 s)"
    )
    ratio = results["hostile_sync"]["seconds"] / results["full_sync"]["seconds"]
    limited = results["server_limited"]
    print(f"hostile / clean full sync: {ratio:.2f}x (target <= 1.5x)")
    print(
        f"server limit {limited['limit_rps']} req/s: achieved {limited['achieved_rps']} req/s"
        f" = {limited['fraction_of_limit']:.0%} of the limit (target >= 90%),"
        f" {limited['fraction_429']:.1%} of requests got 429"
    )


if __name__ == "__main__":
    raise SystemExit(main())
