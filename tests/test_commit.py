"""delivery=commit: held until COMMIT, nothing for rolled-back work."""

import json
import threading
import time

import psycopg
import pytest

from conftest import wait_running
from receivers import Receiver, Stalled, free_port


@pytest.fixture
def rx():
    r = Receiver("eof")
    yield r
    r.close()


def ids(msgs):
    return [json.loads(m)["new"]["id"] for m in msgs]


def attach(db, table, port, *opts):
    extra = "".join(f", '{o}'" for o in opts)
    db.execute(f"CREATE TABLE IF NOT EXISTS {table} (id int primary key, v text)")
    db.execute(
        f"CREATE TRIGGER out AFTER INSERT OR UPDATE ON {table} FOR EACH ROW "
        f"EXECUTE FUNCTION row_to_socket('127.0.0.1', {port}, 'delivery=commit'{extra})"
    )


def test_nothing_before_commit_everything_at_commit(db, table, rx):
    attach(db, table, rx.port)
    db.execute("BEGIN")
    db.execute(f"INSERT INTO {table} SELECT g, 'x' FROM generate_series(1, 3) g")
    assert rx.wait_for(1, timeout=0.3) == []
    db.execute("COMMIT")
    # Sent before COMMIT returned: no waiting needed beyond the receiver's read.
    assert ids(rx.wait_for(3, timeout=2)) == [1, 2, 3]


def test_rollback_sends_nothing(db, table, rx):
    attach(db, table, rx.port)
    db.execute("BEGIN")
    db.execute(f"INSERT INTO {table} VALUES (1, 'x')")
    db.execute("ROLLBACK")
    db.execute(f"INSERT INTO {table} VALUES (2, 'y')")  # autocommit: sent
    assert ids(rx.wait_for(2, timeout=1)) == [2]


def test_savepoint_rollback_sends_nothing_for_undone_work(db, table, rx):
    attach(db, table, rx.port)
    db.execute("BEGIN")
    db.execute(f"INSERT INTO {table} VALUES (1, 'kept')")
    db.execute("SAVEPOINT a")
    db.execute(f"INSERT INTO {table} VALUES (2, 'undone')")
    db.execute("SAVEPOINT b")
    db.execute(f"INSERT INTO {table} VALUES (3, 'undone with a')")
    db.execute("RELEASE SAVEPOINT b")
    db.execute("ROLLBACK TO SAVEPOINT a")
    db.execute(f"INSERT INTO {table} VALUES (4, 'kept')")
    db.execute("SAVEPOINT c")
    db.execute(f"INSERT INTO {table} VALUES (5, 'released')")
    db.execute("RELEASE SAVEPOINT c")
    db.execute("COMMIT")
    assert ids(rx.wait_for(4, timeout=1)) == [1, 4, 5]


def test_exception_block_undoes_its_events(db, table, rx):
    attach(db, table, rx.port)
    db.execute(
        f"""DO $$
        BEGIN
          FOR i IN 1..6 LOOP
            BEGIN
              INSERT INTO {table} VALUES (i, 'x');
              IF i % 2 = 0 THEN RAISE EXCEPTION 'undo %', i; END IF;
            EXCEPTION WHEN raise_exception THEN NULL;
            END;
          END LOOP;
        END $$"""
    )
    assert ids(rx.wait_for(4, timeout=1)) == [1, 3, 5]


def test_receiver_down_commit_succeeds_with_one_warning(db, table):
    attach(db, table, free_port())
    db.execute("BEGIN")
    db.execute(f"INSERT INTO {table} SELECT g, 'x' FROM generate_series(1, 50) g")
    db.execute("COMMIT")
    assert db.one(f"SELECT count(*) FROM {table}") == 50
    w = db.warnings()
    assert len(w) == 1, w
    assert "50 of 50 delivery=commit event(s)" in w[0] and "connection refused" in w[0]


def test_buffer_limit_is_a_clean_error(db, table, rx):
    attach(db, table, rx.port)
    db.execute("SET pg_emit.commit_buffer_size = '64kB'")
    with pytest.raises(psycopg.errors.ProgramLimitExceeded) as e:
        db.execute(f"INSERT INTO {table} SELECT g, repeat('x', 100) FROM generate_series(1, 10000) g")
    assert "pg_emit.commit_buffer_size" in str(e.value) and "delivery=async" in e.value.diag.message_hint
    assert db.one(f"SELECT count(*) FROM {table}") == 0
    assert rx.wait_for(1, timeout=0.3) == []


def test_prepare_transaction_is_refused(db, table, rx):
    attach(db, table, rx.port)
    db.execute("BEGIN")
    db.execute(f"INSERT INTO {table} VALUES (1, 'x')")
    with pytest.raises(psycopg.errors.FeatureNotSupported) as e:
        db.execute("PREPARE TRANSACTION 'pg_emit_test'")
    assert "delivery=commit" in str(e.value)
    db.execute("ROLLBACK")
    assert db.one(f"SELECT count(*) FROM {table}") == 0


def test_ndjson_in_commit_mode_uses_one_connection(db, table):
    nd = Receiver("ndjson")
    try:
        attach(db, table, nd.port, "framing=ndjson")
        db.execute(f"INSERT INTO {table} SELECT g, 'x' FROM generate_series(1, 200) g")
        assert ids(nd.wait_for(200)) == list(range(1, 201))
        assert nd.connections == 1
    finally:
        nd.close()


def test_default_delivery_setting(db, table, rx):
    db.execute(f"CREATE TABLE {table} (id int primary key)")
    db.execute(
        f"CREATE TRIGGER out AFTER INSERT ON {table} FOR EACH ROW "
        f"EXECUTE FUNCTION row_to_socket('127.0.0.1', {rx.port})"
    )
    db.execute("SET pg_emit.default_delivery = 'commit'")
    db.execute("BEGIN")
    db.execute(f"INSERT INTO {table} VALUES (1)")
    assert rx.wait_for(1, timeout=0.3) == []
    db.execute("ROLLBACK")
    db.execute("SET pg_emit.default_delivery = 'sync'")
    db.execute("BEGIN")
    db.execute(f"INSERT INTO {table} VALUES (2)")
    assert ids(rx.wait_for(1, timeout=1)) == [2]  # before COMMIT: sync
    db.execute("ROLLBACK")


def test_locks_are_released_before_sending(cluster, db, table):
    """A hanging receiver delays the committing session's COMMIT reply,
    not other sessions waiting for its row locks."""
    stalled = Stalled()
    try:
        db.execute(f"CREATE TABLE {table} (id int primary key, v text)")
        db.execute(f"INSERT INTO {table} VALUES (1, 'a')")
        attach(db, table, stalled.port)
        db.execute("SET pg_emit.connect_timeout = '3s'")
        pid = db.one("SELECT pg_backend_pid()")
        db.execute("BEGIN")
        db.execute(f"UPDATE {table} SET v = 'b' WHERE id = 1")
        done = {}

        def commit():
            t = time.monotonic()
            db.execute("COMMIT")
            done["commit"] = time.monotonic() - t

        th = threading.Thread(target=commit)
        th.start()
        wait_running(cluster, pid, "COMMIT")
        with cluster.connect("emit_test") as other:
            other.execute("SET lock_timeout = '1s'")
            t = time.monotonic()
            # Takes the row lock the committing session held, without
            # firing the trigger itself.
            assert other.execute(f"SELECT v FROM {table} WHERE id = 1 FOR UPDATE").fetchone() == ("b",)
            waited = time.monotonic() - t
        th.join(10)
        # lock_timeout (1 s) would have raised had it waited for the COMMIT.
        assert waited < 1.0, waited
        assert done["commit"] > 2.0  # the COMMIT itself did wait on the receiver
    finally:
        stalled.close()


def test_cancel_stops_sending_after_commit(cluster, db, table):
    stalled = Stalled()
    try:
        attach(db, table, stalled.port)
        db.execute("SET pg_emit.connect_timeout = '60s'")
        pid = db.one("SELECT pg_backend_pid()")
        db.execute("BEGIN")
        db.execute(f"INSERT INTO {table} VALUES (1, 'x')")
        done = {}

        def commit():
            db.execute("COMMIT")
            done["ok"] = True

        th = threading.Thread(target=commit)
        th.start()
        wait_running(cluster, pid, "COMMIT")
        t = time.monotonic()
        with cluster.connect("emit_test") as other:
            other.execute("SELECT pg_cancel_backend(%s)", (pid,))
        th.join(20)
        assert done.get("ok") and time.monotonic() - t < 15.0  # not the 60 s connect timeout
        assert db.one(f"SELECT count(*) FROM {table}") == 1  # committed all the same
        assert "1 of 1 delivery=commit event(s)" in db.warnings()[-1]
    finally:
        stalled.close()


def test_statement_timeout_bounds_sending_after_commit(db, table):
    """PostgreSQL switches statement_timeout off before COMMIT runs; 0.1.0
    then waited the whole connect timeout (here 60 s) after the commit."""
    stalled = Stalled()
    try:
        attach(db, table, stalled.port)
        db.execute("SET pg_emit.connect_timeout = '60s'")
        db.execute("SET statement_timeout = '1s'")
        db.execute("BEGIN")
        db.execute(f"INSERT INTO {table} VALUES (1, 'x')")
        t = time.monotonic()
        db.execute("COMMIT")
        assert time.monotonic() - t < 15.0  # not the 60 s connect timeout
        assert db.one(f"SELECT count(*) FROM {table}") == 1
        assert "statement_timeout" in db.warnings()[-1]
    finally:
        db.execute("RESET statement_timeout")
        stalled.close()
