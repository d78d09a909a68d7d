-- Listings confirmed gone (404): kept, marked inactive, the change recorded.
WITH gone AS (
    UPDATE cars
    SET is_active = false, removed_at = now(), changed_at = now()
    WHERE id = ANY(%(ids)s) AND is_active
    RETURNING id
)
INSERT INTO car_changes (id, sync_id, field, old_value, new_value)
SELECT id, %(sync_id)s, 'is_active', 'true', 'false' FROM gone;
