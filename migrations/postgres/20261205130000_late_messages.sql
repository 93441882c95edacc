-- late_messages
-- Late messages (docs/messaging.md#late-messages): which instances ever waited on a key (a message
-- type with correlation values), and since when. One row per instance and key, written by a
-- trigger when the instance subscribes, kept after the subscription goes and deleted with the
-- instance by retention. The same change as migrations/sqlite.

CREATE TABLE cairn.waited_keys (
    message_type  TEXT NOT NULL,
    correlation   TEXT NOT NULL,
    instance_id   UUID NOT NULL,
    subscribed_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (message_type, correlation, instance_id)
);
-- No index on (key, subscribed_at): every correlated wait writes this table, while the newest
-- waiter of a key is looked for only for a message no subscription takes, among the key's rows
-- found by the primary key.
CREATE INDEX waited_keys_by_instance ON cairn.waited_keys (instance_id);

CREATE FUNCTION cairn.subscriptions_note_waited() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO cairn.waited_keys (message_type, correlation, instance_id, subscribed_at)
        VALUES (NEW.message_type, NEW.correlation, NEW.instance_id, NEW.created_at)
        ON CONFLICT DO NOTHING;
    RETURN NULL;
END
$$;
CREATE TRIGGER subscriptions_note_waited AFTER INSERT ON cairn.subscriptions
    FOR EACH ROW WHEN (NEW.instance_id IS NOT NULL AND NEW.correlation <> '')
    EXECUTE FUNCTION cairn.subscriptions_note_waited();
