"""Run tags: how a Dagster run says which sync it belongs to, what kind, and where it runs."""

SYNC_ID_TAG = "carsync/sync_id"
SYNC_KIND_TAG = "carsync/kind"  # full, incremental or ranges
# Runs with this tag queue one at a time per schema (dagster.yaml); every run also takes the
# schema's writer lock itself, since `carsync sync` runs in process and never queues.
SCHEMA_TAG = "carsync/schema"
WORKER_TAG = "carsync/worker"  # "<host> <pid> <process start time>" of the run's worker
RECOVERS_TAG = "carsync/recovers"  # the failed run whose sync a recovery run continues
ALLOW_MASS_DEACTIVATION_TAG = "carsync/allow_mass_deactivation"

BACKFILL_TAG = "dagster/backfill"
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"
