-- Internal objects live in schema emit; the user-facing functions live in
-- the schema the extension is installed into.
CREATE SCHEMA emit;
REVOKE ALL ON SCHEMA emit FROM PUBLIC;
COMMENT ON SCHEMA emit IS 'pg_emit internals';
