-- DDL events (emit.create_ddl_trigger): each named route sends the
-- database's DDL to a destination. Event trigger functions take no
-- arguments, so one pair of event triggers, members of the extension,
-- serves every route (see src/ddl.rs). The routes are not dumped: the
-- event triggers come back with CREATE EXTENSION, before a restore's
-- indexes and constraints, which would otherwise be reported to the
-- original's receivers.
CREATE TABLE emit.ddl_triggers (
    name        text PRIMARY KEY,
    dest        text NOT NULL,
    options     jsonb NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT pg_catalog.now()
);
COMMENT ON TABLE emit.ddl_triggers IS
    'pg_emit: where DDL events go (emit.create_ddl_trigger)';
REVOKE ALL ON emit.ddl_triggers FROM PUBLIC;

CREATE FUNCTION emit.ddl_event() RETURNS event_trigger
  LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'ddl_event';
COMMENT ON FUNCTION emit.ddl_event() IS
  'Event trigger: one event per DDL command to each route of emit.ddl_triggers';
CREATE EVENT TRIGGER pg_emit_ddl ON ddl_command_end EXECUTE FUNCTION emit.ddl_event();
CREATE EVENT TRIGGER pg_emit_ddl_drop ON sql_drop EXECUTE FUNCTION emit.ddl_event();
