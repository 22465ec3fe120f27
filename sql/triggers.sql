-- Trigger functions. Their entry points are plain fmgr functions in the
-- shared library (see src/trigger.rs).
CREATE FUNCTION row_to_socket() RETURNS trigger
  LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'row_to_socket';
COMMENT ON FUNCTION row_to_socket() IS
  'Trigger: send each row change as JSON to (host, port [, ''key=value'' ...])';

CREATE FUNCTION row_to_http() RETURNS trigger
  LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'row_to_http';
COMMENT ON FUNCTION row_to_http() IS
  'Trigger: POST each row change as JSON to (url [, ''key=value'' ...])';

CREATE FUNCTION row_to_destination() RETURNS trigger
  LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'row_to_destination';
COMMENT ON FUNCTION row_to_destination() IS
  'Trigger: send each row change as JSON to (destination [, ''key=value'' ...]): a URL or a stored destination';
