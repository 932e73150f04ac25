-- postbackd schema, PostgreSQL (13 or newer: gen_random_uuid). Tables are created in the
-- first schema of the search_path.

CREATE TABLE conversion (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source            text        NOT NULL,
    conversion_id     text        NOT NULL,
    status            text        NOT NULL CHECK (status IN ('pending', 'approved', 'rejected')),
    status_event_time timestamptz,
    fields            jsonb       NOT NULL,
    created_at        timestamptz NOT NULL,
    updated_at        timestamptz NOT NULL,
    UNIQUE (source, conversion_id)
);
CREATE INDEX conversion_updated ON conversion (updated_at);

CREATE TABLE arrival (
    conversion_pk bigint      NOT NULL REFERENCES conversion (id) ON DELETE CASCADE,
    seq           integer     NOT NULL,
    transition    text        NOT NULL,
    status        text        NOT NULL,
    event_time    timestamptz,
    received_at   timestamptz NOT NULL,
    data          jsonb       NOT NULL,
    vals          jsonb       NOT NULL,
    PRIMARY KEY (conversion_pk, seq)
);

CREATE TABLE delivery (
    id              text        PRIMARY KEY,
    conversion_pk   bigint      NOT NULL,
    arrival_seq     integer     NOT NULL,
    source          text        NOT NULL,
    conversion_id   text        NOT NULL,
    postback_id     bigint      NOT NULL,
    action          text        NOT NULL,
    destination     text        NOT NULL,
    affiliate_owner text,
    idempotency_key text        NOT NULL,
    state           text        NOT NULL CHECK (state IN
                        ('queued', 'in_flight', 'retrying', 'succeeded', 'dead', 'cancelled')),
    attempts        integer     NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL,
    next_attempt_at timestamptz,
    last_reason     text,
    lease_owner     text,
    lease_token     text,
    lease_until     timestamptz,
    -- When the delivery may next be claimed: its next attempt while it waits, the end of its
    -- lease while in flight, never once final. One column, so one index serves claim_due.
    due_at          timestamptz GENERATED ALWAYS AS (CASE
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
    delivery_id      text        NOT NULL REFERENCES delivery (id) ON DELETE CASCADE,
    n                integer     NOT NULL,
    started_at       timestamptz NOT NULL,
    duration_ms      integer     NOT NULL,
    outcome          text        NOT NULL,
    reason           text,
    rules_version    text        NOT NULL,
    node             text        NOT NULL,
    request          jsonb,
    response_status  integer,
    response_excerpt text,
    PRIMARY KEY (delivery_id, n)
);
