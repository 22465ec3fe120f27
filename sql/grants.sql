-- Safe by default: nobody but superusers may send, or attach a sending
-- trigger (CREATE TRIGGER requires EXECUTE on the trigger function; firing
-- does not, so existing triggers keep working for every writer).
REVOKE EXECUTE ON FUNCTION send_socket(text, text, integer) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION send_http(text, text, text, text, jsonb) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION row_to_socket() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION row_to_http() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION row_to_destination() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION send_message(text, text, text, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION emit.create_destination(text, text, jsonb) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION emit.alter_destination(text, text, jsonb) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION emit.drop_destination(text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION emit.create_ddl_trigger(text, text, jsonb) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION emit.drop_ddl_trigger(text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION emit.ddl_event() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION emit.create_token(text[], interval) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION emit.revoke_token(text) FROM PUBLIC;

-- Two optional roles bundle what a DBA hands out. Roles are cluster-wide:
-- created by the first database that installs pg_emit, kept by
-- DROP EXTENSION.
DO $$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles
                 WHERE rolname OPERATOR(pg_catalog.=) 'emit_sender') THEN
    CREATE ROLE emit_sender NOLOGIN;
  END IF;
  IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles
                 WHERE rolname OPERATOR(pg_catalog.=) 'emit_admin') THEN
    CREATE ROLE emit_admin NOLOGIN;
  END IF;
END $$;
COMMENT ON ROLE emit_sender IS 'pg_emit: may call send_socket/send_http/send_message and attach row_to_socket/row_to_http/row_to_destination triggers';
COMMENT ON ROLE emit_admin IS 'pg_emit: emit_sender, plus emit.stats, emit.dead_letter (read, re-queue, discard) and stored destinations';

GRANT EXECUTE ON FUNCTION send_socket(text, text, integer) TO emit_sender;
GRANT EXECUTE ON FUNCTION send_http(text, text, text, text, jsonb) TO emit_sender;
GRANT EXECUTE ON FUNCTION row_to_socket() TO emit_sender;
GRANT EXECUTE ON FUNCTION row_to_http() TO emit_sender;
GRANT EXECUTE ON FUNCTION row_to_destination() TO emit_sender;
GRANT EXECUTE ON FUNCTION send_message(text, text, text, text) TO emit_sender;
GRANT emit_sender TO emit_admin;
GRANT USAGE ON SCHEMA emit TO emit_admin;
GRANT SELECT ON emit.stats TO emit_admin;
-- Not DELETE: that right includes LOCK TABLE … ACCESS EXCLUSIVE, which
-- would stall the worker; emit.discard_dead_letters deletes instead.
GRANT SELECT ON emit.dead_letter TO emit_admin;
GRANT SELECT ON emit.http_responses TO emit_admin;
GRANT EXECUTE ON FUNCTION emit.requeue_dead_letters(text) TO emit_admin;
REVOKE EXECUTE ON FUNCTION emit.requeue_dead_letters(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION emit.discard_dead_letters(text, bigint[]) TO emit_admin;
GRANT EXECUTE ON FUNCTION emit.metrics() TO emit_admin;
REVOKE EXECUTE ON FUNCTION emit.metrics() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION emit.discard_dead_letters(text, bigint[]) FROM PUBLIC;
-- Stored destinations hold credentials: emit_admin manages and reads them.
GRANT SELECT ON emit.stored_destinations TO emit_admin;
GRANT EXECUTE ON FUNCTION emit.create_destination(text, text, jsonb) TO emit_admin;
GRANT EXECUTE ON FUNCTION emit.alter_destination(text, text, jsonb) TO emit_admin;
GRANT EXECUTE ON FUNCTION emit.drop_destination(text) TO emit_admin;
-- DDL routes: what they send is object names, never command text.
GRANT SELECT ON emit.ddl_triggers TO emit_admin;
GRANT EXECUTE ON FUNCTION emit.create_ddl_trigger(text, text, jsonb) TO emit_admin;
GRANT EXECUTE ON FUNCTION emit.drop_ddl_trigger(text) TO emit_admin;
-- Live channels: emit_admin hands out and revokes tokens, and may look at
-- the tokens (hashes) and the retained events. Not DELETE: that would let
-- it lock the table the listener reads.
GRANT EXECUTE ON FUNCTION emit.create_token(text[], interval) TO emit_admin;
GRANT EXECUTE ON FUNCTION emit.revoke_token(text) TO emit_admin;
GRANT SELECT ON emit.channel_tokens TO emit_admin;
GRANT SELECT ON emit.channel_events TO emit_admin;
-- Capture from the WAL: emit_admin creates and drops captures (their
-- slots are made by the extension's owner) and sees how far they are.
REVOKE EXECUTE ON FUNCTION emit.create_capture(text, text, text, jsonb) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION emit.drop_capture(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION emit.create_capture(text, text, text, jsonb) TO emit_admin;
GRANT EXECUTE ON FUNCTION emit.drop_capture(text) TO emit_admin;
GRANT SELECT ON emit.captures TO emit_admin;
REVOKE EXECUTE ON FUNCTION emit.backfill(regclass, text, jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION emit.backfill(regclass, text, jsonb) TO emit_admin;
