"""One owner of a sync's lifecycle, whichever way it started (`carsync sync`, the UI's
"Materialize all" or a launched job, a schedule, a sensor, a re-execution, a recovery):

- `claim_run`: every run names its sync and kind in its tags when it starts (a UI backfill's
  runs share the backfill's sync; a re-execution its root run's; a new full sync continues a
  resumable one), and takes the schema's writer lock for the whole run (resources.SyncRun);
- `settle`: the only writer of a sync's outcome, judged from all its Dagster runs;
- `reconcile` (the sync reconciler sensor, and `carsync sync` before it starts): fails runs whose
  worker is gone or silent, settles every running sync, re-runs a full sync that failed on
  something transient (at most CARSYNC_MAX_RECOVERIES times, within CARSYNC_RESUME_MAX_AGE), and
  raises one alert for a sync that will not be re-run.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from dagster import (
    AssetKey,
    DagsterEventType,
    DagsterInstance,
    DagsterRun,
    DagsterRunStatus,
    Failure,
    RunRequest,
    RunsFilter,
)

from carsync_dagster.orchestration.liveness import Worker
from carsync_dagster.orchestration.partitions import listing_ranges
from carsync_dagster.orchestration.tags import (
    ALLOW_MASS_DEACTIVATION_TAG,
    BACKFILL_TAG,
    RANGE_END_TAG,
    RANGE_START_TAG,
    RECOVERS_TAG,
    SCHEMA_TAG,
    SYNC_ID_TAG,
    SYNC_KIND_TAG,
    WORKER_TAG,
)
from carsync_dagster.ranges import in_order
from carsync_dagster.settings import Settings, redact
from carsync_dagster.warehouse import syncs

FULL_SYNC_JOB, INCREMENTAL_SYNC_JOB, RANGES_JOB = "full_sync", "incremental_sync", "ranges_sync"
JOB_KINDS = {FULL_SYNC_JOB: "full", INCREMENTAL_SYNC_JOB: "incremental", RANGES_JOB: "ranges"}
CARS, VANISHED, RECENT = AssetKey("cars"), AssetKey("vanished_listings"), AssetKey("recent_changes")
ACTIVE = [
    DagsterRunStatus.QUEUED,
    DagsterRunStatus.NOT_STARTED,
    DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED,
    DagsterRunStatus.CANCELING,
]
_BACKFILL_ACTIVE = ("REQUESTED", "CANCELING")  # dagster BulkActionStatus values
# Failure metadata a step sets (dagster.Failure) to say what its failure means for the sync.
OUTCOME_KEY, RESUMABLE_KEY = "carsync_outcome", "carsync_resumable"


def sync_failure(
    description: str,
    *,
    resumable: bool,
    outcome: str = "failed",
    metadata: dict[str, Any] | None = None,
) -> Failure:
    """What a step raises to fail its sync in a known way: `outcome` (failed or partial) and
    whether a re-run may continue it (`settle` reads them back)."""
    return Failure(
        description=description,
        metadata={OUTCOME_KEY: outcome, RESUMABLE_KEY: resumable, **(metadata or {})},
    )


# Errors that pass: a lost database connection, the writer lock held by a run that will end,
# a request that failed every attempt on timeouts, resets, 5xx or 429, an API not there.
_TRANSIENT = {
    "OperationalError",
    "InterfaceError",
    "SyncBusyError",
    "PageUnavailableError",
    "ApiUnreachableError",
}
_INTERRUPTED = {"DagsterExecutionInterruptedError", "KeyboardInterrupt"}
_REASON_LIMIT = 300
_QUALIFIED_NAME = re.compile(r"\b(?:\w+\.)+(\w+(?:Error|Exception|Interrupt)\b)")


# ---- which sync a run belongs to --------------------------------------------------------


def full_range(instance: DagsterInstance) -> list[str]:
    return in_order(instance.get_dynamic_partitions(str(listing_ranges.name)))


def claim_run(
    instance: DagsterInstance,
    run: DagsterRun,
    conn: psycopg.Connection,
    schema: str,
    settings: Settings,
) -> tuple[str, str]:
    """(sync id, kind) of a run that is starting, written into its tags and the sync's row.
    Called by the run itself, holding the schema's writer lock."""
    keys = full_range(instance)
    kind = kind_of(instance, run, keys)
    sync_id = _sync_of(instance, run) or (
        syncs.resumable_sync(
            conn, schema, settings.resume_max_age, lambda other: sync_active(instance, other, run)
        )
        if kind == "full"
        else None
    )
    sync_id = sync_id or run.tags.get(BACKFILL_TAG) or run.run_id
    row = syncs.read_sync(conn, schema, sync_id)
    kind = str(row["kind"]) if row else kind  # the sync's first run decided it
    # Tagged before the sync's row says running: the reconciler settles a running sync from
    # the runs that carry its id, and must never find none.
    instance.add_run_tags(
        run.run_id,
        {
            SYNC_ID_TAG: sync_id,
            SYNC_KIND_TAG: kind,
            SCHEMA_TAG: schema,
            WORKER_TAG: Worker.this_process().tag,
        },
    )
    syncs.begin_sync(conn, schema, sync_id, kind, run.run_id)
    if kind == "full" and run.tags.get(RANGE_START_TAG):
        syncs.plan_partitions(conn, schema, sync_id, keys)
    return sync_id, kind


def kind_of(instance: DagsterInstance, run: DagsterRun, keys: list[str]) -> str:
    """full, incremental or ranges: what the run (or the backfill it is part of) syncs."""
    if run.tags.get(SYNC_KIND_TAG) in JOB_KINDS.values():
        return run.tags[SYNC_KIND_TAG]
    backfill = instance.get_backfill(run.tags[BACKFILL_TAG]) if BACKFILL_TAG in run.tags else None
    selection = set((backfill.asset_selection if backfill else None) or run.asset_selection or [])
    if not selection:
        kind = JOB_KINDS.get(run.job_name, "ranges")
    elif {CARS, VANISHED} <= selection:
        # A full sync merges the listing ranges and closes; `vanished_listings` materialised
        # alone is not one (it would judge the feed from no ranges).
        kind = "full"
    else:
        kind = "incremental" if selection == {RECENT} else "ranges"
    start, end = run.tags.get(RANGE_START_TAG), run.tags.get(RANGE_END_TAG)
    every_range = bool(keys) and (start, end) == (keys[0], keys[-1])
    if kind == "full" and start is not None and not every_range:
        return "ranges"  # some listing ranges only
    return kind


def _sync_of(instance: DagsterInstance, run: DagsterRun) -> str | None:
    """The sync named in the run's tags, its backfill's or its root run's."""
    if SYNC_ID_TAG in run.tags:
        return run.tags[SYNC_ID_TAG]
    related: list[DagsterRun] = []
    if BACKFILL_TAG in run.tags:
        related += instance.get_runs(RunsFilter(tags={BACKFILL_TAG: run.tags[BACKFILL_TAG]}))
    if run.root_run_id is not None:
        root = instance.get_run_by_id(run.root_run_id)
        related += [root] if root else []
    return next((other.tags[SYNC_ID_TAG] for other in related if SYNC_ID_TAG in other.tags), None)


def runs_of(instance: DagsterInstance, sync_id: str) -> list[DagsterRun]:
    """The sync's runs, oldest first."""
    runs = instance.get_runs(RunsFilter(tags={SYNC_ID_TAG: sync_id}))
    return sorted(runs, key=lambda run: _created(instance, run))


def sync_active(instance: DagsterInstance, sync_id: str, besides: DagsterRun | None = None) -> bool:
    """Whether a run of the sync (other than `besides`) is queued, starting or running."""
    runs = instance.get_runs(RunsFilter(tags={SYNC_ID_TAG: sync_id}, statuses=ACTIVE))
    return any(besides is None or run.run_id != besides.run_id for run in runs)


def _created(instance: DagsterInstance, run: DagsterRun) -> float:
    record = instance.get_run_record_by_id(run.run_id)
    return record.create_timestamp.timestamp() if record else 0.0


# ---- what the runs of a sync add up to -----------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    status: str  # one of syncs.STATUSES
    reason: str | None = None
    resumable: bool = False
    checks_failed: tuple[str, ...] = ()


@dataclass(frozen=True)
class RunFacts:
    """What settling needs of one run."""

    status: DagsterRunStatus
    failure: Verdict | None = None  # of a failed run: what its failure means
    checks_failed: tuple[str, ...] = ()
    backfill_active: bool = False


def judge(kind: str, closed: bool, runs: Sequence[RunFacts]) -> Verdict:
    """The sync's outcome from its runs, oldest first (pure, so every rule has a test)."""
    if not runs or any(run.status in ACTIVE or run.backfill_active for run in runs):
        return Verdict("running")
    last = runs[-1]
    if last.status == DagsterRunStatus.SUCCESS:
        if kind == "full" and not closed:
            return Verdict("partial", "its closing steps did not run", resumable=True)
        return Verdict("succeeded", checks_failed=last.checks_failed)
    if last.status == DagsterRunStatus.CANCELED:
        return Verdict("interrupted", "the run was canceled", resumable=True)
    failure = last.failure or Verdict("failed", "the run failed", resumable=True)
    return Verdict(failure.status, failure.reason, failure.resumable, last.checks_failed)


def facts_of(instance: DagsterInstance, run: DagsterRun) -> RunFacts:
    backfill = instance.get_backfill(run.tags[BACKFILL_TAG]) if BACKFILL_TAG in run.tags else None
    backfill_active = backfill is not None and backfill.status.value in _BACKFILL_ACTIVE
    checks, blocked = [], None
    for record in instance.get_records_for_run(
        run.run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION
    ).records:
        evaluation = record.event_log_entry.dagster_event.asset_check_evaluation_data  # type: ignore[union-attr]
        if not evaluation.passed:
            checks.append(evaluation.check_name)
            if evaluation.blocking:
                blocked = f"check {evaluation.check_name} failed: {evaluation.description or ''}"
    failure = None
    if run.status == DagsterRunStatus.FAILURE:
        failure = _failure_of(instance, run) if blocked is None else Verdict("blocked", blocked)
    return RunFacts(run.status, failure, tuple(sorted(checks)), backfill_active)


def _failure_of(instance: DagsterInstance, run: DagsterRun) -> Verdict:
    for record in instance.get_records_for_run(
        run.run_id, of_type=DagsterEventType.STEP_FAILURE
    ).records:
        event = record.event_log_entry.dagster_event
        data = event.step_failure_data if event else None
        if data is None:
            continue
        user = data.user_failure_data
        if user is not None and OUTCOME_KEY in user.metadata:
            status = str(user.metadata[OUTCOME_KEY].value)
            resumable = bool(user.metadata[RESUMABLE_KEY].value)
            return Verdict(status, _one_line(user.description or ""), resumable)
        chain, error = [], data.error
        while error is not None:
            chain.append(error)
            error = error.cause or error.context
        names = {error.cls_name for error in chain}
        cause = chain[-1] if chain else None
        why = f"{event.step_key}: {_one_line(cause.message) if cause else 'failed'}"  # type: ignore[union-attr]
        why = _QUALIFIED_NAME.sub(r"\1", why)  # ApiError: …, not carsync_dagster.source.errors.…
        if names & _INTERRUPTED:
            return Verdict("interrupted", why, resumable=True)
        return Verdict("failed", why, resumable=bool(names & _TRANSIENT))
    # No step failed: the worker died, or it was failed from outside (stale, lost).
    records = instance.get_records_for_run(
        run.run_id, of_type=DagsterEventType.RUN_FAILURE, limit=1, ascending=False
    ).records
    message = records[0].event_log_entry.dagster_event.message if records else None  # type: ignore[union-attr]
    return Verdict("failed", _one_line(message or "its run worker died"), resumable=True)


def _one_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    line = lines[-1] if lines else ""
    return line if len(line) <= _REASON_LIMIT else line[: _REASON_LIMIT - 1] + "…"


def settle(
    instance: DagsterInstance,
    conn: psycopg.Connection,
    schema: str,
    sync_id: str,
    secrets: Sequence[str] = (),
) -> Verdict | None:
    """Judge a running sync from its runs and write the outcome (idempotent: a sync that is
    settled already, or still running, is left as it is). Returns the verdict, None when the
    sync has no row."""
    row = syncs.read_sync(conn, schema, sync_id)
    if row is None:
        return None
    if row["status"] != "running":
        return Verdict(row["status"], row["last_error"], row["resumable"])
    runs = runs_of(instance, sync_id)
    if not runs and row["dagster_run_id"]:
        # A sync begun before runs were tagged with their sync: its last run is on its row.
        last = instance.get_run_by_id(row["dagster_run_id"])
        runs = [last] if last is not None else []
    facts = [facts_of(instance, run) for run in runs]
    verdict = judge(row["kind"], row["closed_at"] is not None, facts)
    if verdict.status != "running":
        reason = redact(verdict.reason, list(secrets)) if verdict.reason else None
        syncs.settle_sync(
            conn,
            schema,
            sync_id,
            status=verdict.status,
            error=reason,
            resumable=verdict.resumable,
            figures={"checks_failed": list(verdict.checks_failed)},
        )
    return verdict


# ---- runs whose worker is gone or silent ---------------------------------------------------


def fail_lost_runs(
    instance: DagsterInstance, stale_after: float, log: Callable[[str], None]
) -> list[str]:
    """Fail the started sync runs whose worker on this host is gone, or that logged nothing for
    `stale_after` seconds (a paused worker on this host is ended first: it could wake up and
    write). A worker elsewhere is never signalled. Returns the failed runs' ids."""
    failed = []
    started = instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.STARTED]), limit=100)
    for run in started:
        if SYNC_ID_TAG not in run.tags and run.job_name not in JOB_KINDS:
            continue
        worker = Worker.from_tag(run.tags.get(WORKER_TAG))
        reason = None
        if worker is not None and worker.on_this_host and not worker.alive():
            reason = f"its worker process {worker.pid} is gone"
        else:
            silent = time.time() - _last_event_time(instance, run)
            if silent > stale_after:
                if worker is not None and worker.on_this_host:
                    worker.kill()
                reason = f"it logged nothing for {silent:.0f}s (CARSYNC_STALE_AFTER)"
        if reason is not None:
            instance.report_run_failed(run, f"carsync: {reason}")
            # Give back its API pool slot now: the daemon would take a while, if it runs.
            instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
            log(f"run {run.run_id} failed: {reason}")
            failed.append(run.run_id)
    return failed


def fail_runs_left_here(instance: DagsterInstance, reason: str) -> list[str]:
    """Fail the runs this process executed in process that ended without a word (the database
    went away under them): their syncs can then be settled and resumed. Called when this
    process runs nothing, so none of them is still at work."""
    runs = instance.get_runs(
        RunsFilter(tags={WORKER_TAG: Worker.this_process().tag}, statuses=ACTIVE)
    )
    for run in runs:
        instance.report_run_failed(run, f"carsync: {reason}")
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
    return [run.run_id for run in runs]


def _last_event_time(instance: DagsterInstance, run: DagsterRun) -> float:
    records = instance.get_records_for_run(run.run_id, limit=1, ascending=False).records
    return records[0].timestamp if records else _created(instance, run)


# ---- the reconciler --------------------------------------------------------------------------


@dataclass
class Reconciled:
    settled: dict[str, Verdict] = field(default_factory=dict)
    recoveries: list[RunRequest] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)


def reconcile(
    instance: DagsterInstance,
    conn: psycopg.Connection,
    schema: str,
    settings: Settings,
    *,
    follow_up: bool,
    log: Callable[[str], None],
) -> Reconciled:
    """Fail lost runs and settle every running sync; with `follow_up` (the daemon's sensor),
    also request the re-runs that finish syncs and raise alerts for the ones that stay failed."""
    done = Reconciled()
    fail_lost_runs(instance, settings.stale_after, log)
    secrets = settings.secrets()
    for row in syncs.syncs_where(conn, schema, statuses=["running"]):
        verdict = settle(instance, conn, schema, row["sync_id"], secrets)
        if verdict is not None and verdict.status != "running":
            done.settled[row["sync_id"]] = verdict
    if not follow_up:
        return done
    latest = syncs.latest_full_sync(conn, schema)
    for row in syncs.syncs_where(
        conn, schema, statuses=["failed", "partial", "blocked", "interrupted"], alerted=False
    ):
        if syncs.latest_sync_id(conn, schema, row["kind"]) != row["sync_id"]:
            # A later sync of the same kind has begun since: this one is moot.
            syncs.mark_alerted(conn, schema, row["sync_id"])
            continue
        if _recoverable(instance, row, latest, settings):
            done.recoveries.append(_recovery(instance, conn, schema, row))
            log(f"sync {row['sync_id']} failed ({row['last_error']}): running it again")
        else:
            if row["status"] != "interrupted":  # a person stopped it; nothing to tell them
                done.alerts.append(alert_message(row, settings))
            syncs.mark_alerted(conn, schema, row["sync_id"])
    return done


def _recoverable(
    instance: DagsterInstance,
    row: dict[str, Any],
    latest: dict[str, Any] | None,
    settings: Settings,
) -> bool:
    return (
        row["kind"] == "full"
        and row["status"] in ("failed", "partial")
        and row["resumable"]
        and row["recoveries"] < settings.max_recoveries
        and latest is not None
        and latest["sync_id"] == row["sync_id"]  # a newer full sync supersedes it
        and float(latest["age_seconds"]) <= settings.resume_max_age
        and bool(full_range(instance))
        and not sync_active(instance, row["sync_id"])
    )


def _recovery(
    instance: DagsterInstance, conn: psycopg.Connection, schema: str, row: dict[str, Any]
) -> RunRequest:
    sync_id, keys = str(row["sync_id"]), full_range(instance)
    runs = runs_of(instance, sync_id)
    attempt = syncs.count_recovery(conn, schema, sync_id)
    tags = {
        SYNC_ID_TAG: sync_id,
        SYNC_KIND_TAG: "full",
        SCHEMA_TAG: schema,
        RANGE_START_TAG: keys[0],
        RANGE_END_TAG: keys[-1],
        RECOVERS_TAG: runs[-1].run_id if runs else "",
    }
    if any(run.tags.get(ALLOW_MASS_DEACTIVATION_TAG) == "true" for run in runs):
        tags[ALLOW_MASS_DEACTIVATION_TAG] = "true"
    # Sensor run keys never repeat: one re-run per attempt, however often the sensor ticks.
    return RunRequest(run_key=f"recover:{sync_id}:{attempt}", job_name=FULL_SYNC_JOB, tags=tags)


def alert_message(row: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """What a person needs to act on a sync that will not heal by itself. No secrets."""
    sync_id, status = str(row["sync_id"]), str(row["status"])
    why = redact(str(row["last_error"] or status), settings.secrets())
    recoveries = int(row["recoveries"])
    if status == "blocked":
        action = "if the feed really lost them, run `carsync sync --allow-mass-deactivation`"
    elif row["resumable"] and recoveries >= settings.max_recoveries:
        action = f"it failed again after {recoveries} re-runs; the next sync resumes it"
    else:
        action = "the next sync starts afresh"
    return {
        "text": f"carsync: {row['kind']} sync {sync_id} {status}: {why}; {action}",
        "sync_id": sync_id,
        "kind": str(row["kind"]),
        "status": status,
        "error": why,
        "run_id": str(row["dagster_run_id"] or ""),
        "where": f"Dagster UI → Runs, tag {SYNC_ID_TAG}={sync_id}; `carsync status`",
    }
