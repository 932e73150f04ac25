-- Resend, replay and backfill (issue 18), SQLite. Times are integer microseconds (UTC).

-- name: arrivals_between
-- Arrivals that may fire postbacks, received in [since, until), oldest first, after a keyset
-- cursor; each with the postbacks that already have a delivery for it.
SELECT a.conversion_pk, a.seq, c.source, c.conversion_id, a.transition, a.received_at,
       a.data, a.vals,
       (SELECT json_group_array(d.postback_id) FROM delivery d
        WHERE d.conversion_pk = a.conversion_pk AND d.arrival_seq = a.seq) AS postback_ids
FROM arrival a
JOIN conversion c ON c.id = a.conversion_pk
WHERE a.received_at >= :since AND a.received_at < :until
  AND a.resend_of IS NULL
  AND a.transition IN ('new', 'status_changed')
  AND (:after_received IS NULL
       OR (a.received_at, a.conversion_pk, a.seq) > (:after_received, :after_pk, :after_seq))
ORDER BY a.received_at, a.conversion_pk, a.seq
LIMIT :limit;

-- name: latest_arrival
SELECT a.conversion_pk, a.seq, c.source, c.conversion_id, a.transition, a.received_at,
       a.data, a.vals,
       (SELECT json_group_array(d.postback_id) FROM delivery d
        WHERE d.conversion_pk = a.conversion_pk AND d.arrival_seq = a.seq) AS postback_ids
FROM arrival a
JOIN conversion c ON c.id = a.conversion_pk
WHERE c.source = :source AND c.conversion_id = :conversion_id
  AND a.resend_of IS NULL
  AND a.transition IN ('new', 'status_changed')
ORDER BY a.seq DESC
LIMIT 1;

-- name: insert_delivery_once
INSERT INTO delivery
    (id, conversion_pk, arrival_seq, source, conversion_id, postback_id, action, destination,
     affiliate_owner, idempotency_key, state, created_at, updated_at, next_attempt_at, resend_of)
VALUES
    (:id, :pk, :seq, :source, :conversion_id, :postback_id, :action, :destination,
     :affiliate_owner, :idempotency_key, 'queued', :now, :now, :now, :resend_of)
ON CONFLICT (conversion_pk, arrival_seq, postback_id) DO NOTHING;

-- name: resend_source
SELECT id, state, conversion_pk, arrival_seq, source, conversion_id, postback_id, action,
       destination, affiliate_owner
FROM delivery
WHERE id = :id;

-- name: last_seq
SELECT coalesce(max(seq), 0) FROM arrival WHERE conversion_pk = :pk;

-- name: copy_arrival
INSERT INTO arrival
    (conversion_pk, seq, transition, status, event_time, received_at, data, vals, resend_of)
SELECT conversion_pk, :new_seq, transition, status, event_time, :now, data, vals, :resend_of
FROM arrival
WHERE conversion_pk = :pk AND seq = :seq;

-- name: resend_of
SELECT resend_of FROM delivery WHERE id = :id;

-- name: delivery_log
-- The log of `deliveries list`: each delivery with its arrival's offer, affiliate and trigger.
SELECT d.id, d.postback_id, d.action, d.destination, d.source, d.conversion_id, d.arrival_seq,
       d.idempotency_key, d.state, d.attempts, d.created_at, d.updated_at, d.next_attempt_at,
       d.last_reason, d.affiliate_owner,
       json_extract(a.data, '$.offer'), json_extract(a.data, '$.affiliate'),
       json_extract(a.data, '$.trigger')
FROM delivery d
JOIN arrival a ON a.conversion_pk = d.conversion_pk AND a.seq = d.arrival_seq
WHERE (:state IS NULL OR d.state = :state)
  AND (:postback_id IS NULL OR d.postback_id = :postback_id)
  AND (:action IS NULL OR d.action = :action)
  AND (:conversion_id IS NULL OR d.conversion_id = :conversion_id)
  AND (:since IS NULL OR d.created_at >= :since)
  AND (:until IS NULL OR d.created_at < :until)
  AND (:offer IS NULL OR json_extract(a.data, '$.offer') = :offer)
  AND (:affiliate IS NULL OR json_extract(a.data, '$.affiliate') = :affiliate)
  AND (:trigger IS NULL OR json_extract(a.data, '$.trigger') = :trigger)
  AND (:after_created IS NULL OR (d.created_at, d.id) < (:after_created, :after_id))
ORDER BY d.created_at DESC, d.id DESC
LIMIT :limit;

-- name: conversion_log
SELECT c.id, c.source, c.conversion_id, c.status, c.fields, c.created_at, c.updated_at,
       (SELECT count(*) FROM delivery d WHERE d.conversion_pk = c.id)
FROM conversion c
WHERE (:status IS NULL OR c.status = :status)
  AND (:conversion_id IS NULL OR c.conversion_id = :conversion_id)
  AND (:since IS NULL OR c.updated_at >= :since)
  AND (:until IS NULL OR c.updated_at < :until)
  AND (:offer IS NULL OR json_extract(c.fields, '$.offer') = :offer)
  AND (:affiliate IS NULL OR json_extract(c.fields, '$.affiliate') = :affiliate)
  AND (:trigger IS NULL OR c.status = :trigger)
  AND (:postback_id IS NULL AND :action IS NULL AND :state IS NULL OR EXISTS (
        SELECT 1 FROM delivery d
        WHERE d.conversion_pk = c.id
          AND (:postback_id IS NULL OR d.postback_id = :postback_id)
          AND (:action IS NULL OR d.action = :action)
          AND (:state IS NULL OR d.state = :state)))
  AND (:after_updated IS NULL OR (c.updated_at, c.id) < (:after_updated, :after_pk))
ORDER BY c.updated_at DESC, c.id DESC
LIMIT :limit;
