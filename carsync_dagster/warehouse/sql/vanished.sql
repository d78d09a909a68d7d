-- Active listings this sync did not receive: candidates to confirm with GET /cars/{id}.
SELECT c.id
FROM cars AS c
WHERE c.is_active
  AND NOT EXISTS (SELECT FROM seen_ids AS s WHERE s.sync_id = %(sync_id)s AND s.id = c.id)
ORDER BY c.id;
