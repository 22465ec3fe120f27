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

-- emit.backfill's tbl is a regclass, which pgrx cannot declare (see
-- src/backfill.rs).
CREATE FUNCTION emit.backfill(tbl regclass, dest text, options jsonb DEFAULT '{}')
RETURNS bigint STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c AS 'MODULE_PATHNAME', 'backfill_wrapper';
COMMENT ON FUNCTION emit.backfill(regclass, text, jsonb) IS
    'pg_emit: queues a READ event per row of tbl, in primary-key order, for async delivery to dest';
