"""What `carsync` commands share: bring up the database, the API and the Dagster instance,
and run a sync through Dagster. The CLI only parses, prints and sets exit codes."""

from __future__ import annotations

import contextlib
import gc
import os
import socket
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
from carsync_dagster.warehouse import syncs
from carsync_dagster.warehouse.schema import migrate

DAGSTER_PG_URL_ENV = "CARSYNC_DAGSTER_PG_URL"
DAGSTER_SCHEMA = "dagster"


class SyncBusyError(RuntimeError):
    """Another sync holds the warehouse's writer lock."""


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
            "CARSYNC_PAGES_PER_PARTITION": str(settings.pages_per_partition),
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
    dagster_run_id: str | None
    success: bool
    summary: dict[str, Any]
    error: str | None = None


def _discover_last_page(env: Environment) -> int:
    import asyncio

    from carsync_dagster.source.client import ListingsClient

    async def first_page() -> int:
        async with ListingsClient(
            env.api_base_url,
            env.api_key,
            concurrency=env.settings.concurrency,
            timeout=env.settings.request_timeout,
            rps=env.settings.rps,
            policy=env.settings.retry_policy(),
        ) as client:
            return (await client.get_page(1, env.settings.page_size)).last_page

    return asyncio.run(first_page())


def _register_partitions(instance: Any, keys: list[str]) -> None:
    from carsync_dagster.orchestration.partitions import page_ranges

    name = page_ranges.name
    assert name is not None
    existing = set(instance.get_dynamic_partitions(name))
    new = [key for key in keys if key not in existing]
    if new:
        instance.add_dynamic_partitions(name, new)
    for stale in sorted(existing - set(keys)):
        instance.delete_dynamic_partition(name, stale)


def _materialization_metadata(result: Any, asset: str) -> dict[str, Any]:
    for event in result.get_asset_materialization_events():
        materialization = event.step_materialization_data.materialization
        if materialization.asset_key.to_user_string() == asset:
            return {key: value.value for key, value in materialization.metadata.items()}
    return {}


def run_sync(
    env: Environment,
    *,
    incremental: bool = False,
    allow_mass_deactivation: bool = False,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> SyncOutcome:
    """One sync through Dagster: a full sync is one run over every page-range partition (then
    the catch-up and vanished-listings steps); an incremental one runs `recent_changes`."""
    quiet_chosen_dagster_warnings()
    from dagster import DagsterInstance

    from carsync_dagster.definitions import defs as load_definitions
    from carsync_dagster.orchestration.assets import (
        HOST_TAG,
        PID_TAG,
        SYNC_ID_TAG,
        SYNC_KIND_TAG,
        ensure_api_pool,
    )
    from carsync_dagster.orchestration.changes import ALLOW_MASS_DEACTIVATION_TAG
    from carsync_dagster.orchestration.partitions import partition_keys
    from carsync_dagster.orchestration.recovery import fail_dead_runs

    schema = env.settings.schema_name
    kind = "incremental" if incremental else "full"
    started = time.perf_counter()
    with psycopg.connect(env.database_url, autocommit=True) as lock_conn:
        if not syncs.try_writer_lock(lock_conn, schema):
            raise SyncBusyError(
                f"another sync is writing to schema {schema!r}; wait for it to finish"
            )
        resumed = None if incremental else syncs.resumable_sync(lock_conn, schema)
        sync_id = resumed or uuid.uuid4().hex
        tags = {
            SYNC_ID_TAG: sync_id,
            SYNC_KIND_TAG: kind,
            PID_TAG: str(os.getpid()),
            HOST_TAG: socket.gethostname(),
        }
        if allow_mass_deactivation:
            tags[ALLOW_MASS_DEACTIVATION_TAG] = "true"
        instance = DagsterInstance.get()
        # Dagster's Postgres storage opens a connection for every write unless told otherwise;
        # a sync writes a few hundred events, so keep one open per storage, as its webserver does.
        instance.optimize_for_webserver(statement_timeout=0, pool_recycle=3600, max_overflow=4)
        ensure_api_pool(instance)
        fail_dead_runs(instance)  # a killed sync's run would hold the API pool slot for ever
        if not incremental:
            keys = partition_keys(_discover_last_page(env), env.settings.pages_per_partition)
            if not keys:
                raise ApiError("the API lists no cars at all: nothing to sync")
            _register_partitions(instance, keys)
            tags["dagster/asset_partition_range_start"] = keys[0]
            tags["dagster/asset_partition_range_end"] = keys[-1]
        syncs.begin_sync(lock_conn, schema, sync_id, kind, "")
        watcher = _ProgressWatcher(env.database_url, schema, sync_id, on_progress)
        watcher.start()
        # Dagster and its definitions are a few hundred thousand long-lived objects; frozen, the
        # collector stops re-scanning them while a sync allocates millions of small dicts.
        gc.freeze()
        try:
            result = (
                load_definitions()
                .resolve_job_def(f"{kind}_sync")
                .execute_in_process(
                    instance=instance,
                    tags=tags,
                    run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
                    raise_on_error=False,
                )
            )
        finally:
            watcher.stop()
        summary = _summary(result, time.perf_counter() - started)
        error = None if result.success else _first_failure(result)
        status = "succeeded" if result.success else "failed"
        syncs.finish_sync(lock_conn, schema, sync_id, status=status, summary=summary, error=error)
        return SyncOutcome(sync_id, result.run_id, result.success, summary, error)


def _summary(result: Any, seconds: float) -> dict[str, Any]:
    pages = _materialization_metadata(result, "pages")
    normalised = _materialization_metadata(result, "normalised")
    cars = _materialization_metadata(result, "cars")
    recent = _materialization_metadata(result, "recent_changes")
    gone = _materialization_metadata(result, "vanished_listings")

    def total(name: str, *sources: dict[str, Any]) -> int:
        return sum(int(source.get(name, 0)) for source in sources)

    return {
        "pages": total("pages", pages, recent),
        "fetched": total("records", pages) + total("fetched", recent),
        "inserted": total("inserted", cars, recent),
        "updated": total("updated", cars, recent),
        # A full sync's catch-up pass re-reads a margin of listings the pages already counted.
        "unchanged": total("unchanged", cars) if cars else total("unchanged", recent),
        "rejected": total("rejected", normalised) if cars else total("rejected", recent),
        "deactivated": total("deactivated", gone),
        "vanished_candidates": total("candidates", gone),
        "partitions": total("partitions_fetched", pages) + total("partitions_skipped", pages),
        "partitions_resumed": total("partitions_skipped", pages),
        # Landed with the same pages as last time: their normalised files were kept.
        "partitions_unchanged": total("partitions_reused", normalised),
        "requests": total("requests", pages),
        "retries": total("retries", pages, recent),
        "hedged": total("hedged_requests", pages),
        "errors": dict(pages.get("errors_by_class", {})),
        "p95_latency_ms": float(pages.get("p95_latency_ms", recent.get("p95_latency_ms", 0.0))),
        "checks_failed": sorted(
            evaluation.check_name
            for evaluation in result.get_asset_check_evaluations()
            if not evaluation.passed
        ),
        "seconds": round(seconds, 2),
    }


def _first_failure(result: Any) -> str:
    for evaluation in result.get_asset_check_evaluations():
        if not evaluation.passed:
            return f"check {evaluation.check_name} failed: {evaluation.description}"
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data.error is not None:
            error = event.step_failure_data.error
            # The user code's own exception, one line: Dagster wraps it in a framework error.
            cause = error.cause or error
            return f"{event.step_key}: {cause.message.strip().splitlines()[-1]}"
    return "the sync run failed"


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

    def start(self) -> None:
        if self._on_progress is not None:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        database_url, schema, sync_id = self._args
        assert self._on_progress is not None
        with psycopg.connect(database_url, autocommit=True) as conn:
            wait = 0.5  # the first line comes early, so people see the sync has started
            while not self._stop.wait(wait):
                row = syncs.read_sync(conn, schema, sync_id)
                if row is not None:
                    self._on_progress(row)
                wait = self._every
