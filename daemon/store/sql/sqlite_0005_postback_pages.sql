-- A page of deliveries of some postbacks (an affiliate's, GET /api/deliveries and the console)
-- reads, for each postback, its newest deliveries in this index, and merges them
-- (SQLiteStore._list_query): a page costs at most a page per postback, however many deliveries
-- the store keeps and wherever theirs are in time. The walk in creation order it replaces read
-- every newer delivery first (0.4 s a page with a million when the postback's were the oldest).
-- It replaces delivery_postback (postback_id, state), whose users read the state index instead
-- (the waiting deliveries are few): one index less to write per delivery, and none that a
-- state change rewrites. Building it reads every delivery once (about 1 s a million here).
CREATE INDEX delivery_postback_created ON delivery (postback_id, created_at, id);
DROP INDEX delivery_postback;
