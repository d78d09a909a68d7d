-- Each merge first stages only (id, data_hash, source_updated_at) of its records, finds the few
-- that changed, and stages whole rows for those alone: an unchanged re-sync copies a narrow
-- table instead of every column of every listing.
CREATE UNLOGGED TABLE IF NOT EXISTS cars_keys_staging (
    id                text NOT NULL,
    data_hash         text NOT NULL,
    source_updated_at timestamptz
);
