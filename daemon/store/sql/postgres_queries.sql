-- Named queries of the PostgreSQL store (asyncpg: $n parameters). JSON travels as text.

-- name: insert_conversion
-- A new conversion is inserted first; when it already exists (or another node is inserting
-- it right now) nothing happens, and the caller locks the existing row instead.
INSERT INTO conversion
    (source, conversion_id, status, status_event_time, fields, created_at, updated_at)
VALUES ($1, $2, $3, $4, $5::jsonb, $6, $6)
ON CONFLICT (source, conversion_id) DO NOTHING
RETURNING id;

-- name: lock_conversion
SELECT id, status, status_event_time, fields::text
FROM conversion
WHERE source = $1 AND conversion_id = $2
FOR UPDATE;

-- name: last_seq
-- A statement of its own, after lock_conversion: its snapshot is taken once the lock is held,
-- so it sees the arrivals of whoever held the lock before (a subquery of the locking
-- statement would not).
SELECT coalesce(max(seq), 0) FROM arrival WHERE conversion_pk = $1;

-- name: update_conversion
UPDATE conversion
SET status = $2, status_event_time = $3, fields = $4::jsonb, updated_at = $5
WHERE id = $1;

-- name: touch_conversion
UPDATE conversion SET updated_at = $2 WHERE id = $1;

-- name: insert_arrival
INSERT INTO arrival
    (conversion_pk, seq, transition, status, event_time, received_at, data, vals)
VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8::jsonb);

-- name: insert_delivery
INSERT INTO delivery
    (id, conversion_pk, arrival_seq, source, conversion_id, postback_id, action, destination,
     affiliate_owner, idempotency_key, state, created_at, updated_at, next_attempt_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'queued', $11, $11, $11);

-- name: insert_arrival_stored
-- insert_arrival, answering the arrival's data and values as stored (jsonb's text: the claims
-- of deliveries leased at insert are made from them, as a claim reads them).
INSERT INTO arrival
    (conversion_pk, seq, transition, status, event_time, received_at, data, vals)
VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8::jsonb)
RETURNING data::text, vals::text;

-- name: insert_delivery_leased
-- insert_delivery leased at insert to the node writing it ($12 owner, $13 token, $14 until),
-- in flight as claim_due leaves a claimed delivery (daemon.store.base.LeaseAhead).
INSERT INTO delivery
    (id, conversion_pk, arrival_seq, source, conversion_id, postback_id, action, destination,
     affiliate_owner, idempotency_key, state, created_at, updated_at, next_attempt_at,
     lease_owner, lease_token, lease_until)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'in_flight', $11, $11, $11, $12, $13, $14);

-- name: claim_due
-- SKIP LOCKED: rows another node is claiming right now are left to it, never waited for;
-- a row claimed and committed meanwhile no longer passes due_at <= $1 when re-checked.
WITH due AS (
    SELECT id, due_at FROM delivery
    WHERE due_at <= $1
      AND (affiliate_owner IS NULL OR affiliate_owner <> ALL($5::text[]))  -- fair use
    ORDER BY due_at, id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE delivery d
    SET state = 'in_flight', lease_owner = $3, lease_until = $4, updated_at = $1,
        lease_token = replace(gen_random_uuid()::text, '-', '')
    FROM due
    WHERE d.id = due.id
    RETURNING d.id, d.lease_token, d.postback_id, d.destination, d.source, d.conversion_id,
              d.conversion_pk, d.arrival_seq, d.idempotency_key, d.attempts, d.created_at,
              due.due_at AS was_due
)
SELECT c.id, c.lease_token, c.postback_id, c.destination, c.source, c.conversion_id,
       c.arrival_seq, c.idempotency_key, c.attempts, c.created_at, a.data::text AS data,
       a.vals::text AS vals
FROM claimed c
JOIN arrival a ON a.conversion_pk = c.conversion_pk AND a.seq = c.arrival_seq
ORDER BY c.was_due, c.id;

-- name: claim_due_skipping
-- claim_due leaving out the destinations in $6. Not by reading past their deliveries in the due
-- index (a backlog of 30,000 made due at once would be read on every claim): the destinations
-- with pending deliveries are walked in delivery_destination_due (one seek each), and the
-- oldest due of each one not skipped are merged, oldest first; twice the limit of them are
-- candidates, of which the first `limit` not locked by another node are locked and claimed
-- (SKIP LOCKED: never waited for; a row claimed and committed meanwhile no longer passes
-- due_at <= $1 when re-checked). Only the rows claimed are locked.
WITH RECURSIVE pending(name) AS (
    SELECT (SELECT min(destination) FROM delivery WHERE due_at IS NOT NULL)
    UNION ALL
    SELECT (SELECT min(destination) FROM delivery
            WHERE due_at IS NOT NULL AND destination > p.name)
    FROM pending p WHERE p.name IS NOT NULL
), candidate AS (
    SELECT x.id
    FROM pending p
    CROSS JOIN LATERAL (
        SELECT id, due_at FROM delivery
        WHERE destination = p.name AND due_at <= $1
          AND (affiliate_owner IS NULL OR affiliate_owner <> ALL($5::text[]))  -- fair use
        ORDER BY due_at, id
        LIMIT 2 * $2
    ) x
    WHERE p.name IS NOT NULL AND p.name <> ALL($6::text[])
    ORDER BY x.due_at, x.id
    LIMIT 2 * $2
), due AS (
    SELECT id, due_at FROM delivery
    WHERE id IN (SELECT id FROM candidate) AND due_at <= $1
    ORDER BY due_at, id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE delivery d
    SET state = 'in_flight', lease_owner = $3, lease_until = $4, updated_at = $1,
        lease_token = replace(gen_random_uuid()::text, '-', '')
    FROM due
    WHERE d.id = due.id
    RETURNING d.id, d.lease_token, d.postback_id, d.destination, d.source, d.conversion_id,
              d.conversion_pk, d.arrival_seq, d.idempotency_key, d.attempts, d.created_at,
              due.due_at AS was_due
)
SELECT c.id, c.lease_token, c.postback_id, c.destination, c.source, c.conversion_id,
       c.arrival_seq, c.idempotency_key, c.attempts, c.created_at, a.data::text AS data,
       a.vals::text AS vals
FROM claimed c
JOIN arrival a ON a.conversion_pk = c.conversion_pk AND a.seq = c.arrival_seq
ORDER BY c.was_due, c.id;

-- name: release_delivery
UPDATE delivery
SET state = CASE WHEN attempts > 0 THEN 'retrying' ELSE 'queued' END,
    next_attempt_at = $3, updated_at = $3,
    lease_owner = NULL, lease_token = NULL, lease_until = NULL
WHERE id = $1 AND lease_token = $2 AND state = 'in_flight';

-- name: recover_node
UPDATE delivery
SET state = CASE WHEN attempts > 0 THEN 'retrying' ELSE 'queued' END,
    next_attempt_at = $2, updated_at = $2,
    lease_owner = NULL, lease_token = NULL, lease_until = NULL
WHERE state = 'in_flight' AND lease_owner = $1;

-- name: cancel_postbacks
UPDATE delivery
SET state = 'cancelled', next_attempt_at = NULL, updated_at = $2
WHERE state IN ('queued', 'retrying') AND postback_id = ANY($1::bigint[]);

-- name: requeue
UPDATE delivery
SET state = 'queued', next_attempt_at = $2, updated_at = $2
WHERE state IN ('dead', 'cancelled') AND id = ANY($1::text[]);

-- name: requeue_matching
UPDATE delivery
SET state = 'queued', next_attempt_at = $5, updated_at = $5
WHERE state IN ('dead', 'cancelled')
  AND ($1::text IS NULL OR state = $1::text)
  AND ($2::bigint[] IS NULL OR postback_id = ANY($2::bigint[]))
  AND ($3::text IS NULL OR conversion_id = $3::text)
  AND ($4::timestamptz IS NULL OR created_at >= $4::timestamptz);

-- name: get_delivery
SELECT id, postback_id, action, destination, source, conversion_id, arrival_seq,
       idempotency_key, state, attempts, created_at, updated_at, next_attempt_at, last_reason,
       affiliate_owner
FROM delivery
WHERE id = $1;

-- name: get_attempts
SELECT started_at, duration_ms, outcome, reason, rules_version, node, request::text,
       response_status, response_excerpt
FROM attempt
WHERE delivery_id = $1
ORDER BY n;

-- name: list_deliveries
SELECT id, postback_id, action, destination, source, conversion_id, arrival_seq,
       idempotency_key, state, attempts, created_at, updated_at, next_attempt_at, last_reason,
       affiliate_owner
FROM delivery
WHERE ($1::text IS NULL OR state = $1::text)
  AND ($2::bigint[] IS NULL OR postback_id = ANY($2::bigint[]))
  AND ($3::text IS NULL OR conversion_id = $3::text)
  -- Written as ranges (not `$4 IS NULL OR ...`) so that the created_at index bounds the
  -- walk: a time range or a later page reads only its own rows.
  AND created_at >= coalesce($4::timestamptz, '-infinity'::timestamptz)
  AND (created_at, id) < (coalesce($5::timestamptz, 'infinity'::timestamptz), coalesce($6::text, ''))
ORDER BY created_at DESC, id DESC
LIMIT $7;

-- name: list_postback_pages
-- list_deliveries for the postbacks in $2 (and no conversion id): a page of each postback's own
-- newest deliveries (delivery_postback_created, newest first, at most $7 rows each), merged.
-- One statement for any number of postbacks; a page reads at most $7 rows a postback however
-- many deliveries the store keeps. Its parameters are list_deliveries' ($3, a conversion id,
-- is NULL here: a conversion's few deliveries take list_deliveries).
SELECT d.id, d.postback_id, d.action, d.destination, d.source, d.conversion_id, d.arrival_seq,
       d.idempotency_key, d.state, d.attempts, d.created_at, d.updated_at, d.next_attempt_at,
       d.last_reason, d.affiliate_owner
FROM unnest($2::bigint[]) AS p (postback_id)
CROSS JOIN LATERAL (
    SELECT * FROM delivery
    WHERE delivery.postback_id = p.postback_id
      AND ($1::text IS NULL OR state = $1::text)
      AND ($3::text IS NULL OR conversion_id = $3::text)
      AND created_at >= coalesce($4::timestamptz, '-infinity'::timestamptz)
      AND (created_at, id)
          < (coalesce($5::timestamptz, 'infinity'::timestamptz), coalesce($6::text, ''))
    ORDER BY created_at DESC, id DESC
    LIMIT $7
) AS d
ORDER BY d.created_at DESC, d.id DESC
LIMIT $7;

-- name: get_conversion
SELECT id, source, conversion_id, status, status_event_time, fields::text, created_at,
       updated_at
FROM conversion
WHERE source = $1 AND conversion_id = $2;

-- name: get_arrivals
-- A resend's copy of an arrival (migration 0004) is not an arrival of the conversion.
SELECT seq, transition, status, event_time, received_at
FROM arrival
WHERE conversion_pk = $1 AND resend_of IS NULL
ORDER BY seq;

-- name: queue_depth
-- Every state: reads every delivery the store keeps (the final states are most of them).
SELECT state, count(*) FROM delivery GROUP BY state;

-- name: queue_depth_live
-- The states before a final one, in the state index: as cheap as the queue is short, however
-- many finished deliveries the store keeps (daemon.metrics.QueueDepth reads it every scrape).
SELECT state, count(*) FROM delivery WHERE state IN ('queued', 'in_flight', 'retrying')
GROUP BY state;

-- name: prune_batch
WITH doomed AS (
    SELECT c.id FROM conversion c
    WHERE c.updated_at < $1
      AND NOT EXISTS (
          SELECT 1 FROM delivery d
          WHERE d.conversion_pk = c.id AND d.state IN ('queued', 'retrying', 'in_flight'))
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
DELETE FROM conversion c USING doomed WHERE c.id = doomed.id;

-- name: oldest_due
-- The earliest due_at of all (one index probe): when it is past, that delivery waits unclaimed.
SELECT min(due_at) FROM delivery WHERE due_at IS NOT NULL;

-- name: hold_delivery
-- A claim handed back held by an open circuit breaker: no attempt, no attempt count. It keeps
-- the time it was first due (held_due, also across a second hold) and waits at $3.
-- ($1 id, $2 token, $3 until, $4 now)
UPDATE delivery
SET state = CASE WHEN attempts > 0 THEN 'retrying' ELSE 'queued' END,
    held_due = CASE WHEN held_until IS NOT NULL AND next_attempt_at = held_until
                    THEN held_due ELSE coalesce(next_attempt_at, $4) END,
    next_attempt_at = $3, held_until = $3, updated_at = $4,
    lease_owner = NULL, lease_token = NULL, lease_until = NULL
WHERE id = $1 AND lease_token = $2 AND state = 'in_flight';

-- name: unhold_destination
-- The breaker closed ($3 NULL: all), or its pause ended ($3 = 1: one, to be the probe): the
-- destination's held deliveries are due again when they first were, the oldest first.
-- ($1 destination, $2 now, $3 limit)
UPDATE delivery
SET next_attempt_at = least(held_due, $2), held_due = NULL, held_until = NULL,
    updated_at = $2
WHERE id IN (
    SELECT id FROM delivery
    WHERE destination = $1 AND held_until IS NOT NULL
      AND state IN ('queued', 'retrying') AND next_attempt_at = held_until
    ORDER BY held_due, id
    LIMIT $3);

-- name: arrive_new_batch
-- The whole arrival of new conversions (one, or several that came together:
-- daemon/store/postgres_batch.py) in one statement, one round trip and one commit (a single
-- statement is atomic): each conversion, its first arrival and its deliveries. $1..$9: one
-- array per column, one element per arrival, no (source, conversion_id) twice; $10..$16: the
-- deliveries, one element each, $10 the ordinal (from 1) of the arrival they belong to;
-- $17..$19: each delivery's lease when it is leased at insert to the node writing it (owner,
-- token, until; nulls when it is queued: daemon.store.base.LeaseAhead); $20: per arrival,
-- whether its deliveries are leased. The answer is a row per arrival, in order: the new
-- conversion's id, or null when it exists already (nothing of that arrival written: its caller
-- takes the locking path), and for an arrival whose deliveries are leased, the arrival's data
-- and values as stored (jsonb's text: a claim made at insert is the claim a claim reads).
WITH input AS (
    SELECT *
    FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::text[],
                $6::timestamptz[], $7::text[], $8::text[], $9::text[], $20::boolean[])
         WITH ORDINALITY
         AS i(source, conversion_id, status, event_time, fields, received_at, transition, data,
              vals, leased, n)
), c AS (
    INSERT INTO conversion
        (source, conversion_id, status, status_event_time, fields, created_at, updated_at)
    SELECT source, conversion_id, status, event_time, fields::jsonb, received_at, received_at
    FROM input
    -- In key order: two nodes' rounds that share conversions (a tracker's retry sent to the
    -- other node) wait for each other in one order, not each for the other (a deadlock).
    ORDER BY source, conversion_id
    ON CONFLICT (source, conversion_id) DO NOTHING
    RETURNING id, source, conversion_id
), a AS (
    INSERT INTO arrival
        (conversion_pk, seq, transition, status, event_time, received_at, data, vals)
    SELECT c.id, 1, i.transition, i.status, i.event_time, i.received_at, i.data::jsonb,
           i.vals::jsonb
    FROM c JOIN input i ON i.source = c.source AND i.conversion_id = c.conversion_id
    RETURNING conversion_pk, data, vals
), d AS (
    INSERT INTO delivery
        (id, conversion_pk, arrival_seq, source, conversion_id, postback_id, action,
         destination, affiliate_owner, idempotency_key, state, created_at, updated_at,
         next_attempt_at, lease_owner, lease_token, lease_until)
    SELECT x.id, a.conversion_pk, 1, i.source, i.conversion_id, x.postback_id, x.action,
           x.destination, x.affiliate_owner, x.idempotency_key,
           CASE WHEN x.lease_token IS NULL THEN 'queued' ELSE 'in_flight' END, i.received_at,
           i.received_at, i.received_at, x.lease_owner, x.lease_token, x.lease_until
    FROM unnest($10::bigint[], $11::text[], $12::bigint[], $13::text[], $14::text[],
                $15::text[], $16::text[], $17::text[], $18::text[], $19::timestamptz[])
         AS x(n, id, postback_id, action, destination, affiliate_owner, idempotency_key,
              lease_owner, lease_token, lease_until)
    JOIN input i ON i.n = x.n
    JOIN c ON c.source = i.source AND c.conversion_id = i.conversion_id
    JOIN a ON a.conversion_pk = c.id
)
SELECT c.id, CASE WHEN i.leased THEN a.data::text END, CASE WHEN i.leased THEN a.vals::text END
FROM input i
LEFT JOIN c ON c.source = i.source AND c.conversion_id = i.conversion_id
LEFT JOIN a ON a.conversion_pk = c.id
ORDER BY i.n;

-- name: finish_and_record
-- The delivery finished (lease released) and its attempt recorded in one statement (one round
-- trip): the attempt's number is the count of attempts the UPDATE leaves. No row: the lease was lost, nothing written.
WITH f AS (
    UPDATE delivery
    SET state = $3, attempts = attempts + 1, next_attempt_at = $4, last_reason = $5,
        updated_at = $6, lease_owner = NULL, lease_token = NULL, lease_until = NULL
    WHERE id = $1 AND lease_token = $2 AND state = 'in_flight'
    RETURNING attempts
)
INSERT INTO attempt
    (delivery_id, n, started_at, duration_ms, outcome, reason, rules_version, node, request,
     response_status, response_excerpt)
SELECT $1, f.attempts, $7, $8, $9, $10, $11, $12, $13::jsonb, $14, $15 FROM f
RETURNING n;

-- name: finish_many
-- finish_and_record for several claims in one statement (one round trip): the items come as
-- parallel arrays ($1 ids, $2 tokens, $3 states, $4 next attempts, $5 reasons, $6 finish times,
-- then the attempts' columns), numbered 1, 2, ... in order; the numbers of the items whose
-- claim was held (finished and recorded) come back. The statement is atomic: when it fails,
-- nothing of it is written.
WITH i AS (
    SELECT *
    FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::text[],
                $6::timestamptz[], $7::timestamptz[], $8::integer[], $9::text[], $10::text[],
                $11::text[], $12::text[], $13::text[], $14::integer[], $15::text[])
         WITH ORDINALITY
         AS i(id, token, state, due, last_reason, finished, started, duration_ms, outcome,
              reason, rules_version, node, request, response_status, response_excerpt, k)
), f AS (
    UPDATE delivery d
    SET state = i.state, attempts = d.attempts + 1, next_attempt_at = i.due,
        last_reason = i.last_reason, updated_at = i.finished,
        lease_owner = NULL, lease_token = NULL, lease_until = NULL
    FROM i
    WHERE d.id = i.id AND d.lease_token = i.token AND d.state = 'in_flight'
    RETURNING i.k, d.attempts
), recorded AS (
    INSERT INTO attempt
        (delivery_id, n, started_at, duration_ms, outcome, reason, rules_version, node, request,
         response_status, response_excerpt)
    SELECT i.id, f.attempts, i.started, i.duration_ms, i.outcome, i.reason, i.rules_version,
           i.node, i.request::jsonb, i.response_status, i.response_excerpt
    FROM f JOIN i ON i.k = f.k
)
SELECT k FROM f;
