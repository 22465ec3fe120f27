"""emit.metrics(): emit.stats per destination, its recent delivery latency
and the live listener, in the Prometheus text format, read back with the
parser of prometheus-client (the official Python client)."""

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import Session
from pgcluster import wait_until
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
