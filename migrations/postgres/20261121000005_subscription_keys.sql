-- Routing a published message tries each set of correlation properties that subscriptions to
-- its type use; they are kept here, one row per type and set, written by a trigger when an
-- instance subscribes, instead of being read off every subscription of the type per message.
-- The same change as migrations/sqlite.

CREATE TABLE cairn.subscription_keys (
    message_type     TEXT NOT NULL,
    correlation_keys TEXT NOT NULL,
    PRIMARY KEY (message_type, correlation_keys)
);

INSERT INTO cairn.subscription_keys (message_type, correlation_keys)
    SELECT DISTINCT message_type, correlation_keys FROM cairn.subscriptions WHERE instance_id IS NOT NULL;

CREATE FUNCTION cairn.subscriptions_note_keys() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO cairn.subscription_keys (message_type, correlation_keys)
        VALUES (NEW.message_type, NEW.correlation_keys) ON CONFLICT DO NOTHING;
    RETURN NULL;
END
$$;
CREATE TRIGGER subscriptions_note_keys AFTER INSERT ON cairn.subscriptions
    FOR EACH ROW WHEN (NEW.instance_id IS NOT NULL) EXECUTE FUNCTION cairn.subscriptions_note_keys();
