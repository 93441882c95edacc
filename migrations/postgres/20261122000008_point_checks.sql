-- A persistence point written as one statement outside a transaction (`store/postgres/batch.rs`)
-- makes in SQL the checks a transaction makes between its statements: `point_check(ok, failure)`
-- raises `failure` unless `ok`, which undoes the whole statement.
CREATE OR REPLACE FUNCTION cairn.point_check(ok BOOLEAN, failure TEXT) RETURNS BOOLEAN
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF NOT ok THEN
        RAISE EXCEPTION '%', failure;
    END IF;
    RETURN true;
END
$$;
