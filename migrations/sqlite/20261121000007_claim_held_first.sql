-- The PostgreSQL migration of the same name adds an index for its claim's first part (messages
-- of instances the host holds). SQLite's claim starts that part from the host's instances
-- (`instances_by_owner`, migration 0006) and needs nothing more. Kept for the same list of
-- migrations on both backends.
SELECT 1;
