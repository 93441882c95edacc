-- Scopes, compensation and operator control (issue 4); the same changes as migrations/sqlite.
--
-- * messages.kind and history.reason gain 'compensate'.
-- * history.detail says what a point did in words ("scope flight completed").
-- * instances.resumable: false for a suspension that cannot be resumed as it is.
-- * control: a row inserted here (by `cairn suspend|resume|terminate` or by psql) is carried out
--   by a running host, which fills in status, result and done_at. Inserting wakes the hosts.

ALTER TABLE cairn.messages DROP CONSTRAINT messages_kind_check;
ALTER TABLE cairn.messages ADD CONSTRAINT messages_kind_check
    CHECK (kind IN ('published', 'start', 'reply', 'child_completed', 'child_failed', 'send_failed', 'compensate'));

ALTER TABLE cairn.history DROP CONSTRAINT history_reason_check;
ALTER TABLE cairn.history ADD CONSTRAINT history_reason_check
    CHECK (reason IN ('send', 'start', 'scope_end', 'compensate', 'suspend', 'dehydrate', 'shutdown', 'complete'));
ALTER TABLE cairn.history ADD COLUMN detail TEXT;

ALTER TABLE cairn.instances ADD COLUMN resumable BOOLEAN NOT NULL DEFAULT TRUE;

CREATE TABLE cairn.control (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    instance_id  UUID NOT NULL,
    action       TEXT NOT NULL CHECK (action IN ('suspend', 'resume', 'terminate')),
    reason       TEXT NOT NULL DEFAULT '',
    force        BOOLEAN NOT NULL DEFAULT FALSE,
    requested_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    status       TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'done', 'rejected')),
    result       TEXT,
    done_at      TIMESTAMPTZ,
    done_by      TEXT
);
CREATE INDEX control_pending ON cairn.control (id) WHERE status = 'pending';

CREATE FUNCTION cairn.control_wakes_hosts() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('cairn_work', 'control');
    RETURN NULL;
END
$$;
CREATE TRIGGER control_wakes_hosts AFTER INSERT ON cairn.control
    FOR EACH STATEMENT EXECUTE FUNCTION cairn.control_wakes_hosts();
