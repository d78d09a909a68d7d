-- Merge cars_staging into cars in one statement. Staging holds the listings that
-- changed_ids.sql found new, changed or back after being marked gone, or a whole batch that is
-- mostly new; every one is checked here, so a row is written only when its data_hash changed or
-- it comes back, never otherwise, and never from a version older than the stored one: two
-- batches holding one listing (page drift, a resumed sync's landed pages) may commit in either
-- order, and the newer source_updated_at wins whatever the order.
-- The same statement records the history of price and status. Returns (inserted, updated).
WITH incoming AS (
    -- Page drift can serve one listing twice; keep its newest version.
    SELECT DISTINCT ON (id) *
    FROM cars_staging
    ORDER BY id, source_updated_at DESC NULLS LAST, data_hash
),
changed AS (
    -- Filter before the upsert: ON CONFLICT would lock (and so dirty) even rows it skips.
    SELECT
        i.*,
        c.id IS NULL AS is_new,
        c.price AS old_price,
        c.status AS old_status,
        c.is_active AS was_active
    FROM incoming AS i
    LEFT JOIN cars AS c ON c.id = i.id
    WHERE c.id IS NULL
        OR (
            (c.data_hash IS DISTINCT FROM i.data_hash OR NOT c.is_active)
            AND (i.source_updated_at < c.source_updated_at) IS NOT TRUE
        )
),
merged AS (
    INSERT INTO cars AS c (
        id, manufacturer, model, year, mileage_km, price, currency, fuel, status,
        source_updated_at, lot_number, vin, generation, transmission, body_type, color,
        engine_cc, location, images, source_created_at, data_hash,
        is_active, first_seen_at, changed_at, removed_at
    )
    SELECT
        id, manufacturer, model, year, mileage_km, price, currency, fuel, status,
        source_updated_at, lot_number, vin, generation, transmission, body_type, color,
        engine_cc, location, images, source_created_at, data_hash,
        true, now(), now(), NULL
    FROM changed
    ON CONFLICT (id) DO UPDATE SET
        manufacturer = EXCLUDED.manufacturer,
        model = EXCLUDED.model,
        year = EXCLUDED.year,
        mileage_km = EXCLUDED.mileage_km,
        price = EXCLUDED.price,
        currency = EXCLUDED.currency,
        fuel = EXCLUDED.fuel,
        status = EXCLUDED.status,
        source_updated_at = EXCLUDED.source_updated_at,
        lot_number = EXCLUDED.lot_number,
        vin = EXCLUDED.vin,
        generation = EXCLUDED.generation,
        transmission = EXCLUDED.transmission,
        body_type = EXCLUDED.body_type,
        color = EXCLUDED.color,
        engine_cc = EXCLUDED.engine_cc,
        location = EXCLUDED.location,
        images = EXCLUDED.images,
        source_created_at = EXCLUDED.source_created_at,
        data_hash = EXCLUDED.data_hash,
        is_active = true,
        removed_at = NULL,
        changed_at = CASE
            WHEN c.data_hash IS DISTINCT FROM EXCLUDED.data_hash THEN now()
            ELSE c.changed_at
        END
    -- Checked again here: a batch that committed meanwhile may hold a newer version.
    WHERE (c.data_hash IS DISTINCT FROM EXCLUDED.data_hash OR NOT c.is_active)
        AND (EXCLUDED.source_updated_at < c.source_updated_at) IS NOT TRUE
    RETURNING c.id, (xmax = 0) AS inserted
),
history AS (
    -- Only rows the upsert really wrote: under a concurrent merge of a newer version, a row this
    -- statement saw as changed may be left alone. Old values are as this statement saw them.
    INSERT INTO car_changes (id, sync_id, field, old_value, new_value)
    SELECT id, %(sync_id)s, 'price', old_price::text, price::text
    FROM changed JOIN merged USING (id) WHERE NOT is_new AND old_price IS DISTINCT FROM price
    UNION ALL
    SELECT id, %(sync_id)s, 'status', old_status, status
    FROM changed JOIN merged USING (id) WHERE NOT is_new AND old_status IS DISTINCT FROM status
    UNION ALL
    SELECT id, %(sync_id)s, 'is_active', 'false', 'true'
    FROM changed JOIN merged USING (id) WHERE NOT is_new AND NOT was_active
)
SELECT
    count(*) FILTER (WHERE inserted) AS inserted,
    count(*) FILTER (WHERE NOT inserted) AS updated
FROM merged;
