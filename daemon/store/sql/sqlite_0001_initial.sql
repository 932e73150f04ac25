-- postbackd schema, SQLite. Times are INTEGER microseconds since the Unix epoch, UTC.
-- JSON columns are TEXT holding JSON.

CREATE TABLE conversion (
    id                INTEGER PRIMARY KEY,
    source            TEXT    NOT NULL,
    conversion_id     TEXT    NOT NULL,
    status            TEXT    NOT NULL CHECK (status IN ('pending', 'approved', 'rejected')),
    status_event_time INTEGER,
    fields            TEXT    NOT NULL,
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL,
    UNIQUE (source, conversion_id)
);
CREATE INDEX conversion_updated ON conversion (updated_at);

CREATE TABLE arrival (
    conversion_pk INTEGER NOT NULL REFERENCES conversion (id) ON DELETE CASCADE,
    seq           INTEGER NOT NULL,
    transition    TEXT    NOT NULL,
    status        TEXT    NOT NULL,
    event_time    INTEGER,
    received_at   INTEGER NOT NULL,
    data          TEXT    NOT NULL,
    vals          TEXT    NOT NULL,
    PRIMARY KEY (conversion_pk, seq)
);

CREATE TABLE delivery (
    id              TEXT    PRIMARY KEY,
    conversion_pk   INTEGER NOT NULL,
    arrival_seq     INTEGER NOT NULL,
    source          TEXT    NOT NULL,
    conversion_id   TEXT    NOT NULL,
    postback_id     INTEGER NOT NULL,
    action          TEXT    NOT NULL,
    destination     TEXT    NOT NULL,
    affiliate_owner TEXT,
    idempotency_key TEXT    NOT NULL,
    state           TEXT    NOT NULL CHECK (state IN
                        ('queued', 'in_flight', 'retrying', 'succeeded', 'dead', 'cancelled')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    next_attempt_at INTEGER,
    last_reason     TEXT,
    lease_owner     TEXT,
    lease_token     TEXT,
    lease_until     INTEGER,
    -- When the delivery may next be claimed: its next attempt while it waits, the end of its
    -- lease while in flight, never once final. One column, so one index serves claim_due.
    due_at          INTEGER GENERATED ALWAYS AS (CASE
                        WHEN state IN ('queued', 'retrying') THEN next_attempt_at
                        WHEN state = 'in_flight' THEN lease_until
                    END) STORED,
    -- One delivery per (arrival, postback); also serves the cascade from arrival.
    UNIQUE (conversion_pk, arrival_seq, postback_id),
    FOREIGN KEY (conversion_pk, arrival_seq)
        REFERENCES arrival (conversion_pk, seq) ON DELETE CASCADE
);
CREATE INDEX delivery_due ON delivery (due_at, id) WHERE due_at IS NOT NULL;
CREATE INDEX delivery_created ON delivery (created_at, id);
CREATE INDEX delivery_state ON delivery (state, created_at);
CREATE INDEX delivery_postback ON delivery (postback_id, state);
CREATE INDEX delivery_conversion ON delivery (conversion_id);

CREATE TABLE attempt (
    delivery_id      TEXT    NOT NULL REFERENCES delivery (id) ON DELETE CASCADE,
    n                INTEGER NOT NULL,
    started_at       INTEGER NOT NULL,
    duration_ms      INTEGER NOT NULL,
    outcome          TEXT    NOT NULL,
    reason           TEXT,
    rules_version    TEXT    NOT NULL,
    node             TEXT    NOT NULL,
    request          TEXT,
    response_status  INTEGER,
    response_excerpt TEXT,
    PRIMARY KEY (delivery_id, n)
);
