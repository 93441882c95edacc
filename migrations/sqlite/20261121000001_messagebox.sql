-- The MessageBox. Times are ISO-8601 UTC text with fixed width ('2026-11-21T12:00:00.000000Z'),
-- so that they compare correctly as text; ids are uuid text.

CREATE TABLE instances (
    id               TEXT PRIMARY KEY,
    orchestration    TEXT NOT NULL,
    version          INTEGER NOT NULL,
    status           TEXT NOT NULL CHECK (status IN ('running', 'dehydrated', 'suspended', 'completed', 'failed', 'terminated')),
    step             TEXT NOT NULL,
    waiting_for      TEXT NOT NULL DEFAULT '',
    next_timer_at    TEXT,
    created_at       TEXT NOT NULL,
    updated_at       TEXT NOT NULL,
    last_error       TEXT,
    state            BLOB,
    engine_state     BLOB,
    output           TEXT,
    parent_id        TEXT,
    owner            TEXT,
    lease_expires_at TEXT,
    epoch            INTEGER NOT NULL DEFAULT 0,
    history_seq      INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX instances_by_status ON instances (status, updated_at);

CREATE TABLE messages (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    id              TEXT NOT NULL UNIQUE,
    message_type    TEXT NOT NULL,
    kind            TEXT NOT NULL CHECK (kind IN ('published', 'start', 'reply', 'child_completed', 'child_failed', 'send_failed')),
    properties      TEXT NOT NULL,
    body            TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('unrouted', 'routed', 'consumed')),
    instance_id     TEXT,
    subscription_id TEXT,
    reason          TEXT,
    locked_by       TEXT,
    delivery_count  INTEGER NOT NULL DEFAULT 0,
    published_at    TEXT NOT NULL,
    consumed_at     TEXT
);
CREATE INDEX messages_ready ON messages (seq) WHERE status = 'routed' AND locked_by IS NULL;
CREATE INDEX messages_by_instance ON messages (instance_id, status);
CREATE INDEX messages_unrouted ON messages (message_type) WHERE status = 'unrouted';
CREATE INDEX messages_by_subscription ON messages (subscription_id) WHERE status = 'routed';

CREATE TABLE subscriptions (
    id               TEXT PRIMARY KEY,
    message_type     TEXT NOT NULL,
    instance_id      TEXT,
    orchestration    TEXT,
    version          INTEGER,
    correlation_keys TEXT NOT NULL DEFAULT '',
    correlation      TEXT NOT NULL DEFAULT '',
    created_at       TEXT NOT NULL
);
CREATE INDEX subscriptions_route ON subscriptions (message_type, correlation);
CREATE INDEX subscriptions_by_instance ON subscriptions (instance_id);
CREATE UNIQUE INDEX subscriptions_activating ON subscriptions (message_type, orchestration) WHERE instance_id IS NULL;

CREATE TABLE timers (
    instance_id TEXT NOT NULL,
    name        TEXT NOT NULL,
    due_at      TEXT NOT NULL,
    locked_by   TEXT,
    PRIMARY KEY (instance_id, name)
);
CREATE INDEX timers_due ON timers (due_at);

CREATE TABLE outbox (
    id              TEXT PRIMARY KEY,
    instance_id     TEXT NOT NULL,
    port            TEXT NOT NULL,
    message_type    TEXT NOT NULL,
    body            TEXT NOT NULL,
    expects_reply   BOOLEAN NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('pending', 'delivered', 'dead')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TEXT NOT NULL,
    locked_by       TEXT,
    locked_until    TEXT,
    last_error      TEXT,
    created_at      TEXT NOT NULL,
    delivered_at    TEXT
);
CREATE INDEX outbox_due ON outbox (next_attempt_at) WHERE status = 'pending';
CREATE INDEX outbox_by_instance ON outbox (instance_id);

CREATE TABLE history (
    instance_id TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    reason      TEXT NOT NULL CHECK (reason IN ('send', 'start', 'scope_end', 'suspend', 'dehydrate', 'shutdown', 'complete')),
    step        TEXT NOT NULL,
    status      TEXT NOT NULL,
    at          TEXT NOT NULL,
    host        TEXT NOT NULL,
    epoch       INTEGER NOT NULL,
    PRIMARY KEY (instance_id, seq)
);

CREATE TABLE dead_letters (
    id           TEXT PRIMARY KEY,
    instance_id  TEXT,
    port         TEXT,
    message_type TEXT NOT NULL,
    body         TEXT NOT NULL,
    reason       TEXT NOT NULL,
    attempts     INTEGER NOT NULL,
    dead_at      TEXT NOT NULL
);

CREATE TABLE hosts (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    pid          INTEGER NOT NULL,
    started_at   TEXT NOT NULL,
    heartbeat_at TEXT NOT NULL,
    stopped_at   TEXT
);
