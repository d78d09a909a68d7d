"""What `carsync` commands share: bring up the database, the API and the Dagster instance,
and run a sync through Dagster. The CLI only parses, prints and sets exit codes."""

from __future__ import annotations

import contextlib
import gc
import os
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg

from carsync_dagster.settings import Settings
from carsync_dagster.source.errors import ApiError
from carsync_dagster.warehouse import availability, syncs
from carsync_dagster.warehouse.schema import migrate
from carsync_dagster.warehouse.syncs import SyncBusyError

__all__ = [
    "DatabaseGoneError",
    "Environment",
    "SyncBusyError",
    "SyncOutcome",
    "open_environment",
    "run_sync",
]

DAGSTER_PG_URL_ENV = "CARSYNC_DAGSTER_PG_URL"
DAGSTER_SCHEMA = "dagster"


@dataclass
class Environment:
    settings: Settings
    database_url: str
    api_base_url: str
    api_key: str
    simulator: Any = None
    env: dict[str, str] = field(default_factory=dict)


def dagster_postgres_url(database_url: str) -> str:
    """The warehouse URL as dagster-postgres needs it: the psycopg2 driver (with SQLAlchemy 2.1
    a plain postgresql:// picks psycopg 3, whose NOTIFY fails) and its tables in schema dagster."""
    parts = urlsplit(database_url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "options"]
    query.append(("options", f"-csearch_path={DAGSTER_SCHEMA}"))
    return urlunsplit(parts._replace(scheme="postgresql+psycopg2", query=urlencode(query)))


@contextlib.contextmanager
def open_database(settings: Settings) -> Iterator[str]:
    """The warehouse URL (embedded server unless DATABASE_URL), schema migrated."""
    with contextlib.ExitStack() as stack:
        if settings.database_url is not None:
            database_url = settings.database_url.get_secret_value()
        else:
            from carsync_dagster.warehouse.embedded import (
                embedded_database_url,
                start_embedded_postgres,
            )

            server = start_embedded_postgres(settings.data_path)
            stack.callback(server.cleanup)
            database_url = embedded_database_url(server)
        migrate(database_url, settings.schema_name, other_schemas=[DAGSTER_SCHEMA])
        yield database_url


def prepare_dagster_home(settings: Settings) -> Path:
    home = settings.dagster_home_path
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():
        template = resources.files("carsync_dagster") / "dagster.yaml"
        (home / "dagster.yaml").write_text(template.read_text())
    return home


@contextlib.contextmanager
def open_instance(settings: Settings, database_url: str) -> Iterator[Any]:
    """The Dagster instance at DAGSTER_HOME, for commands that need no API."""
    from dagster import DagsterInstance

    home = prepare_dagster_home(settings)
    env = {"DAGSTER_HOME": str(home), DAGSTER_PG_URL_ENV: dagster_postgres_url(database_url)}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        with DagsterInstance.get() as instance:
            yield instance
    finally:
        _restore_environ(saved)


@contextlib.contextmanager
def open_environment(
    settings: Settings, *, simulator_args: tuple[str, ...] = ()
) -> Iterator[Environment]:
    """Database, API (bundled simulator unless API_BASE_URL) and a Dagster home; the process
    environment is set for Dagster's EnvVars and restored afterwards."""
    with contextlib.ExitStack() as stack:
        database_url = stack.enter_context(open_database(settings))
        simulator = None
        if settings.api_base_url is not None and settings.api_key is not None:
            api_base_url, api_key = settings.api_base_url, settings.api_key.get_secret_value()
        else:
            from carsync_dagster.simulator.process import start_simulator

            simulator = stack.enter_context(start_simulator(args=simulator_args))
            api_base_url, api_key = simulator.base_url, simulator.api_key
        home = prepare_dagster_home(settings)
        env = {
            "API_BASE_URL": api_base_url,
            "API_KEY": api_key,
            "DATABASE_URL": database_url,
            DAGSTER_PG_URL_ENV: dagster_postgres_url(database_url),
            # Write a range run's per-partition events (planned, materialized) in batches: one
            # insert each instead of ~12 ms per partition and asset.
            "DAGSTER_EVENT_BATCH_SIZE": "1000",
            "DAGSTER_HOME": str(home),
            "CARSYNC_DATA_DIR": str(settings.data_path),
            "CARSYNC_SCHEMA": settings.schema_name,
            "CARSYNC_PAGE_SIZE": str(settings.page_size),
            "CARSYNC_PARTITION_SIZE": str(settings.listings_per_partition),
            "CARSYNC_CONCURRENCY": str(settings.concurrency),
            "CARSYNC_RPS": str(settings.rps),
            "CARSYNC_REQUEST_TIMEOUT": str(settings.request_timeout),
            "CARSYNC_MAX_ATTEMPTS": str(settings.max_attempts),
            "CARSYNC_BREAKER_FAILURES": str(settings.breaker_failures),
            "CARSYNC_BREAKER_COOLDOWN": str(settings.breaker_cooldown),
            "CARSYNC_MAX_DEACTIVATION": str(settings.max_deactivation),
            "CARSYNC_WATERMARK_MARGIN": str(settings.watermark_margin),
        }
        saved = {name: os.environ.get(name) for name in env}
        os.environ.update(env)
        stack.callback(_restore_environ, saved)
        yield Environment(settings, database_url, api_base_url, api_key, simulator, env)


def _restore_environ(saved: dict[str, str | None]) -> None:
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def quiet_chosen_dagster_warnings() -> None:
    """Dagster flags the beta and preview APIs we chose on purpose; people running a sync
    should not see that on every run."""
    from dagster import BetaWarning, PreviewWarning, SupersessionWarning

    for category in (BetaWarning, PreviewWarning, SupersessionWarning):
        warnings.filterwarnings("ignore", category=category)


@dataclass
class SyncOutcome:
    sync_id: str
    status: str  # the sync's, as settled (warehouse.syncs.STATUSES)
    summary: dict[str, Any]
    error: str | None = None

    @property
    def success(self) -> bool:
        return self.status == "succeeded"


def _feed_total(env: Environment) -> int:
    import asyncio

    from carsync_dagster.source.client import ListingsClient
    from carsync_dagster.source.extract import feed_total

    async def total() -> int:
        async with ListingsClient(
            env.api_base_url,
            env.api_key,
            concurrency=1,
            timeout=env.settings.request_timeout,
            rps=env.settings.rps,
            policy=env.settings.retry_policy(),
        ) as client:
            return await feed_total(client)

    return asyncio.run(total())


def _register_partitions(instance: Any, keys: list[str]) -> None:
    from carsync_dagster.orchestration.partitions import listing_ranges

    name = str(listing_ranges.name)
    existing = set(instance.get_dynamic_partitions(name))
    new = [key for key in keys if key not in existing]
    if new:
        instance.add_dynamic_partitions(name, new)
    for stale in sorted(existing - set(keys)):
        instance.delete_dynamic_partition(name, stale)


# After the connection to the warehouse is lost, how long to wait for PostgreSQL to answer
# again, and how many restarts one `carsync sync` rides out.
DATABASE_WAIT_SECONDS = 60.0
DATABASE_RESTARTS = 3


class DatabaseGoneError(Exception):
    """The warehouse's PostgreSQL went away and did not come back in time (one line)."""


def run_sync(
    env: Environment,
    *,
    incremental: bool = False,
    allow_mass_deactivation: bool = False,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    on_notice: Callable[[str], None] = lambda _: None,
) -> SyncOutcome:
    """One sync through Dagster (see `_run_once`). When PostgreSQL restarts under it (its
    runs' statements fail: dagster-postgres retries only connecting), waits for the server
    and resumes the same sync in a new run; `on_notice` hears what happened."""
    restarts = 0
    while True:
        began, server_start = time.monotonic(), availability.server_started(env.database_url)
        try:
            outcome = _run_once(
                env,
                incremental=incremental,
                allow_mass_deactivation=allow_mass_deactivation,
                on_progress=on_progress,
            )
        except Exception:
            if restarts == DATABASE_RESTARTS or not _restarted(env, server_start):
                raise
        else:
            done = outcome.success or outcome.status == "interrupted"
            if done or restarts == DATABASE_RESTARTS or not _restarted(env, server_start):
                return outcome
        restarts += 1
        failed = _fail_runs_left_here("PostgreSQL restarted while it ran")
        on_notice(
            f"PostgreSQL restarted {time.monotonic() - began:.0f}s into the sync; it answers "
            f"again, so the sync continues in a new run ({len(failed)} run marked failed)"
        )


def _restarted(env: Environment, server_start: Any) -> bool:
    """Whether the server restarted since `server_start`, waiting for it to answer."""
    now = availability.wait_for_server(env.database_url, DATABASE_WAIT_SECONDS)
    if now is None:
        where = urlsplit(env.database_url)
        raise DatabaseGoneError(
            f"lost the connection to PostgreSQL at {where.hostname or 'localhost'}:"
            f"{where.port or 5432}, which did not answer again within "
            f"{DATABASE_WAIT_SECONDS:.0f}s; run carsync sync again once it is up to resume"
        )
    return server_start is None or now != server_start


def _fail_runs_left_here(reason: str) -> list[str]:
    from dagster import DagsterInstance

    from carsync_dagster.orchestration.lifecycle import fail_runs_left_here

    with DagsterInstance.get() as instance:
        return fail_runs_left_here(instance, reason)


def _run_once(
    env: Environment,
    *,
    incremental: bool,
    allow_mass_deactivation: bool,
    on_progress: Callable[[dict[str, Any]], None] | None,
) -> SyncOutcome:
    """One sync in one Dagster run: a full sync is one run over every listing range (then the
    catch-up and vanished-listings steps); an incremental one runs `recent_changes`. A full
    sync continues the last one when that failed on something transient, not long ago."""
    quiet_chosen_dagster_warnings()
    from dagster import DagsterInstance

    from carsync_dagster.definitions import defs as load_definitions
    from carsync_dagster.orchestration import lifecycle
    from carsync_dagster.orchestration.assets import ensure_api_pool
    from carsync_dagster.orchestration.liveness import Worker
    from carsync_dagster.orchestration.tags import (
        ALLOW_MASS_DEACTIVATION_TAG,
        RANGE_END_TAG,
        RANGE_START_TAG,
        SCHEMA_TAG,
        SYNC_ID_TAG,
        SYNC_KIND_TAG,
        WORKER_TAG,
    )
    from carsync_dagster.ranges import partition_keys

    settings, schema = env.settings, env.settings.schema_name
    kind = "incremental" if incremental else "full"
    started = time.perf_counter()
    # The run takes the lock too (every run does, whatever launched it); held here first, so
    # a second `carsync sync` is refused at once and nothing changes between here and the run.
    with (
        syncs.writer_lock(env.database_url, schema),
        psycopg.connect(env.database_url, autocommit=True) as conn,
        DagsterInstance.get() as instance,
    ):
        # Dagster's Postgres storage opens a connection for every write unless told otherwise;
        # a sync writes a few hundred events, so keep one open per storage, as its webserver does.
        instance.optimize_for_webserver(statement_timeout=0, pool_recycle=3600, max_overflow=4)
        ensure_api_pool(instance)
        # Runs whose worker died are failed (they would hold the API pool slot for ever) and
        # syncs left running are settled, so that what may be resumed is known.
        lifecycle.reconcile(instance, conn, schema, settings, follow_up=False, log=_ignore)
        # The worker tag now, not only when the run claims its sync: a run this process leaves
        # behind (the database restarted) is then found and failed before the sync resumes.
        tags = {SYNC_KIND_TAG: kind, SCHEMA_TAG: schema, WORKER_TAG: Worker.this_process().tag}
        sync_id = None
        if not incremental:
            keys = partition_keys(_feed_total(env), settings.listings_per_partition)
            if not keys:
                raise ApiError("the API lists no cars at all: nothing to sync")
            _register_partitions(instance, keys)
            tags[RANGE_START_TAG], tags[RANGE_END_TAG] = keys[0], keys[-1]
            sync_id = syncs.resumable_sync(
                conn,
                schema,
                settings.resume_max_age,
                lambda other: lifecycle.sync_active(instance, other),
            )
        tags[SYNC_ID_TAG] = sync_id = sync_id or uuid.uuid4().hex
        if allow_mass_deactivation:
            tags[ALLOW_MASS_DEACTIVATION_TAG] = "true"
        watcher = _ProgressWatcher(env.database_url, schema, sync_id, on_progress)
        watcher.start()
        # Dagster and its definitions are a few hundred thousand long-lived objects; frozen, the
        # collector stops re-scanning them while a sync allocates millions of small dicts.
        gc.freeze()
        try:
            load_definitions().resolve_job_def(f"{kind}_sync").execute_in_process(
                instance=instance,
                tags=tags,
                # carsync prints its own one-line outcome; the steps' logs and traces stay in
                # the run's event log (the UI, `dagster` tools).
                run_config={"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}},
                raise_on_error=False,
            )
        finally:
            watcher.stop()
        verdict = lifecycle.settle(
            instance, conn, schema, sync_id, [*settings.secrets(), env.api_key]
        )
        row = syncs.read_sync(conn, schema, sync_id)
    status = verdict.status if verdict else "failed"
    summary = _summary(row, time.perf_counter() - started)
    return SyncOutcome(sync_id, status, summary, verdict.reason if verdict else "no sync row")


def _ignore(_: str) -> None:
    pass


# The contract's figures first, in this order; the rest as the sync recorded them.
_FIRST_FIGURES = ("pages", "fetched", "inserted", "updated", "unchanged", "rejected", "deactivated")


def _summary(row: dict[str, Any] | None, seconds: float) -> dict[str, Any]:
    figures = dict((row or {}).get("summary") or {})
    figures.pop("progress", None)
    first = {name: figures.pop(name, 0) for name in _FIRST_FIGURES}
    return {**first, **figures, "seconds": round(seconds, 2)}


class _ProgressWatcher:
    """Polls the sync's progress row from a thread and hands it to a callback."""

    def __init__(
        self,
        database_url: str,
        schema: str,
        sync_id: str,
        on_progress: Callable[[dict[str, Any]], None] | None,
        every: float = 2.0,
    ) -> None:
        self._args = (database_url, schema, sync_id)
        self._on_progress = on_progress
        self._every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="carsync-progress", daemon=True)
        self._conn: psycopg.Connection | None = None

    def start(self) -> None:
        if self._on_progress is not None:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        assert self._on_progress is not None
        wait = 0.5  # the first line comes early, so people see the sync has started
        shown = None
        while True:
            stopping = self._stop.wait(wait)
            try:
                row = self._read()
            except psycopg.Error:  # the server restarted: the sync's runner deals with that
                row = None
                self._close()
            progress = (row.get("summary") or {}).get("progress") if row else None
            # A last line once the run ended (a sync shorter than the interval shows one),
            # unless it would say what the line before said.
            if row is not None and (not stopping or progress not in (None, shown)):
                self._on_progress(row)
                shown = progress
            if stopping:
                self._close()
                return
            wait = self._every

    def _read(self) -> dict[str, Any] | None:
        database_url, schema, sync_id = self._args
        if self._conn is None:
            self._conn = psycopg.connect(database_url, autocommit=True, connect_timeout=3)
        return syncs.read_sync(self._conn, schema, sync_id)

    def _close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None
