-- pg_emit 0.1.0 -> 0.2.0. Runs inside ALTER EXTENSION pg_emit UPDATE; every
-- name is schema-qualified (extension scripts run under the installing
-- schema's search_path).

-- send_http keeps its signature and C symbol; it is now a plain fmgr
-- function that handles NULL arguments and malformed headers itself.
COMMENT ON FUNCTION @extschema@.send_http(text, text, text, text, jsonb) IS
  'HTTP(S) request; returns the status code, 0 on network failure (with a WARNING)';

-- The outbox is vacuumed whenever it has dead rows, without cost delays
-- (0.1.0's worker never reported its deletes, so autovacuum never ran),
-- and its pages keep room for the worker's numbering update, which no
-- longer touches an index (see outbox.sql); its CHECK constraints cost
-- every async commit a tenth of its time and go.
ALTER TABLE emit.outbox SET (autovacuum_vacuum_scale_factor = 0,
                             autovacuum_vacuum_threshold = 0,
                             autovacuum_vacuum_cost_delay = 0,
                             fillfactor = 70);
DROP INDEX emit.outbox_claimed;
ALTER TABLE emit.outbox DROP CONSTRAINT outbox_framing_check,
                        DROP CONSTRAINT outbox_events_check;

-- Commit order and per-destination event ids (see outbox.sql). Rows queued
-- by 0.1.0 keep their order: their tx_seq is their id, drawn before any
-- new transaction's.
CREATE SEQUENCE emit.tx_seq;
REVOKE ALL ON SEQUENCE emit.tx_seq FROM PUBLIC;
ALTER TABLE emit.outbox ADD COLUMN tx_seq bigint,
                        ADD COLUMN part bigint NOT NULL DEFAULT 0,
                        ADD COLUMN tx bigint,
                        ADD COLUMN keys bigint[];
-- The format of each row's events (see outbox.sql); 0.1.0 knew only json
-- and td, which the worker treats alike.
ALTER TABLE emit.outbox ADD COLUMN format text NOT NULL DEFAULT 'json';
ALTER TABLE emit.dead_letter ADD COLUMN format text NOT NULL DEFAULT 'json';
UPDATE emit.outbox SET tx_seq = id;
SELECT pg_catalog.setval('emit.tx_seq',
                         (SELECT pg_catalog.max(id) FROM emit.outbox), true)
 WHERE EXISTS (SELECT FROM emit.outbox);
DROP INDEX emit.outbox_destination_id;
CREATE INDEX outbox_queue ON emit.outbox (destination, tx_seq, part);
CREATE INDEX outbox_unsequenced ON emit.outbox (tx) WHERE tx_seq IS NULL;

ALTER TABLE emit.destinations
    ADD COLUMN stream uuid NOT NULL DEFAULT pg_catalog.gen_random_uuid(),
    ADD COLUMN next_event_id bigint NOT NULL DEFAULT 1,
    ADD COLUMN origin text;
-- Ids go on from where 0.1.0's shared counter was, for every destination
-- (also one with queued events only), so no receiver sees an id again.
INSERT INTO emit.destinations (destination)
SELECT DISTINCT o.destination FROM emit.outbox o
    ON CONFLICT (destination) DO NOTHING;
-- Their origin is where they are now (the worker's origin(), in SQL), so
-- they keep their numbering.
ALTER TABLE emit.worker
    ADD COLUMN install uuid NOT NULL DEFAULT pg_catalog.gen_random_uuid();
UPDATE emit.destinations
   SET next_event_id = (SELECT w.next_event_id FROM emit.worker w),
       origin = pg_catalog.concat_ws('/',
           (SELECT s.system_identifier FROM pg_catalog.pg_control_system() s),
           (SELECT d.oid FROM pg_catalog.pg_database d
             WHERE d.datname OPERATOR(pg_catalog.=) pg_catalog.current_database()),
           (SELECT c.timeline_id FROM pg_catalog.pg_control_checkpoint() c),
           (SELECT w.install FROM emit.worker w));
ALTER TABLE emit.worker DROP COLUMN next_event_id;

SELECT pg_catalog.pg_extension_config_dump('emit.outbox', '');
SELECT pg_catalog.pg_extension_config_dump('emit.dead_letter', '');
SELECT pg_catalog.pg_extension_config_dump('emit.destinations', '');
SELECT pg_catalog.pg_extension_config_dump('emit.tx_seq', '');
SELECT pg_catalog.pg_extension_config_dump(
    pg_catalog.pg_get_serial_sequence('emit.outbox', 'id')::pg_catalog.regclass, '');
SELECT pg_catalog.pg_extension_config_dump(
    pg_catalog.pg_get_serial_sequence('emit.dead_letter', 'id')::pg_catalog.regclass, '');

-- Stored destinations and the generic entry points (see outbox.sql and
-- triggers.sql).
CREATE TABLE emit.stored_destinations (
    name        text PRIMARY KEY,
    url         text NOT NULL,
    options     jsonb NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    updated_at  timestamptz NOT NULL DEFAULT pg_catalog.now()
);
COMMENT ON TABLE emit.stored_destinations IS
    'pg_emit: destinations by name (emit.create_destination); options may hold credentials';
REVOKE ALL ON emit.stored_destinations FROM PUBLIC;
SELECT pg_catalog.pg_extension_config_dump('emit.stored_destinations', '');

CREATE FUNCTION @extschema@.row_to_destination() RETURNS trigger
  LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'row_to_destination';
COMMENT ON FUNCTION @extschema@.row_to_destination() IS
  'Trigger: send each row change as JSON to (destination [, ''key=value'' ...]): a URL or a stored destination';
CREATE FUNCTION @extschema@.send_message(
    "dest" TEXT, "msg" TEXT, "delivery" TEXT DEFAULT 'async', "key" TEXT DEFAULT NULL
) RETURNS bool
VOLATILE PARALLEL UNSAFE
LANGUAGE c AS 'MODULE_PATHNAME', 'send_message_wrapper';
CREATE FUNCTION emit.create_destination(
    "name" TEXT, "url" TEXT, "options" jsonb DEFAULT '{}'
) RETURNS void
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c AS 'MODULE_PATHNAME', 'create_destination_wrapper';
CREATE FUNCTION emit.alter_destination(
    "name" TEXT, "url" TEXT DEFAULT NULL, "options" jsonb DEFAULT NULL
) RETURNS void
VOLATILE PARALLEL UNSAFE
LANGUAGE c AS 'MODULE_PATHNAME', 'alter_destination_wrapper';
CREATE FUNCTION emit.drop_destination("name" TEXT) RETURNS void
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c AS 'MODULE_PATHNAME', 'drop_destination_wrapper';

REVOKE EXECUTE ON FUNCTION @extschema@.row_to_destination() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION @extschema@.send_message(text, text, text, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION emit.create_destination(text, text, jsonb) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION emit.alter_destination(text, text, jsonb) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION emit.drop_destination(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION @extschema@.row_to_destination() TO emit_sender;
GRANT EXECUTE ON FUNCTION @extschema@.send_message(text, text, text, text) TO emit_sender;
GRANT SELECT ON emit.stored_destinations TO emit_admin;
GRANT EXECUTE ON FUNCTION emit.create_destination(text, text, jsonb) TO emit_admin;
GRANT EXECUTE ON FUNCTION emit.alter_destination(text, text, jsonb) TO emit_admin;
GRANT EXECUTE ON FUNCTION emit.drop_destination(text) TO emit_admin;
COMMENT ON ROLE emit_sender IS 'pg_emit: may call send_socket/send_http/send_message and attach row_to_socket/row_to_http/row_to_destination triggers';
COMMENT ON ROLE emit_admin IS 'pg_emit: emit_sender, plus emit.stats, emit.dead_letter, re-queueing and stored destinations';

-- DDL events (sql/ddl.sql, src/ddl.rs).
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
CREATE FUNCTION emit.create_ddl_trigger(
    "name" TEXT, "dest" TEXT, "options" jsonb DEFAULT '{}'
) RETURNS void
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c AS 'MODULE_PATHNAME', 'create_ddl_trigger_wrapper';
CREATE FUNCTION emit.drop_ddl_trigger("name" TEXT) RETURNS void
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c AS 'MODULE_PATHNAME', 'drop_ddl_trigger_wrapper';
REVOKE EXECUTE ON FUNCTION emit.create_ddl_trigger(text, text, jsonb) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION emit.drop_ddl_trigger(text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION emit.ddl_event() FROM PUBLIC;
GRANT SELECT ON emit.ddl_triggers TO emit_admin;
GRANT EXECUTE ON FUNCTION emit.create_ddl_trigger(text, text, jsonb) TO emit_admin;
GRANT EXECUTE ON FUNCTION emit.drop_ddl_trigger(text) TO emit_admin;

-- Live channels (sql/channels.sql).

-- Written only by the worker, which numbers each channel's events in the
-- order it stores them (ids increase; they are not consecutive once
-- retention or several destinations of a transaction interleave).
CREATE TABLE emit.channel_events (
    channel     text        NOT NULL,
    id          bigint      NOT NULL,
    payload     text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (channel, id)
);
-- Rows arrive in time order and leave by age: a BRIN index finds the old
-- ones at a fraction of a B-tree's cost to every insert.
CREATE INDEX channel_events_age ON emit.channel_events USING brin (created_at);
DO $$
BEGIN
  ALTER TABLE emit.channel_events ALTER COLUMN payload SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported THEN
  NULL;
END $$;
COMMENT ON TABLE emit.channel_events IS
    'pg_emit: channel events kept for pg_emit.channel_retention, replayed to subscribers that reconnect';

-- Tokens are random; only their SHA-256 is kept. Dumped with the
-- database, so subscribers keep working after a restore.
CREATE TABLE emit.channel_tokens (
    hash        bytea       PRIMARY KEY,
    channels    text[]      NOT NULL,
    expires_at  timestamptz NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    created_by  name        NOT NULL
);
SELECT pg_catalog.pg_extension_config_dump('emit.channel_tokens', '');
COMMENT ON TABLE emit.channel_tokens IS
    'pg_emit: subscriber tokens (SHA-256 of each) and the channels each may read';

-- SECURITY DEFINER: emit_admin needs no rights on the table; every name
-- is schema-qualified and search_path pinned.
CREATE FUNCTION emit.create_token(channels text[], valid_for interval DEFAULT '1 day')
RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  token text;
  c text;
BEGIN
  IF channels IS NULL OR pg_catalog.cardinality(channels) OPERATOR(pg_catalog.=) 0 THEN
    RAISE EXCEPTION 'emit.create_token: channels must name at least one channel'
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  FOREACH c IN ARRAY channels LOOP
    IF c IS NULL OR c OPERATOR(pg_catalog.!~) '^[A-Za-z0-9_.-]{1,63}$'
       OR c OPERATOR(pg_catalog.=) ANY (ARRAY['.', '..']) THEN
      RAISE EXCEPTION 'emit.create_token: channels: % is not a channel name', pg_catalog.quote_nullable(c)
        USING ERRCODE = 'invalid_parameter_value',
              HINT = 'A channel name is 1 to 63 letters, digits, _, . and -, as in channel:<name>.';
    END IF;
  END LOOP;
  IF valid_for IS NULL OR valid_for OPERATOR(pg_catalog.<=) '0'::interval THEN
    RAISE EXCEPTION 'emit.create_token: valid_for must be a positive interval, not %',
      pg_catalog.quote_nullable(valid_for)
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  -- 32 bytes from PostgreSQL's strong random source (two random UUIDs,
  -- 244 random bits), URL-safe so that it fits in ?token=.
  token := 'pgemit_' OPERATOR(pg_catalog.||) pg_catalog.rtrim(pg_catalog.translate(pg_catalog.encode(
             pg_catalog.uuid_send(pg_catalog.gen_random_uuid()) OPERATOR(pg_catalog.||)
             pg_catalog.uuid_send(pg_catalog.gen_random_uuid()), 'base64'), '+/', '-_'), '=');
  -- SESSION_USER: inside SECURITY DEFINER, CURRENT_USER is the owner.
  INSERT INTO emit.channel_tokens (hash, channels, expires_at, created_by)
  VALUES (pg_catalog.sha256(pg_catalog.convert_to(token, 'UTF8')), channels,
          pg_catalog.now() OPERATOR(pg_catalog.+) valid_for, SESSION_USER);
  RETURN token;
END
$$;
COMMENT ON FUNCTION emit.create_token(text[], interval) IS
    'pg_emit: a new subscriber token for these channels (shown once; only its hash is kept)';

CREATE FUNCTION emit.revoke_token(token text)
RETURNS boolean
LANGUAGE sql VOLATILE STRICT SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
  WITH gone AS (
    DELETE FROM emit.channel_tokens t
     WHERE t.hash OPERATOR(pg_catalog.=) pg_catalog.sha256(pg_catalog.convert_to(token, 'UTF8'))
    RETURNING 1
  )
  SELECT pg_catalog.count(*) OPERATOR(pg_catalog.>) 0 FROM gone
$$;
COMMENT ON FUNCTION emit.revoke_token(text) IS
    'pg_emit: revokes a subscriber token; its open connections are closed within a second';
REVOKE EXECUTE ON FUNCTION emit.create_token(text[], interval) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION emit.revoke_token(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION emit.create_token(text[], interval) TO emit_admin;
GRANT EXECUTE ON FUNCTION emit.revoke_token(text) TO emit_admin;
GRANT SELECT ON emit.channel_tokens TO emit_admin;
GRANT SELECT ON emit.channel_events TO emit_admin;
