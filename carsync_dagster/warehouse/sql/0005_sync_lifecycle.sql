-- Issue 14: a sync's lifecycle and its partition checkpoints, and the bytes of records that
-- are not UTF-8.

-- The partitions a sync merged, each written in its merge's own transaction: a re-run of the
-- sync merges only the others, and the closing steps run only once every one is here. `seen`
-- is how many ids the merge recorded in seen_ids (UNLOGGED, emptied by a crash recovery).
CREATE TABLE IF NOT EXISTS sync_partitions (
    sync_id       text NOT NULL,
    partition_key text NOT NULL,
    seen          integer NOT NULL,
    merged_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (sync_id, partition_key)
);

ALTER TABLE sync_runs
    -- The partitions of the feed when the sync began: what it must merge before it may close.
    ADD COLUMN IF NOT EXISTS planned_partitions text[],
    -- Re-runs the daemon started after the sync failed on something transient.
    ADD COLUMN IF NOT EXISTS recoveries integer NOT NULL DEFAULT 0,
    -- Whether a later sync may continue it (its failure was transient) instead of starting over.
    ADD COLUMN IF NOT EXISTS resumable boolean NOT NULL DEFAULT false,
    -- When its closing steps finished (a full sync is complete only then).
    ADD COLUMN IF NOT EXISTS closed_at timestamptz,
    -- When the daemon raised the alert for its final failure (once).
    ADD COLUMN IF NOT EXISTS alerted_at timestamptz;
-- Syncs that ended before this version are history: nothing to alert about now.
UPDATE sync_runs SET alerted_at = coalesce(finished_at, now()) WHERE status <> 'running';

ALTER TABLE cars_rejected ADD COLUMN IF NOT EXISTS raw_bytes bytea;
ALTER TABLE cars_rejected_staging ADD COLUMN IF NOT EXISTS raw_bytes bytea;
