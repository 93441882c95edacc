-- Routing a published message tries each set of correlation properties that subscriptions to
-- its type use. Reading those sets off `subscriptions` visited every subscription of the type for
-- every message (10,000 waiting instances: 10,000 rows per publish). They are kept here instead,
-- one row per type and set, written by a trigger when an instance subscribes. A set whose
-- subscriptions are gone stays: it costs one indexed lookup that finds nothing.

CREATE TABLE subscription_keys (
    message_type     TEXT NOT NULL,
    correlation_keys TEXT NOT NULL,
    PRIMARY KEY (message_type, correlation_keys)
);

INSERT INTO subscription_keys (message_type, correlation_keys)
    SELECT DISTINCT message_type, correlation_keys FROM subscriptions WHERE instance_id IS NOT NULL;

CREATE TRIGGER subscriptions_note_keys AFTER INSERT ON subscriptions
    FOR EACH ROW WHEN NEW.instance_id IS NOT NULL
BEGIN
    INSERT OR IGNORE INTO subscription_keys (message_type, correlation_keys)
        VALUES (NEW.message_type, NEW.correlation_keys);
END;
