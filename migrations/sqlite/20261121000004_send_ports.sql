-- Send ports (issue 5, the send side).
--
-- * outbox.seq: the commit order of sends; an ordered port delivers its rows one at a time by seq.
-- * outbox.status gains 'held' (an ordered port stopped on this row after its retries: nothing
--   after it on the port is delivered until an operator resumes or dead-letters it) and
--   'give_up' (an operator asked, with SQL, that the row be dead-lettered: a running host moves it
--   to dead_letters and tells the instance).
-- * outbox.delivered_via: 'primary' or 'backup', the transport that took the message.
-- * outbox.last_attempt_at: when the last delivery attempt ended.
-- SQLite cannot change a CHECK in place, so the outbox is rebuilt with its rows, in their order.

CREATE TABLE outbox_rebuilt (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    id              TEXT NOT NULL UNIQUE,
    instance_id     TEXT NOT NULL,
    port            TEXT NOT NULL,
    message_type    TEXT NOT NULL,
    body            TEXT NOT NULL,
    expects_reply   BOOLEAN NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('pending', 'delivered', 'dead', 'held', 'give_up')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TEXT NOT NULL,
    locked_by       TEXT,
    locked_until    TEXT,
    last_error      TEXT,
    created_at      TEXT NOT NULL,
    delivered_at    TEXT,
    delivered_via   TEXT CHECK (delivered_via IN ('primary', 'backup')),
    last_attempt_at TEXT
);
INSERT INTO outbox_rebuilt (id, instance_id, port, message_type, body, expects_reply, status,
    attempts, next_attempt_at, locked_by, locked_until, last_error, created_at, delivered_at)
SELECT id, instance_id, port, message_type, body, expects_reply, status, attempts,
    next_attempt_at, locked_by, locked_until, last_error, created_at, delivered_at
FROM outbox ORDER BY rowid;
DROP TABLE outbox;
ALTER TABLE outbox_rebuilt RENAME TO outbox;
CREATE INDEX outbox_due ON outbox (next_attempt_at) WHERE status = 'pending';
CREATE INDEX outbox_by_instance ON outbox (instance_id);
CREATE INDEX outbox_by_port ON outbox (port, seq) WHERE status IN ('pending', 'held', 'give_up');
CREATE INDEX dead_letters_by_time ON dead_letters (dead_at);
