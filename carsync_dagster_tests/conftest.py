"""Shared fixtures: a real PostgreSQL (embedded, or CARSYNC_TEST_DATABASE_URL) and helpers to run
the real `carsync` command against the real simulator over loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql


@pytest.fixture(autouse=True)
def no_instance_left_in_context() -> Iterator[None]:
    """Entering a DagsterInstance puts its state storage in a context variable, and loading the
    definitions reads it; a test must not meet an instance an earlier test disposed of."""
    from dagster._core.storage.defs_state.base import set_defs_state_storage

    with set_defs_state_storage(None):
        yield


@pytest.fixture(scope="session")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A PostgreSQL server for the whole session."""
    configured = os.environ.get("CARSYNC_TEST_DATABASE_URL")
    if configured:
        yield configured
        return
    from carsync_dagster.warehouse.embedded import embedded_database_url, start_embedded_postgres

    server = start_embedded_postgres(tmp_path_factory.mktemp("embedded-pg"))
    try:
        yield embedded_database_url(server)
    finally:
        server.cleanup()


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@contextmanager
def fresh_database(server_url: str) -> Iterator[str]:
    """A database of its own, dropped afterwards: warehouse and Dagster storage start empty."""
    name = f"carsync_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield _with_database(server_url, name)
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture
def database_url(server_url: str) -> Iterator[str]:
    """A fresh database per test."""
    with fresh_database(server_url) as url:
        yield url


def carsync_env(workdir: Path, database_url: str, simulator: Any, **extra: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("CARSYNC_", "API_", "DATABASE_URL", "DAGSTER_HOME"))
    }
    env.update(
        {
            "DATABASE_URL": database_url,
            "API_BASE_URL": simulator.base_url,
            "API_KEY": simulator.api_key,
            "DAGSTER_HOME": str(workdir / "dagster"),
            "CARSYNC_DATA_DIR": str(workdir / "data"),
        }
    )
    env.update(extra)
    return env


def errors_when_started_together(calls: Sequence[Callable[[], object]]) -> list[BaseException]:
    """Every call on a thread of its own, all released at once by a barrier (two processes
    starting at the same moment): the errors they raised."""
    barrier = threading.Barrier(len(calls))
    errors: list[BaseException] = []

    def start(call: Callable[[], object]) -> None:
        barrier.wait()
        try:
            call()
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=start, args=(call,)) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def run_carsync(
    args: list[str], env: Mapping[str, str], cwd: Path, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "carsync_dagster", *args],
        env=dict(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def use_dagster_home(home: Path, database_url: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`home` as DAGSTER_HOME with carsync's dagster.yaml: Postgres storage in `database_url`."""
    from carsync_dagster.runner import dagster_postgres_url

    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA IF NOT EXISTS dagster")
    home.mkdir(parents=True, exist_ok=True)
    template = Path(__file__).resolve().parents[1] / "carsync_dagster" / "dagster.yaml"
    (home / "dagster.yaml").write_text(template.read_text())
    monkeypatch.setenv("CARSYNC_DAGSTER_PG_URL", dagster_postgres_url(database_url))
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


class WebhookReceiver:
    """A real local HTTP server that keeps the JSON bodies POSTed to it (alert webhooks)."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                received.append(json.loads(self.rfile.read(length)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
