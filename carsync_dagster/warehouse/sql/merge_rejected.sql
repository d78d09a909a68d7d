-- Keep one row per bad record; a record seen again only moves last_seen_at.
INSERT INTO cars_rejected AS r (id, raw_hash, reason, raw, raw_bytes, first_seen_at, last_seen_at)
SELECT DISTINCT ON (coalesce(id, ''), raw_hash) id, raw_hash, reason, raw, raw_bytes, now(), now()
FROM cars_rejected_staging
ON CONFLICT ((coalesce(id, '')), raw_hash) DO UPDATE SET
    last_seen_at = EXCLUDED.last_seen_at,
    reason = EXCLUDED.reason;
