"""emit.metrics(): emit.stats per destination, its recent delivery latency
and the live listener, in the Prometheus text format, read back with the
parser of prometheus-client (the official Python client)."""

import time

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import Session
from pgcluster import Cluster, wait_until
from receivers import HttpReceiver, free_port

pytestmark = pytest.mark.usefixtures("fast_retries")


def samples(text):
    """{(metric name, destination, quantile): value} of every sample."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, s.labels.get("destination"), s.labels.get("quantile"))] = s.value
    return out


def scrape(session):
    return samples(session.one("SELECT emit.metrics()"))


def test_counters_latency_and_backlog_per_destination(db, table):
    ok = HttpReceiver()
    rejecting = HttpReceiver(default=(400, {}, b"no"))
    down = f"http://127.0.0.1:{free_port()}/"
    try:
        db.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
        for i, url in enumerate((ok.url, rejecting.url, down)):
            db.execute(f"CREATE TRIGGER t{i} AFTER INSERT ON {table} FOR EACH ROW "
                       f"EXECUTE FUNCTION row_to_http('{url}', 'delivery=async')")
        db.execute(f"INSERT INTO {table} SELECT generate_series(1, 20)")
        assert len(ok.wait_for(20)) == 20
        # Counted when the worker's transaction commits, after the requests.
        assert wait_until(lambda: scrape(db).get(
            ("pg_emit_delivered_events_total", ok.url, None)) == 20)
        assert wait_until(lambda: scrape(db).get(
            ("pg_emit_dead_lettered_events_total", rejecting.url, None), 0) >= 1)
        m = scrape(db)
        assert m[("pg_emit_queued_events", ok.url, None)] == 0
        p50 = m[("pg_emit_delivery_latency_seconds", ok.url, "0.5")]
        p99 = m[("pg_emit_delivery_latency_seconds", ok.url, "0.99")]
        assert 0 < p50 <= p99 < 10, (p50, p99)
        # The unreachable one: its events wait, and their age shows.
        assert wait_until(lambda: scrape(db).get(("pg_emit_failed_attempts_total", down, None), 0) >= 1)
        m = scrape(db)
        assert m[("pg_emit_queued_events", down, None)] + m[("pg_emit_in_flight_events", down, None)] == 20
        assert m[("pg_emit_oldest_queued_age_seconds", down, None)] > 0
        assert ("pg_emit_live_subscribers", None, None) not in m  # this database does not listen
    finally:
        ok.close()
        rejecting.close()
        db.execute(f"DROP TABLE IF EXISTS {table}")
        db.execute("DELETE FROM emit.outbox")
        db.execute("DELETE FROM emit.dead_letter")


def test_who_may_scrape(db, cluster):
    db.execute("DROP ROLE IF EXISTS scraper")
    db.execute("CREATE ROLE scraper LOGIN")
    s = Session(cluster, user="scraper")
    try:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            s.one("SELECT emit.metrics()")
        db.execute("GRANT emit_admin TO scraper")
        # A fresh transaction sees the grant; no payload is in the text.
        assert "pg_emit_delivered_events_total" in s.one("SELECT emit.metrics()")
    finally:
        s.close()
        db.execute("DROP ROLE scraper")


def test_the_response_log(db, cluster, table):
    """pg_emit.response_log keeps async HTTP responses (status, time, the
    start of the body) for emit_admin to read, errors only or all, and
    deletes them after pg_emit.response_log_retention; off by default."""
    rx = HttpReceiver(script=[(503, {}, b"busy, try later")], default=(201, {}, b"created " * 100))
    down = f"http://127.0.0.1:{free_port()}/hook"

    def reload(**values):
        with cluster.connect() as c:
            c.execute("LOAD 'pg_emit'")
            for name, value in values.items():
                if value is None:
                    c.execute(f"ALTER SYSTEM RESET pg_emit.{name}")
                else:
                    c.execute(f"ALTER SYSTEM SET pg_emit.{name} = '{value}'")
            c.execute("SELECT pg_reload_conf()")
        time.sleep(0.5)  # the worker has read it

    def logged(dest):
        return db.conn.execute(
            "SELECT first_event_id, last_event_id, status, elapsed_ms, excerpt, error "
            "FROM emit.http_responses WHERE destination = %s ORDER BY id", (dest,)).fetchall()

    try:
        db.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
        db.execute(f"CREATE TRIGGER a AFTER INSERT ON {table} FOR EACH ROW "
                   f"EXECUTE FUNCTION row_to_http('{rx.url}', 'delivery=async')")
        db.execute(f"INSERT INTO {table} VALUES (1)")
        assert len(rx.wait_for(2)) == 2  # off: nothing kept
        assert wait_until(lambda: db.one("SELECT count(*) FROM emit.outbox") == 0)
        assert logged(rx.url) == []
        reload(response_log="all")
        db.execute(f"INSERT INTO {table} VALUES (2)")
        assert wait_until(lambda: len(logged(rx.url)) == 1)
        (first, last, status, ms, excerpt, error), = logged(rx.url)
        assert first == last and status == 201 and ms >= 0 and error is None
        assert excerpt.startswith("created created") and len(excerpt) <= 512
        # errors: a refused connection is kept with why; successes are not.
        reload(response_log="errors")
        db.execute(f"CREATE TRIGGER b AFTER INSERT ON {table} FOR EACH ROW "
                   f"EXECUTE FUNCTION row_to_http('{down}', 'delivery=async')")
        db.execute(f"INSERT INTO {table} VALUES (3)")
        assert wait_until(lambda: len(logged(down)) >= 2)
        assert all(s is None and "refused" in e for _, _, s, _, _, e in logged(down))
        assert len(logged(rx.url)) == 1
        # emit_admin reads it; nobody else.
        db.execute("DROP ROLE IF EXISTS log_reader")
        db.execute("CREATE ROLE log_reader LOGIN")
        reader = Session(cluster, user="log_reader")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            reader.one("SELECT count(*) FROM emit.http_responses")
        reader.close()
        db.execute("GRANT emit_admin TO log_reader")
        reader = Session(cluster, user="log_reader")
        assert reader.one("SELECT count(*) FROM emit.http_responses") >= 3
        reader.close()
        # Retention: checked every 10 s.
        reload(response_log_retention="1s")
        assert wait_until(lambda: db.one("SELECT count(*) FROM emit.http_responses "
                                         "WHERE destination = %s", (rx.url,)) == 0, timeout=20)
    finally:
        reload(response_log=None, response_log_retention=None)
        rx.close()
        db.execute(f"DROP TABLE IF EXISTS {table}")
        db.execute("DELETE FROM emit.outbox")
        db.execute("DROP ROLE IF EXISTS log_reader")


def test_sync_and_commit_failures_are_counted_when_preloaded(db, cluster):
    """They were only WARNINGs of the session that sent. Counted in shared
    memory, which only a preloaded pg_emit has: without it the counters
    are left out, not shown as zero."""
    m = scrape(db)
    assert not [k for k in m if "failed_events" in k[0]]
    c = Cluster("pg_emit-counted", port=54348, conf={"shared_preload_libraries": "'pg_emit'"})
    c.init().start()
    try:
        for name in ("shop", "other"):
            c.create_db(name)
            with c.connect(name) as conn:
                conn.execute("CREATE EXTENSION pg_emit")
        shop, other = Session(c, "shop"), Session(c, "other")
        try:
            def counts(s):
                m = scrape(s)
                return (m[("pg_emit_sync_failed_events_total", None, None)],
                        m[("pg_emit_commit_failed_events_total", None, None)])
            assert counts(shop) == (0, 0)
            down = free_port()
            shop.execute("CREATE TABLE t (id int PRIMARY KEY)")
            shop.execute(f"CREATE TRIGGER s AFTER INSERT ON t FOR EACH ROW "
                         f"EXECUTE FUNCTION row_to_socket('127.0.0.1', {down})")
            shop.execute(f"CREATE TRIGGER c AFTER INSERT ON t FOR EACH ROW "
                         f"EXECUTE FUNCTION row_to_socket('127.0.0.1', {down}, 'delivery=commit')")
            shop.execute("INSERT INTO t SELECT generate_series(1, 5)")
            assert shop.warnings()
            shop.one(f"SELECT send_socket('x', '127.0.0.1', {down})")
            # A failed sync send under on_error=error is counted too.
            shop.execute("SET pg_emit.on_error = error")
            with pytest.raises(psycopg.Error):
                shop.execute("INSERT INTO t VALUES (6)")
            shop.execute("RESET pg_emit.on_error")
            assert counts(shop) == (7, 5)
            # Per database: another's count is its own.
            assert counts(other) == (0, 0)
        finally:
            shop.close()
            other.close()
    finally:
        c.destroy()
