-- Resend and backfill (issue 18). A resend is a deliberate new delivery of an arrival that was
-- delivered already: it gets an arrival of its own, a copy of the original's data marked
-- resend_of (so the one-delivery-per-(arrival, postback) rule and the idempotency key
-- {source}:{conversion_id}:{seq}:{postback} stay as they are: its key is its own), and the
-- delivery records the delivery it resends. Copies are left out of a conversion's arrivals and
-- of backfills. Backfills read arrivals by the time they were received.
ALTER TABLE delivery ADD COLUMN resend_of text;
ALTER TABLE arrival ADD COLUMN resend_of text;
CREATE INDEX arrival_received ON arrival (received_at);
