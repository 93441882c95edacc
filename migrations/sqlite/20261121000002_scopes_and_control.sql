-- Scopes, compensation and operator control (issue 4).
--
-- * messages.kind gains 'compensate' (the engine asks an instance to compensate a scope) and
--   history.reason gains 'compensate'; SQLite cannot change a CHECK in place, so both tables are
--   rebuilt with their rows.
-- * history.detail says what a point did in words ("scope flight completed").
-- * instances.resumable: 0 for a suspension that cannot be resumed as it is (state this build
--   could not read).
-- * control: a row inserted here (by `cairn suspend|resume|terminate` or by any SQL client) is
--   carried out by a running host, which fills in status, result and done_at.

CREATE TABLE messages_rebuilt (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    id              TEXT NOT NULL UNIQUE,
    message_type    TEXT NOT NULL,
    kind            TEXT NOT NULL CHECK (kind IN ('published', 'start', 'reply', 'child_completed', 'child_failed', 'send_failed', 'compensate')),
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
INSERT INTO messages_rebuilt SELECT * FROM messages;
DROP TABLE messages;
ALTER TABLE messages_rebuilt RENAME TO messages;
CREATE INDEX messages_ready ON messages (seq) WHERE status = 'routed' AND locked_by IS NULL;
CREATE INDEX messages_by_instance ON messages (instance_id, status);
CREATE INDEX messages_unrouted ON messages (message_type) WHERE status = 'unrouted';
CREATE INDEX messages_by_subscription ON messages (subscription_id) WHERE status = 'routed';

CREATE TABLE history_rebuilt (
    instance_id TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    reason      TEXT NOT NULL CHECK (reason IN ('send', 'start', 'scope_end', 'compensate', 'suspend', 'dehydrate', 'shutdown', 'complete')),
    step        TEXT NOT NULL,
    status      TEXT NOT NULL,
    at          TEXT NOT NULL,
    host        TEXT NOT NULL,
    epoch       INTEGER NOT NULL,
    detail      TEXT,
    PRIMARY KEY (instance_id, seq)
);
INSERT INTO history_rebuilt (instance_id, seq, reason, step, status, at, host, epoch)
    SELECT instance_id, seq, reason, step, status, at, host, epoch FROM history;
DROP TABLE history;
ALTER TABLE history_rebuilt RENAME TO history;

ALTER TABLE instances ADD COLUMN resumable BOOLEAN NOT NULL DEFAULT 1;

CREATE TABLE control (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    instance_id  TEXT NOT NULL,
    action       TEXT NOT NULL CHECK (action IN ('suspend', 'resume', 'terminate')),
    reason       TEXT NOT NULL DEFAULT '',
    force        BOOLEAN NOT NULL DEFAULT 0,
    requested_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%S.000000Z', 'now')),
    status       TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'done', 'rejected')),
    result       TEXT,
    done_at      TEXT,
    done_by      TEXT
);
CREATE INDEX control_pending ON control (id) WHERE status = 'pending';
