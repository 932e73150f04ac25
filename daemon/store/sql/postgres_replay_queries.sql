-- Resend, replay and backfill (issue 18), PostgreSQL.

-- name: arrivals_between
-- Arrivals that may fire postbacks, received in [since, until), oldest first, after a keyset
-- cursor; each with the postbacks that already have a delivery for it.
SELECT a.conversion_pk, a.seq, c.source, c.conversion_id, a.transition, a.received_at,
       a.data::text, a.vals::text,
       ARRAY(SELECT d.postback_id FROM delivery d
             WHERE d.conversion_pk = a.conversion_pk AND d.arrival_seq = a.seq) AS postback_ids
FROM arrival a
JOIN conversion c ON c.id = a.conversion_pk
WHERE a.received_at >= $1 AND a.received_at < $2
  AND a.resend_of IS NULL
  AND a.transition IN ('new', 'status_changed')
  AND ($3::timestamptz IS NULL
       OR (a.received_at, a.conversion_pk, a.seq) > ($3::timestamptz, $4::bigint, $5::integer))
ORDER BY a.received_at, a.conversion_pk, a.seq
LIMIT $6;

-- name: latest_arrival
SELECT a.conversion_pk, a.seq, c.source, c.conversion_id, a.transition, a.received_at,
       a.data::text, a.vals::text,
       ARRAY(SELECT d.postback_id FROM delivery d
             WHERE d.conversion_pk = a.conversion_pk AND d.arrival_seq = a.seq) AS postback_ids
FROM arrival a
JOIN conversion c ON c.id = a.conversion_pk
WHERE c.source = $1 AND c.conversion_id = $2
  AND a.resend_of IS NULL
  AND a.transition IN ('new', 'status_changed')
ORDER BY a.seq DESC
LIMIT 1;

-- name: insert_delivery_once
INSERT INTO delivery
    (id, conversion_pk, arrival_seq, source, conversion_id, postback_id, action, destination,
     affiliate_owner, idempotency_key, state, created_at, updated_at, next_attempt_at, resend_of)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'queued', $11, $11, $11, $12)
ON CONFLICT (conversion_pk, arrival_seq, postback_id) DO NOTHING
RETURNING id;

-- name: resend_source
-- Locks the conversion row (as an arrival does), so the copy's seq is not taken meanwhile.
SELECT d.id, d.state, d.conversion_pk, d.arrival_seq, d.source, d.conversion_id, d.postback_id,
       d.action, d.destination, d.affiliate_owner
FROM delivery d
JOIN conversion c ON c.id = d.conversion_pk
WHERE d.id = $1
FOR UPDATE OF c;

-- name: last_seq
SELECT coalesce(max(seq), 0) FROM arrival WHERE conversion_pk = $1;

-- name: copy_arrival
INSERT INTO arrival
    (conversion_pk, seq, transition, status, event_time, received_at, data, vals, resend_of)
SELECT conversion_pk, $3, transition, status, event_time, $4, data, vals, $5
FROM arrival
WHERE conversion_pk = $1 AND seq = $2;

-- name: resend_of
SELECT resend_of FROM delivery WHERE id = $1;
