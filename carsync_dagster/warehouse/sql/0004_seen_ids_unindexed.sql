-- seen_ids is only ever read whole: the vanished-listings query (a hash anti-join once the
-- table is analysed) and the clean-up after a complete sync. Its index on (sync_id, id) served
-- neither, yet every merge of 200,000 ids paid 0.25 s to maintain it.
DROP INDEX IF EXISTS seen_ids_sync_id;
