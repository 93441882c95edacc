-- port_subscriptions
-- A send port subscribes to published messages by itself: a subscription row with `port` set
-- sends every message of its type that passes its filter to that port through the outbox. The
-- same change as migrations/sqlite.

ALTER TABLE cairn.subscriptions ADD COLUMN port TEXT;
CREATE UNIQUE INDEX subscriptions_port ON cairn.subscriptions (message_type, port) WHERE port IS NOT NULL;
