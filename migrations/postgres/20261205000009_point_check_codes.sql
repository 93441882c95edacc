-- `point_check(ok, code, failure)`: `point_check` (migration `20261122000008_point_checks`) with
-- the SQLSTATE to raise, so that the engine tells its own failures apart by code, not by their
-- text (`store/postgres/batch.rs`, `NOT_ROUTED_CODE` and `NEEDS_TRANSACTION_CODE`, in the
-- user-defined class `CN`, which PostgreSQL leaves unused).
CREATE OR REPLACE FUNCTION cairn.point_check(ok BOOLEAN, code TEXT, failure TEXT) RETURNS BOOLEAN
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF NOT ok THEN
        RAISE EXCEPTION USING ERRCODE = code, MESSAGE = failure;
    END IF;
    RETURN true;
END
$$;
