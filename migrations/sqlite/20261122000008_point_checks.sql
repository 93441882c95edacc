-- The PostgreSQL migration of the same name adds a function a persistence point's statement
-- checks itself with. SQLite's writer makes the same check through a temporary trigger it
-- creates on each connection (`store/sqlite/writer.rs`, `add_temp_tables`). Kept for the same
-- list of migrations on both backends.
SELECT 1;
