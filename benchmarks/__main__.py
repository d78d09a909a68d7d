"""`python -m benchmarks`: time carsync's full sync and unchanged re-sync against the simulator.

Beside carsync, the same simulator is loaded into the same PostgreSQL by two peers (issue 7): a
script a user would write (peers/seed_script.py) and dlt's rest_api source (peers/dlt_pipeline.py),
each into its own schema. Prints seconds, rows/s, peak memory (PSS, summed over the tool's own
processes: the simulator and PostgreSQL excluded) and the rows of cars each run wrote, and writes
JSON and PNG plots to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import psycopg
from psycopg import sql

from benchmarks.common import HOSTILE, PEERS, peers_python
from carsync_dagster.simulator.process import RunningSimulator, start_simulator
from carsync_dagster.warehouse.embedded import embedded_database_url, start_embedded_postgres

RESULTS = Path(__file__).parent / "results"
MILLION = 1_000_000
RUN_NAMES = ("full_sync", "unchanged_resync", "incremental_1pct", "hostile_sync")
PEER_RUNS = ("full_sync", "unchanged_resync")  # the kinds of run the peers do too


def _pss(process: psutil.Process) -> int:
    try:
        return int(process.memory_full_info().pss)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0


def _own_cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def _server_cpu(postmaster: psutil.Process) -> float:
    """The postmaster's CPU with that of every backend it started, live or ended."""
    times = postmaster.cpu_times()
    total = times.user + times.system + times.children_user + times.children_system
    for backend in postmaster.children():
        with contextlib.suppress(psutil.NoSuchProcess):  # ended: now in children_user/system
            total += _own_cpu(backend)
    return total


def local_postmaster(database_url: str) -> psutil.Process | None:
    """The PostgreSQL server's main process, when it runs on this machine (else None)."""
    with psycopg.connect(database_url) as conn:  # open while its backend is looked up
        row = conn.execute("SELECT pg_backend_pid(), pg_postmaster_start_time()").fetchone()
        assert row is not None
        try:
            postmaster = psutil.Process(row[0]).parent()
            # The pid is the server's: on another machine it may name an unrelated process here.
            if postmaster is None or abs(postmaster.create_time() - row[1].timestamp()) > 2:
                return None
            _server_cpu(postmaster)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None
    return postmaster


class CpuMeter:
    """Core-seconds of CPU used while a run lasts: by the tool (the processes this benchmark
    started and waited for), the simulator, and PostgreSQL (None unless on this machine). On a
    machine of N cores a run cannot take less than their sum / N seconds."""

    def __init__(self, postmaster: psutil.Process | None) -> None:
        self.postmaster = postmaster

    def read(self, simulator: RunningSimulator) -> dict[str, float | None]:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return {
            "tool": children.ru_utime + children.ru_stime,
            "simulator": _own_cpu(psutil.Process(simulator.process.pid)),
            "postgres": _server_cpu(self.postmaster) if self.postmaster else None,
        }

    @staticmethod
    def used(before: dict[str, float | None], after: dict[str, float | None]) -> dict[str, Any]:
        used = {
            name: None if start is None or end is None else round(end - start, 2)
            for (name, start), end in zip(before.items(), after.values(), strict=True)
        }
        known = [value for value in used.values() if value is not None]
        return {**used, "total": round(sum(known), 2) if len(known) == len(used) else None}


def run_measured(command: list[str], env: dict[str, str], cwd: Path) -> dict[str, Any]:
    """Run a command; sample the PSS of it and its children every 50 ms.

    `seconds` is the tool's own figure when its JSON line has one (timed after its imports), else
    the wall time; `wall_seconds` is always the whole process, interpreter start included.
    """
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
    wall = round(seconds, 2)
    return {"seconds": wall, "wall_seconds": wall, "peak_pss_mb": round(peak / 2**20, 1), **summary}


LIMIT_RPS = 30


class Bench:
    """Runs `carsync sync --json` as a separate process against simulators it starts."""

    def __init__(self, workdir: Path, database_url: str) -> None:
        self.workdir, self.database_url = workdir, database_url
        self.cpu = CpuMeter(local_postmaster(database_url))

    def env(self, simulator: RunningSimulator, **settings: str) -> dict[str, str]:
        """The key and the database URL travel in the environment only, never in argv."""
        return {
            **{k: v for k, v in os.environ.items() if not k.startswith("CARSYNC_")},
            "API_BASE_URL": simulator.base_url,
            "API_KEY": simulator.api_key,
            "DATABASE_URL": self.database_url,
            **settings,
        }

    def sync(
        self, simulator: RunningSimulator, schema: str, *flags: str, **settings: str
    ) -> dict[str, Any]:
        env = self.env(
            simulator,
            CARSYNC_SCHEMA=schema,
            CARSYNC_DATA_DIR=str(self.workdir / schema),
            DAGSTER_HOME=str(self.workdir / "dagster"),
            **settings,
        )
        command = [sys.executable, "-m", "carsync_dagster", "sync", "--json", *flags]
        return run_measured(command, env, self.workdir)

    def new_instance(self, simulator: RunningSimulator) -> float:
        """Seconds of `carsync status` on a new Dagster home: creating Dagster's storage tables,
        which happens once per instance, not in a nightly sync, so it is timed on its own."""
        env = self.env(
            simulator,
            CARSYNC_SCHEMA="carsync_bench_instance",  # the measured runs migrate their own
            DAGSTER_HOME=str(self.workdir / "dagster"),
        )
        command = [sys.executable, "-m", "carsync_dagster", "status", "--json"]
        return float(run_measured(command, env, self.workdir)["wall_seconds"])

    def seed(self, simulator: RunningSimulator, schema: str) -> dict[str, Any]:
        """The user's script runs on carsync's python: it needs only httpx and psycopg."""
        command = [sys.executable, str(PEERS / "seed_script.py"), "--schema", schema]
        return run_measured(command, self.env(simulator), self.workdir)

    def bare_fetch(self, simulator: RunningSimulator) -> dict[str, Any]:
        """The floor: every page read and thrown away (peers/bare_fetch.py)."""
        command = [sys.executable, str(PEERS / "bare_fetch.py")]
        return run_measured(command, self.env(simulator), self.workdir)

    def dlt(self, simulator: RunningSimulator, schema: str, python: Path) -> dict[str, Any]:
        # Its pipeline state lives in this run's workdir, so benchmarks never share it.
        pipelines = str(self.workdir / "dlt-pipelines")
        command = [str(python), str(PEERS / "dlt_pipeline.py"), "--schema", schema]
        return run_measured(
            [*command, "--pipelines-dir", pipelines], self.env(simulator), self.workdir
        )

    def cold(self, schema: str) -> str:
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            # dlt's merge stages its loads in a schema of its own beside the dataset.
            for name in (schema, f"{schema}_staging"):
                drop = sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name))
                conn.execute(drop)
        return schema

    def row_versions(self, schema: str) -> dict[str, str]:
        """id → xmin of every row of cars (none yet: empty): a rewritten row gets a new xmin."""
        with psycopg.connect(self.database_url) as conn:
            query = sql.SQL("SELECT id, xmin::text FROM {}.cars").format(sql.Identifier(schema))
            try:
                return dict(conn.execute(query).fetchall())
            except psycopg.errors.UndefinedTable:
                return {}

    def observed(
        self, simulator: RunningSimulator, schema: str, run: Callable[[], dict[str, Any]]
    ) -> dict[str, Any]:
        """`run` plus the rows of `schema`.cars it wrote, the API's admitted requests/s and the
        core-seconds of CPU used meanwhile."""
        before = self.row_versions(schema)
        simulator.control.reset_stats()
        cpu_before = self.cpu.read(simulator)
        started = time.time()
        result = run()
        ended = time.time()
        cpu = self.cpu.used(cpu_before, self.cpu.read(simulator))
        admitted = simulator.control.stats()["admitted_per_second"]  # epoch second → requests
        after = self.row_versions(schema)
        return {
            **result,
            "rows_written": sum(before.get(car_id) != xmin for car_id, xmin in after.items()),
            "cpu_seconds": cpu,
            # Second n of the list is second n since the run started (pages, for list calls).
            "pages_per_second": [
                admitted.get(str(s), 0) for s in range(int(started), int(ended) + 1)
            ],
        }


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
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["chaos"]:  # `python -m benchmarks chaos`: benchmarks/chaos.py
        from benchmarks.chaos import main as chaos

        return chaos(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        epilog="python -m benchmarks chaos --help: the chaos scenarios (benchmarks/chaos.py)",
    )
    parser.add_argument("--cars", type=int, default=200_000)
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL"))
    parser.add_argument("--limit-seconds", type=float, default=25.0)
    parser.add_argument("--output", type=Path, default=RESULTS / "benchmark.json")
    parser.add_argument(
        "--peers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the seed script and dlt (and draw the plots, which need their virtualenv)",
    )
    parser.add_argument(
        "--million", action="store_true", help=f"also a full sync of {MILLION:,} cars (slow)"
    )
    args = parser.parse_args(argv)
    # Built before anything is timed: the first time it takes a while.
    python = peers_python() if args.peers else None

    with tempfile.TemporaryDirectory(prefix="carsync-bench-") as tmp:
        workdir = Path(tmp)
        server = None
        database_url = args.database_url
        if not database_url:
            server = start_embedded_postgres(workdir)
            database_url = embedded_database_url(server)
        bench = Bench(workdir, database_url)
        try:
            results = run_all(bench, args.cars, args.limit_seconds, python, args.million)
        finally:
            if server is not None:
                server.cleanup()

    report(results)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2))
    print(f"results: {args.output}")
    if python is not None:
        drawn = subprocess.run(
            [str(python), str(PEERS / "plots.py"), str(args.output)],
            stdout=subprocess.PIPE, text=True, check=True,
        )  # fmt: skip
        print(f"plots: {', '.join(json.loads(drawn.stdout.splitlines()[-1])['plots'])}")
    return 0


def run_all(
    bench: Bench, cars: int, limit_seconds: float, peers: Path | None, million: bool
) -> dict[str, Any]:
    results: dict[str, Any] = {"cars": cars}
    with start_simulator(cars=cars, seed=1) as simulator:
        results["new_instance_seconds"] = bench.new_instance(simulator)
        schema = bench.cold("carsync_bench")

        # Every tool's full sync runs alone on the machine; the readers get a run of their own.
        results["full_sync"] = bench.observed(
            simulator, schema, lambda: bench.sync(simulator, schema)
        )
        results["unchanged_resync"] = bench.observed(
            simulator, schema, lambda: bench.sync(simulator, schema)
        )
        if peers is not None:
            # Before the mutation below: the peers load exactly the data carsync loaded.
            seed, dlt = bench.cold("peer_seed"), bench.cold("peer_dlt")
            results["peers"] = {
                "seed": cold_and_unchanged(
                    bench, simulator, seed, lambda: bench.seed(simulator, seed)
                ),
                "dlt": cold_and_unchanged(
                    bench, simulator, dlt, lambda: bench.dlt(simulator, dlt, peers)
                ),
            }
        results["bare_fetch"] = bench.bare_fetch(simulator)
        results["full_sync_with_readers"] = with_readers(bench, simulator)
        simulator.control.mutate(update=cars // 100)
        results["incremental_1pct"] = bench.observed(
            simulator, schema, lambda: bench.sync(simulator, schema, "--incremental")
        )
    with start_simulator(cars=cars, seed=1, args=HOSTILE) as simulator:
        hostile = bench.cold("carsync_bench_hostile")
        results["hostile_sync"] = bench.observed(
            simulator, hostile, lambda: bench.sync(simulator, hostile)
        )
    results["server_limited"] = server_limited(bench, limit_seconds)
    if million:
        with start_simulator(cars=MILLION, seed=1) as simulator:
            big = bench.cold("carsync_bench_million")
            run = bench.observed(simulator, big, lambda: bench.sync(simulator, big))
        ratio = run["peak_pss_mb"] / results["full_sync"]["peak_pss_mb"]
        results["million"] = {**run, "cars": MILLION, "pss_ratio": round(ratio, 3)}
    return results


def with_readers(bench: Bench, simulator: RunningSimulator) -> dict[str, Any]:
    """A cold full sync while the web app queries the same cars: the readers' latencies."""
    schema = bench.cold("carsync_bench_readers")

    def full_sync() -> dict[str, Any]:
        with ReaderLoop(bench.database_url, schema) as reader:
            run = bench.sync(simulator, schema)
        return {**run, "reader_p99_ms": reader.p99_ms(), "reader_queries": len(reader.latencies)}

    return bench.observed(simulator, schema, full_sync)


def cold_and_unchanged(
    bench: Bench, simulator: RunningSimulator, schema: str, load: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """A peer's full load into an empty schema, then a re-sync of the same, unchanged data."""
    return {kind: bench.observed(simulator, schema, load) for kind in PEER_RUNS}


def _core_seconds(run: dict[str, Any]) -> str:
    total = run["cpu_seconds"]["total"]
    return "-" if total is None else f"{total:.1f}"


def report(results: dict[str, Any]) -> None:
    cars = results["cars"]
    line = "{:<9}{:<18}{:>9}{:>9}{:>8}{:>10}{:>13}{:>14}{:>9}{:>12}"
    print(
        line.format(
            "tool", "run", "seconds", "wall s", "core-s", "rows/s", "peak PSS MB", "rows written",
            "retries", "vs carsync",
        )
    )  # fmt: skip
    runs = [("carsync", name, results[name]) for name in RUN_NAMES]
    if "million" in results:
        runs.append(("carsync", "full_sync_1m", results["million"]))
    for tool, tool_runs in results.get("peers", {}).items():
        runs += [(tool, name, run) for name, run in tool_runs.items()]
    for tool, name, run in runs:
        # Process start to exit, against the same kind of run of carsync (the targets are
        # whole-process times); none for the incremental, hostile and 1M runs.
        ratio = run["wall_seconds"] / results[name]["wall_seconds"] if name in PEER_RUNS else None
        print(
            line.format(
                tool,
                name,
                f"{run['seconds']:.2f}",
                f"{run['wall_seconds']:.2f}",
                _core_seconds(run),
                f"{run.get('cars', cars) / run['wall_seconds']:,.0f}",
                f"{run['peak_pss_mb']:.1f}",
                f"{run['rows_written']:,}",
                f"{run['retries']:,}" if "retries" in run else "-",
                f"{ratio:.2f}x" if ratio is not None else "-",
            )
        )
    print(
        "seconds: the tool's own timer, after its imports; wall s: its whole process, which"
        " rows/s and the ratios use"
    )
    print("rows written: rows of the tool's own cars table that got a new xmin in the run")
    print(
        f"core-s: CPU used during the run by the tool, the simulator and PostgreSQL; on this"
        f" machine's {os.cpu_count()} cores no run can take less than core-s / {os.cpu_count()}"
    )
    for tool, tool_runs in [("carsync", results), *results.get("peers", {}).items()]:
        used = tool_runs["full_sync"]["cpu_seconds"]
        print(
            f"  {tool} full sync: tool {used['tool']}, simulator {used['simulator']},"
            f" PostgreSQL {used['postgres']} core-s"
        )
    full, unchanged = results["full_sync"], results["unchanged_resync"]
    readers = results["full_sync_with_readers"]
    print(
        f"readers: a full sync of its own took {readers['wall_seconds']:.2f} s while the web app"
        f" queried cars; their p99 {readers['reader_p99_ms']} ms over"
        f" {readers['reader_queries']} point+range queries (target <= 50 ms)"
    )
    print(
        f"unchanged re-sync: {unchanged['rows_written']} rows of cars written (by xmin); "
        f"1% incremental: {results['incremental_1pct']['wall_seconds']:.2f} s (target <= 3 s)"
    )
    print(
        f"targets: full sync {full['wall_seconds']:.2f} s (<= 15 s), unchanged re-sync"
        f" {unchanged['wall_seconds']:.2f} s (<= 10 s), peak PSS"
        f" {max(results[name]['peak_pss_mb'] for name in RUN_NAMES):.1f} MB (<= 300 MB)"
    )
    print(
        f"a new Dagster instance (its storage tables, once per DAGSTER_HOME) took"
        f" {results['new_instance_seconds']:.2f} s before the runs above"
    )
    floor = results["bare_fetch"]["wall_seconds"]
    print(
        f"floor: a bare httpx client reading every page (16 in flight, nothing parsed or stored)"
        f" takes {floor:.2f} s, {floor / full['wall_seconds']:.0%} of carsync's full sync"
    )
    ratio = results["hostile_sync"]["seconds"] / results["full_sync"]["seconds"]
    limited = results["server_limited"]
    print(f"hostile / clean full sync: {ratio:.2f}x (target <= 1.5x)")
    print(
        f"server limit {limited['limit_rps']} req/s: achieved {limited['achieved_rps']} req/s"
        f" = {limited['fraction_of_limit']:.0%} of the limit (target >= 90%),"
        f" {limited['fraction_429']:.1%} of requests got 429"
    )
    if "million" in results:
        million = results["million"]
        print(
            f"{million['cars']:,} cars: peak PSS {million['peak_pss_mb']:.1f} MB ="
            f" {million['pss_ratio']:.2f}x that of {cars:,} cars (target <= 1.10x)"
        )


if __name__ == "__main__":
    raise SystemExit(main())
