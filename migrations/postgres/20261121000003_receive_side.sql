-- Receive side (issue 5); the same changes as migrations/sqlite.
--
-- * messages.status gains 'zombie' (routed to an instance that ended before consuming it) and
--   'dead' (unrouted for longer than the time to live; a copy is in dead_letters).
-- * inbox: the SQL receive location. A row inserted here by any client is taken by a host and
--   published like any other message, in one transaction with its deletion. Inserting wakes the
--   hosts.

ALTER TABLE cairn.messages DROP CONSTRAINT messages_status_check;
ALTER TABLE cairn.messages ADD CONSTRAINT messages_status_check
    CHECK (status IN ('unrouted', 'routed', 'consumed', 'zombie', 'dead'));
CREATE INDEX messages_unrouted_age ON cairn.messages (published_at) WHERE status = 'unrouted';

CREATE TABLE cairn.inbox (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id   TEXT,
    message_type TEXT NOT NULL,
    properties   TEXT NOT NULL DEFAULT '{}',
    body         TEXT NOT NULL,
    inserted_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE FUNCTION cairn.inbox_wakes_hosts() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('cairn_work', 'inbox');
    RETURN NULL;
END
$$;
CREATE TRIGGER inbox_wakes_hosts AFTER INSERT ON cairn.inbox
    FOR EACH STATEMENT EXECUTE FUNCTION cairn.inbox_wakes_hosts();
