"""Dagster resources: the listings API and the warehouse. Secrets arrive through EnvVar."""

import os
from pathlib import Path

import psycopg
from dagster import ConfigurableResource, InitResourceContext

from carsync_dagster.orchestration.lifeline import exit_with_run_worker
from carsync_dagster.settings import Settings, load_settings
from carsync_dagster.source.client import ListingsClient
from carsync_dagster.source.landing import Landing


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
