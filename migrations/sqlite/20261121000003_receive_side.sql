-- Receive side (issue 5).
--
-- * messages.status gains 'zombie' (routed to an instance that ended before consuming it; kept,
--   with the instance named) and 'dead' (unrouted for longer than the time to live; a copy is
--   in dead_letters). SQLite cannot change a CHECK in place, so the table is rebuilt.
-- * inbox: the SQL receive location. A row inserted here by any client is taken by a host and
--   published like any other message, in one transaction with its deletion.

CREATE TABLE messages_rebuilt (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    id              TEXT NOT NULL UNIQUE,
    message_type    TEXT NOT NULL,
    kind            TEXT NOT NULL CHECK (kind IN ('published', 'start', 'reply', 'child_completed', 'child_failed', 'send_failed', 'compensate')),
    properties      TEXT NOT NULL,
    body            TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('unrouted', 'routed', 'consumed', 'zombie', 'dead')),
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
CREATE INDEX messages_unrouted_age ON messages (published_at) WHERE status = 'unrouted';

CREATE TABLE inbox (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id   TEXT,
    message_type TEXT NOT NULL,
    properties   TEXT NOT NULL DEFAULT '{}',
    body         TEXT NOT NULL,
    inserted_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%S.000000Z', 'now'))
);
