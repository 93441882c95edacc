-- The MessageBox, in the schema `cairn`. The same tables, columns and CHECK words as
-- migrations/sqlite; only the types are PostgreSQL's: instance and subscription ids UUID, message
-- ids TEXT (chosen by users), times TIMESTAMPTZ (UTC, written by the engine's clock, never by the
-- database), state BYTEA, JSON bodies and properties TEXT.

CREATE SCHEMA IF NOT EXISTS cairn;

CREATE TABLE cairn.instances (
    id               UUID PRIMARY KEY,
    orchestration    TEXT NOT NULL,
    version          INTEGER NOT NULL,
    status           TEXT NOT NULL CHECK (status IN ('running', 'dehydrated', 'suspended', 'completed', 'failed', 'terminated')),
    step             TEXT NOT NULL,
    waiting_for      TEXT NOT NULL DEFAULT '',
    next_timer_at    TIMESTAMPTZ,
    created_at       TIMESTAMPTZ NOT NULL,
    updated_at       TIMESTAMPTZ NOT NULL,
    last_error       TEXT,
    state            BYTEA,
    engine_state     BYTEA,
    output           TEXT,
    parent_id        UUID,
    owner            TEXT,
    lease_expires_at TIMESTAMPTZ,
    epoch            BIGINT NOT NULL DEFAULT 0,
    history_seq      BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX instances_by_status ON cairn.instances (status, updated_at);
-- Heartbeats renew every lease a host holds.
CREATE INDEX instances_by_owner ON cairn.instances (owner) WHERE owner IS NOT NULL;

CREATE TABLE cairn.messages (
    seq             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id              TEXT NOT NULL UNIQUE,
    message_type    TEXT NOT NULL,
    kind            TEXT NOT NULL CHECK (kind IN ('published', 'start', 'reply', 'child_completed', 'child_failed', 'send_failed')),
    properties      TEXT NOT NULL,
    body            TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('unrouted', 'routed', 'consumed')),
    instance_id     UUID,
    subscription_id UUID,
    reason          TEXT,
    locked_by       TEXT,
    delivery_count  INTEGER NOT NULL DEFAULT 0,
    published_at    TIMESTAMPTZ NOT NULL,
    consumed_at     TIMESTAMPTZ
);
CREATE INDEX messages_ready ON cairn.messages (seq) WHERE status = 'routed' AND locked_by IS NULL;
-- Claims also look at routed messages whose lock is stale (a host that is gone).
CREATE INDEX messages_routed ON cairn.messages (seq) WHERE status = 'routed';
CREATE INDEX messages_by_instance ON cairn.messages (instance_id, status);
CREATE INDEX messages_unrouted ON cairn.messages (message_type) WHERE status = 'unrouted';
CREATE INDEX messages_by_subscription ON cairn.messages (subscription_id) WHERE status = 'routed';

CREATE TABLE cairn.subscriptions (
    id               UUID PRIMARY KEY,
    message_type     TEXT NOT NULL,
    instance_id      UUID,
    orchestration    TEXT,
    version          INTEGER,
    correlation_keys TEXT NOT NULL DEFAULT '',
    correlation      TEXT NOT NULL DEFAULT '',
    created_at       TIMESTAMPTZ NOT NULL
);
CREATE INDEX subscriptions_route ON cairn.subscriptions (message_type, correlation);
CREATE INDEX subscriptions_by_instance ON cairn.subscriptions (instance_id);
CREATE UNIQUE INDEX subscriptions_activating ON cairn.subscriptions (message_type, orchestration) WHERE instance_id IS NULL;

CREATE TABLE cairn.timers (
    instance_id UUID NOT NULL,
    name        TEXT NOT NULL,
    due_at      TIMESTAMPTZ NOT NULL,
    locked_by   TEXT,
    PRIMARY KEY (instance_id, name)
);
CREATE INDEX timers_due ON cairn.timers (due_at);

CREATE TABLE cairn.outbox (
    id              TEXT PRIMARY KEY,
    instance_id     UUID NOT NULL,
    port            TEXT NOT NULL,
    message_type    TEXT NOT NULL,
    body            TEXT NOT NULL,
    expects_reply   BOOLEAN NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('pending', 'delivered', 'dead')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TIMESTAMPTZ NOT NULL,
    locked_by       TEXT,
    locked_until    TIMESTAMPTZ,
    last_error      TEXT,
    created_at      TIMESTAMPTZ NOT NULL,
    delivered_at    TIMESTAMPTZ
);
CREATE INDEX outbox_due ON cairn.outbox (next_attempt_at) WHERE status = 'pending';
CREATE INDEX outbox_by_instance ON cairn.outbox (instance_id);

CREATE TABLE cairn.history (
    instance_id UUID NOT NULL,
    seq         BIGINT NOT NULL,
    reason      TEXT NOT NULL CHECK (reason IN ('send', 'start', 'scope_end', 'suspend', 'dehydrate', 'shutdown', 'complete')),
    step        TEXT NOT NULL,
    status      TEXT NOT NULL,
    at          TIMESTAMPTZ NOT NULL,
    host        TEXT NOT NULL,
    epoch       BIGINT NOT NULL,
    PRIMARY KEY (instance_id, seq)
);

CREATE TABLE cairn.dead_letters (
    id           TEXT PRIMARY KEY,
    instance_id  UUID,
    port         TEXT,
    message_type TEXT NOT NULL,
    body         TEXT NOT NULL,
    reason       TEXT NOT NULL,
    attempts     INTEGER NOT NULL,
    dead_at      TIMESTAMPTZ NOT NULL
);

CREATE TABLE cairn.hosts (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    pid          INTEGER NOT NULL,
    started_at   TIMESTAMPTZ NOT NULL,
    heartbeat_at TIMESTAMPTZ NOT NULL,
    stopped_at   TIMESTAMPTZ
);
