"""The outbox under real operations (issue 10): a limit that releases once
the backlog is delivered, a table that is vacuumed while it churns."""

import json
import time

import psycopg
import pytest

from conftest import Session
from pgcluster import BIN, Cluster, wait_until
from receivers import Receiver, free_port

pytestmark = pytest.mark.usefixtures("fast_retries")


@pytest.fixture
def quick_autovacuum(cluster):
    """autovacuum looks every second (the default is a minute)."""
    with cluster.connect() as c:
        c.execute("ALTER SYSTEM SET autovacuum_naptime = 1")
        c.execute("SELECT pg_reload_conf()")
    yield
    with cluster.connect() as c:
        c.execute("ALTER SYSTEM RESET autovacuum_naptime")
        c.execute("SELECT pg_reload_conf()")


@pytest.fixture
def own_db(cluster):
    """A database of the test's own, with pg_emit: its outbox holds only
    what the test queues."""
    cluster.create_db("emit_own")
    with cluster.connect("emit_own") as c:
        c.execute("CREATE EXTENSION pg_emit")
    s = Session(cluster, "emit_own")
    yield s
    s.close()
    with cluster.connect() as c:
        c.execute("DROP DATABASE emit_own WITH (FORCE)")


def test_outbox_limit_refuses_then_releases_once_delivered(own_db, quick_autovacuum):
    db, table = own_db, "t"
    port = free_port()
    db.execute(f"CREATE TABLE {table} (id int, v text)")
    db.execute(
        f"CREATE TRIGGER out AFTER INSERT ON {table} FOR EACH ROW "
        f"EXECUTE FUNCTION row_to_socket('127.0.0.1', {port}, 'delivery=async', 'framing=ndjson')"
    )
    db.execute("SET pg_emit.max_outbox_size = '256kB'")
    db.execute("SET pg_emit.on_error = error")
    # The receiver is down: the backlog grows until the limit refuses (a
    # size under half the limit is trusted for a second, so allow time).
    queued = 0
    end = time.monotonic() + 30
    with pytest.raises(psycopg.errors.ConfigurationLimitExceeded) as e:
        while time.monotonic() < end:
            db.execute(f"INSERT INTO {table} SELECT g, repeat('x', 200) FROM generate_series(1, 100) g")
            queued += 100
    assert "pg_emit.max_outbox_size" in str(e.value)
    assert queued >= 100
    # Under on_error = warning the transaction commits, without its events,
    # and says so.
    db.execute("SET pg_emit.on_error = warning")
    db.execute(f"INSERT INTO {table} VALUES (0, 'lost')")
    assert "1 event(s) not queued" in db.warnings()[-1]
    db.execute("SET pg_emit.on_error = error")
    # The receiver comes back; once the backlog is delivered (and the outbox
    # vacuumed), events are accepted again.
    nd = Receiver("ndjson", port=port)
    try:
        assert len(nd.wait_for(queued, timeout=30)) >= queued
        assert wait_until(lambda: db.one("SELECT count(*) FROM emit.outbox") == 0, 15)

        def accepted():
            try:
                db.execute(f"INSERT INTO {table} VALUES (-1, 'after')")
                return True
            except psycopg.errors.ConfigurationLimitExceeded:
                return False

        assert wait_until(accepted, 30, every=0.5)
        assert any(b'"after"' in m for m in nd.wait_for(queued + 1, timeout=10))
    finally:
        nd.close()


def test_a_dead_destination_costs_only_itself_at_the_limit(cluster, own_db):
    """0.2.0 refused every destination's events once the outbox was full:
    one dead receiver cost a healthy one the events of 119,600 committed
    rows. Now the worker marks the destinations over an equal share of the
    limit, and only their events are refused."""
    db = own_db
    dead = free_port()
    alive = Receiver("ndjson")
    with cluster.connect() as c:
        c.execute("LOAD 'pg_emit'")
        c.execute("ALTER SYSTEM SET pg_emit.max_outbox_size = '256kB'")
        c.execute("SELECT pg_reload_conf()")
    try:
        for name, port in (("to_dead", dead), ("to_alive", alive.port), ("to_both", None)):
            db.execute(f"CREATE TABLE {name} (id int, v text)")
        for name, port in (("to_dead", dead), ("to_alive", alive.port),
                           ("to_both", dead), ("to_both", alive.port)):
            db.execute(
                f"CREATE TRIGGER out_{port} AFTER INSERT ON {name} FOR EACH ROW EXECUTE FUNCTION "
                f"row_to_socket('127.0.0.1', {port}, 'delivery=async', 'framing=ndjson')")
        db.execute("SET pg_emit.on_error = warning")
        # The dead receiver's backlog passes the limit, and the worker
        # marks it over its share.
        dead_key = f"tcp://127.0.0.1:{dead}?framing=ndjson"

        def marked():
            # Random text: lz4 would make repeat('x', 200) almost nothing.
            db.execute("INSERT INTO to_dead SELECT g, md5(random()::text) || md5(random()::text) "
                       "|| md5(random()::text) || md5(random()::text) FROM generate_series(1, 100) g")
            return db.one("SELECT count(*) FROM emit.destinations WHERE destination = %s "
                          "AND over_share", (dead_key,))
        assert wait_until(marked, 30, every=0.2)
        db.notices.clear()
        # Over the limit, the healthy destination's events are queued and
        # delivered; the dead one's are refused, and the WARNING names it.
        assert db.one("SELECT pg_table_size('emit.outbox')") > 256 * 1024
        db.execute("INSERT INTO to_alive SELECT g, 'a' FROM generate_series(1, 100) g")
        assert db.warnings() == []
        db.execute("INSERT INTO to_both SELECT g, 'b' FROM generate_series(1, 10) g")
        (w,) = db.warnings()
        assert dead_key in w and "10 event(s) not queued" in w, w
        got = [json.loads(m) for m in alive.wait_for(110, timeout=10)]
        assert sorted(e["new"]["v"] for e in got).count("a") == 100
        assert sum(1 for e in got if e["new"]["v"] == "b") == 10
    finally:
        alive.close()
        with cluster.connect() as c:
            c.execute("LOAD 'pg_emit'")
            c.execute("ALTER SYSTEM RESET pg_emit.max_outbox_size")
            c.execute("SELECT pg_reload_conf()")


def test_worker_reports_its_deletes_so_autovacuum_runs(cluster, db, table):
    """0.1.0's worker never reported statistics: the outbox's dead rows were
    invisible to autovacuum until the worker exited."""
    nd = Receiver("ndjson")
    try:
        db.execute(f"CREATE TABLE {table} (id int)")
        db.execute(
            f"CREATE TRIGGER out AFTER INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION "
            f"row_to_socket('127.0.0.1', {nd.port}, 'delivery=async', 'framing=ndjson')")
        before = db.one("SELECT n_tup_del FROM pg_stat_user_tables WHERE relid = 'emit.outbox'::regclass")
        for i in range(50):
            db.execute(f"INSERT INTO {table} VALUES ({i})")
        assert len(nd.wait_for(50, timeout=10)) == 50
        assert wait_until(lambda: db.one(
            "SELECT n_tup_del FROM pg_stat_user_tables WHERE relid = 'emit.outbox'::regclass"
        ) - before >= 50, 10)
    finally:
        nd.close()


def test_default_retries_outlast_many_attempts(cluster, db, table):
    """0.1.0 gave up after 50 attempts (~15 minutes at its backoff): now
    only the age limit, three days by default, ends retries."""
    with cluster.connect() as c:
        c.execute("LOAD 'pg_emit'")
        c.execute("ALTER SYSTEM SET pg_emit.retry_backoff_min = '1ms'")
        c.execute("ALTER SYSTEM SET pg_emit.retry_backoff_max = '5ms'")
        c.execute("SELECT pg_reload_conf()")
    port = free_port()
    try:
        db.execute("LOAD 'pg_emit'")
        assert db.one("SHOW pg_emit.max_attempts") == "0"
        assert db.one("SHOW pg_emit.max_age") == "3d"
        db.execute(f"CREATE TABLE {table} (id int)")
        db.execute(
            f"CREATE TRIGGER out AFTER INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION "
            f"row_to_socket('127.0.0.1', {port}, 'delivery=async', 'framing=ndjson')")
        mark = len(cluster.tail_log(100000))
        db.execute(f"INSERT INTO {table} VALUES (1)")
        assert wait_until(lambda: (db.one(
            "SELECT max(attempts) FROM emit.outbox WHERE port = %s", (port,)) or 0) > 120, 30)
        assert db.one("SELECT count(*) FROM emit.dead_letter WHERE port = %s", (port,)) == 0
        # One log line for the first failure, then one a minute at most.
        logged = cluster.tail_log(100000)[mark:].count(
            f"delivery to tcp://127.0.0.1:{port}?framing=ndjson failed")
        assert 1 <= logged <= 2, logged
        nd = Receiver("ndjson", port=port)
        try:
            assert len(nd.wait_for(1, timeout=10)) == 1
        finally:
            nd.close()
    finally:
        with cluster.connect() as c:  # back to this module's fast_retries
            c.execute("ALTER SYSTEM SET pg_emit.retry_backoff_min = '20ms'")
            c.execute("ALTER SYSTEM SET pg_emit.retry_backoff_max = '300ms'")
            c.execute("SELECT pg_reload_conf()")


@pytest.mark.parametrize("force", [False, True])
def test_drop_database_is_not_held_up_and_leaves_no_restarting_worker(cluster, force):
    """0.1.0's idle worker blocked DROP DATABASE (and CREATE DATABASE ...
    TEMPLATE), and after DROP DATABASE ... WITH (FORCE) it was restarted
    every second for ever."""
    nd = Receiver("ndjson")
    try:
        cluster.create_db("emit_doomed")
        with cluster.connect("emit_doomed") as c:
            c.execute("CREATE EXTENSION pg_emit")
            c.execute("CREATE TABLE t (id int)")
            c.execute("CREATE TRIGGER out AFTER INSERT ON t FOR EACH ROW EXECUTE FUNCTION "
                      f"row_to_socket('127.0.0.1', {nd.port}, 'delivery=async', 'framing=ndjson')")
            c.execute("INSERT INTO t VALUES (1)")
            assert len(nd.wait_for(1, timeout=10)) == 1
            oid = c.execute("SELECT oid FROM pg_database WHERE datname = 'emit_doomed'").fetchone()[0]
        with cluster.connect() as c:
            c.execute("DROP DATABASE emit_doomed" + (" WITH (FORCE)" if force else ""))
        mark = len(cluster.tail_log(100000))
        time.sleep(3.5)
        later = cluster.tail_log(100000)[mark:]
        assert later.count(f'database {oid} does not exist') <= 1, later
        with cluster.connect() as c:
            assert c.execute("SELECT count(*) FROM pg_stat_activity "
                             "WHERE backend_type = 'pg_emit worker' AND datid = %s", (oid,)).fetchone()[0] == 0
    finally:
        nd.close()
        with cluster.connect() as c:
            c.execute("DROP DATABASE IF EXISTS emit_doomed WITH (FORCE)")


def test_drop_extension_says_what_it_discards(cluster):
    cluster.create_db("emit_dropext")
    try:
        with cluster.connect("emit_dropext") as c:
            notices = []
            c.add_notice_handler(lambda d: notices.append((d.severity_nonlocalized, d.message_primary)))
            c.execute("CREATE EXTENSION pg_emit")
            c.execute("CREATE TABLE t (id int)")
            c.execute("CREATE TRIGGER out AFTER INSERT ON t FOR EACH ROW EXECUTE FUNCTION "
                      f"row_to_socket('127.0.0.1', {free_port()}, 'delivery=async')")
            c.execute("INSERT INTO t SELECT generate_series(1, 7)")
            c.execute("DROP EXTENSION pg_emit CASCADE")
            assert ("WARNING", "DROP EXTENSION pg_emit discards 7 queued event(s) for 1 destination(s) "
                               "and 0 dead-lettered event(s)") in notices, notices
    finally:
        with cluster.connect() as c:
            c.execute("DROP DATABASE emit_dropext WITH (FORCE)")


def test_requeue_on_a_standby_is_a_clean_error(cluster):
    standby = Cluster("pg_emit-standby", port=54336)
    try:
        standby.run(f"{BIN}/pg_basebackup", "-h", cluster.sock, "-p", str(cluster.port),
                    "-U", "postgres", "-D", standby.data, "-R", "-X", "stream")
        standby.write_conf()  # its own port and socket; standby.signal stays
        standby.start()
        with standby.connect("emit_test") as c:
            assert c.execute("SELECT pg_is_in_recovery()").fetchone()[0]
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction) as e:
                c.execute("SELECT emit.requeue_dead_letters()")
            assert "standby" in str(e.value)
            assert not e.value.diag.message_detail
    finally:
        standby.destroy()


def test_pg_dump_keeps_the_backlog_and_a_restore_starts_new_streams(cluster):
    """0.1.0's outbox and dead letters were not in pg_dump's output. The
    restored copy sends the events the original had numbered under the
    same (stream, id), so a receiver drops them as repeats (0.2.0 numbered
    them again in a new stream: 1,000 events twice after a restore beside
    the original), and numbers what it queues itself in a new stream."""
    port, dead_port = free_port(), free_port()
    cluster.create_db("emit_dumped")
    dump = f"{cluster.root}/emit.dump"
    try:
        with cluster.connect("emit_dumped") as c:
            c.execute("CREATE EXTENSION pg_emit")
            c.execute("CREATE TABLE t (id int)")
            c.execute("CREATE TRIGGER out AFTER INSERT ON t FOR EACH ROW EXECUTE FUNCTION "
                      f"row_to_socket('127.0.0.1', {port}, 'delivery=async', 'framing=ndjson')")
            c.execute("INSERT INTO t SELECT generate_series(1, 5)")
            # The worker has numbered them (its attempt failed: no receiver).
            assert wait_until(lambda: c.execute(
                "SELECT count(*) FROM emit.outbox WHERE first_event_id IS NULL").fetchone()[0] == 0, 10)
            c.execute("INSERT INTO emit.dead_letter (outbox_id, destination, host, port, framing, events, "
                      "payload, attempts, enqueued_at) VALUES (0, %s, '127.0.0.1', %s, 'ndjson', 1, "
                      "'{\"dead\":1}', 9, now())", (f"tcp://127.0.0.1:{dead_port}?framing=ndjson", dead_port))
        cluster.run(f"{BIN}/pg_dump", "-h", cluster.sock, "-p", str(cluster.port), "-U", "postgres",
                    "-Fc", "-f", dump, "emit_dumped")
        cluster.create_db("emit_restored")
        cluster.run(f"{BIN}/pg_restore", "-h", cluster.sock, "-p", str(cluster.port), "-U", "postgres",
                    "-d", "emit_restored", dump)
        with cluster.connect("emit_restored") as c:
            assert c.execute("SELECT sum(events) FROM emit.outbox").fetchone()[0] == 5
            assert c.execute("SELECT count(*) FROM emit.dead_letter").fetchone()[0] == 1
            assert c.execute("SELECT emit.requeue_dead_letters()").fetchone()[0] == 1
        nd, dead = Receiver("ndjson", port=port), Receiver("ndjson", port=dead_port)
        try:
            # Both databases deliver their copy of the backlog, under the
            # same (stream, id): five events, each twice.
            got = [json.loads(m) for m in nd.wait_for(10, timeout=20)]
            assert sorted(e["new"]["id"] for e in got) == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
            assert len({(e["stream"], e["id"]) for e in got}) == 5
            # What the copy queues from now on is its own: a new stream.
            with cluster.connect("emit_restored") as c:
                c.execute("INSERT INTO t VALUES (6)")
            (after,) = [json.loads(m) for m in nd.wait_for(11, timeout=20)][10:]
            assert after["new"]["id"] == 6 and after["stream"] != got[0]["stream"]
            assert after["id"] == 1
            assert [json.loads(m) for m in dead.wait_for(1, timeout=20)][0]["dead"] == 1
        finally:
            nd.close()
            dead.close()
    finally:
        with cluster.connect() as c:
            c.execute("DROP DATABASE IF EXISTS emit_dumped WITH (FORCE)")
            c.execute("DROP DATABASE IF EXISTS emit_restored WITH (FORCE)")


def test_a_promoted_standby_sends_what_was_numbered_under_the_same_ids():
    """0.2.0 numbered a promoted standby's backlog again in a new stream:
    192 events reached the receiver twice after a failover, under ids it
    could not tell from new ones. Now what the primary had numbered keeps
    its (stream, id) on the standby, and only what the standby queues
    itself after the promotion is numbered in a new stream."""
    port = free_port()
    conf = {"shared_preload_libraries": "'pg_emit'"}
    primary = Cluster("pg_emit-primary", port=54341, conf=conf).init().start()
    standby = Cluster("pg_emit-standby", port=54342, conf=conf)
    try:
        with primary.connect() as c:
            c.execute("CREATE EXTENSION pg_emit")
            c.execute("CREATE TABLE t (id int PRIMARY KEY)")
            c.execute("CREATE TRIGGER out AFTER INSERT ON t FOR EACH ROW EXECUTE FUNCTION "
                      f"row_to_socket('127.0.0.1', {port}, 'delivery=async', 'framing=ndjson')")
            c.execute("INSERT INTO t SELECT generate_series(1, 5)")
            # The worker numbers them (its attempt fails: no receiver yet).
            assert wait_until(lambda: c.execute(
                "SELECT count(*) FROM emit.outbox WHERE first_event_id IS NULL").fetchone()[0] == 0, 10)
            numbered = c.execute("SELECT stream::text FROM emit.destinations").fetchone()[0]
        primary.run(f"{BIN}/pg_basebackup", "-h", primary.sock, "-p", str(primary.port), "-U", "postgres",
                    "-D", standby.data, "-X", "stream")
        standby.set_conf(primary_conninfo=f"'host={primary.sock} port={primary.port} user=postgres'")
        primary.run("touch", f"{standby.data}/standby.signal")
        standby.start()
        assert wait_until(lambda: standby.connect().execute(
            "SELECT count(*) FROM emit.outbox WHERE first_event_id IS NOT NULL").fetchone()[0] == 1, 20)
        # The primary fails; the standby takes over.
        assert primary.stop("immediate").returncode == 0
        standby.run(f"{BIN}/pg_ctl", "-D", standby.data, "-w", "promote")
        nd = Receiver("ndjson", port=port)
        try:
            with standby.connect() as c:
                c.execute("INSERT INTO t VALUES (6)")
            got = [json.loads(m) for m in nd.wait_for(6, timeout=30)]
        finally:
            nd.close()
        before = [e for e in got if e["new"]["id"] <= 5]
        after = [e for e in got if e["new"]["id"] == 6]
        assert sorted(e["new"]["id"] for e in before) == [1, 2, 3, 4, 5]
        assert {e["stream"] for e in before} == {numbered}
        assert sorted(e["id"] for e in before) == [1, 2, 3, 4, 5]
        (six,) = after
        assert six["stream"] != numbered and six["id"] == 1
    finally:
        standby.destroy()
        primary.destroy()
