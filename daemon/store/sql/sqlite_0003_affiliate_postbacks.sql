-- Affiliate postbacks (issue 15): postbacks that affiliates keep in the store, their audit
-- trail, their secrets, and one version counter that every change bumps (nodes and worker
-- processes compare it to pick changes up).

-- Ids of store postbacks start at 1,000,000,000 (file postbacks stay below, checked at load);
-- AUTOINCREMENT never hands out an id again, even after its row is gone.
CREATE TABLE affiliate_postback (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    affiliate     TEXT    NOT NULL,
    offer         TEXT    NOT NULL,
    status        TEXT    NOT NULL CHECK (status IN ('active', 'disabled', 'deleted')),
    status_reason TEXT,
    body          TEXT    NOT NULL,   -- JSON: the rule-file fields but id, offer and status
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL,
    change_seq    INTEGER NOT NULL    -- affiliate_state.version of its last change
);
INSERT INTO sqlite_sequence (name, seq) VALUES ('affiliate_postback', 999999999);
CREATE INDEX affiliate_postback_changes ON affiliate_postback (change_seq);
CREATE INDEX affiliate_postback_owner ON affiliate_postback (affiliate, status);

CREATE TABLE affiliate_audit (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    postback_id INTEGER NOT NULL,
    at          INTEGER NOT NULL,
    who         TEXT    NOT NULL,   -- JSON: {id, name, affiliate}
    change      TEXT    NOT NULL,
    before      TEXT,               -- JSON row as stored, or NULL
    after       TEXT
);
CREATE INDEX affiliate_audit_postback ON affiliate_audit (postback_id, id);

CREATE TABLE affiliate_secret (
    affiliate  TEXT    NOT NULL,
    name       TEXT    NOT NULL,
    value      TEXT,               -- NULL once deleted (kept so other nodes learn it)
    updated_at INTEGER NOT NULL,
    change_seq INTEGER NOT NULL,
    PRIMARY KEY (affiliate, name)
);
CREATE INDEX affiliate_secret_changes ON affiliate_secret (change_seq);

CREATE TABLE affiliate_state (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL
);
INSERT INTO affiliate_state (id, version) VALUES (1, 0);
