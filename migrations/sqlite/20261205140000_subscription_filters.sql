-- subscription_filters
-- Publish-subscribe (docs/messaging.md#publish-subscribe): an activating subscription carries a
-- filter on the message's properties, as text (`amount >= 1000 AND region = 'EU'`), so that SQL
-- shows who receives what; empty for every message of the type. A filter that does not parse (a
-- hand-written row) routes nothing and says why in `filter_error`, without stopping routing for
-- the other subscriptions.

ALTER TABLE subscriptions ADD COLUMN filter TEXT NOT NULL DEFAULT '';
ALTER TABLE subscriptions ADD COLUMN filter_error TEXT;
