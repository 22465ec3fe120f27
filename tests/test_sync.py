"""Sync delivery against a live cluster and real loopback receivers."""

import json
import os
import threading
import time
from decimal import Decimal

import psycopg
import pytest

from conftest import wait_running
from receivers import Receiver, Sink, Stalled, free_port


@pytest.fixture
def rx():
    r = Receiver("eof")
    yield r
    r.close()


def loads(msg):
    return json.loads(msg, parse_float=Decimal)


# --- the seed recipe -------------------------------------------------------


def test_seed_recipe_insert_update_delete(db, table, rx):
    db.execute(f"CREATE TABLE {table} (id int primary key, total numeric(6,2))")
    db.execute(
        f"CREATE TRIGGER out AFTER INSERT OR UPDATE OR DELETE ON {table} "
        f"FOR EACH ROW EXECUTE PROCEDURE row_to_socket('127.0.0.1', {rx.port})"
    )
    db.execute(f"INSERT INTO {table} VALUES (1, 7.00)")
    db.execute(f"UPDATE {table} SET total = 9.50 WHERE id = 1")
    db.execute(f"DELETE FROM {table} WHERE id = 1")
    msgs = rx.wait_for(3)
    assert msgs == [
        f'{{"op":"INSERT","schema":"public","table":"{table}","new":{{"id":1,"total":7.00}},"old":null}}'.encode(),
        f'{{"op":"UPDATE","schema":"public","table":"{table}","new":{{"id":1,"total":9.50}},"old":{{"id":1,"total":7.00}}}}'.encode(),
        f'{{"op":"DELETE","schema":"public","table":"{table}","new":null,"old":{{"id":1,"total":9.50}}}}'.encode(),
    ]
    assert rx.connections == 3  # default framing: one connection per message
    assert db.warnings() == []


def test_every_type_family_matches_row_to_json(db, table, rx):
    db.execute("DROP TYPE IF EXISTS emit_pair CASCADE")
    db.execute("DROP DOMAIN IF EXISTS emit_posint CASCADE")
    db.execute("CREATE TYPE emit_pair AS (a int, b text)")
    db.execute("CREATE DOMAIN emit_posint AS int CHECK (VALUE > 0)")
    db.execute(
        f"""CREATE TABLE {table} (
            i int, big bigint, n numeric, f float8, t text, b bool,
            j json, jb jsonb, arr int[], tarr text[], ts timestamptz,
            d date, by bytea, nul text, comp emit_pair, dom emit_posint,
            u uuid, iv interval)"""
    )
    db.execute(
        f"CREATE TRIGGER out AFTER INSERT ON {table} "
        f"FOR EACH ROW EXECUTE FUNCTION row_to_socket('127.0.0.1', {rx.port})"
    )
    db.execute("SET timezone = 'UTC'")
    db.execute(
        f"""INSERT INTO {table} VALUES (
            -42, 9007199254740993, 12345678901234567890.000000001, 1.5e300,
            E'quote " backslash \\\\ newline \\n tab \\t unicode \u00e9\u4e2d\U0001F600',
            true, '{{"a" : [1, 2]}}', '{{"b": {{"c": null}}}}', ARRAY[1,NULL,3],
            ARRAY['x,y', 'z"'], '2026-11-20 12:34:56.789+02', '2026-11-20',
            '\\x00ff10', NULL, ROW(1, 'p'), 7,
            'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '1 day 2 hours')"""
    )
    raw = rx.wait_for(1)[0]
    expected = db.one(f"SELECT row_to_json(x)::text FROM {table} x")
    ev = loads(raw)
    assert ev["op"] == "INSERT" and ev["old"] is None
    # Byte for byte what PostgreSQL's row_to_json gives.
    assert raw.decode().endswith(f',"new":{expected},"old":null}}')
    new = ev["new"]
    assert new["i"] == -42 and new["big"] == 9007199254740993
    assert new["n"] == Decimal("12345678901234567890.000000001")
    assert new["f"] == Decimal("1.5e+300")
    assert new["t"] == 'quote " backslash \\ newline \n tab \t unicode \u00e9\u4e2d\U0001F600'
    assert new["b"] is True and new["nul"] is None
    assert new["j"] == {"a": [1, 2]} and new["jb"] == {"b": {"c": None}}
    assert new["arr"] == [1, None, 3] and new["tarr"] == ["x,y", 'z"']
    assert new["ts"] == "2026-11-20T10:34:56.789+00:00"
    assert new["d"] == "2026-11-20" and new["by"] == "\\x00ff10"
    assert new["comp"] == {"a": 1, "b": "p"} and new["dom"] == 7
    assert new["u"] == "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"


@pytest.mark.parametrize("mb", [1, 4])
def test_large_toasted_row_is_sent_whole(db, table, rx, mb):
    db.execute(f"CREATE TABLE {table} (id int, payload text)")
    db.execute(f"ALTER TABLE {table} ALTER payload SET STORAGE EXTERNAL")
    db.execute(
        f"CREATE TRIGGER out AFTER INSERT OR UPDATE ON {table} "
        f"FOR EACH ROW EXECUTE FUNCTION row_to_socket('127.0.0.1', {rx.port})"
    )
    payload = os.urandom(mb << 19).hex()  # mb MiB of text
    db.execute(f"INSERT INTO {table} VALUES (1, %s)", (payload,))
    # UPDATE of another column: the old and new payload are TOAST pointers.
    db.execute(f"UPDATE {table} SET id = 2")
    msgs = rx.wait_for(2)
    assert len(msgs) == 2
    assert loads(msgs[0])["new"]["payload"] == payload
    upd = loads(msgs[1])
    assert upd["new"]["payload"] == payload and upd["old"]["payload"] == payload
    # The value really lived out of line, in the TOAST table.
    assert db.one(
        "SELECT pg_relation_size(reltoastrelid) FROM pg_class WHERE relname = %s", (table,)
    ) >= mb << 20


def test_before_triggers_keep_the_row(db, table, rx):
    db.execute(f"CREATE TABLE {table} (id int, v text)")
    db.execute(
        f"CREATE TRIGGER out BEFORE INSERT OR UPDATE OR DELETE ON {table} "
        f"FOR EACH ROW EXECUTE FUNCTION row_to_socket('127.0.0.1', {rx.port}, 'format=td')"
    )
    db.execute(f"INSERT INTO {table} VALUES (1, 'a'), (2, 'b')")
    db.execute(f"UPDATE {table} SET v = 'c' WHERE id = 1")
    assert db.one(f"SELECT string_agg(v, ',' ORDER BY id) FROM {table}") == "c,b"
    db.execute(f"DELETE FROM {table} WHERE id = 2")
    assert db.one(f"SELECT count(*) FROM {table}") == 1
    events = [loads(m) for m in rx.wait_for(4)]
    assert [(e["event"], e["when"]) for e in events] == [
        ("INSERT", "BEFORE"), ("INSERT", "BEFORE"), ("UPDATE", "BEFORE"), ("DELETE", "BEFORE"),
    ]


def test_truncate_is_sent_at_statement_level(db, table, rx):
    db.execute(f"CREATE TABLE {table} (id int)")
    db.execute(
        f"CREATE TRIGGER out AFTER TRUNCATE ON {table} "
        f"FOR EACH STATEMENT EXECUTE FUNCTION row_to_socket('127.0.0.1', {rx.port})"
    )
    db.execute(f"INSERT INTO {table} VALUES (1)")
    db.execute(f"TRUNCATE {table}")
    assert rx.wait_for(1) == [
        f'{{"op":"TRUNCATE","schema":"public","table":"{table}","new":null,"old":null}}'.encode()
    ]


def test_format_td_matches_plpython(db, table, rx):
    """The same change through the plpython recipe and through format=td
    gives the same TD keys and metadata."""
    if not db.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'plpython3u'").fetchone():
        pytest.skip("this PostgreSQL has no PL/Python (the pinned 14 build is made without it)")
    py = Receiver("eof")
    try:
        db.execute("CREATE EXTENSION IF NOT EXISTS plpython3u")
        db.execute(
            """CREATE OR REPLACE FUNCTION emit_recipe() RETURNS trigger AS $$
import json, socket
s = socket.create_connection(('127.0.0.1', int(TD['args'][1])))
s.sendall(json.dumps(TD, default=str).encode())
s.close()
$$ LANGUAGE plpython3u"""
        )
        db.execute(f"CREATE TABLE {table} (id int, note text)")
        db.execute(
            f"CREATE TRIGGER a_recipe AFTER INSERT OR UPDATE ON {table} "
            f"FOR EACH ROW EXECUTE FUNCTION emit_recipe('127.0.0.1', '{py.port}')"
        )
        db.execute(
            f"CREATE TRIGGER b_emit AFTER INSERT OR UPDATE ON {table} "
            f"FOR EACH ROW EXECUTE FUNCTION row_to_socket('127.0.0.1', '{rx.port}', 'format=td')"
        )
        db.execute(f"INSERT INTO {table} VALUES (1, 'x')")
        db.execute(f"UPDATE {table} SET note = 'y'")
        theirs = [json.loads(m) for m in py.wait_for(2)]
        ours = [json.loads(m) for m in rx.wait_for(2)]
        for t, o in zip(theirs, ours):
            assert set(t) == set(o)
            for k in ("event", "when", "level", "table_name", "table_schema", "relid", "new", "old"):
                assert t[k] == o[k], k
            assert o["name"] == "b_emit" and t["name"] == "a_recipe"
            assert o["args"] == ["127.0.0.1", str(rx.port), "format=td"]
    finally:
        py.close()


# --- ndjson framing --------------------------------------------------------


def test_ndjson_keeps_one_connection_and_reconnects(db, table, nd):
    db.execute(f"CREATE TABLE {table} (id int, j json)")
    db.execute(
        f"CREATE TRIGGER out AFTER INSERT ON {table} FOR EACH ROW "
        f"EXECUTE FUNCTION row_to_socket('127.0.0.1', {nd.port}, 'framing=ndjson')"
    )
    # A json value keeps its line breaks; the line must not be split.
    db.execute(f"INSERT INTO {table} SELECT g, E'{{\"a\":\\n1}}' FROM generate_series(1, 100) g")
    msgs = nd.wait_for(100)
    assert len(msgs) == 100 and nd.connections == 1
    assert [loads(m)["new"]["id"] for m in msgs] == list(range(1, 101))
    assert loads(msgs[0])["new"]["j"] == {"a": 1}
    # The receiver restarts: the next message goes over a new connection.
    nd.drop_connections()
    time.sleep(0.05)
    db.execute(f"INSERT INTO {table} VALUES (101, '1')")
    msgs = nd.wait_for(101)
    assert len(msgs) == 101 and nd.connections == 2
    assert db.warnings() == []


# --- send_socket -----------------------------------------------------------


def test_send_socket_delivers(db, rx):
    assert db.one("SELECT send_socket('{\"hello\":1}', '127.0.0.1', %s)", (rx.port,)) == 1
    assert rx.wait_for(1) == [b'{"hello":1}']


def test_send_socket_by_name_and_ipv6(db, rx):
    assert db.one("SELECT send_socket('by-name', 'localhost', %s)", (rx.port,)) == 1
    assert rx.wait_for(1)[0] == b"by-name"
    try:
        v6 = Receiver("eof", host="::1")
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    try:
        assert db.one("SELECT send_socket('v6', '::1', %s)", (v6.port,)) == 1
        assert db.one("SELECT send_socket('v6b', '[::1]', %s)", (v6.port,)) == 1
        assert sorted(v6.wait_for(2)) == [b"v6", b"v6b"]
    finally:
        v6.close()


def test_send_socket_refused(db):
    port = free_port()
    assert db.one("SELECT send_socket('x', '127.0.0.1', %s)", (port,)) == 0
    assert db.warnings() == [f"send_socket: could not send to 127.0.0.1:{port}: connection refused"]


def test_send_socket_unknown_host(db):
    assert db.one("SELECT send_socket('x', 'no-such-host.invalid', 9)") == 0
    assert "not found" in db.warnings()[0]


@pytest.mark.parametrize(
    "args, fragment",
    [
        ("'x', '127.0.0.1', 0", "port \"0\""),
        ("'x', '127.0.0.1', 65536", "port \"65536\""),
        ("'x', '127.0.0.1', -5", "port \"-5\""),
        ("'x', '', 80", "host must not be empty"),
        ("'x', 'a b', 80", "control character or whitespace"),
    ],
)
def test_send_socket_bad_arguments(db, args, fragment):
    with pytest.raises(psycopg.errors.InvalidParameterValue) as e:
        db.execute(f"SELECT send_socket({args})")
    assert e.value.sqlstate == "22023"
    assert fragment in str(e.value) and "send_socket" in str(e.value)


def test_send_socket_null_gives_null(db):
    assert db.one("SELECT send_socket(NULL, '127.0.0.1', 80)") is None
    assert db.one("SELECT send_socket('x', NULL, 80)") is None
    assert db.one("SELECT send_socket('x', '127.0.0.1', NULL)") is None


# --- bad trigger arguments -------------------------------------------------


@pytest.mark.parametrize(
    "args, fragment",
    [
        ("", "missing host"),
        ("'127.0.0.1'", "missing port"),
        ("'127.0.0.1', 'http'", 'port "http" is not an integer'),
        ("'127.0.0.1', '1', 'fromat=td'", 'argument 3: unknown option "fromat"'),
        ("'127.0.0.1', '1', 'ndjson'", 'argument 3 "ndjson" is not of the form key=value'),
        ("'127.0.0.1', '1', 'format=xml'", 'argument 3: format="xml" is not valid'),
        ("'127.0.0.1', '1', 'framing=json', 'delivery=soon'", 'argument 3: framing="json"'),
    ],
)
def test_bad_trigger_arguments_fail_at_first_firing(db, table, args, fragment):
    db.execute(f"CREATE TABLE {table} (id int)")
    db.execute(
        f"CREATE TRIGGER badtrg AFTER INSERT ON {table} FOR EACH ROW "
        f"EXECUTE FUNCTION row_to_socket({args})"
    )
    with pytest.raises(psycopg.errors.InvalidParameterValue) as e:
        db.execute(f"INSERT INTO {table} VALUES (1)")
    msg = str(e.value)
    assert f'row_to_socket trigger "badtrg" on "public"."{table}"' in msg
    assert fragment in msg
    assert db.one(f"SELECT count(*) FROM {table}") == 0


def test_statement_level_row_event_is_rejected(db, table):
    db.execute(f"CREATE TABLE {table} (id int)")
    db.execute(
        f"CREATE TRIGGER stmt AFTER INSERT ON {table} FOR EACH STATEMENT "
        f"EXECUTE FUNCTION row_to_socket('127.0.0.1', '1')"
    )
    with pytest.raises(psycopg.errors.TriggerProtocolViolated) as e:
        db.execute(f"INSERT INTO {table} VALUES (1)")
    assert 'row_to_socket trigger "stmt"' in str(e.value) and "FOR EACH ROW" in str(e.value)


# --- failures, timeouts, cancellation --------------------------------------


def test_connect_timeout_then_fail_fast(db, table):
    stalled = Stalled()
    try:
        db.execute("SET pg_emit.connect_timeout = '300ms'")
        db.execute(f"CREATE TABLE {table} (id int)")
        db.execute(
            f"CREATE TRIGGER out AFTER INSERT ON {table} FOR EACH ROW "
            f"EXECUTE FUNCTION row_to_socket('127.0.0.1', {stalled.port})"
        )
        t = time.monotonic()
        db.execute(f"INSERT INTO {table} SELECT generate_series(1, 50)")
        elapsed = time.monotonic() - t
        assert db.one(f"SELECT count(*) FROM {table}") == 50
        w = db.warnings()
        # The first row's timeout, then one summary for the 49 skipped rows.
        assert len(w) == 2, w
        assert "timed out after 3" in w[0] and "pg_emit.connect_timeout" in w[0]
        assert "49 event(s) not sent: not sending to" in w[1] and "pg_emit.failure_cooldown" in w[1]
        # One timeout, then 49 immediate skips (50 timeouts would be 15 s).
        assert elapsed < 7.5, elapsed
    finally:
        stalled.close()


def test_cooldown_expires_and_zero_disables(db, rx):
    port = free_port()
    db.execute("SET pg_emit.failure_cooldown = '200ms'")
    assert db.one("SELECT send_socket('x', '127.0.0.1', %s)", (port,)) == 0
    assert db.one("SELECT send_socket('x', '127.0.0.1', %s)", (port,)) == 0
    assert "not sending" in db.warnings()[-1]
    time.sleep(0.25)
    assert db.one("SELECT send_socket('x', '127.0.0.1', %s)", (port,)) == 0
    assert "connection refused" in db.warnings()[-1]
    db.execute("SET pg_emit.failure_cooldown = 0")
    assert db.one("SELECT send_socket('x', '127.0.0.1', %s)", (port,)) == 0
    assert "connection refused" in db.warnings()[-1]


def test_write_timeout_on_a_receiver_that_does_not_read(db):
    sink = Sink()
    try:
        db.execute("SET pg_emit.write_timeout = '300ms'")
        t = time.monotonic()
        r = db.one("SELECT send_socket(repeat('x', 64 * 1024 * 1024), '127.0.0.1', %s)", (sink.port,))
        assert r == 0 and time.monotonic() - t < 10.0  # without the timeout: for ever
        assert "write timed out" in db.warnings()[0] and "pg_emit.write_timeout" in db.warnings()[0]
    finally:
        sink.close()


def test_statement_timeout_cancels_a_hanging_connect(db):
    stalled = Stalled()
    try:
        db.execute("SET pg_emit.connect_timeout = '60s'")
        db.execute("SET statement_timeout = '300ms'")
        t = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            db.execute("SELECT send_socket('x', '127.0.0.1', %s)", (stalled.port,))
        # Cancelled, not waited out (60 s); a loaded machine took 2 s.
        assert time.monotonic() - t < 15.0
    finally:
        stalled.close()


def test_pg_cancel_backend_cancels_a_hanging_write(cluster, db):
    sink = Sink()
    try:
        db.execute("SET pg_emit.write_timeout = '60s'")
        pid = db.one("SELECT pg_backend_pid()")
        errors = []

        def run():
            try:
                db.execute("SELECT send_socket(repeat('x', 64 * 1024 * 1024), '127.0.0.1', %s)", (sink.port,))
            except psycopg.Error as e:
                errors.append(e)

        th = threading.Thread(target=run)
        th.start()
        wait_running(cluster, pid, "send_socket")
        with cluster.connect("emit_test") as other:
            t = time.monotonic()
            other.execute("SELECT pg_cancel_backend(%s)", (pid,))
        th.join(5)
        assert not th.is_alive()
        assert time.monotonic() - t < 15.0  # not the 60 s write timeout
        assert isinstance(errors[0], psycopg.errors.QueryCanceled)
    finally:
        sink.close()


def test_on_error_error_aborts_the_statement(db, table):
    port = free_port()
    db.execute("SET pg_emit.on_error = error")
    db.execute(f"CREATE TABLE {table} (id int)")
    db.execute(
        f"CREATE TRIGGER out AFTER INSERT ON {table} FOR EACH ROW "
        f"EXECUTE FUNCTION row_to_socket('127.0.0.1', {port})"
    )
    with pytest.raises(psycopg.errors.SqlclientUnableToEstablishSqlconnection) as e:
        db.execute(f"INSERT INTO {table} VALUES (1)")
    assert "connection refused" in str(e.value)
    assert db.one(f"SELECT count(*) FROM {table}") == 0
    with pytest.raises(psycopg.errors.SqlclientUnableToEstablishSqlconnection):
        db.execute("SELECT send_socket('x', '127.0.0.1', %s)", (port,))


def test_shutdown_interrupts_a_hanging_connect(cluster):
    """`pg_ctl stop -m fast` must not wait for a backend stuck in connect."""
    stalled = Stalled()
    try:
        conn = cluster.connect("emit_test")
        conn.execute("SET pg_emit.connect_timeout = '60s'")
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]

        def run():
            try:
                conn.execute("SELECT send_socket('x', '127.0.0.1', %s)", (stalled.port,))
            except psycopg.Error:
                pass

        th = threading.Thread(target=run)
        th.start()
        wait_running(cluster, pid, "send_socket")
        t = time.monotonic()
        r = cluster.stop("fast")
        assert r.returncode == 0, r.stderr
        assert time.monotonic() - t < 20.0  # not the 60 s connect timeout
        th.join(5)
    finally:
        stalled.close()
        cluster.start()



def test_skipped_sends_are_summed_up_per_statement(db):
    port = free_port()
    got = db.conn.execute(
        "SELECT sum(send_socket('x', '127.0.0.1', %s)) FROM generate_series(1, 100)", (port,)
    ).fetchone()[0]
    assert got == 0
    w = db.warnings()
    assert len(w) == 2, w
    assert "connection refused" in w[0]
    assert w[1].startswith("send_socket: 99 event(s) not sent: not sending to 127.0.0.1:")


def test_instead_of_trigger_on_a_view(db, table, rx):
    """A view whose writes only emit events: INSTEAD OF hands the row back,
    so PostgreSQL counts it as done."""
    db.execute(f"CREATE TABLE {table} (id int, v text)")
    db.execute(f"CREATE VIEW {table}_v AS SELECT * FROM {table}")
    db.execute(
        f"CREATE TRIGGER out INSTEAD OF INSERT ON {table}_v FOR EACH ROW "
        f"EXECUTE FUNCTION row_to_socket('127.0.0.1', {rx.port})"
    )
    cur = db.execute(f"INSERT INTO {table}_v VALUES (1, 'only an event')")
    assert cur.rowcount == 1
    assert db.one(f"SELECT count(*) FROM {table}") == 0
    ev = json.loads(rx.wait_for(1)[0])
    assert ev["op"] == "INSERT" and ev["table"] == f"{table}_v" and ev["new"]["v"] == "only an event"
    db.execute(f"DROP VIEW {table}_v")
