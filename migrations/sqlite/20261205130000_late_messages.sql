-- late_messages
-- Late messages (docs/messaging.md#late-messages): which instances ever waited on a key (a message
-- type with correlation values), and since when. One row per instance and key, written by a
-- trigger when the instance subscribes (whichever path writes the subscription), kept after the
-- subscription goes and deleted with the instance by retention.
--
-- Routing reads it for a message that matches no subscription and activates nothing: if the
-- newest instance that waited on the message's key has ended, the message is a zombie naming
-- that instance, not held for a later one; a new subscription takes an unrouted message only if
-- no other instance waited on its key before it was published.

CREATE TABLE waited_keys (
    message_type  TEXT NOT NULL,
    correlation   TEXT NOT NULL,
    instance_id   TEXT NOT NULL,
    subscribed_at TEXT NOT NULL,
    PRIMARY KEY (message_type, correlation, instance_id)
) WITHOUT ROWID;
-- No index on (key, subscribed_at): every correlated wait writes this table, while the newest
-- waiter of a key is looked for only for a message no subscription takes, among the key's rows
-- found by the primary key.
CREATE INDEX waited_keys_by_instance ON waited_keys (instance_id);

CREATE TRIGGER subscriptions_note_waited AFTER INSERT ON subscriptions
    FOR EACH ROW WHEN NEW.instance_id IS NOT NULL AND NEW.correlation <> ''
BEGIN
    INSERT OR IGNORE INTO waited_keys (message_type, correlation, instance_id, subscribed_at)
        VALUES (NEW.message_type, NEW.correlation, NEW.instance_id, NEW.created_at);
END;
