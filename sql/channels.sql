-- Live channels (src/worker/live.rs, core/src/live): events sent to
-- channel:<name>, kept for pg_emit.channel_retention so that a subscriber
-- that reconnects gets what it missed, and the tokens subscribers present.

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
