-- Claims take the messages of instances the host already holds first. This index lets that
-- part start from the host's instances instead of reading every ready message (PostgreSQL has
-- had `instances_by_owner` since the first migration).
CREATE INDEX instances_by_owner ON instances (owner) WHERE owner IS NOT NULL;
