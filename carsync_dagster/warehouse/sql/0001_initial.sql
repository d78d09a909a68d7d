-- The warehouse tables (warehouse.md). Runs with search_path set to the carsync schema.

CREATE TABLE IF NOT EXISTS cars (
    id                text PRIMARY KEY,
    manufacturer      text,
    model             text,
    year              integer,
    mileage_km        integer,
    price             numeric,
    currency          text,
    fuel              text,
    status            text,
    source_updated_at timestamptz,
    lot_number        text,
    vin               text,
    generation        text,
    transmission      text,
    body_type         text,
    color             text,
    engine_cc         integer,
    location          text,
    images            jsonb,
    source_created_at timestamptz,
    data_hash         text NOT NULL,
    is_active         boolean NOT NULL DEFAULT true,
    first_seen_at     timestamptz NOT NULL DEFAULT now(),
    changed_at        timestamptz NOT NULL DEFAULT now(),
    removed_at        timestamptz
);

-- Staging is rewritten by every merge: UNLOGGED, so loading it writes no WAL. A later migration
-- that adds a column to cars must add it here too (LIKE copies the columns once, at creation).
CREATE UNLOGGED TABLE IF NOT EXISTS cars_staging (LIKE cars INCLUDING DEFAULTS);

CREATE TABLE IF NOT EXISTS cars_rejected (
    id            text,
    raw_hash      text NOT NULL,
    reason        text NOT NULL,
    raw           jsonb NOT NULL,
    first_seen_at timestamptz NOT NULL DEFAULT now(),
    last_seen_at  timestamptz NOT NULL DEFAULT now(),
    resolved_at   timestamptz
);
-- One row per bad record: (id, raw_hash), where a record without an id counts as id ''.
CREATE UNIQUE INDEX IF NOT EXISTS cars_rejected_record ON cars_rejected ((coalesce(id, '')), raw_hash);

CREATE UNLOGGED TABLE IF NOT EXISTS cars_rejected_staging (
    id       text,
    raw_hash text NOT NULL,
    reason   text NOT NULL,
    raw      jsonb NOT NULL
);

-- One row per sync, for `carsync status` and for apps that want to know how fresh `cars` is.
CREATE TABLE IF NOT EXISTS sync_runs (
    sync_id          text PRIMARY KEY,
    kind             text NOT NULL,
    status           text NOT NULL,
    dagster_run_id   text,
    started_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz,
    last_activity_at timestamptz NOT NULL DEFAULT now(),
    pages_total      integer,
    pages_done       integer NOT NULL DEFAULT 0,
    records_done     bigint NOT NULL DEFAULT 0,
    summary          jsonb,
    last_error       text
);
