-- pg_emit 0.1.0 -> 0.2.0. Runs inside ALTER EXTENSION pg_emit UPDATE; every
-- name is schema-qualified (extension scripts run under the installing
-- schema's search_path).

-- send_http keeps its signature and C symbol; it is now a plain fmgr
-- function that handles NULL arguments and malformed headers itself.
COMMENT ON FUNCTION @extschema@.send_http(text, text, text, text, jsonb) IS
  'HTTP(S) request; returns the status code, 0 on network failure (with a WARNING)';
