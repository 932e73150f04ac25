-- Deliveries held by an open circuit breaker (daemon/breaker.py). A held delivery keeps the time
-- it was due (held_due) and waits at a safety time (next_attempt_at = held_until) in case the
-- node holding it dies. When the breaker closes, every delivery of the destination still in its
-- hold (next_attempt_at = held_until: nothing has moved it since) becomes due again at its
-- held_due, in one statement, so the backlog drains oldest first. The marks of a delivery that
-- left its hold otherwise (attempted by another node after the safety time) are stale and
-- ignored.
ALTER TABLE delivery ADD COLUMN held_due INTEGER;
ALTER TABLE delivery ADD COLUMN held_until INTEGER;
CREATE INDEX delivery_held ON delivery (destination) WHERE held_until IS NOT NULL;

-- Fair use: a claim may skip the deliveries of affiliates that have their share in flight
-- (claim_due's skip_affiliates), and of destinations that have theirs (skip_destinations: a
-- backlog draining after an outage). The due index carries affiliate_owner and destination so
-- that skipping reads only the index, not every skipped row (30,000 skipped on SQLite: about
-- 5-20 ms instead of 35-135 ms, on a busy 2-core machine).
DROP INDEX delivery_due;
CREATE INDEX delivery_due ON delivery (due_at, id, affiliate_owner, destination)
    WHERE due_at IS NOT NULL;
