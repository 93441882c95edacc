-- port_subscriptions
-- A send port subscribes to published messages by itself (docs/messaging.md#send-port-subscriptions):
-- a subscription row with `port` set (and no instance, no orchestration) sends every message of
-- its type that passes its filter to that port through the outbox, with the port's retries,
-- leases and dead letters. One row a port and type.

ALTER TABLE subscriptions ADD COLUMN port TEXT;
CREATE UNIQUE INDEX subscriptions_port ON subscriptions (message_type, port) WHERE port IS NOT NULL;
