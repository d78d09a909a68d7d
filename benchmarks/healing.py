"""`python -m benchmarks.healing`: the self-healing scenarios of issue 14, with figures.

Each scenario runs a `carsync` installation (this one by default, or another one's `carsync`
executable with --carsync, to compare two versions) in a fresh database against the bundled
simulator of this checkout, breaks something the way the world does, and measures what the
warehouse looks like afterwards against the simulator's truth: seconds to heal, requests spent,
rows wrong. One line per scenario; JSON with --output.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import psutil
import psycopg
from psycopg import sql

from benchmarks.common import HOSTILE
from carsync_dagster.simulator.process import RunningSimulator, start_simulator
from carsync_dagster_tests.warehouse_truth import differences

HEAL_WITHIN = 240.0


@dataclass
class Context:
    carsync: str  # the executable under test
    server_url: str  # a PostgreSQL server; each scenario gets a database of its own
    cars: int
    workdir: Path

    @contextlib.contextmanager
    def fresh(self, name: str, *sim_args: str) -> Iterator[tuple[RunningSimulator, Run]]:
        database = f"heal_{name}_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(self.server_url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
        url = urlunsplit(urlsplit(self.server_url)._replace(path=f"/{database}"))
        folder = self.workdir / database
        folder.mkdir(parents=True)
        try:
            with start_simulator(cars=self.cars, seed=14, args=list(sim_args)) as sim:
                yield sim, Run(self.carsync, url, folder, sim)
        finally:
            with psycopg.connect(self.server_url, autocommit=True) as conn:
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                        sql.Identifier(database)
                    )
                )


@dataclass
class Run:
    carsync: str
    database_url: str
    folder: Path
    sim: RunningSimulator

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("CARSYNC_", "API_", "DATABASE_URL", "DAGSTER_HOME"))
        }
        env.update(
            DATABASE_URL=self.database_url,
            API_BASE_URL=self.sim.base_url,
            API_KEY=self.sim.api_key,
            DAGSTER_HOME=str(self.folder / "dagster"),
            CARSYNC_DATA_DIR=str(self.folder / "data"),
        )
        env.update(extra)
        return env

    def sync(self, *flags: str, env: dict[str, str] | None = None) -> dict[str, Any]:
        started = time.monotonic()
        done = subprocess.run(
            [self.carsync, "sync", "--json", *flags],
            env=env or self.env(), cwd=self.folder, capture_output=True, text=True,
            timeout=1800, check=False,
        )  # fmt: skip
        try:
            summary = json.loads(done.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            summary = {}
        errors = [line for line in done.stderr.splitlines() if line.startswith("carsync:")]
        return {
            "exit": done.returncode,
            "seconds": round(time.monotonic() - started, 1),
            "error": errors[-1][:160] if errors else "",
            **{k: summary[k] for k in _FIGURES if k in summary},
        }

    def start_sync(self, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [self.carsync, "sync", "--json"], env=env or self.env(), cwd=self.folder,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def wrong(self, strict: bool = True) -> int:
        """Rows that differ from the source (missing, extra active, wrong field, inactive)."""
        return rows_wrong(differences(self.sim.control.truth(), self.database_url, strict=strict))

    def query(self, statement: str) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.database_url) as conn:
            try:
                return conn.execute(statement.encode()).fetchall()
            except psycopg.errors.UndefinedTable:
                return []

    def landed(self, since: float = 0.0) -> int:
        """Partitions (listing or page ranges) landed since then (a time.time())."""
        manifests = (self.folder / "data" / "landing").glob("*.json")
        return sum(1 for path in manifests if path.stat().st_mtime > since)


def rows_wrong(problems: list[str]) -> int:
    """The rows `differences` found wrong ("5 cars missing, e.g. ..." is five)."""
    total = 0
    for problem in problems:
        head = problem.split(" ", 1)[0]
        total += int(head) if head.isdigit() else 1
    return total


_FIGURES = (
    "status", "pages", "fetched", "inserted", "updated", "deactivated", "vanished_candidates",
    "confirm_requests", "confirmed_gone", "partitions_resumed", "checks_failed",
)  # fmt: skip


def _kill_when(process: subprocess.Popen[bytes], ready: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 300
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the sync ended before it could be killed")
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


# ---- scenarios ---------------------------------------------------------------------------


def ui_kill_mid_merge(ctx: Context, how: str) -> dict[str, Any]:
    """1: a full sync started from the UI (a backfill of every asset, or a launched full_sync
    job) loses its run worker mid-merge after 1% of the source changed (500 deleted)."""
    with ctx.fresh(f"ui_{how}", "--latency-ms", "20") as (sim, run):
        env = run.env(
            CARSYNC_SENSOR_INTERVAL="5", CARSYNC_STALE_AFTER="60", CARSYNC_CONCURRENCY="4"
        )
        first = run.sync(env=env)
        share = ctx.cars // 200
        sim.control.mutate(update=share, insert=share // 2, delete=share // 2)
        with _ui(run, env) as base:
            keys = _wait(lambda: _graphql(base, _KEYS)["assetNodeOrError"]["partitionKeys"], 120)
            _launch(base, how, keys)
            started = time.monotonic()
            _wait(lambda: _merging(run), 300)
            worker = _wait(lambda: _run_worker(run), 30)
            worker.kill()
            killed = time.monotonic()
            healed = None
            while time.monotonic() - killed < HEAL_WITHIN:
                running = run.query("SELECT 1 FROM carsync.sync_runs WHERE status = 'running'")
                if not running and run.wrong() == 0:
                    healed = round(time.monotonic() - killed, 1)
                    break
                time.sleep(2)
            statuses = [
                row[0]
                for row in run.query("SELECT status FROM carsync.sync_runs ORDER BY started_at")
            ]
        return {
            "first_sync_seconds": first["seconds"],
            "killed_after_seconds": round(killed - started, 1),
            "healed_seconds": healed,
            "rows_wrong_at_240s": None if healed is not None else run.wrong(),
            "sync_statuses": statuses,
        }


def drift_and_faults(ctx: Context) -> dict[str, Any]:
    """2 and 3: heavy page drift under the hostile profile, 500 listings really deleted; then
    the API is healthy again and a plain sync runs."""
    with ctx.fresh("drift", *HOSTILE) as (sim, run):
        run.sync()
        sim.control.mutate(delete=500)
        sim.control.configure(drift_inserts=2, drift_deletes=2)
        sim.control.reset_stats()
        drifting = run.sync()
        drifting["by_id_requests"] = sim.control.stats()["by_id"]
        gone = len(sim.control.truth()["deleted"])
        wrong_after = run.wrong()
        sim.control.configure(
            drift_inserts=0, drift_deletes=0, error_rate=0, overload_429=0, truncate_rate=0,
            html_rate=0, hang_rate=0,
        )  # fmt: skip
        healthy = run.sync()
        return {
            "drifting_sync": drifting,
            "really_gone": gone,
            "rows_wrong_after_it": wrong_after,
            "next_plain_sync": healthy,
            "rows_wrong_after_next": run.wrong(),
        }


def broken_page(ctx: Context, how: str) -> dict[str, Any]:
    """2 and 11: a page 60% into the feed stays broken (no data list, or a record that is not
    UTF-8); then the API is fixed and two plain syncs run."""
    with ctx.fresh(f"page_{how}") as (sim, run):
        page = int(ctx.cars / 100 * 0.6)
        sim.control.break_pages({page: how})
        broken = run.sync()
        broken["rows_in_cars"] = run.query("SELECT count(*) FROM carsync.cars")[0][0]
        again = run.sync()
        sim.control.break_pages({page: "mend"})
        fixed = run.sync()
        return {
            "page": page,
            "broken_sync": broken,
            "next_sync_still_broken": again,
            "after_the_fix": fixed,
            "rows_wrong": run.wrong(),
        }


def resume_too_old(ctx: Context) -> dict[str, Any]:
    """4: a sync killed mid-fetch, then seven hours old: the next sync must start afresh."""
    with ctx.fresh("old", "--latency-ms", "20") as (_, run):
        env = run.env(CARSYNC_CONCURRENCY="2")
        _kill_when(run.start_sync(env), lambda: run.landed() >= 3)
        run.query("SELECT 1")  # the schema exists by now
        with psycopg.connect(run.database_url, autocommit=True) as conn:
            conn.execute("UPDATE carsync.sync_runs SET started_at = now() - interval '7 hours'")
        after = run.sync(env=env)
        return {"next_sync": after, "rows_wrong": run.wrong()}


def page_size_change(ctx: Context) -> dict[str, Any]:
    """10: a sync killed mid-fetch at 100 per page, continued at 300 per page."""
    with ctx.fresh("page_size", "--latency-ms", "20") as (_, run):
        env = run.env(CARSYNC_CONCURRENCY="2", CARSYNC_PAGE_SIZE="100")
        _kill_when(run.start_sync(env), lambda: run.landed() >= 3)
        resumed = run.sync(env={**env, "CARSYNC_PAGE_SIZE": "300"})
        return {"resumed_sync": resumed, "rows_wrong": run.wrong()}


def kill_change_incremental_resume(ctx: Context) -> dict[str, Any]:
    """7 and resume: a sync killed after landing, the source changed, an incremental sync, then
    the killed sync continued: no listing may hold older values than the source."""
    with ctx.fresh("older", "--latency-ms", "20") as (sim, run):
        env = run.env(CARSYNC_CONCURRENCY="2")
        run.sync(env=env)
        began = time.time()
        _kill_when(run.start_sync(env), lambda: run.landed(since=began) >= 4)
        changes = sim.control.mutate(update=ctx.cars // 100, delete=500)
        run.sync("--incremental", env=env)
        resumed = run.sync(env=env)
        truth = {car["id"]: car for car in sim.control.truth()["cars"]}
        rows = dict(run.query("SELECT id, price FROM carsync.cars"))
        older = sum(
            1
            for car_id in changes["updated"]
            if str(rows.get(car_id)) != str(truth[car_id]["price"])
        )
        return {"resumed_sync": resumed, "rows_older_than_source": older, "rows_wrong": run.wrong()}


def database_without_api(ctx: Context) -> dict[str, Any]:
    """8: DATABASE_URL set, API_BASE_URL unset."""
    with ctx.fresh("no_api") as (_, run):
        env = {k: v for k, v in run.env().items() if k not in ("API_BASE_URL", "API_KEY")}
        result = run.sync(env=env)
        rows = run.query("SELECT count(*) FROM carsync.cars")
        return {"sync": result, "invented_rows_written": rows[0][0] if rows else 0}


SCENARIOS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "ui_backfill_kill": lambda ctx: ui_kill_mid_merge(ctx, "backfill"),
    "ui_job_kill": lambda ctx: ui_kill_mid_merge(ctx, "job"),
    "drift_and_faults": drift_and_faults,
    "page_without_data": lambda ctx: broken_page(ctx, "no_data"),
    "record_not_utf8": lambda ctx: broken_page(ctx, "bad_utf8"),
    "resume_too_old": resume_too_old,
    "page_size_change": page_size_change,
    "kill_change_incremental_resume": kill_change_incremental_resume,
    "database_without_api": database_without_api,
}


# ---- the UI ------------------------------------------------------------------------------

_KEYS = '{ assetNodeOrError(assetKey: {path: ["pages"]}) { ... on AssetNode { partitionKeys } } }'
_LAUNCH_RUN = """mutation($p: ExecutionParams!) { launchRun(executionParams: $p) {
  __typename ... on PythonError { message } } }"""
_LAUNCH_BACKFILL = """mutation($p: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $p) { __typename ... on PythonError { message } } }"""


@contextlib.contextmanager
def _ui(run: Run, env: dict[str, str]) -> Iterator[str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [run.carsync, "ui", "--port", str(port)], env=env, cwd=run.folder,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: httpx.get(f"{base}/server_info", timeout=5).is_success, 120)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def _graphql(base: str, query: str, variables: dict[str, Any] | None = None) -> Any:
    response = httpx.post(f"{base}/graphql", json={"query": query, "variables": variables or {}})
    return response.json()["data"]


def _launch(base: str, how: str, keys: list[str]) -> None:
    if how == "job":
        tags = [
            {"key": "dagster/asset_partition_range_start", "value": keys[0]},
            {"key": "dagster/asset_partition_range_end", "value": keys[-1]},
            {"key": "carsync/kind", "value": "full"},
        ]
        selector = {
            "repositoryLocationName": "carsync_dagster.definitions",
            "repositoryName": "__repository__",
            "jobName": "full_sync",
        }
        params = {"selector": selector, "executionMetadata": {"tags": tags}}
        answer = _graphql(base, _LAUNCH_RUN, {"p": params})["launchRun"]
    else:
        assets = ("pages", "normalised", "cars", "recent_changes", "vanished_listings")
        params = {"assetSelection": [{"path": [a]} for a in assets], "allPartitions": True}
        answer = _graphql(base, _LAUNCH_BACKFILL, {"p": params})["launchPartitionBackfill"]
    if "message" in answer:
        raise RuntimeError(answer["message"])


def _merging(run: Run) -> bool:
    """The running sync has merged some partitions (either version's way of saying so)."""
    merged = run.query(
        "SELECT count(*) FROM carsync.sync_partitions p JOIN carsync.sync_runs r USING (sync_id)"
        " WHERE r.status = 'running'"
    )
    if merged:
        return int(merged[0][0]) >= 2
    progress = run.query(
        "SELECT summary->'progress'->>'stage', (summary->'progress'->>'done')::int"
        " FROM carsync.sync_runs WHERE status = 'running'"
    )
    return any(stage == "merge" and (done or 0) >= 2 for stage, done in progress)


def _run_worker(run: Run) -> psutil.Process | None:
    """The worker process of the started run, as Dagster's engine event names its pid."""
    from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus, RunsFilter

    from carsync_dagster.runner import DAGSTER_PG_URL_ENV, dagster_postgres_url

    os.environ.update(
        DAGSTER_HOME=str(run.folder / "dagster"),
        **{DAGSTER_PG_URL_ENV: dagster_postgres_url(run.database_url)},
    )
    with DagsterInstance.get() as instance:
        for started in instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.STARTED])):
            records = instance.get_records_for_run(
                started.run_id, of_type=DagsterEventType.ENGINE_EVENT
            ).records
            for record in records:
                event = record.event_log_entry.dagster_event
                pid = event.engine_event_data.metadata.get("pid") if event else None
                if pid is not None:
                    return psutil.Process(int(str(pid.value)))
    return None


def _wait(check: Callable[[], Any], seconds: float) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, KeyError, TypeError):
            value = check()
            if value:
                return value
        time.sleep(0.05)
    raise TimeoutError(f"waited {seconds:.0f}s for {getattr(check, '__name__', 'it')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.healing", description=__doc__)
    parser.add_argument("--cars", type=int, default=100_000)
    parser.add_argument("--carsync", default=str(Path(sys.executable).with_name("carsync")))
    parser.add_argument(
        "--database-url", default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="a PostgreSQL server; each scenario creates and drops a database of its own",
    )  # fmt: skip
    parser.add_argument("--only", nargs="*", choices=sorted(SCENARIOS), default=None)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"carsync": args.carsync, "cars": args.cars}
    with tempfile.TemporaryDirectory(prefix="carsync-heal-") as workdir:
        ctx = Context(args.carsync, args.database_url, args.cars, Path(workdir))
        for name in args.only or SCENARIOS:
            started = time.monotonic()
            try:
                outcome = SCENARIOS[name](ctx)
            except (RuntimeError, TimeoutError, subprocess.SubprocessError) as error:
                outcome = {"error": f"{type(error).__name__}: {error}"}
            outcome["scenario_seconds"] = round(time.monotonic() - started, 1)
            results[name] = outcome
            print(f"{name}: {json.dumps(outcome, default=str)}", flush=True)
    if args.output:
        args.output.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
