-- Claims take the messages of instances the host already holds first, starting from the host's
-- instances. PostgreSQL has had this index since the first migration; the SQLite migration of
-- the same name adds it there. Kept for the same list of migrations on both backends.
CREATE INDEX IF NOT EXISTS instances_by_owner ON cairn.instances (owner) WHERE owner IS NOT NULL;
