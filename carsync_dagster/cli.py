"""The `carsync` command (operations.md)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from carsync_dagster.settings import Settings, SettingsError, load_settings, redact

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Keep a PostgreSQL warehouse of car listings in sync with the listings API.",
)
err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)

# Flags of the same name as the settings; there is deliberately no flag for API_KEY.
ApiBaseUrl = Annotated[str | None, typer.Option("--api-base-url", help="API_BASE_URL")]
# A command line is visible to every user of the machine: this flag never takes a password
# (load_settings refuses one; the DATABASE_URL environment variable may hold it).
DatabaseUrl = Annotated[
    str | None,
    typer.Option("--database-url", help="DATABASE_URL, without a password (set that in the env)"),
]
Schema = Annotated[str | None, typer.Option("--schema", help="CARSYNC_SCHEMA")]
PageSize = Annotated[int | None, typer.Option("--page-size", help="CARSYNC_PAGE_SIZE")]
PagesPerPartition = Annotated[
    int | None, typer.Option("--pages-per-partition", help="CARSYNC_PAGES_PER_PARTITION")
]
Concurrency = Annotated[int | None, typer.Option("--concurrency", help="CARSYNC_CONCURRENCY")]
Rps = Annotated[float | None, typer.Option("--rps", help="CARSYNC_RPS")]
Simulator = Annotated[
    bool,
    typer.Option(
        "--simulator",
        help="Without API_BASE_URL, sync from the bundled simulator's invented listings even "
        "into the database at DATABASE_URL.",
    ),
]


def _settings(*, simulated: bool | None = None, **flags: object) -> Settings:
    """Settings from the environment and flags; `simulated` (commands that may start the
    simulator) also checks that a real database is not filled with invented listings."""
    names = {
        "api_base_url": "API_BASE_URL",
        "database_url": "DATABASE_URL",
        "schema": "CARSYNC_SCHEMA",
        "page_size": "CARSYNC_PAGE_SIZE",
        "pages_per_partition": "CARSYNC_PAGES_PER_PARTITION",
        "concurrency": "CARSYNC_CONCURRENCY",
        "rps": "CARSYNC_RPS",
    }
    try:
        settings = load_settings(os.environ, {names[k]: v for k, v in flags.items()})
        if simulated is not None:
            settings.check_source(simulated=simulated)
        return settings
    except SettingsError as error:
        err.print(f"carsync: bad setting: {error}", markup=False)
        raise typer.Exit(2) from None


def _print_progress(row: dict[str, Any], started: float) -> None:
    progress = (row.get("summary") or {}).get("progress") or {}
    elapsed = max(time.perf_counter() - started, 1e-6)
    if not progress:  # the run is being launched: no stage has counted anything yet
        err.print(f"starting  {elapsed:.1f}s: launching the Dagster run", markup=False)
        return
    stage, done, total = progress["stage"], progress["done"], progress["total"]
    pages, records = row.get("pages_done") or 0, row.get("records_done") or 0
    unit = "pages" if stage == "fetch" else "partitions"
    eta = ""
    if stage == "fetch" and pages and total:
        eta = f"  ETA {max(0.0, (total - done) / (pages / elapsed)):.0f}s"
    requests = ""
    if "retries" in progress:
        requests = (
            f"  p95 {progress['p95_ms']:.0f} ms  retries {progress['retries']}"
            f"  429s {progress['rate_limited']}"
        )
    err.print(
        f"{stage:<9} {done}/{total} {unit}  {pages / elapsed:,.0f} pages/s  "
        f"{records / elapsed:,.0f} rows/s{eta}{requests}",
        markup=False,
    )


def _summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title="carsync sync", show_header=True)
    table.add_column("what")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in sorted(value.items())) or "none"
        elif isinstance(value, list):
            value = ", ".join(map(str, value)) or "none"
        table.add_row(key, f"{value:,}" if isinstance(value, int) else str(value))
    return table


@app.command()
def sync(
    json_output: Annotated[bool, typer.Option("--json", help="End with one JSON line.")] = False,
    incremental: Annotated[
        bool, typer.Option("--incremental", help="Only what changed since the last sync.")
    ] = False,
    allow_mass_deactivation: Annotated[
        bool,
        typer.Option(
            "--allow-mass-deactivation",
            help="Deactivate missing listings even past CARSYNC_MAX_DEACTIVATION (this run).",
        ),
    ] = False,
    api_base_url: ApiBaseUrl = None,
    database_url: DatabaseUrl = None,
    schema: Schema = None,
    page_size: PageSize = None,
    pages_per_partition: PagesPerPartition = None,
    concurrency: Concurrency = None,
    rps: Rps = None,
    simulator: Simulator = False,
) -> None:
    """Run one sync through Dagster: complete by default, or --incremental."""
    settings = _settings(
        simulated=simulator,
        api_base_url=api_base_url,
        database_url=database_url,
        schema=schema,
        page_size=page_size,
        pages_per_partition=pages_per_partition,
        concurrency=concurrency,
        rps=rps,
    )
    from carsync_dagster import interrupts
    from carsync_dagster.runner import (
        DatabaseGoneError,
        SyncBusyError,
        open_environment,
        run_sync,
    )
    from carsync_dagster.source.errors import ApiError

    started = time.perf_counter()
    secrets = settings.secrets()
    log_file = _log_to_file(settings.data_path / "logs" / "carsync.log")

    def say(text: str) -> None:
        err.print(f"carsync: {redact(text, secrets)}", markup=False)

    # SIGTERM as Ctrl+C: the sync stops at its next event and keeps what it merged.
    signal.signal(signal.SIGTERM, _interrupt)
    stop_errors = _stop_errors()
    with interrupts.received_signals() as received:
        try:
            with open_environment(settings) as env:
                secrets.append(env.api_key)
                outcome = run_sync(
                    env,
                    incremental=incremental,
                    allow_mass_deactivation=allow_mass_deactivation,
                    on_progress=lambda row: _print_progress(row, started),
                    on_notice=say,
                )
        except stop_errors:
            say("interrupted before the sync's run began or after it ended; run carsync sync again")
            raise typer.Exit(_signal_exit(received())) from None
        except (SyncBusyError, ApiError, DatabaseGoneError) as error:
            say(str(error))
            raise typer.Exit(1) from None
        except Exception as error:  # anything else: one safe line, never a secret
            logging.getLogger("carsync").exception("sync failed")
            say(f"sync failed: {_first_line(error)} (details in {log_file})")
            raise typer.Exit(1) from None
        signals = received()
    summary = {**outcome.summary, "seconds": round(time.perf_counter() - started, 2)}
    if outcome.status == "interrupted" and any(n in interrupts.STOP_SIGNALS for n in signals):
        why = (outcome.error or "").removeprefix("interrupted: ")
        say(f"interrupted: {why}; run carsync sync again to resume")
        if json_output:
            print(json.dumps({**summary, "status": outcome.status, "success": False}), flush=True)
        raise typer.Exit(_signal_exit(signals))
    if not outcome.success:
        say(f"sync {outcome.status}: {outcome.error or ''}")
    if json_output:
        report = {**summary, "status": outcome.status, "success": outcome.success}
        print(json.dumps(report, default=str), flush=True)
    else:
        out.print(_summary_table(summary))
    raise typer.Exit(0 if outcome.success else 1)


def _first_line(error: BaseException) -> str:
    lines = f"{type(error).__name__}: {error}".splitlines()
    return lines[0] if lines else type(error).__name__


def _signal_exit(signals: list[int]) -> int:
    """128 + the signal that stopped the command, as shells report it (SIGINT → 130)."""
    stops = [n for n in signals if n in (signal.SIGINT, signal.SIGTERM)]
    return 128 + (stops[0] if stops else signal.SIGINT)


def _stop_errors() -> tuple[type[BaseException], ...]:
    from dagster._core.errors import DagsterExecutionInterruptedError

    return (KeyboardInterrupt, DagsterExecutionInterruptedError)


def _log_to_file(path: Path) -> Path:
    """Warnings, tracebacks of threads and libraries, anything written to sys.stderr: into a
    log file. carsync prints one line per event; the full story is there and in the run's log."""
    path.parent.mkdir(parents=True, exist_ok=True)
    err.file = sys.stderr  # carsync's own lines still reach the terminal
    # Dagster writes some failures straight to sys.stderr (an event it could not store).
    sys.stderr = open(path, "a", buffering=1)  # noqa: SIM115 (open for the process's life)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True
    )
    # The API client's notices (the circuit opened, closed) are one line each, for people.
    notices = logging.StreamHandler(err.file)
    notices.setFormatter(logging.Formatter("carsync: %(message)s"))
    logging.getLogger("carsync.source").addHandler(notices)
    return path.resolve()


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def simulate(ctx: typer.Context) -> None:
    """Serve the bundled API simulator in the foreground (flags: carsync simulate --help)."""
    from carsync_dagster.simulator.server import main as simulator_main

    raise typer.Exit(simulator_main(list(ctx.args)))


@app.command()
def ui(
    port: Annotated[int, typer.Option(help="Port of the Dagster webserver.")] = 3000,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    simulator: Simulator = False,
) -> None:
    """Serve the Dagster UI and daemon on the carsync instance and database."""
    settings = _settings(simulated=simulator)
    stop = _StopSignals()
    try:
        code = _serve_ui(settings, host, port, stop)
    except KeyboardInterrupt:
        code = 1  # replaced by the signal's code below
    finally:
        stop.restore()
    # Like a shell reports a job a signal ended: 130 after Ctrl+C (SIGINT), 143 after SIGTERM.
    raise typer.Exit(128 + stop.received if stop.received else code)


def _serve_ui(settings: Settings, host: str, port: int, stop: _StopSignals) -> int:
    """Run `dagster dev` on the carsync environment until it exits or a signal stops it;
    everything started on the way (simulator, embedded PostgreSQL) is stopped on the way out."""
    from carsync_dagster.runner import open_environment

    with open_environment(settings) as env:
        from dagster import DagsterInstance

        from carsync_dagster.orchestration.assets import ensure_api_pool

        with DagsterInstance.get() as instance:
            ensure_api_pool(instance)
        err.print(f"carsync ui: http://{host}:{port} (Ctrl-C stops)", markup=False)
        command = [
            sys.executable, "-m", "dagster", "dev",
            "-m", "carsync_dagster.definitions", "-h", host, "-p", str(port),
        ]  # fmt: skip
        # A session of its own: a terminal's Ctrl+C reaches carsync alone, which then stops
        # everything `dagster dev` started (its process group) even if a server ignores the
        # polite request - and only once it is done with them.
        process = subprocess.Popen(command, env={**os.environ, **env.env}, start_new_session=True)
        try:
            return _wait(process)
        finally:
            stop.hold()  # what follows must run to the end
            _stop_dagster_dev(process)


class _StopSignals:
    """SIGINT and SIGTERM raise KeyboardInterrupt in the main thread, once, and not after
    hold(): nothing must cut short carsync's stopping what it started. `received` is the first
    signal's number."""

    def __init__(self) -> None:
        self.received = 0
        self._raise = True
        self._saved = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}

    def _handle(self, signum: int, _frame: object) -> None:
        if not self.received:
            self.received = signum
            if self._raise:
                self._raise = False
                raise KeyboardInterrupt

    def hold(self) -> None:
        self._raise = False

    def restore(self) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
DAGSTER_DEV_GRACE = 20.0  # it stops its webserver, daemon and code servers in a few seconds
GROUP_GRACE = 5.0  # what it left in its group (a run worker, say) gets SIGTERM first


def _wait(process: subprocess.Popen[bytes]) -> int:
    """Wait for `process` to exit, with signals still raising promptly.

    The kernel may deliver a signal to any thread (the simulator's stdout reader, say); Python
    then runs the handler only when the main thread next runs bytecode, which it never does
    while blocked in waitpid(). A short sleep in a loop returns to it soon enough.
    """
    while (code := process.poll()) is None:
        time.sleep(0.2)
    return code


def _stop_dagster_dev(process: subprocess.Popen[bytes]) -> None:
    """Stop `dagster dev` as a terminal would (SIGINT: it stops its webserver, daemon and code
    servers), then whatever is left in its process group: SIGTERM, and SIGKILL after a grace."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=DAGSTER_DEV_GRACE)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not _group_alive(process.pid):
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        deadline = time.monotonic() + GROUP_GRACE
        while _group_alive(process.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
    process.wait()


def _group_alive(pgid: int) -> bool:
    """Whether a process of group `pgid` still runs (zombies, awaiting their parent, don't)."""
    import psutil

    for proc in psutil.process_iter(["status"]):
        with contextlib.suppress(ProcessLookupError, psutil.Error):
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                return True
    return False


@app.command()
def status(
    database_url: DatabaseUrl = None,
    schema: Schema = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """The last syncs, page-range health and the next scheduled syncs."""
    settings = _settings(database_url=database_url, schema=schema)
    import psycopg

    from carsync_dagster.runner import open_database, open_instance, quiet_chosen_dagster_warnings
    from carsync_dagster.warehouse import syncs

    quiet_chosen_dagster_warnings()
    from carsync_dagster.orchestration.checks import failed_partitions
    from carsync_dagster.orchestration.lifecycle import full_range
    from carsync_dagster.orchestration.status import next_ticks

    try:
        with open_database(settings) as url:
            with psycopg.connect(url) as conn:
                rows = syncs.recent_syncs(conn, settings.schema_name)
            with open_instance(settings, url) as instance:
                ranges, failed = len(full_range(instance)), failed_partitions(instance)
    except psycopg.OperationalError as error:
        message = redact(_first_line(error), settings.secrets())
        err.print(f"carsync: cannot read the warehouse: {message}", markup=False)
        raise typer.Exit(1) from None
    scheduled = next_ticks(settings)
    if json_output:
        report = {
            "syncs": rows,
            "listing_ranges": ranges,
            "failed_listing_ranges": failed,
            "next_scheduled": scheduled,
        }
        print(json.dumps(report, default=str))
        return
    out.print(_syncs_table(rows))
    out.print(f"listing ranges: {ranges}, failed: {', '.join(failed) if failed else 'none'}")
    for name, when in scheduled.items():
        out.print(f"next {name}: {when:%Y-%m-%d %H:%M} UTC (if the schedule is on in `carsync ui`)")


def _syncs_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="carsync: recent syncs")
    for column in ("started", "kind", "status", "seconds", "pages", "inserted", "updated", "error"):
        table.add_column(column)
    for row in rows:
        summary = row.get("summary") or {}
        finished = row["finished_at"]
        table.add_row(
            f"{row['started_at']:%Y-%m-%d %H:%M:%S}",
            row["kind"],
            row["status"],
            f"{(finished - row['started_at']).total_seconds():.1f}" if finished else "",
            str(summary.get("pages", row["pages_done"])),
            str(summary.get("inserted", "")),
            str(summary.get("updated", "")),
            row["last_error"] or "",
        )
    return table


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    app()
