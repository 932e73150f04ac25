-- A page of deliveries of some postbacks (an affiliate's, GET /api/deliveries and the console)
-- reads, for each postback, its newest deliveries in this index, and merges them
-- (list_postback_pages): a page costs at most a page per postback, however many deliveries the
-- store keeps and wherever theirs are in time. The planner walked the deliveries in creation
-- order instead, every newer one first (0.23 s a page with a million when the postback's were
-- the oldest). It replaces delivery_postback (postback_id, state): one index less to write per
-- delivery, and none that a state change rewrites. Building it reads every delivery once, and
-- new deliveries wait for it (about 1 s a million).
CREATE INDEX delivery_postback_created ON delivery (postback_id, created_at, id);
DROP INDEX delivery_postback;
