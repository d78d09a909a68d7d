-- Issue 5: listings seen per sync (outside cars), price/status history, the incremental
-- watermark, and what the web app reads: indexes on active listings and a cars_active view.

-- Ids a sync received. Kept outside cars so an unchanged feed writes no row of cars; UNLOGGED
-- because a sync that is interrupted re-merges every partition and so writes them again.
CREATE UNLOGGED TABLE IF NOT EXISTS seen_ids (
    sync_id text NOT NULL,
    id      text NOT NULL
);
CREATE INDEX IF NOT EXISTS seen_ids_sync_id ON seen_ids (sync_id, id);

-- Each change of price or status (and a listing leaving or coming back), for price history.
CREATE TABLE IF NOT EXISTS car_changes (
    id         text NOT NULL,
    sync_id    text,
    field      text NOT NULL,
    old_value  text,
    new_value  text,
    changed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS car_changes_id ON car_changes (id, changed_at);

-- Newest source updated_at a sync merged: the next incremental asks for what came after it.
ALTER TABLE sync_runs ADD COLUMN IF NOT EXISTS watermark timestamptz;

CREATE INDEX IF NOT EXISTS cars_active_maker_model ON cars (manufacturer, model) WHERE is_active;
CREATE INDEX IF NOT EXISTS cars_active_year ON cars (year) WHERE is_active;
CREATE INDEX IF NOT EXISTS cars_active_price ON cars (price) WHERE is_active;

CREATE OR REPLACE VIEW cars_active AS
SELECT * FROM cars WHERE is_active;
