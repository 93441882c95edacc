-- console_indexes
-- The operations console (docs/console.md) reads these tables with a million instances in them;
-- each page answers from an index.

-- Instances by orchestration, status, version and step: the list filtered on orchestration and
-- status, the overview's counts and the map's waiting counts.
CREATE INDEX instances_by_definition ON instances (orchestration, status, version, step);
-- The instance list, newest change first, without a status filter (keyset on updated_at, id).
CREATE INDEX instances_by_update ON instances (updated_at, id);
-- The list filtered on error text reads only the instances that have one.
CREATE INDEX instances_with_error ON instances (updated_at) WHERE last_error IS NOT NULL;
-- An instance's children.
-- instances_by_parent (parent_id) comes with the retention migration just before.
-- Points per minute over the last hour, and the map's recent transitions.
CREATE INDEX history_by_time ON history (at);
-- Instances by correlation value (the waits they have).
CREATE INDEX subscriptions_by_correlation ON subscriptions (correlation) WHERE instance_id IS NOT NULL;
-- Zombie messages, newest first.
CREATE INDEX messages_zombie ON messages (seq) WHERE status = 'zombie';
