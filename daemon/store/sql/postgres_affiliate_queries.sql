-- Named queries of affiliate postbacks (issue 15), PostgreSQL.

-- name: bump_version
UPDATE affiliate_state SET version = version + 1 WHERE id = 1 RETURNING version;

-- name: notify
SELECT pg_notify($1, $2);

-- name: version
SELECT version FROM affiliate_state WHERE id = 1;

-- name: count_live
SELECT count(*) FROM affiliate_postback
WHERE affiliate = $1 AND status IN ('active', 'disabled');

-- name: insert_postback
INSERT INTO affiliate_postback
    (affiliate, offer, status, status_reason, body, created_at, updated_at, change_seq)
VALUES ($1, $2, $3, $4, $5, $6, $6, $7)
RETURNING id, affiliate, offer, status, status_reason, body, created_at, updated_at, change_seq;

-- name: select_postback
SELECT id, affiliate, offer, status, status_reason, body, created_at, updated_at, change_seq
FROM affiliate_postback WHERE id = $1;

-- name: update_postback
UPDATE affiliate_postback
SET offer = $3, status = $4, status_reason = $5, body = $6, updated_at = $7, change_seq = $8
WHERE id = $1 AND change_seq = $2 AND status != 'deleted'
RETURNING id, affiliate, offer, status, status_reason, body, created_at, updated_at, change_seq;

-- name: delete_postback
UPDATE affiliate_postback
SET status = 'deleted', status_reason = NULL, updated_at = $3, change_seq = $4
WHERE id = $1 AND change_seq = $2 AND status != 'deleted'
RETURNING id, affiliate, offer, status, status_reason, body, created_at, updated_at, change_seq;

-- name: cancel_deliveries
UPDATE delivery
SET state = 'cancelled', next_attempt_at = NULL, updated_at = $2
WHERE state IN ('queued', 'retrying') AND postback_id = $1;

-- name: insert_audit
INSERT INTO affiliate_audit (postback_id, at, who, change, before, after)
VALUES ($1, $2, $3, $4, $5, $6);

-- name: changed_postbacks
SELECT id, affiliate, offer, status, status_reason, body, created_at, updated_at, change_seq
FROM affiliate_postback WHERE change_seq > $1 ORDER BY id;

-- name: changed_secrets
SELECT affiliate, name, value, change_seq FROM affiliate_secret
WHERE change_seq > $1 ORDER BY affiliate, name;

-- name: history
SELECT postback_id, at, who, change, before, after, id FROM affiliate_audit
WHERE postback_id = $1 AND id > $2 ORDER BY id LIMIT $3;

-- name: upsert_secret
INSERT INTO affiliate_secret (affiliate, name, value, updated_at, change_seq)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (affiliate, name) DO UPDATE
SET value = excluded.value, updated_at = excluded.updated_at, change_seq = excluded.change_seq;

-- name: delete_secret
UPDATE affiliate_secret SET value = NULL, updated_at = $3, change_seq = $4
WHERE affiliate = $1 AND name = $2 AND value IS NOT NULL;

-- name: secret_names
SELECT name FROM affiliate_secret WHERE affiliate = $1 AND value IS NOT NULL ORDER BY name;
