-- Named queries of the SQLite store (3.31 or newer, no RETURNING so that Ubuntu 20.04's 3.31
-- will do). Times are integer microseconds (UTC); lists of values arrive as JSON arrays and are
-- read with json_each.

-- The statements of an arrival, a claim and a finished attempt run in the writer thread for
-- every request: they take positional parameters (?), which bind faster than named ones.

-- name: select_conversion
-- (source, conversion_id)
SELECT c.id, c.status, c.status_event_time, c.fields,
       (SELECT coalesce(max(a.seq), 0) FROM arrival a WHERE a.conversion_pk = c.id) AS last_seq
FROM conversion c
WHERE c.source = ? AND c.conversion_id = ?;

-- name: insert_conversion
-- (source, conversion_id, status, status_event_time, fields, now). Tried first: a new
-- conversion (the common case) costs one statement; when it exists, nothing is written and
-- the caller reads the stored row (select_conversion) in the same transaction.
INSERT INTO conversion
    (source, conversion_id, status, status_event_time, fields, created_at, updated_at)
VALUES
    (?1, ?2, ?3, ?4, ?5, ?6, ?6)
ON CONFLICT (source, conversion_id) DO NOTHING;

-- name: update_conversion
-- (pk, status, status_event_time, fields, now)
UPDATE conversion
SET status = ?2, status_event_time = ?3, fields = ?4, updated_at = ?5
WHERE id = ?1;

-- name: touch_conversion
-- (pk, now)
UPDATE conversion SET updated_at = ?2 WHERE id = ?1;

-- name: insert_arrival
-- (pk, seq, transition, status, event_time, received_at, data, vals)
INSERT INTO arrival
    (conversion_pk, seq, transition, status, event_time, received_at, data, vals)
VALUES
    (?, ?, ?, ?, ?, ?, ?, ?);

-- name: insert_delivery
-- (id, pk, seq, source, conversion_id, postback_id, action, destination, affiliate_owner,
--  idempotency_key, now)
INSERT INTO delivery
    (id, conversion_pk, arrival_seq, source, conversion_id, postback_id, action, destination,
     affiliate_owner, idempotency_key, state, created_at, updated_at, next_attempt_at)
VALUES
    (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, 'queued', ?11, ?11, ?11);

-- name: insert_delivery_leased
-- insert_delivery leased at insert to this node, as claim_one leaves a claimed delivery
-- (daemon.store.base.LeaseAhead): (..., now, node, token, until)
INSERT INTO delivery
    (id, conversion_pk, arrival_seq, source, conversion_id, postback_id, action, destination,
     affiliate_owner, idempotency_key, state, created_at, updated_at, next_attempt_at,
     lease_owner, lease_token, lease_until)
VALUES
    (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, 'in_flight', ?11, ?11, ?11, ?12, ?13, ?14);

-- name: claim_candidates
-- In the order of Claim's fields (daemon.store.rows.claim); the lease token is made here, as
-- PostgreSQL's claim_due makes it (32 hex digits: a fencing token, not a secret).
SELECT d.id, lower(hex(randomblob(16))) AS lease_token, d.postback_id, d.destination,
       d.source, d.conversion_id, d.arrival_seq, d.idempotency_key, d.attempts, d.created_at,
       a.data, a.vals
FROM delivery d
JOIN arrival a ON a.conversion_pk = d.conversion_pk AND a.seq = d.arrival_seq
WHERE d.due_at <= :now
  AND (d.affiliate_owner IS NULL
       OR d.affiliate_owner NOT IN (SELECT value FROM json_each(:skip_affiliates)))
ORDER BY d.due_at, d.id
LIMIT :limit;

-- name: claim_candidates_skipping
-- claim_candidates leaving out the destinations in :skip_destinations. Not by reading past
-- their deliveries in the due index (a backlog of 30,000 made due at once would be read on
-- every claim): the destinations with pending deliveries are walked in delivery_destination_due
-- (one seek each), and the oldest due of each one not skipped are merged, oldest first.
WITH RECURSIVE pending(name) AS (
    SELECT (SELECT min(destination) FROM delivery WHERE due_at IS NOT NULL)
    UNION ALL
    SELECT (SELECT min(destination) FROM delivery
            WHERE due_at IS NOT NULL AND destination > pending.name)
    FROM pending WHERE pending.name IS NOT NULL
)
SELECT d.id, lower(hex(randomblob(16))) AS lease_token, d.postback_id, d.destination,
       d.source, d.conversion_id, d.arrival_seq, d.idempotency_key, d.attempts, d.created_at,
       a.data, a.vals
FROM pending p
JOIN delivery d ON d.id IN (
    SELECT x.id FROM delivery x
    WHERE x.destination = p.name AND x.due_at <= :now
      AND (x.affiliate_owner IS NULL
           OR x.affiliate_owner NOT IN (SELECT value FROM json_each(:skip_affiliates)))
    ORDER BY x.due_at, x.id
    LIMIT :limit)
JOIN arrival a ON a.conversion_pk = d.conversion_pk AND a.seq = d.arrival_seq
WHERE p.name IS NOT NULL
  AND p.name NOT IN (SELECT value FROM json_each(:skip_destinations))
ORDER BY d.due_at, d.id
LIMIT :limit;

-- name: claim_one
-- (node, token, until, now, id); run with executemany for every candidate of a claim
UPDATE delivery
SET state = 'in_flight', lease_owner = ?1, lease_token = ?2, lease_until = ?3, updated_at = ?4
WHERE id = ?5;

-- name: finish_delivery
-- (id, token, state, next_attempt_at, reason, now)
UPDATE delivery
SET state = ?3, attempts = attempts + 1, next_attempt_at = ?4, last_reason = ?5,
    updated_at = ?6, lease_owner = NULL, lease_token = NULL, lease_until = NULL
WHERE id = ?1 AND lease_token = ?2 AND state = 'in_flight';

-- name: insert_attempt
-- (delivery_id, started_at, duration_ms, outcome, reason, rules_version, node, request,
--  response_status, response_excerpt), right after finish_delivery: the attempt's number is
-- the delivery's count of attempts as that statement left it (no statement of its own).
INSERT INTO attempt
    (delivery_id, n, started_at, duration_ms, outcome, reason, rules_version, node, request,
     response_status, response_excerpt)
SELECT ?1, d.attempts, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10
FROM delivery d
WHERE d.id = ?1;

-- name: release_delivery
UPDATE delivery
SET state = CASE WHEN attempts > 0 THEN 'retrying' ELSE 'queued' END,
    next_attempt_at = :now, updated_at = :now,
    lease_owner = NULL, lease_token = NULL, lease_until = NULL
WHERE id = :id AND lease_token = :token AND state = 'in_flight';

-- name: recover_node
UPDATE delivery
SET state = CASE WHEN attempts > 0 THEN 'retrying' ELSE 'queued' END,
    next_attempt_at = :now, updated_at = :now,
    lease_owner = NULL, lease_token = NULL, lease_until = NULL
WHERE state = 'in_flight' AND lease_owner = :node;

-- name: cancel_postbacks
UPDATE delivery
SET state = 'cancelled', next_attempt_at = NULL, updated_at = :now
WHERE state IN ('queued', 'retrying')
  -- `+`: through the state index (the waiting deliveries are few), not a postback's history.
  AND +postback_id IN (SELECT value FROM json_each(:postback_ids));

-- name: requeue
UPDATE delivery
SET state = 'queued', next_attempt_at = :now, updated_at = :now
WHERE state IN ('dead', 'cancelled')
  AND id IN (SELECT value FROM json_each(:ids));

-- name: requeue_matching
UPDATE delivery
SET state = 'queued', next_attempt_at = :now, updated_at = :now
WHERE state IN ('dead', 'cancelled')
  AND (:state IS NULL OR state = :state)
  AND (:postback_ids IS NULL OR postback_id IN (SELECT value FROM json_each(:postback_ids)))
  AND (:conversion_id IS NULL OR conversion_id = :conversion_id)
  AND (:since IS NULL OR created_at >= :since);

-- name: get_delivery
SELECT id, postback_id, action, destination, source, conversion_id, arrival_seq,
       idempotency_key, state, attempts, created_at, updated_at, next_attempt_at, last_reason,
       affiliate_owner
FROM delivery
WHERE id = :id;

-- name: get_attempts
SELECT started_at, duration_ms, outcome, reason, rules_version, node, request,
       response_status, response_excerpt
FROM attempt
WHERE delivery_id = :id
ORDER BY n;

-- name: list_deliveries
-- The filters marker (after WHERE) becomes the conditions of the filters given, each followed
-- by AND, one of them leading through its index (SQLiteStore._list_query); for postbacks this
-- statement is one postback's page (list_postback_page), and the pages are merged.
SELECT id, postback_id, action, destination, source, conversion_id, arrival_seq,
       idempotency_key, state, attempts, created_at, updated_at, next_attempt_at, last_reason,
       affiliate_owner
FROM delivery
WHERE {filters}
  -- Written as ranges (not `:since IS NULL OR ...`) so that the delivery_created index bounds
  -- the walk: a time range or a later page reads only its own rows.
      created_at >= coalesce(:since, -9223372036854775808)
  AND (created_at, id) < (coalesce(:after_created, 9223372036854775807), coalesce(:after_id, ''))
ORDER BY created_at DESC, id DESC
LIMIT :limit;

-- name: list_postback_page
-- One postback's page for list_postback_pages: the marker is list_deliveries whose filters
-- name that postback (`postback_id = :pN AND`, then the state's condition if given), read in
-- delivery_postback_created newest first, at most :limit rows.
SELECT * FROM ({page})

-- name: list_postback_pages
-- The postbacks' pages (list_postback_page each, joined by UNION ALL at the marker) merged
-- into one: at most a page per postback read, however many deliveries the store keeps.
SELECT * FROM ({pages})
ORDER BY created_at DESC, id DESC
LIMIT :limit;

-- name: get_conversion
SELECT id, source, conversion_id, status, status_event_time, fields, created_at, updated_at
FROM conversion
WHERE source = :source AND conversion_id = :conversion_id;

-- name: get_arrivals
-- A resend's copy of an arrival (migration 0004) is not an arrival of the conversion.
SELECT seq, transition, status, event_time, received_at
FROM arrival
WHERE conversion_pk = :pk AND resend_of IS NULL
ORDER BY seq;

-- name: ping
SELECT 1 FROM postbackd_schema LIMIT 1;

-- name: queue_depth
-- Every state: reads every delivery the store keeps (the final states are most of them).
SELECT state, count(*) FROM delivery GROUP BY state;

-- name: queue_depth_live
-- The states before a final one, in the state index: as cheap as the queue is short, however
-- many finished deliveries the store keeps (daemon.metrics.QueueDepth reads it every scrape).
SELECT state, count(*) FROM delivery WHERE state IN ('queued', 'in_flight', 'retrying')
GROUP BY state;

-- name: prune_batch
DELETE FROM conversion
WHERE id IN (
    SELECT c.id FROM conversion c
    WHERE c.updated_at < :before
      AND NOT EXISTS (
          SELECT 1 FROM delivery d
          WHERE d.conversion_pk = c.id AND d.state IN ('queued', 'retrying', 'in_flight'))
    LIMIT :batch);

-- name: oldest_due
-- The earliest due_at of all (one index probe): when it is past, that delivery waits unclaimed.
SELECT min(due_at) FROM delivery WHERE due_at IS NOT NULL;

-- name: hold_delivery
-- A claim handed back held by an open circuit breaker: no attempt, no attempt count. It keeps
-- the time it was first due (held_due, also across a second hold) and waits at :until.
UPDATE delivery
SET state = CASE WHEN attempts > 0 THEN 'retrying' ELSE 'queued' END,
    held_due = CASE WHEN held_until IS NOT NULL AND next_attempt_at = held_until
                    THEN held_due ELSE coalesce(next_attempt_at, :now) END,
    next_attempt_at = :until, held_until = :until, updated_at = :now,
    lease_owner = NULL, lease_token = NULL, lease_until = NULL
WHERE id = :id AND lease_token = :token AND state = 'in_flight';

-- name: unhold_destination
-- The breaker closed (:limit -1: all), or its pause ended (:limit 1: one, to be the probe): the
-- destination's held deliveries are due again when they first were, the oldest first.
UPDATE delivery
SET next_attempt_at = min(held_due, :now), held_due = NULL, held_until = NULL,
    updated_at = :now
WHERE id IN (
    SELECT id FROM delivery
    WHERE destination = :destination AND held_until IS NOT NULL
      AND state IN ('queued', 'retrying') AND next_attempt_at = held_until
    ORDER BY held_due, id
    LIMIT :limit);
