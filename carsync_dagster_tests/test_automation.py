"""Sensors, schedules and alerts with Dagster's test contexts on a real Postgres-backed instance,
against the simulator and a real local HTTP receiver."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from dagster import (
    DagsterInstance,
    DagsterRunStatus,
    RunRequest,
    SensorResult,
    SkipReason,
    build_schedule_context,
    build_sensor_context,
)

from carsync_dagster.definitions import defs as load_definitions
from carsync_dagster.orchestration.automation import (
    alert_message,
    discover_page_ranges,
    freshness_tick,
    full_sync_tick,
    incremental_sync_tick,
    send_alert,
)
from carsync_dagster.orchestration.partitions import page_ranges
from carsync_dagster.orchestration.resources import ListingsApiResource
from carsync_dagster.simulator.process import RunningSimulator, start_simulator
from carsync_dagster_tests.conftest import use_dagster_home


@pytest.fixture
def instance(database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A Dagster instance with Postgres storage, as `carsync` configures it."""
    use_dagster_home(tmp_path / "dagster", database_url, monkeypatch)
    with DagsterInstance.get() as dagster_instance:
        yield dagster_instance


@pytest.fixture(scope="module")
def simulator() -> Iterator[RunningSimulator]:
    with start_simulator(cars=2_000, seed=4) as running:
        yield running


TICK = datetime(2026, 11, 24, 3, 0, tzinfo=UTC)


def _keys(instance: Any) -> list[str]:
    return sorted(instance.get_dynamic_partitions(str(page_ranges.name)))


def test_discovery_sensor_matches_partitions_to_the_feed(
    instance: Any, simulator: RunningSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CARSYNC_PAGES_PER_PARTITION", "5")
    api = ListingsApiResource(base_url=simulator.base_url, api_key=simulator.api_key)
    context = build_sensor_context(instance=instance, resources={"api": api})
    result = discover_page_ranges(context, api)
    assert isinstance(result, SensorResult) and result.run_requests in (None, [])
    for request in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(str(page_ranges.name), list(request.partition_keys))
    assert _keys(instance) == ["p00001-00005", "p00006-00010", "p00011-00015", "p00016-00020"]
    assert isinstance(discover_page_ranges(context, api), SkipReason)

    simulator.control.mutate(insert=600)  # 26 pages now
    grown = discover_page_ranges(context, api)
    assert isinstance(grown, SensorResult)
    added = [key for r in grown.dynamic_partitions_requests or [] for key in r.partition_keys]
    assert added == ["p00021-00025", "p00026-00030"]


def test_full_sync_schedule_requests_one_run_over_every_range(instance: Any) -> None:
    instance.add_dynamic_partitions(str(page_ranges.name), ["p00001-00050", "p00051-00100"])
    context = build_schedule_context(instance=instance, scheduled_execution_time=TICK)
    request = full_sync_tick(context)
    assert isinstance(request, RunRequest)
    assert request.tags["dagster/asset_partition_range_start"] == "p00001-00050"
    assert request.tags["dagster/asset_partition_range_end"] == "p00051-00100"
    assert request.tags["carsync/kind"] == "full"
    assert request.run_key == TICK.isoformat(), (
        "one run per tick, whatever retries the daemon makes"
    )
    incremental = incremental_sync_tick(context)
    assert isinstance(incremental, RunRequest)


def test_schedules_and_sensors_follow_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARSYNC_FULL_SYNC_CRON", "30 1 * * *")
    monkeypatch.setenv("CARSYNC_INCREMENTAL_SYNC_CRON", "*/5 * * * *")
    monkeypatch.setenv("CARSYNC_SENSOR_INTERVAL", "7")
    defs = load_definitions()
    assert defs.resolve_schedule_def("full_sync_schedule").cron_schedule == "30 1 * * *"
    assert defs.resolve_schedule_def("incremental_sync_schedule").cron_schedule == "*/5 * * * *"
    for name in ("discovery_sensor", "stale_run_sensor", "failed_partition_sensor"):
        assert defs.resolve_sensor_def(name).minimum_interval_seconds == 7
    monkeypatch.delenv("CARSYNC_FULL_SYNC_CRON")
    assert load_definitions().resolve_schedule_def("full_sync_schedule").cron_schedule == (
        "0 3 * * *"
    )


def test_schedules_skip_while_a_sync_runs(
    instance: Any, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in (("API_BASE_URL", "http://127.0.0.1:9"), ("API_KEY", "k")):
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("DATABASE_URL", database_url)
    instance.add_dynamic_partitions(str(page_ranges.name), ["p00001-00050"])
    instance.create_run_for_job(
        job_def=load_definitions().resolve_job_def("incremental_sync"),
        status=DagsterRunStatus.STARTED,
    )
    context = build_schedule_context(instance=instance, scheduled_execution_time=TICK)
    skipped = full_sync_tick(context)
    assert isinstance(skipped, SkipReason) and "another sync is running" in str(
        skipped.skip_message
    )
    assert isinstance(incremental_sync_tick(context), SkipReason)


def test_alerts_post_json_to_the_webhook_and_hold_no_secret() -> None:
    received: list[dict[str, Any]] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers["Content-Length"])
            received.append(json.loads(self.rfile.read(length)))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        message = alert_message("full_sync", "run-1", "vanished_listings: check failed")
        send_alert(message, f"http://127.0.0.1:{server.server_address[1]}/hook")
    finally:
        server.shutdown()
        server.server_close()
    assert received == [message]
    assert "run-1" in received[0]["text"] and "Dagster UI" in received[0]["where"]


def test_the_instance_config_loads_with_postgres_storage_and_monitoring(instance: Any) -> None:
    assert type(instance.run_storage).__name__ == "PostgresRunStorage"
    assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
    assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
    assert instance.run_monitoring_enabled
    assert not instance.run_retries_enabled


def test_freshness_is_checked_on_its_own_and_warns_when_no_sync_ran(
    instance: Any, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from carsync_dagster.warehouse.schema import migrate

    migrate(database_url, "carsync")
    for name, value in (("API_BASE_URL", "http://127.0.0.1:9"), ("API_KEY", "k")):
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("DATABASE_URL", database_url)
    assert isinstance(
        freshness_tick(build_schedule_context(scheduled_execution_time=TICK)), RunRequest
    )
    result = (
        load_definitions()
        .resolve_job_def("sync_freshness_check")
        .execute_in_process(instance=instance)
    )
    assert result.success, "a stale warehouse warns; it does not fail the run"
    [evaluation] = result.get_asset_check_evaluations()
    assert evaluation.check_name == "sync_freshness" and not evaluation.passed
