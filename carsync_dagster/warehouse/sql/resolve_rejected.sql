-- A listing that now arrives valid resolves the quarantine rows of its earlier broken versions.
-- {staging} is whichever staging table holds every valid id of the batch.
UPDATE cars_rejected AS r
SET resolved_at = now()
FROM {staging} AS s
WHERE r.id = s.id AND r.resolved_at IS NULL;
