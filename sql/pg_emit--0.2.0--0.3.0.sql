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

-- emit.metrics(): each destination's recent delivery latency, and the live
-- listener's state, as the worker writes them.
ALTER TABLE emit.destinations ADD COLUMN latency_p50_ms double precision,
                              ADD COLUMN latency_p99_ms double precision,
                              -- Over its share of pg_emit.max_outbox_size.
                              ADD COLUMN over_share boolean;
-- Each event's outcome is its own: events delivered past a failing one of
-- another key are recorded, never sent again.
ALTER TABLE emit.outbox ADD COLUMN acked integer[];
-- Numbered events keep the stream they were numbered in, also when a copy
-- of the database starts a new one.
ALTER TABLE emit.outbox ADD COLUMN stream uuid;
-- Kafka's record_key "columns": each event's key as text.
ALTER TABLE emit.outbox ADD COLUMN record_keys text[];
-- A dead letter keeps its events' keys: re-queued, they are ordered and
-- partitioned as before.
ALTER TABLE emit.dead_letter ADD COLUMN keys bigint[],
                             ADD COLUMN record_keys text[];
ALTER TABLE emit.worker ADD COLUMN live_connections integer,
                        ADD COLUMN live_subscribers integer,
                        ADD COLUMN live_dropped bigint;
CREATE OR REPLACE VIEW emit.stats AS
SELECT d.destination,
       coalesce(q.queued, 0)    AS queued,
       coalesce(q.in_flight, 0) AS in_flight,
       coalesce(s.delivered, 0)       AS delivered,
       coalesce(s.failed_attempts, 0) AS failed_attempts,
       coalesce(s.dead_lettered, 0)   AS dead_lettered,
       s.last_error,
       s.last_error_at,
       s.last_delivered_at,
       q.oldest_enqueued_at,
       s.latency_p50_ms,
       s.latency_p99_ms
  FROM (SELECT destination FROM emit.outbox
        UNION SELECT destination FROM emit.destinations) d
  LEFT JOIN (SELECT destination,
                    sum(events - sent - coalesce(cardinality(acked), 0))
                        FILTER (WHERE first_event_id IS NULL)     AS queued,
                    sum(events - sent - coalesce(cardinality(acked), 0))
                        FILTER (WHERE first_event_id IS NOT NULL) AS in_flight,
                    min(enqueued_at) AS oldest_enqueued_at
               FROM emit.outbox GROUP BY destination) q USING (destination)
  LEFT JOIN emit.destinations s USING (destination);
CREATE FUNCTION emit.metrics() RETURNS text
STRICT VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c AS 'MODULE_PATHNAME', 'metrics_wrapper';
REVOKE EXECUTE ON FUNCTION emit.metrics() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION emit.metrics() TO emit_admin;

-- (0.3) With pg_emit.response_log: the async HTTP responses the worker got
-- (or why none came), for pg_emit.response_log_retention. Not dumped: a log.
CREATE TABLE emit.http_responses (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    destination     text    NOT NULL,
    -- The events the request carried (one, or a batch).
    first_event_id  bigint  NOT NULL,
    last_event_id   bigint  NOT NULL,
    -- NULL when no response came; error says why.
    status          integer,
    elapsed_ms      double precision NOT NULL,
    -- The start of the body (512 bytes at most).
    excerpt         text    NOT NULL,
    error           text,
    created_at      timestamptz NOT NULL DEFAULT pg_catalog.now()
);
CREATE INDEX http_responses_age ON emit.http_responses USING brin (created_at);
COMMENT ON TABLE emit.http_responses IS
    'pg_emit: async HTTP responses (pg_emit.response_log), kept for pg_emit.response_log_retention';
REVOKE ALL ON emit.http_responses FROM PUBLIC;
GRANT SELECT ON emit.http_responses TO emit_admin;

-- (0.3) Capture from the WAL (see sql/capture.sql).
-- (0.3) Capture from the WAL (emit.create_capture): each capture decodes
-- its publication's changes from a logical replication slot of its own,
-- named pg_emit_<database oid>_<name>, and the worker queues them in
-- emit.outbox like async trigger events. queued_lsn is how far the queued
-- events go: the worker writes it in the transaction that queues them, and
-- moves the slot there only afterwards, so a crash in between decodes
-- those transactions again and skips them (see src/worker/capture.rs).
-- Not dumped: a replication slot is not, so a restore creates its captures
-- again.
CREATE TABLE emit.capture_definitions (
    name        text PRIMARY KEY,
    dest        text NOT NULL,
    publication text NOT NULL,
    slot        text NOT NULL UNIQUE,
    options     jsonb NOT NULL DEFAULT '{}',
    queued_lsn  pg_lsn NOT NULL,
    -- The role that created it: only tables it may SELECT are captured.
    created_by  oid NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    -- Failed passes in a row, the last one's reason, and when the worker
    -- tries again (kept here, so a restarted worker waits too).
    failures    integer NOT NULL DEFAULT 0,
    last_error  text,
    retry_at    timestamptz
);
COMMENT ON TABLE emit.capture_definitions IS
    'pg_emit: captures from the WAL (emit.create_capture) and how far each has queued';
REVOKE ALL ON emit.capture_definitions FROM PUBLIC;

-- (0.3) Where a backfill in parts (emit.backfill's options limit and
-- resume) stands, per table and destination (as the caller named it): the
-- primary key of the last row queued (each value's text, made with fixed
-- settings, in the key's order; signature: the key's columns, types and
-- collations then), and whether the last part reached the end. Written
-- in the part's transaction, as the emit schema's owner. Not dumped
-- (table oids do not survive a restore).
CREATE TABLE emit.backfill_progress (
    relid      oid NOT NULL,
    dest       text NOT NULL,
    signature  text NOT NULL,
    after      bytea[] NOT NULL,
    done       boolean NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (relid, dest)
);
COMMENT ON TABLE emit.backfill_progress IS
    'pg_emit: where each backfill in parts (emit.backfill with limit, resume) stopped';
REVOKE ALL ON emit.backfill_progress FROM PUBLIC;

CREATE VIEW emit.captures AS
SELECT c.name, c.dest, c.publication, c.slot, c.options,
       c.created_by::pg_catalog.regrole AS created_by,
       s.confirmed_flush_lsn AS confirmed_lsn,
       c.queued_lsn,
       -- WAL written since what is queued (not yet decoded), and WAL the
       -- slot keeps the server from recycling.
       CASE WHEN NOT pg_catalog.pg_is_in_recovery() THEN
         pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), c.queued_lsn)::bigint
       END AS lag_bytes,
       CASE WHEN NOT pg_catalog.pg_is_in_recovery() THEN
         pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), s.restart_lsn)::bigint
       END AS retained_wal_bytes,
       s.slot_name IS NOT NULL AS slot_exists,
       c.created_at,
       c.last_error,
       c.retry_at
  FROM emit.capture_definitions c
  LEFT JOIN pg_catalog.pg_replication_slots s ON s.slot_name OPERATOR(pg_catalog.=) c.slot;
COMMENT ON VIEW emit.captures IS
    'pg_emit: captures from the WAL, their slots and how far behind they are';
REVOKE ALL ON emit.captures FROM PUBLIC;
CREATE FUNCTION emit.create_capture(
    "name" TEXT, "dest" TEXT, "publication" TEXT, "options" jsonb DEFAULT '{}'
) RETURNS void
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c AS 'MODULE_PATHNAME', 'create_capture_wrapper';
CREATE FUNCTION emit.drop_capture("name" TEXT) RETURNS void
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c AS 'MODULE_PATHNAME', 'drop_capture_wrapper';
CREATE FUNCTION emit.backfill(tbl regclass, dest text, options jsonb DEFAULT '{}')
RETURNS bigint STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c AS 'MODULE_PATHNAME', 'backfill_wrapper';
COMMENT ON FUNCTION emit.backfill(regclass, text, jsonb) IS
    'pg_emit: queues a READ event per row of tbl, in primary-key order, for async delivery to dest';
REVOKE EXECUTE ON FUNCTION emit.backfill(regclass, text, jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION emit.backfill(regclass, text, jsonb) TO emit_admin;
REVOKE EXECUTE ON FUNCTION emit.create_capture(text, text, text, jsonb) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION emit.drop_capture(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION emit.create_capture(text, text, text, jsonb) TO emit_admin;
GRANT EXECUTE ON FUNCTION emit.drop_capture(text) TO emit_admin;
GRANT SELECT ON emit.captures TO emit_admin;
