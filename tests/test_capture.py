"""Capture from the WAL: emit.create_capture decodes a publication's
changes with a logical replication slot, and the worker queues and
delivers them like async trigger events."""

import json
import os
import signal
import time

import psycopg
import pytest

from conftest import DB, Session
from pgcluster import Cluster, wait_until
from receivers import Receiver, free_port


@pytest.fixture(scope="module")
def wal():
    c = Cluster("pg_emit-capture", port=54349, conf={
        "shared_preload_libraries": "'pg_emit'",
        "wal_level": "logical",
        "max_replication_slots": "20",
        "max_wal_senders": "4",
    })
    c.init().start()
    c.create_db(DB)
    with c.connect(DB) as conn:
        conn.execute("CREATE EXTENSION pg_emit")
    yield c
    c.destroy()


@pytest.fixture
def s(wal):
    s = Session(wal)
    yield s
    for (name,) in s.execute("SELECT name FROM emit.capture_definitions").fetchall():
        s.execute("SELECT emit.drop_capture(%s)", (name,))
    s.close()


def url(rx):
    return f"tcp://127.0.0.1:{rx.port}?framing=ndjson"


def events(msgs):
    return [json.loads(m) for m in msgs]


def slot_of(s, name):
    return s.one("SELECT slot FROM emit.capture_definitions WHERE name = %s", (name,))


def test_changes_arrive_in_commit_order_as_a_trigger_would_send_them(s):
    rx = Receiver("ndjson")
    try:
        s.execute("CREATE TABLE c_orders (id int PRIMARY KEY, note text, amount numeric, "
                  "tags text[], doc jsonb, at timestamptz)")
        s.execute("CREATE PUBLICATION c_pub FOR TABLE c_orders")
        s.execute("SELECT emit.create_capture('orders', %s, 'c_pub')", (url(rx),))
        s.execute("BEGIN")
        s.execute("INSERT INTO c_orders VALUES (1, 'a', 1.50, '{x,y}', '{\"k\": [1, 2]}', "
                  "'2026-01-02 03:04:05.678+00'), (2, 'b', NULL, NULL, NULL, NULL)")
        s.execute("COMMIT")
        # Rolled back: never sent.
        s.execute("BEGIN")
        s.execute("INSERT INTO c_orders VALUES (99, 'rolled back')")
        s.execute("ROLLBACK")
        s.execute("UPDATE c_orders SET note = 'a2' WHERE id = 1")
        s.execute("DELETE FROM c_orders WHERE id = 2")
        s.execute("TRUNCATE c_orders")
        got = events(rx.wait_for(5, timeout=20))
        assert [e["op"] for e in got] == ["INSERT", "INSERT", "UPDATE", "DELETE", "TRUNCATE"]
        first = got[0]
        assert set(first) == {"id", "stream", "op", "schema", "table", "new", "old"}
        assert (first["schema"], first["table"]) == ("public", "c_orders")
        # Every type reads as row_to_json writes it, as in a trigger's event.
        s.execute("INSERT INTO c_orders VALUES (1, 'a', 1.50, '{x,y}', '{\"k\": [1, 2]}', "
                  "'2026-01-02 03:04:05.678+00')")
        expected = s.one("SELECT row_to_json(o)::text FROM c_orders o WHERE id = 1")
        assert first["new"] == json.loads(expected)
        assert got[1]["new"] == {"id": 2, "note": "b", "amount": None, "tags": None,
                                 "doc": None, "at": None}
        # old: what the replica identity puts in the WAL. By default (the
        # primary key) an UPDATE that keeps the key has none, a DELETE the key.
        assert got[2]["old"] is None and got[2]["new"]["note"] == "a2"
        assert got[3]["old"] == {"id": 2} and got[3]["new"] is None
        assert got[4]["new"] is None and got[4]["old"] is None
        ids = [e["id"] for e in got]
        assert ids == sorted(ids) and len(set(ids)) == 5
        assert all(99 not in (e["new"] or {}).values() for e in got)
        assert len(events(rx.wait_for(6, timeout=20))) == 6
        # A key that changes is in old; REPLICA IDENTITY FULL: the whole row.
        s.execute("UPDATE c_orders SET id = 3 WHERE id = 1")
        s.execute("ALTER TABLE c_orders REPLICA IDENTITY FULL")
        s.execute("UPDATE c_orders SET note = 'full' WHERE id = 3")
        later = events(rx.wait_for(8, timeout=20))[6:]
        assert later[0]["old"] == {"id": 1} and later[0]["new"]["id"] == 3
        assert later[1]["old"] == dict(json.loads(expected), id=3)
        assert later[1]["new"]["note"] == "full"
    finally:
        rx.close()
        s.execute("DROP PUBLICATION IF EXISTS c_pub")
        s.execute("DROP TABLE IF EXISTS c_orders")


def test_debezium_source_says_the_real_transaction_and_position(s):
    rx = Receiver("ndjson")
    try:
        s.execute("CREATE TABLE c_dbz (id int PRIMARY KEY, v text)")
        s.execute("CREATE PUBLICATION c_dbz_pub FOR TABLE c_dbz")
        s.execute("SELECT emit.create_capture('dbz', %s, 'c_dbz_pub', '{\"format\": \"debezium\"}')",
                  (url(rx),))
        s.execute("BEGIN")
        s.execute("INSERT INTO c_dbz VALUES (1, 'x')")
        xid = s.one("SELECT txid_current()")
        before = s.one("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn")
        s.execute("COMMIT")
        (e,) = events(rx.wait_for(1, timeout=20))
        assert e["op"] == "c"
        assert e["after"] == {"id": 1, "v": "x"}
        src = e["source"]
        assert src["txId"] == xid
        assert src["lsn"] <= before and src["lsn"] > 0
        assert (src["schema"], src["table"]) == ("public", "c_dbz")
    finally:
        rx.close()
        s.execute("DROP PUBLICATION IF EXISTS c_dbz_pub")
        s.execute("DROP TABLE IF EXISTS c_dbz")


def test_a_receiver_that_is_down_costs_queue_rows_not_wal(s, wal):
    port = free_port()
    s.execute("CREATE TABLE c_down (id int PRIMARY KEY, v text)")
    s.execute("CREATE PUBLICATION c_down_pub FOR TABLE c_down")
    try:
        s.execute("SELECT emit.create_capture('down', %s, 'c_down_pub')",
                  (f"tcp://127.0.0.1:{port}?framing=ndjson",))
        start = s.one("SELECT pg_current_wal_lsn()")
        for i in range(20):
            s.execute(f"INSERT INTO c_down SELECT g, repeat('x', 200) "
                      f"FROM generate_series({i * 5000 + 1}, {i * 5000 + 5000}) g")
        # Other WAL, not published, also must not be held.
        s.execute("CREATE TABLE c_other AS SELECT g FROM generate_series(1, 300000) g")
        s.execute("DROP TABLE c_other")
        written = s.one("SELECT pg_current_wal_lsn() - %s::pg_lsn", (start,))
        assert written > 40 << 20
        # A checkpoint logs the running transactions at once (the server
        # does every 15 s otherwise), which lets the restart point move.
        s.execute("CHECKPOINT")
        # The slot's restart point follows the decoding at the server's
        # next snapshot of running transactions (every 15 s under load).
        assert wait_until(lambda: s.one(
            "SELECT retained_wal_bytes < %s AND lag_bytes < 1024 * 1024 "
            "FROM emit.captures WHERE name = 'down'", (written // 8,)), timeout=60), \
            s.execute("SELECT confirmed_lsn, queued_lsn, lag_bytes, retained_wal_bytes, pg_current_wal_lsn() FROM emit.captures").fetchall()
        queued = s.one("SELECT coalesce(sum(events), 0) FROM emit.outbox WHERE port = %s", (port,))
        assert queued == 100_000
        rx = Receiver("ndjson", port=port)
        try:
            got = rx.wait_for(100_000, timeout=120)
            ids = {e["new"]["id"] for e in events(got)}
            assert ids == set(range(1, 100_001))
        finally:
            rx.close()
    finally:
        s.execute("DROP PUBLICATION IF EXISTS c_down_pub")
        s.execute("DROP TABLE IF EXISTS c_down")


def test_capture_pauses_at_max_outbox_size_and_loses_nothing(s, wal):
    """Past pg_emit.max_outbox_size, capture stops queueing (the slot keeps
    the WAL instead) and goes on once delivery has made room and
    autovacuum has given the space back (at once here: naptime 1 s)."""
    port = free_port()
    s.execute("ALTER SYSTEM SET pg_emit.max_outbox_size = '1MB'")
    s.execute("ALTER SYSTEM SET autovacuum_naptime = 1")
    s.execute("SELECT pg_reload_conf()")
    s.execute("CREATE TABLE c_full (id int PRIMARY KEY, v text)")
    s.execute("CREATE PUBLICATION c_full_pub FOR TABLE c_full")
    log = open(wal.log)
    log.seek(0, os.SEEK_END)
    try:
        s.execute("SELECT emit.create_capture('full', %s, 'c_full_pub')",
                  (f"tcp://127.0.0.1:{port}?framing=ndjson",))
        for i in range(10):
            s.execute(f"INSERT INTO c_full SELECT g, (SELECT string_agg(md5(g::text || k), '') "
                      f"FROM generate_series(1, 10) k) "
                      f"FROM generate_series({i * 5000 + 1}, {i * 5000 + 5000}) g")
        queued = lambda: s.one("SELECT coalesce(sum(events), 0) FROM emit.outbox WHERE port = %s",
                               (port,))
        assert wait_until(lambda: queued() > 0, 20)
        time.sleep(3)
        held = queued()
        assert 0 < held < 50_000
        assert s.one("SELECT lag_bytes > 1024 * 1024 FROM emit.captures WHERE name = 'full'")
        assert "capture paused: emit.outbox is past pg_emit.max_outbox_size" in log.read()
        rx = Receiver("ndjson", port=port)
        try:
            got = rx.wait_for(50_000, timeout=120)
            assert {e["new"]["id"] for e in events(got)} == set(range(1, 50_001))
        finally:
            rx.close()
    finally:
        log.close()
        s.execute("ALTER SYSTEM RESET pg_emit.max_outbox_size")
        s.execute("ALTER SYSTEM RESET autovacuum_naptime")
        s.execute("SELECT pg_reload_conf()")
        s.execute("DROP PUBLICATION IF EXISTS c_full_pub")
        s.execute("DROP TABLE IF EXISTS c_full")


def test_nothing_is_lost_when_the_server_stops_abruptly(wal):
    rx = Receiver("ndjson")
    s = Session(wal)
    s.execute("CREATE TABLE c_crash (id int PRIMARY KEY)")
    s.execute("CREATE PUBLICATION c_crash_pub FOR TABLE c_crash")
    s.execute("SELECT emit.create_capture('crash', %s, 'c_crash_pub')", (url(rx),))
    try:
        for i in range(1, 301):
            s.execute("INSERT INTO c_crash VALUES (%s)", (i,))
        s.close()
        assert wal.stop("immediate").returncode == 0
        wal.start()
        s2 = Session(wal)
        try:
            for i in range(301, 401):
                s2.execute("INSERT INTO c_crash VALUES (%s)", (i,))
            assert wait_until(lambda: {e["new"]["id"] for e in events(rx.messages)} >= set(range(1, 401)),
                              timeout=60)
            # Kill the worker itself (the postmaster restarts everything).
            pid = s2.one("SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_emit worker' "
                         "AND datname = current_database()")
            for i in range(401, 501):
                s2.execute("INSERT INTO c_crash VALUES (%s)", (i,))
            os.kill(pid, signal.SIGKILL)
        finally:
            s2.close()
        time.sleep(1)
        assert wait_until(lambda: wal.connect(DB).execute("SELECT 1").fetchone() == (1,), timeout=30)
        with wal.connect(DB) as c:
            for i in range(501, 551):
                c.execute("INSERT INTO c_crash VALUES (%s)", (i,))
        assert wait_until(lambda: {e["new"]["id"] for e in events(rx.messages)} >= set(range(1, 551)),
                          timeout=60)
    finally:
        rx.close()
        with wal.connect(DB) as c:
            c.execute("SELECT emit.drop_capture('crash')")
            c.execute("DROP PUBLICATION c_crash_pub")
            c.execute("DROP TABLE c_crash")


def test_drop_capture_and_drop_extension_drop_their_slots(wal):
    wal.create_db("capture_drop")
    try:
        with wal.connect("capture_drop") as c:
            c.execute("CREATE EXTENSION pg_emit")
            c.execute("CREATE TABLE t (id int PRIMARY KEY)")
            c.execute("CREATE PUBLICATION p FOR TABLE t")
            c.execute("SELECT emit.create_capture('one', 'tcp://127.0.0.1:9?framing=ndjson', 'p')")
            c.execute("SELECT emit.create_capture('two', 'tcp://127.0.0.1:9?framing=ndjson', 'p')")
            slots = lambda: sorted(r[0] for r in c.execute(
                "SELECT slot_name FROM pg_replication_slots WHERE database = current_database()"))
            db_oid = c.execute("SELECT oid FROM pg_database WHERE datname = current_database()").fetchone()[0]
            assert slots() == [f"pg_emit_{db_oid}_one", f"pg_emit_{db_oid}_two"]
            c.execute("SELECT emit.drop_capture('one')")
            assert slots() == [f"pg_emit_{db_oid}_two"]
            c.execute("DROP EXTENSION pg_emit")
            assert slots() == []
            # In a transaction block the slots stay (a rollback brings the
            # extension back, and its captures must still have them), and
            # the WARNING says what to do once it has committed.
            notices = []
            c.add_notice_handler(lambda d: notices.append(d.message_primary))
            c.execute("CREATE EXTENSION pg_emit")
            c.execute("SELECT emit.create_capture('three', 'tcp://127.0.0.1:9?framing=ndjson', 'p')")
            for end in ("ROLLBACK", "COMMIT"):
                c.execute("BEGIN")
                c.execute("DROP EXTENSION pg_emit")
                c.execute(end)
                assert slots() == [f"pg_emit_{db_oid}_three"]
            assert len(notices) == 2 and "keeps its capture slots" in notices[1], notices
            assert "pg_drop_replication_slot" in notices[1]
            c.execute("SELECT pg_drop_replication_slot(%s)", (f"pg_emit_{db_oid}_three",))
    finally:
        with wal.connect() as c:
            wait_until(lambda: c.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = 'capture_drop'").fetchone()[0] == 0)
            c.execute("DROP DATABASE capture_drop WITH (FORCE)")


def test_refusals(s, wal):
    s.execute("CREATE TABLE c_ref (id int PRIMARY KEY, v int, g int GENERATED ALWAYS AS (id * 2) STORED)")
    s.execute("CREATE TABLE c_ref_parted (id int PRIMARY KEY) PARTITION BY RANGE (id)")
    s.execute("CREATE PUBLICATION c_ref_pub FOR TABLE c_ref")
    try:
        with pytest.raises(psycopg.errors.UndefinedObject, match="publication \"nope\" does not exist"):
            s.execute("SELECT emit.create_capture('x', 'tcp://127.0.0.1:9', 'nope')")
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="capture name"):
            s.execute("SELECT emit.create_capture('Bad-Name', 'tcp://127.0.0.1:9', 'c_ref_pub')")
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="unknown option \"snapshott\""):
            s.execute("SELECT emit.create_capture('x', 'tcp://127.0.0.1:9', 'c_ref_pub', '{\"snapshott\": true}')")
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="format \"xml\""):
            s.execute("SELECT emit.create_capture('x', 'tcp://127.0.0.1:9', 'c_ref_pub', '{\"format\": \"xml\"}')")
        with pytest.raises(psycopg.errors.UndefinedObject, match="no_such_dest"):
            s.execute("SELECT emit.create_capture('x', 'no_such_dest', 'c_ref_pub')")
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="live channel"):
            s.execute("SELECT emit.create_capture('x', 'channel:orders', 'c_ref_pub')")
        # The option tables, checked against the tables it names.
        for tables, error, text in [
            ({"c_nope": {}}, psycopg.errors.UndefinedTable, 'tables: relation "c_nope" does not exist'),
            ({"c_ref": {"columns": "id,nope"}}, psycopg.errors.UndefinedColumn,
             'columns: column "nope" of public.c_ref does not exist'),
            ({"c_ref": {"key": ["ghost"]}}, psycopg.errors.UndefinedColumn, 'key: column "ghost"'),
            ({"c_ref": {"key": "v"}}, psycopg.errors.InvalidParameterValue,
             'key: column "v" of public.c_ref is not in its replica identity'),
            ({"c_ref": {"columns": "id", "exclude": "v"}}, psycopg.errors.InvalidParameterValue,
             "columns and exclude cannot both be given"),
            ({"c_ref": {"colums": "id"}}, psycopg.errors.InvalidParameterValue, 'unknown option "colums"'),
            ({"c_ref": {}, "public.c_ref": {}}, psycopg.errors.DuplicateObject,
             "tables: public.c_ref is named twice"),
            ({"c_ref": {"columns": ["id", "g"]}}, psycopg.errors.InvalidParameterValue,
             'columns: column "g" of public.c_ref is generated, which the WAL does not carry'),
            ({"c_ref_parted": {}}, psycopg.errors.InvalidParameterValue,
             "public.c_ref_parted is partitioned: name each of its partitions"),
            ({"c_ref": "id"}, psycopg.errors.InvalidParameterValue, "is not an object"),
            (["c_ref"], psycopg.errors.InvalidParameterValue, "is not an object of table names"),
        ]:
            with pytest.raises(error, match=text):
                s.execute("SELECT emit.create_capture('x', 'tcp://127.0.0.1:9', 'c_ref_pub', %s)",
                          (json.dumps({"tables": tables}),))
        # Slots are not transactional: each in a transaction of its own.
        s.execute("BEGIN")
        with pytest.raises(psycopg.errors.ActiveSqlTransaction, match="transaction block"):
            s.execute("SELECT emit.create_capture('x', 'tcp://127.0.0.1:9', 'c_ref_pub')")
        s.execute("ROLLBACK")
        s.execute("SELECT emit.create_capture('x', 'tcp://127.0.0.1:9', 'c_ref_pub')")
        with pytest.raises(psycopg.errors.DuplicateObject, match="capture \"x\" already exists"):
            s.execute("SELECT emit.create_capture('x', 'tcp://127.0.0.1:9', 'c_ref_pub')")
        with pytest.raises(psycopg.errors.UndefinedObject, match="capture \"y\" does not exist"):
            s.execute("SELECT emit.drop_capture('y')")
        s.execute("BEGIN")
        with pytest.raises(psycopg.errors.ActiveSqlTransaction, match="transaction block"):
            s.execute("SELECT emit.drop_capture('x')")
        s.execute("ROLLBACK")
        # Ordinary roles may not capture, nor read what captures exist;
        # emit_admin may.
        s.execute("DROP ROLE IF EXISTS c_plain")
        s.execute("CREATE ROLE c_plain LOGIN")
        s.execute("DROP ROLE IF EXISTS c_admin")
        s.execute("CREATE ROLE c_admin LOGIN IN ROLE emit_admin")
        with wal.connect(DB, user="c_plain") as c:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute("SELECT emit.create_capture('z', 'tcp://127.0.0.1:9', 'c_ref_pub')")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute("SELECT * FROM emit.captures")
        with wal.connect(DB, user="c_admin") as c:
            c.execute("SELECT emit.create_capture('z', 'tcp://127.0.0.1:9', 'c_ref_pub')")
            assert c.execute("SELECT count(*) FROM emit.captures WHERE slot_exists").fetchone()[0] == 2
            c.execute("SELECT emit.drop_capture('z')")
    finally:
        s.execute("DROP PUBLICATION IF EXISTS c_ref_pub")
        s.execute("DROP TABLE IF EXISTS c_ref, c_ref_parted")


def test_publication_and_table_changes_follow_the_wal(s):
    rx = Receiver("ndjson")
    s.execute("CREATE TABLE c_a (id int PRIMARY KEY, n int, gone text)")
    s.execute("CREATE TABLE c_b (id int PRIMARY KEY)")
    s.execute("CREATE PUBLICATION c_ab FOR TABLE c_a")
    try:
        s.execute("SELECT emit.create_capture('ab', %s, 'c_ab')", (url(rx),))
        s.execute("INSERT INTO c_b VALUES (1)")  # not published yet
        s.execute("INSERT INTO c_a VALUES (1, 1, 'x')")
        s.execute("ALTER PUBLICATION c_ab ADD TABLE c_b")
        s.execute("INSERT INTO c_b VALUES (2)")
        s.execute("ALTER TABLE c_a ADD COLUMN extra text DEFAULT 'e', DROP COLUMN gone")
        s.execute("INSERT INTO c_a VALUES (2, 2)")
        s.execute("ALTER TABLE c_a ALTER COLUMN n TYPE text USING n::text || '!'")
        s.execute("INSERT INTO c_a VALUES (3, 'three')")
        s.execute("ALTER PUBLICATION c_ab DROP TABLE c_b")
        s.execute("INSERT INTO c_b VALUES (3)")
        s.execute("TRUNCATE c_a")
        got = events(rx.wait_for(5, timeout=20))
        assert [(e["table"], e["op"], e["new"]) for e in got] == [
            ("c_a", "INSERT", {"id": 1, "n": 1, "gone": "x"}),
            ("c_b", "INSERT", {"id": 2}),
            ("c_a", "INSERT", {"id": 2, "n": 2, "extra": "e"}),
            ("c_a", "INSERT", {"id": 3, "n": "three", "extra": "e"}),
            ("c_a", "TRUNCATE", None),
        ]
        time.sleep(1)
        assert len(rx.messages) == 5
    finally:
        rx.close()
        s.execute("DROP PUBLICATION IF EXISTS c_ab")
        s.execute("DROP TABLE IF EXISTS c_a, c_b")


def test_a_large_value_an_update_left_alone_is_left_out(s):
    rx = Receiver("ndjson")
    s.execute("CREATE TABLE c_toast (id int PRIMARY KEY, n int, big text)")
    s.execute("ALTER TABLE c_toast ALTER COLUMN big SET STORAGE EXTERNAL")
    s.execute("CREATE PUBLICATION c_toast_pub FOR TABLE c_toast")
    try:
        s.execute("SELECT emit.create_capture('toast', %s, 'c_toast_pub')", (url(rx),))
        s.execute("INSERT INTO c_toast VALUES (1, 1, repeat('b', 100000))")
        s.execute("UPDATE c_toast SET n = 2")
        first, second = events(rx.wait_for(2, timeout=20))
        assert len(first["new"]["big"]) == 100000
        assert second["new"] == {"id": 1, "n": 2}
    finally:
        rx.close()
        s.execute("DROP PUBLICATION IF EXISTS c_toast_pub")
        s.execute("DROP TABLE IF EXISTS c_toast")


def test_only_tables_the_creator_may_read_are_captured(s, wal):
    """emit_admin may capture a publication someone else made, but gets
    only the tables it may SELECT from, however the publication grows;
    its snapshot reads the same tables."""
    rx = Receiver("ndjson")
    s.execute("CREATE TABLE c_open (id int PRIMARY KEY, v text)")
    s.execute("CREATE TABLE c_secret (id int PRIMARY KEY, v text)")
    s.execute("CREATE TABLE c_rls (id int PRIMARY KEY, v text)")
    s.execute("ALTER TABLE c_rls ENABLE ROW LEVEL SECURITY")
    s.execute("CREATE TABLE c_parts (id int PRIMARY KEY, v text) PARTITION BY RANGE (id)")
    s.execute("CREATE TABLE c_part1 PARTITION OF c_parts FOR VALUES FROM (0) TO (100)")
    s.execute("CREATE PUBLICATION c_mixed FOR TABLE c_open, c_rls, c_parts")
    s.execute("DROP ROLE IF EXISTS c_admin2")
    s.execute("CREATE ROLE c_admin2 LOGIN IN ROLE emit_admin")
    s.execute("GRANT SELECT ON c_open, c_rls, c_parts TO c_admin2")
    s.execute("INSERT INTO c_rls VALUES (0, 'policy-hidden, before')")
    s.execute("INSERT INTO c_open VALUES (0, 'public, before')")
    try:
        with wal.connect(DB, user="c_admin2") as c:
            notices = []
            c.add_notice_handler(lambda d: notices.append(d.message_primary))
            c.execute("SELECT emit.create_capture('mixed', %s, 'c_mixed', '{\"snapshot\": true}')",
                      (url(rx),))
            assert notices == ["emit.create_capture: the snapshot leaves out public.c_rls: row "
                               "security applies to you there, and the capture leaves out its changes"]
        s.execute("ALTER PUBLICATION c_mixed ADD TABLE c_secret")
        s.execute("INSERT INTO c_secret VALUES (1, 'password')")
        # Row security would show c_admin2 no row of c_rls: none is captured.
        s.execute("INSERT INTO c_rls VALUES (1, 'policy-hidden')")
        # A partition's changes come under its own name; SELECT on the
        # partitioned table is enough.
        s.execute("INSERT INTO c_parts VALUES (5, 'partitioned')")
        s.execute("INSERT INTO c_open VALUES (1, 'public')")
        got = events(rx.wait_for(3, timeout=20))
        assert [(e["table"], e["new"]["v"]) for e in got] == [
            ("c_open", "public, before"), ("c_part1", "partitioned"), ("c_open", "public")]
        time.sleep(1)
        assert len(rx.messages) == 3
        assert s.one("SELECT created_by::text FROM emit.captures WHERE name = 'mixed'") == "c_admin2"
    finally:
        rx.close()
        s.execute("DROP PUBLICATION IF EXISTS c_mixed")
        s.execute("DROP TABLE IF EXISTS c_open, c_secret, c_rls, c_parts")


def test_backfill_sends_existing_rows_in_key_order_before_later_changes(s, wal):
    rx = Receiver("ndjson")
    s.execute("CREATE TABLE c_fill (a int, b text, v int, PRIMARY KEY (b, a))")
    s.execute("INSERT INTO c_fill SELECT g % 7, 'k' || (g % 3), g FROM generate_series(1, 21) g")
    s.execute("INSERT INTO c_fill SELECT g, 'z', g FROM generate_series(100, 2599) g")
    s.execute("CREATE TRIGGER out AFTER UPDATE ON c_fill FOR EACH ROW EXECUTE FUNCTION "
              f"row_to_destination('{url(rx)}', 'delivery=async')")
    try:
        s.execute("BEGIN")
        assert s.one("SELECT emit.backfill('c_fill', %s)", (url(rx),)) == 2521
        # Writers wait until the backfill commits: their changes follow.
        done = []
        import threading

        def update():
            with wal.connect(DB) as c:
                c.execute("UPDATE c_fill SET v = -1 WHERE a = 0 AND b = 'k0'")
            done.append(True)
        th = threading.Thread(target=update)
        th.start()
        time.sleep(0.5)
        assert done == []
        s.execute("COMMIT")
        th.join(10)
        got = events(rx.wait_for(2522, timeout=60))
        reads = [e for e in got if e["op"] == "READ"]
        assert len(reads) == 2521 and got[-1]["op"] == "UPDATE"
        assert [(e["new"]["b"], e["new"]["a"]) for e in reads] == sorted(
            (e["new"]["b"], e["new"]["a"]) for e in reads)
        assert reads[0]["new"] == {"a": 0, "b": "k0", "v": 21} and reads[0]["old"] is None
        assert got[-1]["new"]["v"] == -1
        assert set(reads[0]) == {"id", "stream", "op", "schema", "table", "new", "old"}
        # The formats' own words for a snapshot read.
        s.execute("TRUNCATE c_fill")
        s.execute("INSERT INTO c_fill VALUES (1, 'x', 1)")
        s.execute("SELECT emit.backfill('c_fill', %s, '{\"format\": \"debezium\"}')", (url(rx),))
        s.execute("SELECT emit.backfill('c_fill', %s, '{\"format\": \"cloudevents\"}')", (url(rx),))
        dbz, ce = events(rx.wait_for(2524, timeout=20))[-2:]
        assert dbz["op"] == "r" and dbz["after"] == {"a": 1, "b": "x", "v": 1}
        assert dbz["source"]["snapshot"] == "true"
        assert ce["type"] == "pg_emit.row.read" and ce["data"]["new"]["v"] == 1
    finally:
        rx.close()
        s.execute("DROP TABLE IF EXISTS c_fill")


def test_backfill_keys_rows_by_their_replica_identity(s):
    """A READ event's ordering key is the one the row's later changes get
    (its replica identity's, as triggers and capture give it), so they
    cannot overtake it: here an index other than the primary key, then
    FULL (no key)."""
    port = free_port()
    dest = f"tcp://127.0.0.1:{port}?framing=ndjson"
    s.execute("CREATE TABLE c_ri (a int PRIMARY KEY, b int NOT NULL UNIQUE, v text)")
    s.execute("ALTER TABLE c_ri REPLICA IDENTITY USING INDEX c_ri_b_key")
    s.execute("INSERT INTO c_ri VALUES (1, 10, 'x'), (2, 20, 'y')")
    s.execute("CREATE TRIGGER out AFTER UPDATE ON c_ri FOR EACH ROW EXECUTE FUNCTION "
              f"row_to_destination('{dest}', 'delivery=async')")
    keys = lambda: [r[0] for r in s.execute(
        "SELECT keys FROM emit.outbox WHERE port = %s ORDER BY id", (port,)).fetchall()]
    try:
        assert s.one("SELECT emit.backfill('c_ri', %s)", (dest,)) == 2
        s.execute("UPDATE c_ri SET v = 'z' WHERE a = 1")
        (read1, read2), (update1,) = keys()
        assert read1 == update1 and read1 != read2
        s.execute("DELETE FROM emit.outbox WHERE port = %s", (port,))
        s.execute("ALTER TABLE c_ri REPLICA IDENTITY FULL")
        s.execute("SELECT emit.backfill('c_ri', %s)", (dest,))
        s.execute("UPDATE c_ri SET v = 'w' WHERE a = 1")
        assert keys() == [None, None]
    finally:
        s.execute("DELETE FROM emit.outbox WHERE port = %s", (port,))
        s.execute("DROP TABLE IF EXISTS c_ri")


def test_a_backfill_rolled_back_to_a_savepoint_leaves_refusals_to_on_error(s):
    """A backfill makes the outbox limit refuse with an ERROR (it must not
    say it queued rows it did not); rolled back to a savepoint, it no
    longer does, and the transaction commits with pg_emit.on_error's
    WARNING as it would have without it."""
    port = free_port()
    dest = f"tcp://127.0.0.1:{port}?framing=ndjson"
    s.execute("CREATE TABLE c_strict (id int PRIMARY KEY)")
    s.execute("INSERT INTO c_strict VALUES (1)")
    try:
        s.execute("SET pg_emit.on_error = 'warning'")
        s.execute("SELECT send_message(%s, '{}')", (dest,))
        # One page of outbox is past a 1 kB limit, for every destination.
        s.execute("SET pg_emit.max_outbox_size = 1")
        s.execute("BEGIN")
        s.execute("SAVEPOINT a")
        s.execute("SELECT emit.backfill('c_strict', %s)", (dest,))
        s.execute("ROLLBACK TO SAVEPOINT a")
        s.execute("INSERT INTO c_strict VALUES (2)")
        s.execute("SELECT send_message(%s, '{}')", (dest,))
        s.notices.clear()
        s.execute("COMMIT")
        assert any("max_outbox_size" in w for w in s.warnings()), s.warnings()
        assert s.one("SELECT count(*) FROM c_strict") == 2
        # Not rolled back: the COMMIT fails.
        s.execute("BEGIN")
        s.execute("SELECT emit.backfill('c_strict', %s)", (dest,))
        with pytest.raises(psycopg.Error, match="max_outbox_size"):
            s.execute("COMMIT")
    finally:
        s.execute("RESET pg_emit.max_outbox_size")
        s.execute("RESET pg_emit.on_error")
        s.execute("DELETE FROM emit.outbox WHERE port = %s", (port,))
        s.execute("DROP TABLE IF EXISTS c_strict")


def test_backfill_waiting_for_a_writer_reads_what_it_committed(s, wal):
    """The lock may wait for a writer; the rows are read after it, so the
    READ carries the writer's change and follows its event."""
    rx = Receiver("ndjson")
    s.execute("CREATE TABLE c_wait (id int PRIMARY KEY, v int, t int)")
    s.execute("INSERT INTO c_wait VALUES (1, 1, 0)")
    s.execute("CREATE TRIGGER out AFTER UPDATE ON c_wait FOR EACH ROW EXECUTE FUNCTION "
              f"row_to_destination('{url(rx)}', 'delivery=async')")
    w = wal.connect(DB)
    try:
        w.execute("BEGIN")
        w.execute("UPDATE c_wait SET v = 2 WHERE id = 1")
        import threading
        counted = []
        th = threading.Thread(target=lambda: counted.append(
            Session(wal).one("SELECT emit.backfill('c_wait', %s)", (url(rx),))))
        th.start()
        time.sleep(0.5)
        assert counted == []  # waiting for the writer's lock
        w.execute("COMMIT")
        th.join(10)
        assert counted == [1]
        got = events(rx.wait_for(2, timeout=20))
        assert [(e["op"], e["new"]["v"]) for e in got] == [("UPDATE", 2), ("READ", 2)]
    finally:
        w.close()
        rx.close()
        s.execute("DROP TABLE IF EXISTS c_wait")


def test_backfill_refusals(s, wal):
    s.execute("CREATE TABLE c_nokey (v int)")
    s.execute("CREATE TABLE c_keyed (id int PRIMARY KEY)")
    s.execute("CREATE VIEW c_view AS SELECT 1 AS id")
    try:
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="is a system table"):
            s.execute("SELECT emit.backfill('pg_class', 'tcp://127.0.0.1:9')")
        s.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="READ COMMITTED"):
            s.execute("SELECT emit.backfill('c_keyed', 'tcp://127.0.0.1:9')")
        s.execute("ROLLBACK")
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="has no primary key"):
            s.execute("SELECT emit.backfill('c_nokey', 'tcp://127.0.0.1:9')")
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="is not a table"):
            s.execute("SELECT emit.backfill('c_view', 'tcp://127.0.0.1:9')")
        with pytest.raises(psycopg.errors.UndefinedTable):
            s.execute("SELECT emit.backfill('c_missing', 'tcp://127.0.0.1:9')")
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="unknown option \"snapshot\""):
            s.execute("SELECT emit.backfill('c_keyed', 'tcp://127.0.0.1:9', '{\"snapshot\": true}')")
        with pytest.raises(psycopg.errors.UndefinedColumn, match='exclude: column "nope" of public.c_keyed'):
            s.execute("SELECT emit.backfill('c_keyed', 'tcp://127.0.0.1:9', '{\"exclude\": \"nope\"}')")
        s.execute("DROP ROLE IF EXISTS c_admin3")
        s.execute("CREATE ROLE c_admin3 LOGIN IN ROLE emit_admin")
        s.execute("DROP ROLE IF EXISTS c_plain3")
        s.execute("CREATE ROLE c_plain3 LOGIN")
        s.execute("GRANT SELECT ON c_keyed TO c_plain3")
        # An emit_admin reads only what it may read, and cannot queue for a
        # lock on a table it may not (it would hold off that table's
        # writers): refused at once, while a writer holds the table.
        s.execute("BEGIN")
        s.execute("INSERT INTO c_keyed VALUES (1)")
        try:
            with wal.connect(DB, user="c_admin3") as c:
                c.execute("SET lock_timeout = '5s'")
                with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied for table"):
                    c.execute("SELECT emit.backfill('c_keyed', 'tcp://127.0.0.1:9')")
        finally:
            s.execute("ROLLBACK")
        with wal.connect(DB, user="c_plain3") as c:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute("SELECT emit.backfill('c_keyed', 'tcp://127.0.0.1:9')")
    finally:
        s.execute("DROP VIEW IF EXISTS c_view")
        s.execute("DROP TABLE IF EXISTS c_nokey, c_keyed")


def test_capture_with_snapshot_starts_with_the_rows_there_are(s):
    rx = Receiver("ndjson")
    s.execute("CREATE TABLE c_snap (id int PRIMARY KEY, v text)")
    s.execute("INSERT INTO c_snap SELECT g, 'old' FROM generate_series(1, 50) g")
    s.execute("CREATE PUBLICATION c_snap_pub FOR TABLE c_snap")
    try:
        s.execute("SELECT emit.create_capture('snap', %s, 'c_snap_pub', '{\"snapshot\": true}')",
                  (url(rx),))
        s.execute("UPDATE c_snap SET v = 'new' WHERE id = 7")
        s.execute("INSERT INTO c_snap VALUES (51, 'new')")
        got = events(rx.wait_for(52, timeout=30))
        assert [e["op"] for e in got] == ["READ"] * 50 + ["UPDATE", "INSERT"]
        assert [e["new"]["id"] for e in got[:50]] == list(range(1, 51))
        assert got[50]["new"] == {"id": 7, "v": "new"}
    finally:
        rx.close()
        s.execute("DROP PUBLICATION IF EXISTS c_snap_pub")
        s.execute("DROP TABLE IF EXISTS c_snap")


def test_values_are_made_as_the_table_owner_and_a_bad_one_does_not_stop_capture(s, wal):
    """A domain's CHECK runs when the worker makes a value: as the table's
    owner, never as the worker's superuser; and a value its type no longer
    takes is sent as text, while the capture goes on."""
    rx = Receiver("ndjson")
    s.execute("DROP ROLE IF EXISTS c_owner")
    s.execute("CREATE ROLE c_owner")
    s.execute("GRANT CREATE ON SCHEMA public TO c_owner")
    s.execute("SET ROLE c_owner")
    s.execute("CREATE TABLE c_seen (who text, pid int)")
    s.execute("CREATE TABLE c_flag (strict bool)")
    s.execute("INSERT INTO c_flag VALUES (false)")
    s.execute("""CREATE FUNCTION c_check(v int) RETURNS bool LANGUAGE plpgsql AS $$
                 BEGIN
                   INSERT INTO public.c_seen VALUES (current_user, pg_catalog.pg_backend_pid());
                   RETURN v < 10 OR NOT (SELECT strict FROM public.c_flag);
                 END $$""")
    s.execute("CREATE DOMAIN c_small AS int CHECK (public.c_check(VALUE))")
    s.execute("CREATE TABLE c_dom (id int PRIMARY KEY, v c_small)")
    s.execute("RESET ROLE")
    s.execute("CREATE PUBLICATION c_dom_pub FOR TABLE c_dom")
    try:
        s.execute("SELECT emit.create_capture('dom', %s, 'c_dom_pub')", (url(rx),))
        s.execute("INSERT INTO c_dom VALUES (1, 5)")
        (first,) = events(rx.wait_for(1, timeout=20))
        assert first["new"] == {"id": 1, "v": 5}
        assert {w for (w,) in s.execute(
            "SELECT who FROM c_seen WHERE pid IN (SELECT pid FROM pg_stat_activity "
            "WHERE backend_type = 'pg_emit worker')")} == {"c_owner"}
        # Valid when written, refused by the time the worker reads it.
        s.execute("BEGIN")
        s.execute("INSERT INTO c_dom VALUES (2, 50)")
        s.execute("UPDATE c_flag SET strict = true")
        s.execute("COMMIT")
        got = events(rx.wait_for(2, timeout=30))
        assert got[1]["op"] == "INSERT" and got[1]["new"] == {"id": "2", "v": "50"}
        s.execute("UPDATE c_flag SET strict = false")
        s.execute("INSERT INTO c_dom VALUES (3, 7)")
        got = events(rx.wait_for(3, timeout=30))
        assert got[2]["new"] == {"id": 3, "v": 7}
        assert {w for (w,) in s.execute(
            "SELECT who FROM c_seen WHERE pid IN (SELECT pid FROM pg_stat_activity "
            "WHERE backend_type = 'pg_emit worker')")} == {"c_owner"}
        assert "sent as text" in open(wal.log).read()
    finally:
        rx.close()
        s.execute("DROP PUBLICATION IF EXISTS c_dom_pub")
        s.execute("DROP TABLE IF EXISTS c_dom, c_seen, c_flag")
        s.execute("DROP DOMAIN IF EXISTS c_small")
        s.execute("DROP FUNCTION IF EXISTS c_check(int)")
        s.execute("REVOKE CREATE ON SCHEMA public FROM c_owner")


def test_a_failure_in_decoding_lets_go_of_the_slot_and_decodes_in_a_fresh_process(s, wal):
    """A dropped publication: said before decoding starts. Made again, the
    changes written without it fail inside decoding (PostgreSQL decodes
    them with the catalog of their time): the worker lets go of the slot
    (drop_capture can drop it) and restarts before decoding again."""
    rx = Receiver("ndjson")
    log = open(wal.log)
    log.seek(0, os.SEEK_END)
    seen = []

    def logged(text):
        seen.append(log.read())
        return text in "".join(seen)

    def slot_active():
        return s.one("SELECT active FROM pg_replication_slots WHERE slot_name = %s", (slot_of(s, "f"),))

    try:
        s.execute("CREATE TABLE f_t (id int PRIMARY KEY)")
        s.execute("CREATE PUBLICATION f_pub FOR TABLE f_t")
        s.execute("SELECT emit.create_capture('f', %s, 'f_pub')", (url(rx),))
        s.execute("INSERT INTO f_t VALUES (1)")
        assert len(rx.wait_for(1, timeout=20)) == 1
        s.execute("DROP PUBLICATION f_pub")
        s.execute("INSERT INTO f_t VALUES (2)")
        assert wait_until(lambda: logged('its publication "f_pub" does not exist (dropped?)'), 15)
        assert not slot_active()
        # Said in emit.captures too (recorded just after the WARNING), with
        # when it tries again.
        assert wait_until(lambda: s.one("SELECT last_error FROM emit.captures WHERE name = 'f'"), 10)
        last_error, waits = s.execute("SELECT last_error, retry_at > now() FROM emit.captures "
                                      "WHERE name = 'f'").fetchone()
        assert "does not exist (dropped?)" in last_error and waits
        worker = s.one("SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_emit worker'")
        s.execute("CREATE PUBLICATION f_pub FOR TABLE f_t")
        s.execute("INSERT INTO f_t VALUES (3)")
        restarted = "restarting, so that a capture decodes in a fresh process"
        # PostgreSQL 18 skips the changes made without the publication (row
        # 2) and goes on; earlier versions fail inside decoding.
        assert wait_until(lambda: logged(restarted) or any(
            json.loads(m)["new"]["id"] == 3 for m in rx.messages), 30), "".join(seen)
        if logged(restarted):
            assert wait_until(lambda: logged("pg_emit worker\" (PID %d) exited with exit code 1" % worker), 10)
        started = time.monotonic()
        s.execute("SELECT emit.drop_capture('f')")
        assert time.monotonic() - started < 4
    finally:
        rx.close()
        log.close()


def test_kafka_record_keys_are_the_same_from_a_backfill_a_trigger_and_capture(s):
    """record_key "columns" (Debezium's record key, schemas off): a row's
    key columns as JSON, byte for byte the same whichever made the event,
    so that a row's events share a partition, the one Java's partitioner
    gives the key; a message is keyed by its key as given."""
    from receivers import KafkaServer

    from test_kafka import java_partitions

    k = KafkaServer()
    try:
        k.create_topic("keyed")
        s.execute("SELECT emit.create_destination('keyed', %s, %s)",
                  (f"kafka://127.0.0.1:{k.port}/keyed",
                   json.dumps({"record_key": "columns", "format": "debezium"})))
        s.execute("CREATE TABLE k_rows (v int, tenant text, id int, at timestamptz, "
                  "PRIMARY KEY (id, tenant, at))")
        s.execute("INSERT INTO k_rows VALUES (0, 'a', 1, '2026-01-01Z'), (0, 'b', 2, '2026-01-01Z')")
        # Keys are written with fixed settings, whatever the session's.
        s.execute("SET TimeZone = 'Asia/Tokyo'")
        assert s.one("SELECT emit.backfill('k_rows', 'keyed')") == 2
        s.execute("CREATE TRIGGER out AFTER INSERT OR UPDATE OR DELETE ON k_rows FOR EACH ROW "
                  "EXECUTE FUNCTION row_to_destination('keyed', 'delivery=async')")
        s.execute("UPDATE k_rows SET v = 1")
        s.execute("DELETE FROM k_rows WHERE id = 2")
        s.execute("CREATE TABLE k_captured (id bigint PRIMARY KEY, v int)")
        s.execute("CREATE PUBLICATION k_pub FOR TABLE k_captured")
        s.execute("SELECT emit.create_capture('keyed', 'keyed', 'k_pub')")
        s.execute("INSERT INTO k_captured VALUES (10, 0)")
        s.execute("UPDATE k_captured SET v = 1")
        s.execute("DELETE FROM k_captured")
        s.execute("SELECT send_message('keyed', '{\"n\": 1}', 'async', 'order-7')")
        recs = sorted(k.records("keyed", 9), key=lambda r: (r["partition"], r["offset"]))
        assert len(recs) == 9
        by_key = {}
        for r in recs:
            v = r["value"]
            by_key.setdefault(r["key"], []).append((r["partition"], v.get("op"), v.get("n")))
        # The key columns in the table's order (as the replica identity
        # lists them), as row_to_json writes them.
        assert {k: [op for _, op, _ in seen] for k, seen in by_key.items()} == {
            '{"tenant":"a","id":1,"at":"2026-01-01T00:00:00+00:00"}': ["r", "u"],
            '{"tenant":"b","id":2,"at":"2026-01-01T00:00:00+00:00"}': ["r", "u", "d"],
            '{"id":10}': ["c", "u", "d"],
            "order-7": [None],
        }
        assert all(len({p for p, _, _ in seen}) == 1 for seen in by_key.values())
        k.create_topic("java")
        assert java_partitions(k, "java", list(by_key)) == {
            key: seen[0][0] for key, seen in by_key.items()}
    finally:
        s.execute("RESET TimeZone")
        s.execute("SELECT emit.drop_capture(name) FROM emit.capture_definitions WHERE name = 'keyed'")
        s.execute("DROP TABLE IF EXISTS k_rows, k_captured")
        s.execute("DROP PUBLICATION IF EXISTS k_pub")
        s.execute("SELECT emit.drop_destination(name) FROM emit.stored_destinations "
                  "WHERE name = 'keyed'")
        k.close()


def test_tables_option_shapes_a_captures_events_and_keys(s):
    """The option tables: per table, the columns events carry (columns,
    exclude, in the order given) and the columns that key them (key),
    for the snapshot's READ events as for captured changes; seen through
    Kafka record keys, which are the key columns. A key coarser than the
    primary key puts rows of one tenant in one partition, in commit
    order; a table with REPLICA IDENTITY FULL, whose events are otherwise
    not keyed, gets a key."""
    from receivers import KafkaServer

    k = KafkaServer()
    try:
        k.create_topic("shaped")
        s.execute("SELECT emit.create_destination('shaped', %s, %s)",
                  (f"kafka://127.0.0.1:{k.port}/shaped", json.dumps({"record_key": "columns"})))
        s.execute("CREATE TABLE k_tenants (tenant text, id int, secret text, note text, "
                  "PRIMARY KEY (tenant, id))")
        s.execute("CREATE TABLE k_full (id int PRIMARY KEY, v text)")
        s.execute("ALTER TABLE k_full REPLICA IDENTITY FULL")
        s.execute("INSERT INTO k_tenants VALUES ('a', 1, 's1', 'n1')")
        s.execute("INSERT INTO k_full VALUES (1, 'x')")
        s.execute("CREATE PUBLICATION k_shape_pub FOR TABLE k_tenants, k_full")
        s.execute("SELECT emit.create_capture('shaped', 'shaped', 'k_shape_pub', %s)", (json.dumps({
            "snapshot": True,
            "tables": {"k_tenants": {"exclude": ["secret"], "key": "tenant"},
                       "public.k_full": {"columns": "v,id", "key": ["id"]}}}),))
        assert s.one("SELECT options->'tables' FROM emit.captures WHERE name = 'shaped'") == [
            {"relid": s.one("SELECT 'k_tenants'::regclass::oid"), "table": "public.k_tenants",
             "key": ["tenant"], "exclude": ["secret"], "attnums": {"secret": 3, "tenant": 1}},
            {"relid": s.one("SELECT 'k_full'::regclass::oid"), "table": "public.k_full",
             "key": ["id"], "columns": ["v", "id"], "attnums": {"v": 2, "id": 1}}]
        s.execute("INSERT INTO k_tenants VALUES ('a', 2, 's2', 'n2')")
        s.execute("UPDATE k_tenants SET note = 'n2b' WHERE id = 2")
        s.execute("DELETE FROM k_tenants WHERE id = 1")
        # Renamed, an excluded column stays excluded.
        s.execute("ALTER TABLE k_tenants RENAME COLUMN secret TO hidden")
        s.execute("INSERT INTO k_tenants VALUES ('a', 3, 's3', 'n3')")
        s.execute("UPDATE k_full SET v = 'y'")
        s.execute("DELETE FROM k_full")
        recs = sorted(k.records("shaped", 8), key=lambda r: (r["partition"], r["offset"]))
        assert len(recs) == 8
        tenants = [r for r in recs if r["value"]["table"] == "k_tenants"]
        full = [r for r in recs if r["value"]["table"] == "k_full"]
        # One key for the tenant's rows: one partition, in commit order.
        assert {r["key"] for r in tenants} == {'{"tenant":"a"}'}
        assert len({r["partition"] for r in tenants}) == 1
        assert [(e["op"], e["new"], e["old"]) for e in (r["value"] for r in tenants)] == [
            ("READ", {"tenant": "a", "id": 1, "note": "n1"}, None),
            ("INSERT", {"tenant": "a", "id": 2, "note": "n2"}, None),
            ("UPDATE", {"tenant": "a", "id": 2, "note": "n2b"}, None),
            ("DELETE", None, {"tenant": "a", "id": 1}),
            ("INSERT", {"tenant": "a", "id": 3, "note": "n3"}, None),
        ]
        assert {r["key"] for r in full} == {'{"id":1}'}
        assert [(e["op"], list((e["new"] or e["old"]).items())) for e in (r["value"] for r in full)] == [
            ("READ", [("v", "x"), ("id", 1)]),
            ("UPDATE", [("v", "y"), ("id", 1)]),
            ("DELETE", [("v", "y"), ("id", 1)]),
        ]
        # A backfill takes the same options, and keys the same way.
        s.execute("SELECT emit.backfill('k_tenants', 'shaped', %s)",
                  (json.dumps({"exclude": "hidden", "key": "tenant"}),))
        same = [r for r in k.records("shaped", 10) if r["partition"] == tenants[0]["partition"]]
        again = sorted(same, key=lambda r: r["offset"])[-2:]
        assert {r["key"] for r in again} == {'{"tenant":"a"}'}
        assert [(r["value"]["op"], r["value"]["new"]) for r in again] == [
            ("READ", {"tenant": "a", "id": 2, "note": "n2b"}),
            ("READ", {"tenant": "a", "id": 3, "note": "n3"})]
    finally:
        s.execute("SELECT emit.drop_capture(name) FROM emit.capture_definitions WHERE name = 'shaped'")
        s.execute("DROP TABLE IF EXISTS k_tenants, k_full")
        s.execute("DROP PUBLICATION IF EXISTS k_shape_pub")
        s.execute("SELECT emit.drop_destination(name) FROM emit.stored_destinations "
                  "WHERE name = 'shaped'")
        k.close()


def test_a_failover_slot_carries_the_capture_over_to_a_promoted_standby(s):
    """{"failover": true} (PostgreSQL 17 on): the capture's slot is one a
    standby with sync_replication_slots keeps a copy of. The primary is
    killed, the standby promoted, and the capture goes on there from the
    copy: a change made after the promotion arrives, and none before it is
    lost. Before 17 the option is refused."""
    from pgcluster import BIN

    if int(s.one("SHOW server_version_num")) < 170000:
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="failover slots need PostgreSQL 17"):
            s.execute("SELECT emit.create_capture('fo', 'tcp://127.0.0.1:9', 'nope', "
                      "'{\"failover\": true}')")
        return
    conf = {"shared_preload_libraries": "'pg_emit'", "wal_level": "logical",
            "max_replication_slots": "10", "max_wal_senders": "10", "hot_standby_feedback": "on"}
    primary = Cluster("pg_emit-fo-primary", port=54351, conf=conf).init().start()
    standby = Cluster("pg_emit-fo-standby", port=54352, conf=conf)
    rx = Receiver("ndjson")
    try:
        with primary.connect() as c:
            c.execute("CREATE EXTENSION pg_emit")
            c.execute("SELECT pg_catalog.pg_create_physical_replication_slot('standby1', true)")
            c.execute("CREATE TABLE fo (id int PRIMARY KEY)")
            c.execute("CREATE PUBLICATION fo_pub FOR TABLE fo")
            c.execute("SELECT emit.create_capture('fo', %s, 'fo_pub', '{\"failover\": true}')", (url(rx),))
            slot = c.execute("SELECT slot FROM emit.captures").fetchone()[0]
            assert c.execute("SELECT failover FROM pg_replication_slots WHERE slot_name = %s",
                             (slot,)).fetchone()[0] is True
            c.execute("INSERT INTO fo VALUES (1)")
            assert len(rx.wait_for(1, timeout=20)) == 1
        primary.run(f"{BIN}/pg_basebackup", "-h", primary.sock, "-p", str(primary.port), "-U", "postgres",
                    "-D", standby.data, "-X", "stream")
        standby.set_conf(
            primary_conninfo=f"'host={primary.sock} port={primary.port} user=postgres dbname=postgres'",
            primary_slot_name="'standby1'", sync_replication_slots="on")
        primary.run("touch", f"{standby.data}/standby.signal")
        standby.start()
        with primary.connect() as c:
            c.execute("INSERT INTO fo VALUES (2)")
            assert len(rx.wait_for(2, timeout=20)) == 2

            def synced():
                at = c.execute("SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = %s",
                               (slot,)).fetchone()[0]
                with standby.connect() as sc:
                    row = sc.execute("SELECT synced, confirmed_flush_lsn >= %s::pg_lsn FROM "
                                     "pg_replication_slots WHERE slot_name = %s", (at, slot)).fetchone()
                return row == (True, True)
            # The standby's slot sync worker copies it (every few seconds).
            assert wait_until(synced, 60, every=0.5), standby.tail_log()
        # The primary fails; the standby takes over, and the capture with it.
        assert primary.stop("immediate").returncode == 0
        standby.run(f"{BIN}/pg_ctl", "-D", standby.data, "-w", "promote")
        with standby.connect() as c:
            c.execute("INSERT INTO fo VALUES (3)")
        got = events(rx.wait_for(3, timeout=40))
        assert got[-1]["new"] == {"id": 3}, standby.tail_log()
        assert sorted({e["new"]["id"] for e in got}) == [1, 2, 3]
    finally:
        rx.close()
        standby.destroy()
        primary.destroy()


def test_wal_level_logical_is_required(db):
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="wal_level = logical"):
        db.execute("SELECT emit.create_capture('x', 'tcp://127.0.0.1:9', 'p')")


class PeakMemory:
    """The highest private memory (RssAnon, MB) a process reaches while
    the `with` block runs, sampled every 20 ms (shared buffers it touches
    are not counted)."""

    def __init__(self, pid):
        self.pid, self.peak, self.stop = pid, 0.0, False

    def sample(self):
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon"):
                    self.peak = max(self.peak, int(line.split()[1]) / 1024)

    def __enter__(self):
        import threading

        def run():
            while not self.stop:
                self.sample()
                time.sleep(0.02)
        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()


def test_a_large_transaction_and_a_large_backfill_hold_a_batch_not_every_row(s, wal):
    """100,000 rows of 1.8 kB (180 MB): capturing them in one transaction
    and backfilling them each keep memory to a batch of rows (and, while
    decoding, PostgreSQL's logical_decoding_work_mem), not the whole: both
    held a copy of every row until they ended. The destination is down, so
    the worker's delivery costs nothing beside."""
    rows = 100_000
    port = free_port()
    dest = f"tcp://127.0.0.1:{port}?framing=ndjson"
    s.execute("CREATE TABLE c_wide (id int PRIMARY KEY, v text)")
    s.execute("CREATE PUBLICATION c_wide_pub FOR TABLE c_wide")
    try:
        s.execute("SELECT emit.create_capture('wide', %s, 'c_wide_pub')", (dest,))
        queued = lambda: s.one("SELECT coalesce(sum(events), 0) FROM emit.outbox WHERE port = %s", (port,))
        worker = s.one("SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_emit worker' "
                       "AND datname = current_database()")
        with PeakMemory(worker) as captured:
            s.execute("INSERT INTO c_wide SELECT g, repeat(chr(65 + g %% 26), 1800) "
                      "FROM generate_series(1, %s) g", (rows,))
            wait_until(lambda: queued() == rows, timeout=300, every=0.5)
        s.execute("SELECT emit.drop_capture('wide')")
        s.execute("DELETE FROM emit.outbox WHERE port = %s", (port,))
        with wal.connect(DB) as c:
            pid = c.execute("SELECT pg_backend_pid()").fetchone()[0]
            with PeakMemory(pid) as backfilled:
                assert c.execute("SELECT emit.backfill('c_wide', %s)", (dest,)).fetchone()[0] == rows
        assert queued() == rows
        # 72 MB and 55 MB here; 230 MB and 422 MB before.
        assert captured.peak < 140, captured.peak
        assert backfilled.peak < 140, backfilled.peak
    finally:
        s.execute("DELETE FROM emit.outbox WHERE port = %s", (port,))
        s.execute("DROP PUBLICATION IF EXISTS c_wide_pub")
        s.execute("DROP TABLE IF EXISTS c_wide")


def test_a_backfill_in_parts_resumes_after_the_last_committed_part(s, wal):
    """`limit` and `resume`: a table backfilled in parts, each in a
    transaction of its own (a DO loop that commits after each), in key
    order; a part that rolled back is read again, a row changed between
    parts is read as it then is, and a finished backfill resumes to 0."""
    rx = Receiver("ndjson")
    dest = url(rx)
    s.execute("CREATE TABLE c_parts (tenant text, id int, v int, PRIMARY KEY (tenant, id))")
    s.execute("INSERT INTO c_parts SELECT t, g, g FROM unnest(ARRAY['b', 'a']) t, generate_series(1, 13) g")
    part = lambda opts: s.one("SELECT emit.backfill('c_parts', %s, %s)", (dest, json.dumps(opts)))
    try:
        assert part({"limit": 10}) == 10
        s.execute("BEGIN")
        assert part({"limit": 10, "resume": True}) == 10
        s.execute("ROLLBACK")
        # Between parts: a row of a later part changes, another goes.
        s.execute("UPDATE c_parts SET v = -1 WHERE tenant = 'b' AND id = 1")
        s.execute("DELETE FROM c_parts WHERE tenant = 'a' AND id = 13")
        s.execute("""DO $$ BEGIN
                       WHILE emit.backfill('c_parts', '%s', '{"limit": 10, "resume": true}') = 10 LOOP
                         COMMIT;
                       END LOOP;
                     END $$""" % dest)
        assert part({"limit": 10, "resume": True}) == 0
        got = events(rx.wait_for(25, timeout=30))
        time.sleep(0.5)
        assert len(rx.messages) == 25
        keys = [(e["new"]["tenant"], e["new"]["id"]) for e in got]
        assert keys == sorted((t, i) for t in "ab" for i in range(1, 14) if (t, i) != ("a", 13))
        assert {e["op"] for e in got} == {"READ"}
        assert got[keys.index(("b", 1))]["new"] == {"tenant": "b", "id": 1, "v": -1}
        # Without resume, a part starts again from the first row.
        assert part({"limit": 3}) == 3
        assert events(rx.wait_for(28, timeout=30))[-3]["new"]["id"] == 1
        # An emit_admin goes on with it (where it stands is written as the
        # extension's owner).
        s.execute("DROP ROLE IF EXISTS c_admin4")
        s.execute("CREATE ROLE c_admin4 IN ROLE emit_admin")
        s.execute("GRANT SELECT ON c_parts TO c_admin4")
        s.execute("SET ROLE c_admin4")
        assert part({"limit": 3, "resume": True}) == 3
        s.execute("RESET ROLE")
        assert [e["new"]["id"] for e in events(rx.wait_for(31, timeout=30))[-3:]] == [4, 5, 6]
        # Two parts at once: the second waits for the first to commit, then
        # goes on after it.
        import threading
        s.execute("BEGIN")
        assert part({"limit": 2, "resume": True}) == 2
        other = []

        def second():
            with wal.connect(DB) as c:
                other.append(c.execute("SELECT emit.backfill('c_parts', %s, %s)",
                                       (dest, '{"limit": 2, "resume": true}')).fetchone()[0])
        th = threading.Thread(target=second)
        th.start()
        time.sleep(0.5)
        assert other == []
        s.execute("COMMIT")
        th.join(10)
        assert other == [2]
        assert [e["new"]["id"] for e in events(rx.wait_for(35, timeout=30))[-4:]] == [7, 8, 9, 10]
        # Resuming after the primary key changed would skip or repeat rows.
        s.execute("ALTER TABLE c_parts DROP CONSTRAINT c_parts_pkey, ADD PRIMARY KEY (id, tenant)")
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="primary key of public.c_parts changed"):
            part({"limit": 3, "resume": True})
        for opts, why in [({"limit": 0}, "limit 0 is not a positive integer"),
                          ({"limit": "5"}, 'limit "5" is not a positive integer'),
                          ({"resume": "yes"}, 'resume "yes" is not true or false')]:
            with pytest.raises(psycopg.errors.InvalidParameterValue, match=why):
                part(opts)
        # Only the extension's owner reads or writes where backfills stand.
        assert s.one("SELECT has_table_privilege('emit_admin', 'emit.backfill_progress', 'SELECT')") is False
    finally:
        rx.close()
        s.execute("RESET ROLE")
        s.execute("DROP TABLE IF EXISTS c_parts")
        s.execute("DROP ROLE IF EXISTS c_admin4")


def test_a_partitioned_table_published_via_its_root_is_snapshotted_under_its_name(s, wal):
    """With publish_via_partition_root, changes come under the partitioned
    table's name and key: so does its snapshot, locking every partition
    (a write straight into one waits for it). Before, the snapshot refused
    the partitioned table and the capture could not be made. And a
    create_capture that rolled back leaves its slot, which a retry takes
    the place of."""
    port = free_port()
    dest = f"tcp://127.0.0.1:{port}?framing=ndjson"
    s.execute("CREATE TABLE c_m (id int, region text, v int, PRIMARY KEY (region, id)) "
              "PARTITION BY LIST (region)")
    s.execute("CREATE TABLE c_m_eu PARTITION OF c_m FOR VALUES IN ('eu')")
    s.execute("CREATE TABLE c_m_us PARTITION OF c_m FOR VALUES IN ('us')")
    s.execute("INSERT INTO c_m VALUES (2, 'us', 2), (1, 'eu', 1)")
    s.execute("CREATE PUBLICATION c_m_pub FOR TABLE c_m WITH (publish_via_partition_root = true)")
    rows = lambda: s.execute("SELECT events, keys, payload FROM emit.outbox WHERE port = %s ORDER BY id",
                             (port,)).fetchall()
    db = s.one("SELECT oid FROM pg_database WHERE datname = current_database()")
    slots = lambda: s.one("SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", (f"pg_emit_{db}_m",))
    try:
        # The snapshot locks every partition: it waits for a writer of
        # one, here until its lock_timeout fails the capture. (A writer's
        # lock without an xid yet: making the slot waits for transactions
        # that have one.)
        with wal.connect(DB, autocommit=False) as w:
            w.execute("LOCK TABLE c_m_us IN ROW EXCLUSIVE MODE")
            s.execute("SET lock_timeout = '300ms'")
            with pytest.raises(psycopg.errors.LockNotAvailable):
                s.execute("SELECT emit.create_capture('m', %s, 'c_m_pub', '{\"snapshot\": true}')", (dest,))
            s.execute("RESET lock_timeout")
            w.rollback()
        assert rows() == []
        # The slot it made outlived its failure: a retry takes its place.
        assert slots() == 1
        s.execute("SELECT emit.create_capture('m', %s, 'c_m_pub', '{\"snapshot\": true}')", (dest,))
        assert slots() == 1 and slot_of(s, "m") == f"pg_emit_{db}_m"
        s.execute("UPDATE c_m SET v = 10 WHERE region = 'eu' AND id = 1")
        wait_until(lambda: len(rows()) == 2, timeout=20)
        (n_read, read_keys, reads), (n_upd, upd_keys, update) = rows()
        assert (n_read, n_upd) == (2, 1)
        reads, update = events(reads.splitlines()), events(update.splitlines())
        assert [(e["op"], e["table"], e["new"]["region"]) for e in reads] == [
            ("READ", "c_m", "eu"), ("READ", "c_m", "us")]
        assert (update[0]["op"], update[0]["table"]) == ("UPDATE", "c_m")
        # The row's READ and its later change share a key: one order.
        assert upd_keys[0] == read_keys[0] and read_keys[0] != read_keys[1]
    finally:
        s.execute("RESET lock_timeout")
        s.execute("DELETE FROM emit.outbox WHERE port = %s", (port,))
        for (name,) in s.execute("SELECT name FROM emit.capture_definitions").fetchall():
            s.execute("SELECT emit.drop_capture(%s)", (name,))
        s.execute("DROP PUBLICATION IF EXISTS c_m_pub")
        s.execute("DROP TABLE IF EXISTS c_m")


def test_a_backfill_in_parts_resumes_at_the_same_row_whatever_the_settings(s, wal):
    """The key a part resumes after is written and read back with fixed
    settings: a part from a session with float8 keys written to one digit
    (extra_float_digits = -15) and dates as day/month is resumed by a
    session with the defaults at the next row, neither repeating nor
    skipping one. A key column whose type changed is refused."""
    rx = Receiver("ndjson")
    dest = url(rx)
    s.execute("CREATE TABLE c_fk (x float8, d date, PRIMARY KEY (x, d))")
    s.execute("INSERT INTO c_fk SELECT 1 + g / 3.0, date '2024-01-02' + g FROM generate_series(1, 9) g")
    try:
        s.execute("SET extra_float_digits = -15")
        s.execute("SET DateStyle = 'SQL, DMY'")
        assert s.one("SELECT emit.backfill('c_fk', %s, '{\"limit\": 4}')", (dest,)) == 4
        s.execute("RESET extra_float_digits")
        s.execute("RESET DateStyle")
        with wal.connect(DB) as c:
            c.execute("SET DateStyle = 'ISO, MDY'")
            assert c.execute("SELECT emit.backfill('c_fk', %s, '{\"limit\": 100, \"resume\": true}')",
                             (dest,)).fetchone()[0] == 5
        got = events(rx.wait_for(9, timeout=30))
        time.sleep(0.3)
        assert len(rx.messages) == 9
        assert [e["new"]["d"] for e in got] == [f"2024-01-{3 + g:02d}" for g in range(9)]
        # The key's type changed between parts: its order may have too.
        assert s.one("SELECT emit.backfill('c_fk', %s, '{\"limit\": 2}')", (dest,)) == 2
        s.execute("ALTER TABLE c_fk ALTER COLUMN d TYPE timestamp")
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="changed since the last part"):
            s.execute("SELECT emit.backfill('c_fk', %s, '{\"limit\": 2, \"resume\": true}')", (dest,))
        # A key type with its own order (citext: case-insensitive, where
        # "B" comes after "_x", which text in "C" puts before it).
        s.execute("CREATE EXTENSION IF NOT EXISTS citext")
        s.execute('CREATE TABLE c_ci (k citext COLLATE "C" PRIMARY KEY)')
        s.execute("INSERT INTO c_ci VALUES ('B'), ('_x'), ('a')")
        assert s.one("SELECT emit.backfill('c_ci', %s, '{\"limit\": 1}')", (dest,)) == 1
        assert s.one("SELECT emit.backfill('c_ci', %s, '{\"limit\": 5, \"resume\": true}')", (dest,)) == 2
        assert [e["new"]["k"] for e in events(rx.wait_for(14, timeout=30))[-3:]] == ["_x", "a", "B"]
    finally:
        rx.close()
        s.execute("RESET ALL")
        s.execute("DROP TABLE IF EXISTS c_fk, c_ci")
        s.execute("DROP EXTENSION IF EXISTS citext")
