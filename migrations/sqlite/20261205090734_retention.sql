-- Retention (issue 22): the purge of ended instances asks, for each one, whether a child of it
-- still runs; without this index that is a scan of every instance.
CREATE INDEX IF NOT EXISTS instances_by_parent ON instances (parent_id) WHERE parent_id IS NOT NULL;
