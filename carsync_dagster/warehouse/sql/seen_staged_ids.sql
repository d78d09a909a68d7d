-- Whole rows were staged at once (most of the batch changed): record every id this sync received.
INSERT INTO seen_ids (sync_id, id)
SELECT DISTINCT %(sync_id)s, id FROM cars_staging;
