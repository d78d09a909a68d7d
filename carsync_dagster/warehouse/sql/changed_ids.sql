-- From the narrow staging of one batch: record every id this sync received (seen_ids), and
-- return the ids whose newest version is new, or changed or back after being marked gone and
-- not older than the stored version (merge_cars.sql says why).
WITH incoming AS (
    -- Page drift can serve one listing twice; its newest version decides.
    SELECT DISTINCT ON (id) id, data_hash, source_updated_at
    FROM cars_keys_staging
    ORDER BY id, source_updated_at DESC NULLS LAST, data_hash
),
seen AS (
    INSERT INTO seen_ids (sync_id, id)
    SELECT %(sync_id)s, id FROM incoming
)
SELECT i.id
FROM incoming AS i
LEFT JOIN cars AS c ON c.id = i.id
WHERE c.id IS NULL
    OR (
        (c.data_hash IS DISTINCT FROM i.data_hash OR NOT c.is_active)
        AND (i.source_updated_at < c.source_updated_at) IS NOT TRUE
    );
