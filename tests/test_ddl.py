"""DDL events (emit.create_ddl_trigger): one event per DDL command, in every
delivery mode; nothing for rolled-back DDL in commit and async; never the
command's text; DDL by an ordinary role works and is reported; a route
whose stored destination is gone warns instead of blocking DDL."""

import json

import psycopg
import pytest

from conftest import Session
from pgcluster import wait_until
from receivers import HttpReceiver, Receiver, free_port


@pytest.fixture
def rx():
    r = Receiver("ndjson")
    yield r
    r.close()


@pytest.fixture
def route(db, rx):
    """A DDL route named ddl_test to `rx`; returns a function creating it
    with options, dropped afterwards."""
    def make(options="{}", dest=None):
        db.execute("SELECT emit.create_ddl_trigger('ddl_test', %s, %s)",
                   (dest or f"tcp://127.0.0.1:{rx.port}?framing=ndjson", options))
    yield make
    db.execute("DELETE FROM emit.ddl_triggers")  # as a superuser may
    db.execute("DROP SCHEMA IF EXISTS ddl_s CASCADE")


def events(rx, n, timeout=10):
    return [json.loads(m) for m in rx.wait_for(n, timeout=timeout)]


def test_async_one_event_per_command_none_for_rollback(db, rx, route):
    route()
    db.execute("CREATE SCHEMA ddl_s")
    db.execute("CREATE TABLE ddl_s.orders (id int PRIMARY KEY)")
    db.execute("ALTER TABLE ddl_s.orders ADD COLUMN note text")
    with pytest.raises(psycopg.errors.DivisionByZero):
        with db.conn.transaction():
            db.execute("ALTER TABLE ddl_s.orders ADD COLUMN rolled_back int")
            db.execute("SELECT 1/0")
    db.execute("CREATE INDEX orders_note ON ddl_s.orders (note)")
    db.execute("DROP TABLE ddl_s.orders")
    got = events(rx, 6)
    seen = [(e["command_tag"], e["object_type"], e["object_identity"], e["dropped"]) for e in got]
    # The primary key's index is a command of its own; DROP TABLE reports
    # the table, not its row type or indexes, which go along internally.
    assert seen == [
        ("CREATE SCHEMA", "schema", "ddl_s", False),
        ("CREATE TABLE", "table", "ddl_s.orders", False),
        ("CREATE INDEX", "index", "ddl_s.orders_pkey", False),
        ("ALTER TABLE", "table", "ddl_s.orders", False),
        ("CREATE INDEX", "index", "ddl_s.orders_note", False),
        ("DROP TABLE", "table", "ddl_s.orders", True),
    ]
    assert not any("rolled_back" in json.dumps(e) for e in got)
    assert all(e["op"] == "DDL" and isinstance(e["id"], int) for e in got)
    assert {e["schema"] for e in got[1:]} == {"ddl_s"}
    # A view dropped by CASCADE is reported too.
    db.execute("CREATE TABLE ddl_s.base (id int)")
    db.execute("CREATE VIEW ddl_s.v AS SELECT * FROM ddl_s.base")
    db.execute("DROP TABLE ddl_s.base CASCADE")
    dropped = [(e["object_identity"], e["dropped"]) for e in events(rx, 10)[6:]]
    assert dropped == [("ddl_s.base", False), ("ddl_s.v", False),
                       ("ddl_s.base", True), ("ddl_s.v", True)]
    # A rule of one's own is reported when dropped (a view's is the view).
    db.execute("CREATE TABLE ddl_s.r (id int)")
    db.execute("CREATE RULE quiet AS ON DELETE TO ddl_s.r DO INSTEAD NOTHING")
    db.execute("DROP RULE quiet ON ddl_s.r")
    last = events(rx, 13)[-1]
    assert (last["command_tag"], last["object_type"], last["object_identity"]) == (
        "DROP RULE", "rule", "quiet on ddl_s.r")


@pytest.mark.parametrize("mode", ["sync", "commit"])
def test_sync_and_commit(db, rx, route, mode):
    route(json.dumps({"delivery": mode}))
    db.execute("CREATE SCHEMA ddl_s")
    with pytest.raises(psycopg.errors.DivisionByZero):
        with db.conn.transaction():
            db.execute("CREATE TABLE ddl_s.gone (id int)")
            db.execute("SELECT 1/0")
    db.execute("CREATE TABLE ddl_s.kept (id int)")
    got = events(rx, 2 if mode == "commit" else 3)
    identities = [e["object_identity"] for e in got]
    if mode == "commit":
        assert identities == ["ddl_s", "ddl_s.kept"]
    else:
        # Sync sends inside the statement: a rolled-back one was sent.
        assert identities == ["ddl_s", "ddl_s.gone", "ddl_s.kept"]
    assert db.warnings() == []


def test_no_command_text_is_sent(db, rx, route):
    route()
    db.execute("CREATE SCHEMA ddl_s")
    db.execute("CREATE FUNCTION ddl_s.f() RETURNS text LANGUAGE sql AS $$SELECT 'hunter2'$$")
    db.execute("COMMENT ON FUNCTION ddl_s.f() IS 'password hunter2'")
    got = events(rx, 3)
    assert [e["command_tag"] for e in got] == ["CREATE SCHEMA", "CREATE FUNCTION", "COMMENT"]
    assert not any("hunter2" in json.dumps(e) for e in got)
    assert set(got[1]) == {"op", "command_tag", "object_type", "schema", "object_identity",
                           "dropped", "in_extension", "id", "stream"}


def test_ddl_by_an_ordinary_role_is_reported(cluster, db, rx, route):
    route()
    db.execute("DROP ROLE IF EXISTS ddl_bob")
    db.execute("CREATE ROLE ddl_bob LOGIN")
    db.execute("CREATE SCHEMA ddl_s AUTHORIZATION ddl_bob")
    bob = Session(cluster, user="ddl_bob")
    try:
        bob.execute("CREATE TABLE ddl_s.mine (id int)")
        # ...who may not read the routes, nor make one.
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            bob.execute("SELECT * FROM emit.ddl_triggers")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            bob.execute("SELECT emit.create_ddl_trigger('x', 'tcp://127.0.0.1:1')")
    finally:
        bob.close()
        db.execute("DROP SCHEMA ddl_s CASCADE")
        db.execute("DROP ROLE ddl_bob")
    assert [e["object_identity"] for e in events(rx, 2)][:2] == ["ddl_s", "ddl_s.mine"]


def test_a_dropped_stored_destination_warns_and_ddl_goes_on(db, rx, route, dest):
    db.execute("SELECT emit.create_destination(%s, %s)",
               (dest, f"tcp://127.0.0.1:{rx.port}?framing=ndjson"))
    route(dest=dest)
    db.execute("CREATE SCHEMA ddl_s")
    assert [e["object_identity"] for e in events(rx, 1)] == ["ddl_s"]
    db.execute("SELECT emit.drop_destination(%s)", (dest,))
    db.execute("CREATE TABLE ddl_s.t (id int)")
    assert any("does not exist" in w and "not sent" in w for w in db.warnings())


def test_a_refused_destination_is_refused_when_stored(db, rx, dest):
    db.execute(f"SET pg_emit.allowed_destinations = '127.0.0.1:{rx.port}'")
    try:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            db.execute("SELECT emit.create_destination(%s, 'tcp://127.0.0.1:1')", (dest,))
        assert "emit.create_destination: 127.0.0.1:1 is not allowed by pg_emit.allowed_destinations" \
            in str(e.value)
        db.execute("SELECT emit.create_destination(%s, %s)", (dest, f"tcp://127.0.0.1:{rx.port}"))
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            db.execute("SELECT emit.alter_destination(%s, 'http://169.254.169.254/latest')", (dest,))
        assert "emit.alter_destination" in str(e.value)
    finally:
        db.execute("RESET pg_emit.allowed_destinations")


@pytest.mark.parametrize("mode", ["sync", "commit", "async"])
def test_no_delivery_problem_fails_someone_elses_ddl(db, rx, route, dest, mode):
    """A route whose destination the allowlist now refuses, or whose
    receiver is gone, or whose commit buffer is full: the DDL goes on with
    a WARNING, even with pg_emit.on_error = error (which makes triggers'
    failures errors)."""
    db.execute("SELECT emit.create_destination(%s, %s)",
               (dest, f"tcp://127.0.0.1:{rx.port}?framing=ndjson"))
    route(json.dumps({"delivery": mode}), dest=dest)
    db.execute("SET pg_emit.on_error = 'error'")
    try:
        db.execute("CREATE SCHEMA ddl_s")
        assert [e["object_identity"] for e in events(rx, 1)] == ["ddl_s"]
        db.execute("SET pg_emit.allowed_destinations = '127.0.0.1:1'")
        db.execute("CREATE TABLE ddl_s.refused (id int)")
        assert any("is not allowed by pg_emit.allowed_destinations" in w and "not sent" in w
                   for w in db.warnings()), db.warnings()
        db.execute("RESET pg_emit.allowed_destinations")
        db.execute("SELECT emit.alter_destination(%s, %s)",
                   (dest, f"tcp://127.0.0.1:{free_port()}?framing=ndjson"))
        db.execute("CREATE TABLE ddl_s.unreachable (id int)")
        if mode != "async":
            assert any("refused" in w for w in db.warnings()), db.warnings()
        if mode == "commit":
            db.execute("SET pg_emit.commit_buffer_size = 1")
            db.execute("DO $$ BEGIN FOR i IN 1..20 LOOP "
                       "EXECUTE format('CREATE TABLE ddl_s.many%s (id int)', i); END LOOP; END $$")
            assert any("pg_emit.commit_buffer_size" in w for w in db.warnings()), db.warnings()
            db.execute("RESET pg_emit.commit_buffer_size")
        assert db.one("SELECT count(*) FROM pg_tables WHERE schemaname = 'ddl_s'") >= 2
    finally:
        db.execute("RESET pg_emit.on_error")
        db.execute("RESET pg_emit.allowed_destinations")


def test_temporary_objects_send_nothing(cluster, db, rx, route):
    """Any role may make temporary tables (TEMP is PUBLIC's): a loop of
    them must not fill the outbox every writer shares."""
    route()
    db.execute("DELETE FROM emit.outbox")  # what earlier tests left queued
    db.execute("DROP ROLE IF EXISTS ddl_temp")
    db.execute("CREATE ROLE ddl_temp LOGIN")
    temp = Session(cluster, user="ddl_temp")
    try:
        for i in range(20):
            temp.execute(f"CREATE TEMP TABLE t{i} (id serial PRIMARY KEY, v text)")
            temp.execute(f"CREATE INDEX ON t{i} (v)")
            temp.execute(f"DROP TABLE t{i}")
        temp.execute("CREATE FUNCTION pg_temp.f() RETURNS int LANGUAGE sql AS 'SELECT 1'")
        # Gone now, not when the session's backend gets round to it (the
        # role is dropped next).
        temp.execute("DISCARD TEMP")
        assert db.conn.execute("SELECT payload FROM emit.outbox").fetchall() == []
    finally:
        temp.close()
        db.execute("DROP ROLE ddl_temp")
    # The route works: the next persistent object is the first event.
    db.execute("CREATE SCHEMA ddl_s")
    assert [e["object_identity"] for e in events(rx, 1)] == ["ddl_s"]


@pytest.mark.parametrize("mode, options", [
    ("async", {"format": "cloudevents"}),
    ("sync", {"format": "cloudevents", "cloudevents": "binary"}),
])
def test_cloudevents_destinations_get_pg_emit_ddl_events(db, route, dest, mode, options):
    from cloudevents.core.bindings.http import HTTPMessage, from_http_event

    http = HttpReceiver()
    try:
        db.execute("SELECT emit.create_destination(%s, %s, %s)", (dest, http.url, json.dumps(options)))
        route(json.dumps({"delivery": mode}), dest=dest)
        db.execute("CREATE SCHEMA ddl_s")
        req = http.wait_for(1)[0]
        ev = from_http_event(HTTPMessage(headers=req[2], body=req[3]))
        assert (ev.get_type(), ev.get_subject()) == ("pg_emit.ddl", "ddl_s")
        assert ev.get_data()["command_tag"] == "CREATE SCHEMA"
        assert ev.get_id() == req[2]["webhook-id"]
    finally:
        http.close()


@pytest.mark.parametrize("call, error, text", [
    ("emit.create_ddl_trigger('x', 'nope://h')", psycopg.errors.InvalidParameterValue, "nope://h"),
    ("emit.create_ddl_trigger('x', 'no_such_destination')", psycopg.errors.UndefinedObject,
     "no_such_destination"),
    ("emit.create_ddl_trigger('x', 'tcp://127.0.0.1:1', '{\"delivery\": \"later\"}')",
     psycopg.errors.InvalidParameterValue, "sync, commit or async"),
    ("emit.create_ddl_trigger('x', 'tcp://127.0.0.1:1', '{\"command\": true}')",
     psycopg.errors.InvalidParameterValue, "unknown option"),
    ("emit.drop_ddl_trigger('never_made')", psycopg.errors.UndefinedObject, "never_made"),
])
def test_bad_calls(db, call, error, text):
    with pytest.raises(error) as e:
        db.execute(f"SELECT {call}")
    assert text in str(e.value)


def test_duplicate_name(db, route):
    route()
    with pytest.raises(psycopg.errors.DuplicateObject):
        route()


def test_an_operator_on_the_search_path_is_not_used(db, rx, route):
    """The event trigger runs as whoever does the DDL, under their
    search_path: an operator planted there must not run in its queries
    (with a superuser's rights)."""
    route()
    db.execute("CREATE SCHEMA ddl_s")
    db.execute("CREATE FUNCTION ddl_s.eq(text, text) RETURNS bool LANGUAGE plpgsql "
               "AS $$BEGIN RAISE EXCEPTION 'hijacked'; END$$")
    db.execute("CREATE OPERATOR ddl_s.= (leftarg = text, rightarg = text, function = ddl_s.eq)")
    db.execute("SET search_path = ddl_s, pg_catalog, public")
    try:
        db.execute("CREATE TABLE public.ddl_hijack (id int)")
        db.execute("CREATE RULE r AS ON DELETE TO public.ddl_hijack DO INSTEAD NOTHING")
        db.execute("DROP TABLE public.ddl_hijack")
    finally:
        db.execute("RESET search_path")
    assert "public.ddl_hijack" in {e["object_identity"] for e in events(rx, 6)}


def test_latin1_names(cluster, rx):
    with cluster.connect() as c:
        c.execute("CREATE DATABASE emit_ddl_latin1 ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' "
                  "TEMPLATE template0")
    try:
        with cluster.connect("emit_ddl_latin1") as c:
            c.execute("CREATE EXTENSION pg_emit")
            c.execute("SELECT emit.create_ddl_trigger('r', %s, '{\"delivery\": \"sync\"}')",
                      (f"tcp://127.0.0.1:{rx.port}?framing=ndjson",))
            c.execute('CREATE TABLE "café" (id int)')
            assert events(rx, 1)[0]["object_identity"] == 'public."café"'
    finally:
        with cluster.connect() as c:
            c.execute("DROP DATABASE emit_ddl_latin1 WITH (FORCE)")


def test_drop_extension_with_a_route(cluster, rx):
    cluster.create_db("emit_ddl_drop")
    try:
        with cluster.connect("emit_ddl_drop") as c:
            c.execute("CREATE EXTENSION pg_emit")
            c.execute("SELECT emit.create_ddl_trigger('r', %s, '{\"delivery\": \"sync\"}')",
                      (f"tcp://127.0.0.1:{rx.port}?framing=ndjson",))
            c.execute("CREATE TABLE t (id int)")
            assert [e["object_identity"] for e in events(rx, 1)] == ["public.t"]
            c.execute("DROP EXTENSION pg_emit")
            c.execute("DROP TABLE t")  # DDL without pg_emit: nothing fires
            assert c.execute("SELECT count(*) FROM pg_event_trigger").fetchone()[0] == 0
            # Async DDL, then DROP EXTENSION, in one transaction: the
            # commit goes through, the events go with the extension.
            c.execute("CREATE EXTENSION pg_emit")
            c.execute("SELECT emit.create_ddl_trigger('r', %s)",
                      (f"tcp://127.0.0.1:{rx.port}?framing=ndjson",))
            with c.transaction():
                c.execute("CREATE TABLE t2 (id int)")
                c.execute("DROP EXTENSION pg_emit")
            assert c.execute("SELECT count(*) FROM pg_event_trigger").fetchone()[0] == 0
    finally:
        with cluster.connect() as c:
            c.execute("DROP DATABASE emit_ddl_drop WITH (FORCE)")
    assert len(rx.messages) == 1


def test_the_worker_gives_way_in_a_deadlock(cluster, rx):
    """DROP EXTENSION takes the extension's tables one at a time; a worker
    starting meanwhile may hold one and want another. The worker is the one
    that gives way (its deadlock_timeout is shorter), quietly: no ERROR in
    the log, and the user's transaction goes through."""
    cluster.create_db("emit_ddl_deadlock")
    try:
        with cluster.connect("emit_ddl_deadlock") as c, \
                cluster.connect("emit_ddl_deadlock") as u:
            c.execute("CREATE EXTENSION pg_emit")
            c.execute("CREATE TABLE t (id int)")
            c.execute("CREATE TRIGGER e AFTER INSERT ON t FOR EACH ROW EXECUTE FUNCTION "
                      f"row_to_socket('127.0.0.1', {rx.port}, 'delivery=async', 'framing=ndjson')")
            c.execute("INSERT INTO t VALUES (1)")
            rx.wait_for(1)
            # Recorded as delivered before the worker goes (else it is
            # rightly sent again).
            assert wait_until(lambda: c.execute("SELECT count(*) FROM emit.outbox").fetchone()[0] == 0)
            pid = c.execute("SELECT pid FROM emit.worker").fetchone()[0]
            with open(cluster.log) as f:
                f.seek(0, 2)
                c.execute("SELECT pg_catalog.pg_terminate_backend(%s)", (pid,))
                assert wait_until(lambda: c.execute(
                    "SELECT count(*) FROM pg_catalog.pg_stat_activity WHERE pid = %s", (pid,)
                ).fetchone()[0] == 0)
                u.execute("BEGIN")
                u.execute("LOCK TABLE emit.destinations IN ACCESS EXCLUSIVE MODE")
                c.execute("INSERT INTO t VALUES (2)")
                # The next worker, starting, has read emit.worker and waits
                # for emit.destinations.
                assert wait_until(lambda: c.execute(
                    "SELECT count(*) FROM pg_catalog.pg_locks l"
                    "  JOIN pg_catalog.pg_stat_activity a USING (pid)"
                    " WHERE a.backend_type = 'pg_emit worker' AND NOT l.granted"
                    "   AND l.relation = 'emit.destinations'::regclass").fetchone()[0] == 1)
                u.execute("LOCK TABLE emit.worker IN ACCESS EXCLUSIVE MODE")
                u.execute("COMMIT")
                assert [json.loads(m)["new"]["id"] for m in rx.wait_for(2)] == [1, 2]
                log = f.read()
        assert "gave way to a concurrent transaction" in log, log
        assert "ERROR" not in log, log
    finally:
        with cluster.connect() as c:
            c.execute("DROP DATABASE emit_ddl_deadlock WITH (FORCE)")
