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

from carsync_dagster.simulator.process import start_simulator
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--cars", type=int, default=200_000)
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL"))
    parser.add_argument("--output", type=Path, default=RESULTS / "benchmark.json")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="carsync-bench-") as tmp:
        workdir = Path(tmp)
        server = None
        database_url = args.database_url
        if not database_url:
            server = start_embedded_postgres(workdir)
            database_url = embedded_database_url(server)
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("DROP SCHEMA IF EXISTS carsync_bench CASCADE")  # a cold warehouse
        try:
            with start_simulator(cars=args.cars, seed=1) as simulator:
                env = {
                    **{k: v for k, v in os.environ.items() if not k.startswith("CARSYNC_")},
                    "API_BASE_URL": simulator.base_url,
                    "API_KEY": simulator.api_key,
                    "DATABASE_URL": database_url,
                    "CARSYNC_SCHEMA": "carsync_bench",
                    "CARSYNC_DATA_DIR": str(workdir / "data"),
                    "DAGSTER_HOME": str(workdir / "dagster"),
                }
                command = [sys.executable, "-m", "carsync_dagster", "sync", "--json"]
                results = {
                    "cars": args.cars,
                    "full_sync": run_measured(command, env, workdir),
                    "unchanged_resync": run_measured(command, env, workdir),
                }
        finally:
            if server is not None:
                server.cleanup()

    rows = results["cars"]
    line = "{:<18}{:>9}{:>10}{:>13}{:>10}{:>11}"
    print(line.format("run", "seconds", "rows/s", "peak PSS MB", "inserted", "unchanged"))
    for name in ("full_sync", "unchanged_resync"):
        run = results[name]
        print(
            line.format(
                name,
                f"{run['seconds']:.2f}",
                f"{rows / run['seconds']:,.0f}",
                f"{run['peak_pss_mb']:.1f}",
                f"{run['inserted']:,}",
                f"{run['unchanged']:,}",
            )
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2))
    print(f"results: {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
