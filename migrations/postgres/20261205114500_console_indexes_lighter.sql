-- console_indexes_lighter
-- Every persistence point rewrites its instance's status, step and updated_at and adds a history
-- row, and every index on those columns is written with them. The console (docs/console.md) now
-- reads the instance list per status along instances_by_status, history through the instances
-- changed lately, and waits by correlation through subscriptions_route; what it still needs is
-- kept in a partial index that the points of a running instance do not touch.
DROP INDEX cairn.instances_by_update;
DROP INDEX cairn.history_by_time;
DROP INDEX cairn.subscriptions_by_correlation;
DROP INDEX cairn.instances_by_definition;
-- Instances by definition, status and step, except the running ones (read along
-- instances_by_status): the overview's counts, the map's waiting counts and a step's instances.
CREATE INDEX instances_by_definition ON cairn.instances (orchestration, version, status, step)
    WHERE status <> 'running';
-- Which statuses and steps go together, per definition (no step is 'AwaitingPayment' among the
-- completed ones): without it the planner takes the columns as independent and reads a whole
-- status along instances_by_status for a step filter. Gathered by ANALYZE; nothing to write.
CREATE STATISTICS cairn.instances_by_definition_stats (mcv) ON orchestration, version, status, step
    FROM cairn.instances;
