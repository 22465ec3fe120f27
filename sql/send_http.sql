-- send_http is a plain fmgr function (see src/send.rs): it handles NULL
-- arguments and malformed headers itself. Same signature and symbol as the
-- definition pgrx generated in 0.1.0.
CREATE FUNCTION send_http(
    url text,
    body text,
    method text DEFAULT 'POST',
    content_type text DEFAULT 'application/json',
    headers jsonb DEFAULT NULL
) RETURNS integer
  LANGUAGE c VOLATILE PARALLEL UNSAFE AS 'MODULE_PATHNAME', 'send_http_wrapper';
COMMENT ON FUNCTION send_http(text, text, text, text, jsonb) IS
  'HTTP(S) request; returns the status code, 0 on network failure (with a WARNING)';
