-- A listing that now arrives valid resolves the quarantine rows of its earlier broken versions.
UPDATE cars_rejected AS r
SET resolved_at = now()
FROM cars_keys_staging AS s
WHERE r.id = s.id AND r.resolved_at IS NULL;
