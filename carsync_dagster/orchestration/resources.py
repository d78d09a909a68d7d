"""Dagster resources: the listings API, the warehouse, and the sync a run belongs to. Secrets
arrive through EnvVar."""

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import psycopg
from dagster import ConfigurableResource, InitResourceContext
from pydantic import PrivateAttr

from carsync_dagster.orchestration.lifeline import exit_with_run_worker
from carsync_dagster.settings import Settings, load_settings
from carsync_dagster.source.client import ListingsClient
from carsync_dagster.source.landing import Landing
from carsync_dagster.warehouse.syncs import writer_lock

# How long a run waits for the schema's writer lock: a recovery run may start while the worker
# it replaces still holds it, and the runs of one UI backfill start one after the other.
LOCK_WAIT_SECONDS = 120.0


def _settings(**secrets: str) -> Settings:
    # Read when a run starts, never at import: the CLI and `carsync ui` set the environment.
    return load_settings({**os.environ, **secrets})


class ListingsApiResource(ConfigurableResource["ListingsApiResource"]):
    """The source API: base URL and key (EnvVar), page size, concurrency and timeouts."""

    base_url: str
    api_key: str

    def settings(self) -> Settings:
        return _settings(API_BASE_URL=self.base_url, API_KEY=self.api_key)

    def client(self) -> ListingsClient:
        settings = self.settings()
        return ListingsClient(
            self.base_url,
            self.api_key,
            concurrency=settings.concurrency,
            timeout=settings.request_timeout,
            rps=settings.rps,
            policy=settings.retry_policy(),
        )

    def landing(self) -> Landing:
        return Landing(self.settings().data_path / "landing")

    def normalised_dir(self) -> Path:
        return self.settings().data_path / "normalised"


class WarehouseResource(ConfigurableResource["WarehouseResource"]):
    """The PostgreSQL warehouse: URL (EnvVar, it may hold a password) and schema."""

    database_url: str

    def setup_for_execution(self, context: InitResourceContext) -> None:
        exit_with_run_worker()  # every step that writes uses this resource

    @property
    def schema_name(self) -> str:
        return _settings(DATABASE_URL=self.database_url).schema_name

    def connect(self, *, autocommit: bool = False) -> psycopg.Connection:
        return psycopg.connect(self.database_url, autocommit=autocommit)


class SyncRunResource(ConfigurableResource["SyncRunResource"]):
    """The sync this run belongs to. When the run starts it takes the schema's writer lock
    (held until the run ends: one writer, whatever launched the run) and claims the run for
    its sync: sync id and kind go into the run's tags and the sync's row."""

    database_url: str  # the warehouse's (EnvVar): where the lock and the sync's row are
    _sync_id: str = PrivateAttr(default="")
    _kind: str = PrivateAttr(default="")

    @property
    def sync_id(self) -> str:
        return self._sync_id

    @property
    def kind(self) -> str:
        return self._kind

    @contextlib.contextmanager
    def yield_for_execution(self, context: InitResourceContext) -> Iterator["SyncRunResource"]:
        from carsync_dagster.orchestration.lifecycle import claim_run

        run, instance = context.run, context.instance
        assert run is not None and instance is not None
        settings = _settings(DATABASE_URL=self.database_url)
        schema = settings.schema_name
        with writer_lock(
            self.database_url,
            schema,
            wait=LOCK_WAIT_SECONDS,
            on_wait=lambda waited: context.log.info(  # type: ignore[union-attr]
                f"waiting {waited:.0f}s for the writer lock of schema {schema!r}"
            ),
        ):
            with psycopg.connect(self.database_url, autocommit=True) as conn:
                self._sync_id, self._kind = claim_run(instance, run, conn, schema, settings)
            yield self
