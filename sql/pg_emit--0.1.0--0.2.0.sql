-- pg_emit 0.1.0 -> 0.2.0. Runs inside ALTER EXTENSION pg_emit UPDATE; every
-- name is schema-qualified (extension scripts run under the installing
-- schema's search_path).

-- send_http keeps its signature and C symbol; it is now a plain fmgr
-- function that handles NULL arguments and malformed headers itself.
COMMENT ON FUNCTION @extschema@.send_http(text, text, text, text, jsonb) IS
  'HTTP(S) request; returns the status code, 0 on network failure (with a WARNING)';

-- The outbox is vacuumed whenever it has dead rows, without cost delays
-- (0.1.0's worker never reported its deletes, so autovacuum never ran).
ALTER TABLE emit.outbox SET (autovacuum_vacuum_scale_factor = 0,
                             autovacuum_vacuum_threshold = 0,
                             autovacuum_vacuum_cost_delay = 0);
