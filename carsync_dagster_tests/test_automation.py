"""Sensors, schedules and alerts with Dagster's test contexts on a real Postgres-backed instance,
against the simulator and a real local HTTP receiver."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
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
    discover_listing_ranges,
    freshness_tick,
    full_sync_tick,
    incremental_sync_tick,
    send_alert,
)
from carsync_dagster.orchestration.partitions import listing_ranges
from carsync_dagster.orchestration.resources import ListingsApiResource
from carsync_dagster.orchestration.tags import SCHEMA_TAG
from carsync_dagster.simulator.process import RunningSimulator, start_simulator
from carsync_dagster_tests.conftest import WebhookReceiver, use_dagster_home


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
    return sorted(instance.get_dynamic_partitions(str(listing_ranges.name)))


def test_discovery_sensor_matches_partitions_to_the_feed(
    instance: Any, simulator: RunningSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CARSYNC_PARTITION_SIZE", "500")
    api = ListingsApiResource(base_url=simulator.base_url, api_key=simulator.api_key)
    context = build_sensor_context(instance=instance, resources={"api": api})
    simulator.control.reset_stats()
    result = discover_listing_ranges(context, api)
    assert isinstance(result, SensorResult) and result.run_requests in (None, [])
    assert simulator.control.stats()["requests"] == 1, "one request of one listing"
    for request in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(str(listing_ranges.name), list(request.partition_keys))
    assert _keys(instance) == [
        "0000001-0000500",
        "0000501-0001000",
        "0001001-0001500",
        "0001501-0002000",
    ]
    assert isinstance(discover_listing_ranges(context, api), SkipReason)

    simulator.control.mutate(insert=600)  # 2,600 listings now
    grown = discover_listing_ranges(context, api)
    assert isinstance(grown, SensorResult)
    added = [key for r in grown.dynamic_partitions_requests or [] for key in r.partition_keys]
    assert added == ["0002001-0002500", "0002501-0003000"]


def test_full_sync_schedule_requests_one_run_over_every_range(instance: Any) -> None:
    instance.add_dynamic_partitions(
        str(listing_ranges.name), ["0000001-0005000", "0005001-0010000"]
    )
    context = build_schedule_context(instance=instance, scheduled_execution_time=TICK)
    request = full_sync_tick(context, "warehouse")
    assert isinstance(request, RunRequest)
    assert request.tags["dagster/asset_partition_range_start"] == "0000001-0005000"
    assert request.tags["dagster/asset_partition_range_end"] == "0005001-0010000"
    assert request.tags["carsync/kind"] == "full"
    assert request.tags[SCHEMA_TAG] == "warehouse", "runs of one schema queue one at a time"
    assert request.run_key == TICK.isoformat(), (
        "one run per tick, whatever retries the daemon makes"
    )
    incremental = incremental_sync_tick(context, "warehouse")
    assert isinstance(incremental, RunRequest)


def test_schedules_and_sensors_follow_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARSYNC_FULL_SYNC_CRON", "30 1 * * *")
    monkeypatch.setenv("CARSYNC_INCREMENTAL_SYNC_CRON", "*/5 * * * *")
    monkeypatch.setenv("CARSYNC_SENSOR_INTERVAL", "7")
    defs = load_definitions()
    assert defs.resolve_schedule_def("full_sync_schedule").cron_schedule == "30 1 * * *"
    assert defs.resolve_schedule_def("incremental_sync_schedule").cron_schedule == "*/5 * * * *"
    for name in ("discovery_sensor", "sync_reconciler"):
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
    instance.add_dynamic_partitions(str(listing_ranges.name), ["0000001-0005000"])
    instance.create_run_for_job(
        job_def=load_definitions().resolve_job_def("incremental_sync"),
        status=DagsterRunStatus.STARTED,
    )
    context = build_schedule_context(instance=instance, scheduled_execution_time=TICK)
    skipped = full_sync_tick(context, "carsync")
    assert isinstance(skipped, SkipReason) and "another sync is running" in str(
        skipped.skip_message
    )
    assert isinstance(incremental_sync_tick(context, "carsync"), SkipReason)


def test_alerts_post_json_to_the_webhook() -> None:
    message = {"text": "carsync: full sync s-1 blocked: check failed", "sync_id": "s-1"}
    with WebhookReceiver() as webhook:
        send_alert(message, webhook.url)
    assert webhook.received == [message]


def test_the_instance_config_loads_with_postgres_storage_and_monitoring(instance: Any) -> None:
    assert type(instance.run_storage).__name__ == "PostgresRunStorage"
    assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
    assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
    assert instance.run_monitoring_enabled
    assert not instance.run_retries_enabled
    limits = instance.get_concurrency_config().run_queue_config.tag_concurrency_limits
    assert {"key": SCHEMA_TAG, "value": {"applyLimitPerUniqueValue": True}, "limit": 1} in limits


def test_every_sync_job_tags_its_runs_with_the_schema(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARSYNC_SCHEMA", "warehouse")
    defs = load_definitions()
    for job in ("full_sync", "incremental_sync", "ranges_sync"):
        assert defs.resolve_job_def(job).tags[SCHEMA_TAG] == "warehouse", job


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
