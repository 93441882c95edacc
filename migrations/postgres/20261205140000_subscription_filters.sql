-- subscription_filters
-- Publish-subscribe (docs/messaging.md#publish-subscribe): an activating subscription carries a
-- filter on the message's properties, as text, so that SQL shows who receives what; a filter that
-- does not parse routes nothing and says why in `filter_error`. The same change as
-- migrations/sqlite.

ALTER TABLE cairn.subscriptions ADD COLUMN filter TEXT NOT NULL DEFAULT '';
ALTER TABLE cairn.subscriptions ADD COLUMN filter_error TEXT;
