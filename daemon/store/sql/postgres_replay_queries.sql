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

-- name: delivery_log
-- The log of `deliveries list`: each delivery with its arrival's offer, affiliate and trigger.
-- $1 state, $2 postback, $3 action, $4 conversion id, $5 since, $6 until, $7 offer,
-- $8 affiliate, $9 trigger, $10/$11 keyset, $12 limit.
SELECT d.id, d.postback_id, d.action, d.destination, d.source, d.conversion_id, d.arrival_seq,
       d.idempotency_key, d.state, d.attempts, d.created_at, d.updated_at, d.next_attempt_at,
       d.last_reason, d.affiliate_owner,
       a.data->>'offer', a.data->>'affiliate', a.data->>'trigger'
FROM delivery d
JOIN arrival a ON a.conversion_pk = d.conversion_pk AND a.seq = d.arrival_seq
WHERE ($1::text IS NULL OR d.state = $1)
  AND ($2::bigint IS NULL OR d.postback_id = $2)
  AND ($3::text IS NULL OR d.action = $3)
  AND ($4::text IS NULL OR d.conversion_id = $4)
  AND ($5::timestamptz IS NULL OR d.created_at >= $5)
  AND ($6::timestamptz IS NULL OR d.created_at < $6)
  AND ($7::text IS NULL OR a.data->>'offer' = $7)
  AND ($8::text IS NULL OR a.data->>'affiliate' = $8)
  AND ($9::text IS NULL OR a.data->>'trigger' = $9)
  AND ($10::timestamptz IS NULL OR (d.created_at, d.id) < ($10, $11::text))
ORDER BY d.created_at DESC, d.id DESC
LIMIT $12;

-- name: conversion_log
-- $1 status, $2 conversion id, $3 since, $4 until, $5 offer, $6 affiliate, $7 trigger status,
-- $8 postback, $9 action, $10 state, $11/$12 keyset, $13 limit.
SELECT c.id, c.source, c.conversion_id, c.status, c.fields::text, c.created_at, c.updated_at,
       (SELECT count(*) FROM delivery d WHERE d.conversion_pk = c.id)
FROM conversion c
WHERE ($1::text IS NULL OR c.status = $1)
  AND ($2::text IS NULL OR c.conversion_id = $2)
  AND ($3::timestamptz IS NULL OR c.updated_at >= $3)
  AND ($4::timestamptz IS NULL OR c.updated_at < $4)
  AND ($5::text IS NULL OR c.fields->>'offer' = $5)
  AND ($6::text IS NULL OR c.fields->>'affiliate' = $6)
  AND ($7::text IS NULL OR c.status = $7)
  AND (($8::bigint IS NULL AND $9::text IS NULL AND $10::text IS NULL) OR EXISTS (
        SELECT 1 FROM delivery d
        WHERE d.conversion_pk = c.id
          AND ($8::bigint IS NULL OR d.postback_id = $8)
          AND ($9::text IS NULL OR d.action = $9)
          AND ($10::text IS NULL OR d.state = $10)))
  AND ($11::timestamptz IS NULL OR (c.updated_at, c.id) < ($11, $12::bigint))
ORDER BY c.updated_at DESC, c.id DESC
LIMIT $13;
