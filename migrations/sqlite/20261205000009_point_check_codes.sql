-- The PostgreSQL migration of the same name gives its point check an error code. SQLite's check
-- (a temporary trigger, `store/sqlite/writer.rs`) is told apart by SQLite's own code for a
-- trigger's `RAISE(ABORT)`. Kept for the same list of migrations on both backends.
SELECT 1;
