-- delivery=async: the durable outbox, dead letters and delivery statistics.
--
-- One outbox row holds the events one transaction queued for one
-- destination (split at 8 MB), one per line, so a 20,000-row INSERT costs
-- one row here rather than 20,000.
--
-- Order: a transaction takes its place in the queue when it commits
-- (tx_seq, drawn at PRE_COMMIT), not when it starts writing, and its rows
-- go out together, in the order of their events (part); rows written
-- early by a large transaction get its tx_seq at PRE_COMMIT too. A
-- prepared transaction's rows get theirs from the worker once COMMIT
-- PREPARED has made them visible. Ids: the worker numbers events per
-- destination when it claims a row (emit.destinations.next_event_id), so
-- each destination sees 1, 2, 3, ... in delivery order.

CREATE SEQUENCE emit.tx_seq;

CREATE TABLE emit.outbox (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    destination     text    NOT NULL,
    host            text    NOT NULL,
    port            integer NOT NULL,
    -- 'close' or 'ndjson' (TCP), or 'http'. (No CHECK constraints here:
    -- only pg_emit writes this table, and checking them cost every
    -- async commit a tenth of its time.)
    framing         text    NOT NULL,
    url             text,
    -- Extra request headers, one "Name: value" per line.
    headers         text,
    events          integer NOT NULL,
    payload         text    NOT NULL,
    -- Set by the worker when it claims the row: events get ids
    -- first_event_id .. first_event_id + events - 1.
    first_event_id  bigint,
    -- Events of this row already delivered (framing=close delivers them one
    -- connection at a time, so a failure can come halfway).
    sent            integer NOT NULL DEFAULT 0,
    attempts        integer NOT NULL DEFAULT 0,
    last_error      text,
    enqueued_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- (Columns added in 0.2 come last, where the upgrade adds them.)
    -- Commit order of the writing transaction (NULL until known).
    tx_seq          bigint,
    -- Place of the row's first event among its transaction's events.
    part            bigint  NOT NULL DEFAULT 0,
    -- The writing transaction (full transaction id), to group a prepared
    -- transaction's rows when the worker gives them their tx_seq.
    tx              bigint,
    -- Each event's ordering key (a hash of the row's primary key or
    -- replica identity, or of send_message's key); NULL for an event
    -- without one, which is delivered after everything before it and
    -- before everything after it. NULL for the whole row: no event has one.
    keys            bigint[],
    -- How its events were made (format=): where the worker puts their ids
    -- and how it sends them.
    format          text    NOT NULL DEFAULT 'json',
    -- (Added in 0.3.) Events past `sent` already delivered (0-based, in
    -- ascending order): sent while an earlier event of another key was
    -- failing, never sent again. NULL: none.
    acked           integer[],
    -- (0.3) The stream its ids were given in (NULL: the destination's
    -- current one). A restored copy or a promoted standby numbers new
    -- events in a new stream, and sends these again as they were.
    stream          uuid,
    -- (0.3) Each event's key as text, for destinations that carry it
    -- (Kafka's record_key "columns": a row's key columns as JSON); NULL
    -- for an event without one, and for the whole row: none has one.
    record_keys     text[]
);
CREATE INDEX outbox_queue ON emit.outbox (destination, tx_seq, part);
CREATE INDEX outbox_unsequenced ON emit.outbox (tx) WHERE tx_seq IS NULL;
-- Payloads are JSON text of up to 8 MB: lz4 compresses them several-fold at
-- a fraction of pglz's CPU cost (pglz was a fifth of the async enqueue time
-- in profiles). Builds without lz4 keep the default.
DO $$
BEGIN
  ALTER TABLE emit.outbox ALTER COLUMN payload SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported THEN
  NULL;
END $$;
-- Every row is deleted soon after it is written, and one row can hold 8 MB:
-- vacuum the outbox whenever it has dead rows (at each autovacuum_naptime),
-- without cost-based delays, so it stays small under steady load and gives
-- a drained backlog's space back.
--
-- Pages keep room for the worker's one update of each row (numbering its
-- events): with no index on first_event_id, that update stays on the page
-- (HOT) and logs only the changed bytes.
ALTER TABLE emit.outbox SET (autovacuum_vacuum_scale_factor = 0,
                             autovacuum_vacuum_threshold = 0,
                             autovacuum_vacuum_cost_delay = 0,
                             fillfactor = 70);
COMMENT ON TABLE emit.outbox IS
    'pg_emit: events queued by delivery=async triggers, one row per transaction and destination';

CREATE TABLE emit.dead_letter (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    outbox_id       bigint  NOT NULL,
    destination     text    NOT NULL,
    host            text    NOT NULL,
    port            integer NOT NULL,
    framing         text    NOT NULL,
    url             text,
    headers         text,
    events          integer NOT NULL,
    payload         text    NOT NULL,
    attempts        integer NOT NULL,
    last_error      text,
    -- HTTP: the status that made the event undeliverable, and the start of
    -- the response body.
    status          integer,
    response        text,
    enqueued_at     timestamptz NOT NULL,
    dead_at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    format          text    NOT NULL DEFAULT 'json',
    -- (0.3) Its events' ordering keys and record keys, as in emit.outbox:
    -- a re-queued event is ordered and (Kafka) partitioned as before.
    keys            bigint[],
    record_keys     text[]
);
COMMENT ON TABLE emit.dead_letter IS
    'pg_emit: async events given up on after pg_emit.max_attempts or pg_emit.max_age';

-- Counters the worker keeps per destination, and its event ids: stream
-- names this destination's sequence of ids. It is new for a new install,
-- and the worker starts a new one when origin (system identifier, database
-- oid, timeline, installation) is not where it runs, as after CREATE
-- DATABASE ... TEMPLATE, a restore or a failover: (stream, id) is unique
-- wherever events come from.
CREATE TABLE emit.destinations (
    destination       text PRIMARY KEY,
    delivered         bigint NOT NULL DEFAULT 0,
    failed_attempts   bigint NOT NULL DEFAULT 0,
    dead_lettered     bigint NOT NULL DEFAULT 0,
    last_error        text,
    last_error_at     timestamptz,
    last_delivered_at timestamptz,
    stream            uuid   NOT NULL DEFAULT pg_catalog.gen_random_uuid(),
    next_event_id     bigint NOT NULL DEFAULT 1,
    origin            text,
    -- (0.3) Commit to delivery of the last five minutes' events, as the
    -- worker last wrote them (emit.metrics()).
    latency_p50_ms    double precision,
    latency_p99_ms    double precision,
    -- (0.3) Set by the worker while emit.outbox is over
    -- pg_emit.max_outbox_size: this destination queues more than an equal
    -- share of it, and new events for it are refused; others' are not.
    over_share        boolean
);

-- Single-row state: which process is the worker (committing backends read
-- it to wake the worker up), and this installation of the extension (part
-- of the streams' origin; not dumped, so a restore is a new installation).
CREATE TABLE emit.worker (
    one            boolean PRIMARY KEY DEFAULT true CHECK (one),
    pid            integer,
    started_at     timestamptz,
    install        uuid NOT NULL DEFAULT pg_catalog.gen_random_uuid(),
    -- (0.3) The live listener, if this database's worker runs it, as it
    -- last wrote it (emit.metrics()).
    live_connections integer,
    live_subscribers integer,
    live_dropped     bigint
);
INSERT INTO emit.worker DEFAULT VALUES;

CREATE VIEW emit.stats AS
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
COMMENT ON VIEW emit.stats IS 'pg_emit: async delivery per destination (no payloads)';

-- Stored destinations (emit.create_destination): URLs and options, with
-- the credentials in them, out of pg_trigger, which every role can read.
-- Async events for one keep only its name (outbox.framing = 'stored').
CREATE TABLE emit.stored_destinations (
    name        text PRIMARY KEY,
    url         text NOT NULL,
    options     jsonb NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    updated_at  timestamptz NOT NULL DEFAULT pg_catalog.now()
);
COMMENT ON TABLE emit.stored_destinations IS
    'pg_emit: destinations by name (emit.create_destination); options may hold credentials';

REVOKE ALL ON emit.outbox, emit.dead_letter, emit.destinations, emit.worker, emit.stats,
              emit.stored_destinations FROM PUBLIC;

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
REVOKE ALL ON SEQUENCE emit.tx_seq FROM PUBLIC;

-- pg_dump keeps the backlog, the dead letters and the counters, with the
-- sequences that number them (a restored database starts new streams, see
-- emit.destinations). emit.worker is process state and is not dumped.
SELECT pg_catalog.pg_extension_config_dump('emit.outbox', '');
SELECT pg_catalog.pg_extension_config_dump('emit.dead_letter', '');
SELECT pg_catalog.pg_extension_config_dump('emit.destinations', '');
SELECT pg_catalog.pg_extension_config_dump('emit.tx_seq', '');
SELECT pg_catalog.pg_extension_config_dump('emit.stored_destinations', '');
SELECT pg_catalog.pg_extension_config_dump(
    pg_catalog.pg_get_serial_sequence('emit.outbox', 'id')::pg_catalog.regclass, '');
SELECT pg_catalog.pg_extension_config_dump(
    pg_catalog.pg_get_serial_sequence('emit.dead_letter', 'id')::pg_catalog.regclass, '');
