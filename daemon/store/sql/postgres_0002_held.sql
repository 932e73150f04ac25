-- Deliveries held by an open circuit breaker (daemon/breaker.py). A held delivery keeps the time
-- it was due (held_due) and waits at a safety time (next_attempt_at = held_until) in case the
-- node holding it dies. When the breaker closes, every delivery of the destination still in its
-- hold (next_attempt_at = held_until: nothing has moved it since) becomes due again at its
-- held_due, in one statement, so the backlog drains oldest first. The marks of a delivery that
-- left its hold otherwise (attempted by another node after the safety time) are stale and
-- ignored.
ALTER TABLE delivery ADD COLUMN held_due timestamptz;
ALTER TABLE delivery ADD COLUMN held_until timestamptz;
CREATE INDEX delivery_held ON delivery (destination) WHERE held_until IS NOT NULL;

-- Fair use: a claim may skip the deliveries of affiliates that have their share in flight
-- (claim_due's skip_affiliates). The due index carries affiliate_owner so that skipping reads
-- only the index, not every skipped row (30,000 skipped on SQLite: 5 ms instead of 35-135 ms).
DROP INDEX delivery_due;
CREATE INDEX delivery_due ON delivery (due_at, id) INCLUDE (affiliate_owner)
    WHERE due_at IS NOT NULL;

-- A claim may skip the destinations that have their share in flight (skip_destinations: a
-- backlog made due at once when a breaker closes). Reading past such a backlog in the due
-- index costs a scan of it per claim (30,000 rows: 15-40 ms on SQLite); instead such a claim
-- walks the destinations with pending deliveries in this index (one seek each) and takes the
-- oldest due of each one not skipped (0.03 ms with 30,000 skipped).
CREATE INDEX delivery_destination_due ON delivery (destination, due_at, id)
    WHERE due_at IS NOT NULL;
