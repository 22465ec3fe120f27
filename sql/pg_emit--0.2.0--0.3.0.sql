-- pg_emit 0.2.0 -> 0.3.0. Runs inside ALTER EXTENSION pg_emit UPDATE; every
-- name is schema-qualified (extension scripts run under the installing
-- schema's search_path).

-- emit_admin deletes dead letters through a function: DELETE on the table
-- also allowed LOCK TABLE emit.dead_letter IN ACCESS EXCLUSIVE MODE, and the
-- worker, which writes dead letters, waited for that transaction with all
-- delivery and the live listener stalled.
CREATE FUNCTION emit.discard_dead_letters(
    "destination" TEXT DEFAULT NULL, "ids" bigint[] DEFAULT NULL
) RETURNS bigint
VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c AS 'MODULE_PATHNAME', 'discard_dead_letters_wrapper';
REVOKE EXECUTE ON FUNCTION emit.discard_dead_letters(text, bigint[]) FROM PUBLIC;
REVOKE DELETE ON emit.dead_letter FROM emit_admin;
GRANT EXECUTE ON FUNCTION emit.discard_dead_letters(text, bigint[]) TO emit_admin;
COMMENT ON ROLE emit_admin IS 'pg_emit: emit_sender, plus emit.stats, emit.dead_letter (read, re-queue, discard) and stored destinations';
