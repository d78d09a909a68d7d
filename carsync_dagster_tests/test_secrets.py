"""Issue 15: the API key and the database password never appear in output, logs, exceptions,
Dagster's run and event storage, compute logs or warehouse tables. A distinctive key served by
the real simulator (which echoes it back in a 400, in three spellings) and a password that needs
%-encoding, on a real role of the real PostgreSQL; `carsync` runs as a real subprocess; then
everything it left behind is searched (secret_scan)."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import os
import secrets
import signal
import subprocess
import sys
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
import polars as pl
import psutil
import psycopg
import pytest
from psycopg import sql

from carsync_dagster.simulator.process import RunningSimulator, start_simulator
from carsync_dagster.source.client import ListingsClient
from carsync_dagster.source.errors import ApiConfigError
from carsync_dagster_tests.conftest import WebhookReceiver, carsync_env, run_carsync
from carsync_dagster_tests.secret_scan import scan
from carsync_dagster_tests.ui_process import free_port, graphql, leftovers, wait_for

PASSWORD = "p@ss:w/rd%42"  # every character URLs treat specially
ECHO_PAGE = 12  # a page of the third listing range (5 pages each)


def _distinctive_key() -> str:
    return f"sk-test/{secrets.token_urlsafe(12)}+Key="  # `/`, `+`, `=` need %-encoding


@dataclass(frozen=True)
class SecretDatabase:
    url: str  # as carsync gets it: the role and its password, %-encoded
    admin_url: str  # the same database, for the test to read everything in it


@pytest.fixture
def secret_database(server_url: str) -> Iterator[SecretDatabase]:
    """A fresh database owned by a fresh role whose password needs %-encoding (trust auth: the
    server does not check it, but it is in the URL carsync gets); both dropped afterwards."""
    suffix = uuid.uuid4().hex[:10]
    role, database = f"carsync_secret_{suffix}", f"carsync_test_secret_{suffix}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(PASSWORD)
            )
        )
        conn.execute(
            sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(database), sql.Identifier(role)
            )
        )
    parts = urlsplit(server_url)
    host = parts.netloc.rsplit("@", 1)[-1]
    url = urlunsplit(
        parts._replace(netloc=f"{role}:{quote(PASSWORD, safe='')}@{host}", path=f"/{database}")
    )
    try:
        yield SecretDatabase(url, urlunsplit(parts._replace(path=f"/{database}")))
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database))
            )
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def _outputs(results: dict[str, subprocess.CompletedProcess[str]]) -> dict[str, str | bytes]:
    texts: dict[str, str | bytes] = {}
    for name, result in results.items():
        texts[f"{name}: stdout"] = result.stdout
        texts[f"{name}: stderr"] = result.stderr
    return texts


def _last_errors(database_url: str) -> list[str | None]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT last_error FROM carsync.sync_runs ORDER BY started_at")
        return [row[0] for row in rows]


def _events_saying(database_url: str, text: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM dagster.event_logs WHERE strpos(event, %s) > 0", (text,)
        ).fetchone()
    return int(row[0]) if row else 0


def test_a_sync_leaves_no_secret_anywhere(secret_database: SecretDatabase, tmp_path: Path) -> None:
    key = _distinctive_key()
    found_secrets = {"API key": key, "database password": PASSWORD}
    with start_simulator(cars=3_000, seed=15, api_key=key, args=["--broken-rate", "0.01"]) as sim:
        env = carsync_env(
            tmp_path, secret_database.url, sim,
            CARSYNC_PAGES_PER_PARTITION="5", CARSYNC_MAX_ATTEMPTS="3",
        )  # fmt: skip
        results: dict[str, subprocess.CompletedProcess[str]] = {}

        def sync(name: str, *flags: str) -> subprocess.CompletedProcess[str]:
            results[name] = run_carsync(["sync", *flags], env, tmp_path)
            return results[name]

        assert sync("clean", "--json").returncode == 0, results["clean"].stderr
        sim.control.break_pages({7: "not_json"})
        assert sync("a page that is not JSON", "--json").returncode == 1
        # A 400 that echoes the key: met by the run's fetch of the pages, by an incremental
        # sync (recorded as the step's failure), and by the command itself (the feed's size).
        sim.control.break_pages({7: "mend", ECHO_PAGE: "echo_400"})
        echoed = _echoed_400(sim)
        assert sync("a 400 in the run").returncode == 1
        sim.control.break_pages({1: "echo_400"})
        assert sync("a 400 in an incremental run", "--incremental").returncode == 1
        assert sync("a 400 before the run").returncode == 1
        for flags in ([], ["--json"]):
            results[" ".join(["status", *flags])] = run_carsync(["status", *flags], env, tmp_path)

    # The scan finds what is there: the simulator's 400 holds the key in all three spellings,
    # carsync's URL the password %-encoded.
    assert {hit.form for hit in scan(found_secrets, texts={"the 400": echoed})} == {
        "raw",
        "%-encoded",
        "base64",
    }
    assert {h.form for h in scan(found_secrets, texts={"url": secret_database.url})} == {
        "%-encoded"
    }
    # What the syncs met reached the output, the sync's row and Dagster's event log: redacted.
    (line,) = [
        line for line in results["a 400 before the run"].stderr.splitlines() if "400" in line
    ]
    assert line.startswith(
        "carsync: page 1: /cars: HTTP 400 from the API: refused /cars?page=1&"
    ), line
    assert line.count("***") >= 3, line
    errors = _last_errors(secret_database.admin_url)
    assert len(errors) == 4 and errors[0] is None, errors
    assert errors[1] and "page 7" in errors[1], errors
    assert errors[3] and "recent_changes: " in errors[3] and "HTTP 400 from" in errors[3], errors
    assert errors[3].count("***") >= 3, errors
    assert _events_saying(secret_database.admin_url, "HTTP 400 from the API: refused") > 0
    assert "HTTP 400" in results["status --json"].stdout

    hits = scan(
        found_secrets,
        texts=_outputs(results),
        databases=[secret_database.admin_url],
        folders=[tmp_path],
    )
    assert hits == [], "\n".join(map(str, hits))


def _echoed_400(sim: RunningSimulator) -> bytes:
    """The simulator's answer to the echo page, as the server sends it."""
    response = httpx.get(
        f"{sim.base_url}/cars",
        params={"page": ECHO_PAGE, "per_page": 100},
        headers={"X-API-Key": sim.api_key},
    )
    assert response.status_code == 400
    return response.content


def test_the_client_takes_the_key_out_of_what_a_server_says() -> None:
    """Redacted before the text is cut to length, so no piece of the key is left at the cut;
    one line whatever the server sent."""
    key = _distinctive_key()
    with start_simulator(cars=1_000, seed=15, api_key=key) as sim:
        sim.control.break_pages({ECHO_PAGE: "echo_400"})

        async def fetch() -> None:
            async with ListingsClient(sim.base_url, key) as client:
                await client.get_page(ECHO_PAGE, 50)

        with pytest.raises(ApiConfigError) as raised:
            asyncio.run(fetch())
    message = str(raised.value)
    assert message.startswith(
        f"page {ECHO_PAGE}: /cars: HTTP 400 from the API: refused /cars?page="
    )
    assert "\n" not in message and message.count("***") >= 3, message
    assert scan({"API key": key}, texts={"message": message}) == []
    assert scan({"API key": key[:-6]}, texts={"message": message}) == [], "no piece of it"


@pytest.mark.parametrize(
    ("command", "url"),
    [
        ("sync", f"postgresql://carsync:{quote(PASSWORD, safe='')}@127.0.0.1:9/warehouse"),
        ("status", "postgresql://carsync:hunter2secret@127.0.0.1:9/warehouse"),
        ("status", "postgresql://carsync@127.0.0.1:9/warehouse?password=hunter2secret"),
    ],
)
def test_no_password_is_taken_on_the_command_line(command: str, url: str, tmp_path: Path) -> None:
    """`ps` shows a command line to every user: a password there is refused, before anything
    is written, with a line that says where it goes instead."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("CARSYNC_", "API_", "DATABASE_URL", "DAGSTER_HOME"))
    }
    result = run_carsync([command, "--database-url", url], env, tmp_path, timeout=60)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "DATABASE_URL" in line and "environment variable" in line, line
    password = "hunter2secret" if "hunter2secret" in url else PASSWORD
    texts: dict[str, str | bytes] = {"stdout": result.stdout, "stderr": result.stderr}
    assert scan({"password": password}, texts=texts) == []
    assert list(tmp_path.iterdir()) == [], "nothing may be written"


def test_the_scan_looks_inside_every_column_and_file(database_url: str, tmp_path: Path) -> None:
    """The scan itself: a secret in a text, JSON or compressed column, or in a compressed or
    Parquet file, is found and said where."""
    key = _distinctive_key()
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA elsewhere")
        conn.execute("CREATE TABLE elsewhere.t (id int, note text, doc jsonb, blob bytea)")
        conn.execute(
            "INSERT INTO elsewhere.t VALUES (1, %s, NULL, NULL), (2, NULL, %s, %s)",
            (f"key={quote(key, safe='')}", json.dumps({"k": key}), zlib.compress(key.encode())),
        )
    (tmp_path / "deep").mkdir()
    (tmp_path / "deep" / "log.gz").write_bytes(gzip.compress(f"saw {key}".encode()))
    pl.DataFrame({"k": [key]}).write_parquet(tmp_path / "deep" / "rows.parquet")
    (tmp_path / "clean.txt").write_text("nothing here")
    hits = scan({"API key": key}, databases=[database_url], folders=[tmp_path])
    where = {(hit.form, hit.where.split(" (")[0]) for hit in hits}
    name = urlsplit(database_url).path.lstrip("/")
    assert ("%-encoded", f"database {name} table elsewhere.t column note") in where
    assert ("raw", f"database {name} table elsewhere.t column doc") in where
    assert ("raw", f"database {name} table elsewhere.t column blob") in where
    assert ("raw", f"file {tmp_path / 'deep' / 'log.gz'}") in where
    assert ("raw", f"file {tmp_path / 'deep' / 'rows.parquet'}") in where
    assert not [hit for hit in hits if "clean.txt" in hit.where or "column id" in hit.where]
    assert all(key not in str(hit) for hit in hits), "a hit never shows the secret"


LAUNCH_RUN = """mutation($params: ExecutionParams!) { launchRun(executionParams: $params) {
  __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }"""


def _run_statuses(database_url: str, job: str) -> list[str]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT status FROM dagster.runs WHERE pipeline_name = %s", (job,)
        ).fetchall()
    return [str(row[0]) for row in rows]


def test_the_ui_and_its_runs_leave_no_secret_anywhere(
    secret_database: SecretDatabase, tmp_path: Path
) -> None:
    """`carsync ui`: the command lines of everything it starts (`ps` shows them to every user;
    the run worker the daemon launches among them), a run that meets the echoing 400 (its compute
    logs, the daemon's sensors and the alert it raises), and the UI's own output."""
    key = _distinctive_key()
    found_secrets = {"API key": key, "database password": PASSWORD}
    command_lines: dict[str, str | bytes] = {}
    with (
        start_simulator(cars=1_000, seed=15, api_key=key) as sim,
        WebhookReceiver() as webhook,
    ):
        env = carsync_env(
            tmp_path, secret_database.url, sim,
            CARSYNC_SENSOR_INTERVAL="2", CARSYNC_ALERT_WEBHOOK=webhook.url,
        )  # fmt: skip
        first = run_carsync(["sync"], env, tmp_path)
        assert first.returncode == 0, first.stderr
        sim.control.break_pages({1: "echo_400"})
        port = free_port()
        with (tmp_path / "ui.out").open("wb") as out, (tmp_path / "ui.err").open("wb") as err:
            ui = subprocess.Popen(
                [sys.executable, "-m", "carsync_dagster", "ui", "--port", str(port)],
                env=env, cwd=tmp_path, stdout=out, stderr=err, start_new_session=True,
            )  # fmt: skip
        base = f"http://127.0.0.1:{port}"

        def sample() -> None:
            for process in psutil.Process(ui.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    command_lines[f"command line of {process.pid}"] = " ".join(process.cmdline())

        def up() -> bool:
            sample()
            return httpx.get(f"{base}/server_info").is_success

        def settled() -> bool:
            sample()
            return _last_errors(secret_database.admin_url)[-1] is not None and bool(
                webhook.received
            )

        try:
            wait_for("the UI", 90, up)
            selector = {
                "repositoryLocationName": "carsync_dagster.definitions",
                "repositoryName": "__repository__",
                "jobName": "incremental_sync",
            }
            launched = graphql(base, LAUNCH_RUN, {"params": {"selector": selector}})["launchRun"]
            assert launched["__typename"] == "LaunchRunSuccess", launched
            wait_for("the failed sync settled and alerted", 120, settled)
        finally:
            ui.terminate()
            try:
                ui.wait(timeout=60)
            finally:
                if leftovers(port):
                    os.killpg(ui.pid, signal.SIGKILL)

    # What the scan is to find was there: the run worker among the command lines, the 400 in
    # the sync's row, the alert and the run's compute logs, all redacted.
    # A run worker: `dagster api execute_run …`, or spawned by its code server (Dagster 1.12).
    workers = [
        line
        for line in map(str, command_lines.values())
        if "execute_run" in line or "spawn_main" in line
    ]
    assert workers, list(command_lines.values())
    assert _run_statuses(secret_database.admin_url, "incremental_sync") == ["FAILURE"]
    error = _last_errors(secret_database.admin_url)[-1]
    assert error and "HTTP 400 from the API: refused" in error and "***" in error, error
    alert = webhook.received[0]
    assert "HTTP 400" in alert["text"] and "***" in alert["text"], alert
    compute_logs = [p for p in (tmp_path / "dagster" / "storage").rglob("*") if p.is_file()]
    assert compute_logs, "the daemon's run captured its compute logs"

    texts = {**command_lines, "alert": json.dumps(webhook.received)}
    hits = scan(
        found_secrets, texts=texts, databases=[secret_database.admin_url], folders=[tmp_path]
    )
    assert hits == [], "\n".join(map(str, hits))
