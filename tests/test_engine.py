"""The async engine against a receiver that fails some requests, as real
ones do (500s, 429 with Retry-After): an event's outcome is its own. A
failed event is retried alone, its key held back so that per-key order
holds; events that succeeded are never sent again; the backlog drains."""

import http.server
import json
import os
import socket
import threading
import time

import pytest

from conftest import DB, attach, worker_settings
from pgcluster import Cluster, wait_until
from receivers import HttpReceiver

pytestmark = pytest.mark.usefixtures("fast_retries")


class FlakyReceiver:
    """An HTTP receiver that fails each event `fails(row, v)` picks (500,
    or 429 with Retry-After: 1 when `limited(row, v)`), on its first
    attempt only when `once`, and accepts everything else. Keeps
    (webhook-id, row, v, status) of every request, in arrival order."""

    def __init__(self, fails, limited=lambda row, v: False, once=True):
        self.log = []
        self.lock = threading.Lock()
        self.failed_once = set()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                e = json.loads(body)
                row, v = e["new"]["id"], e["new"]["v"]
                eid = self.headers["webhook-id"]
                with outer.lock:
                    first = eid not in outer.failed_once
                    if (first or not once) and fails(row, v):
                        outer.failed_once.add(eid)
                        status = 429 if limited(row, v) else 500
                    else:
                        status = 200
                    outer.log.append((eid, row, v, status))
                self.send_response(status)
                if status == 429:
                    self.send_header("Retry-After", "1")
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def delivered(self):
        with self.lock:
            return [(eid, row, v) for eid, row, v, status in self.log if status == 200]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def flaky():
    made = []

    def make(*a, **kw):
        r = FlakyReceiver(*a, **kw)
        made.append(r)
        return r
    yield make
    for r in made:
        r.close()


def test_a_failed_event_costs_only_itself_and_its_key(db, table, dest, flaky):
    # 3 % of events fail once with 500, 1 % with 429 and Retry-After.
    rx = flaky(lambda row, v: (row * 31 + v * 7) % 100 < 4,
               limited=lambda row, v: (row * 31 + v * 7) % 100 == 0)
    db.execute("SELECT emit.create_destination(%s, %s, %s)",
               (dest, f"http://127.0.0.1:{rx.port}/", json.dumps({"concurrency": 16})))
    attach(db, table, dest, "delivery=async", v="int")
    # 400 rows, then 100 of them (hot keys) updated 5 times.
    db.execute(f"INSERT INTO {table} SELECT g, 0 FROM generate_series(1, 400) g")
    for v in range(1, 6):
        db.execute(f"UPDATE {table} SET v = {v} WHERE id <= 100")
    total = 400 + 5 * 100
    assert wait_until(lambda: len(rx.delivered()) >= total, 60), len(rx.delivered())
    assert wait_until(lambda: db.one(
        "SELECT count(*) FROM emit.outbox WHERE destination = %s", (dest,)) == 0, 10)
    got = rx.delivered()
    # Every event delivered once: a success is never sent again.
    assert len(got) == total
    assert len({eid for eid, _, _ in got}) == total
    # Per key, the delivered values are in commit order.
    by_row = {}
    for _, row, v in got:
        by_row.setdefault(row, []).append(v)
    assert all(vs == sorted(vs) for vs in by_row.values())
    assert [len(by_row[r]) for r in (1, 100, 101, 400)] == [6, 6, 1, 1]
    # And no event of a key was sent while an earlier one of that key had
    # failed and not yet been delivered.
    pending = {}
    for eid, row, v, status in rx.log:
        assert pending.get(row) in (None, eid), (row, v, pending.get(row))
        pending[row] = eid if status != 200 else None
    failed = sum(1 for *_, status in rx.log if status != 200)
    assert failed > 10, failed
    assert db.one("SELECT dead_lettered FROM emit.stats WHERE destination = %s", (dest,)) == 0


def test_progress_past_a_failing_event_is_kept_across_a_worker_restart(db, table, dest, flaky):
    """The events delivered past a failing one are recorded in the outbox:
    a restarted worker sends only what was not delivered."""
    stuck = threading.Event()
    rx = flaky(lambda row, v: row == 1 and not stuck.is_set(), once=False)
    db.execute("SELECT emit.create_destination(%s, %s, %s)",
               (dest, f"http://127.0.0.1:{rx.port}/", json.dumps({"concurrency": 8})))
    attach(db, table, dest, "delivery=async", v="int")
    db.execute(f"INSERT INTO {table} SELECT g, 0 FROM generate_series(1, 50) g")
    assert wait_until(lambda: len(rx.delivered()) == 49, 20), len(rx.delivered())
    assert wait_until(lambda: db.one(
        "SELECT cardinality(acked) FROM emit.outbox WHERE destination = %s", (dest,)) == 49, 10)
    assert db.one("SELECT queued + in_flight FROM emit.stats WHERE destination = %s", (dest,)) == 1
    db.execute("SELECT pg_terminate_backend(pid) FROM emit.worker")
    time.sleep(1.5)
    stuck.set()
    assert wait_until(lambda: db.one(
        "SELECT count(*) FROM emit.outbox WHERE destination = %s", (dest,)) == 0, 20)
    got = rx.delivered()
    assert sorted(row for _, row, _ in got) == list(range(1, 51))
    assert len({eid for eid, _, _ in got}) == 50



def test_a_dead_letter_holds_only_what_was_not_delivered(cluster, db, table, dest, flaky):
    rx = flaky(lambda row, v: row in (7, 30), once=False)
    with worker_settings(cluster, max_attempts=3):
        db.execute("SELECT emit.create_destination(%s, %s, %s)",
                   (dest, f"http://127.0.0.1:{rx.port}/", json.dumps({"concurrency": 8})))
        attach(db, table, dest, "delivery=async", v="int")
        db.execute(f"INSERT INTO {table} SELECT g, 0 FROM generate_series(1, 40) g")
        assert wait_until(lambda: db.one(
            "SELECT count(*) FROM emit.dead_letter WHERE destination = %s", (dest,)) == 1, 20)
        events, payload = db.conn.execute(
            "SELECT events, payload FROM emit.dead_letter WHERE destination = %s", (dest,)).fetchone()
        assert events == 2
        # Each left event's ordering key with it (a requeue keeps them).
        keys = db.one("SELECT keys FROM emit.dead_letter WHERE destination = %s", (dest,))
        assert len(keys) == 2 and None not in keys and keys[0] != keys[1]
        assert [json.loads(line)["new"]["id"] for line in payload.split("\n")] == [7, 30]
        assert sorted(row for _, row, _ in rx.delivered()) == [r for r in range(1, 41) if r not in (7, 30)]
        assert db.one("SELECT dead_lettered FROM emit.stats WHERE destination = %s", (dest,)) == 2


def test_numbered_events_go_first_whatever_became_visible_since(db, table):
    """Rows the worker numbered, and could not deliver, are claimed first
    in id order, also when more than a claim's worth of rows (8 MB) sits
    before them in commit order (a transaction that became visible late):
    a receiver never sees ids go backwards."""
    from receivers import Receiver, free_port
    port = free_port()
    db.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
    db.execute(f"CREATE TRIGGER out AFTER INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION "
               f"row_to_socket('127.0.0.1', {port}, 'delivery=async', 'framing=ndjson')")
    db.execute(f"INSERT INTO {table} VALUES (1, 'first')")
    assert wait_until(lambda: db.one(
        "SELECT first_event_id FROM emit.outbox WHERE port = %s", (port,)) == 1, 10)
    # Ten 1 MB rows, then made to look committed before row 1 was.
    db.execute(f"INSERT INTO {table} SELECT g, repeat('x', 1 << 20) FROM generate_series(2, 11) g")
    db.execute("UPDATE emit.outbox SET tx_seq = 0 WHERE port = %s AND first_event_id IS NULL", (port,))
    rx = Receiver("ndjson", port=port)
    try:
        got = [json.loads(m) for m in rx.wait_for(11, timeout=30)]
    finally:
        rx.close()
    ids = [e["id"] for e in got]
    assert ids == sorted(ids) and len(set(ids)) == len(ids), ids
    assert got[0]["new"]["id"] == 1
    assert sorted({e["new"]["id"] for e in got}) == list(range(1, 12))


@pytest.fixture
def few_files():
    """A cluster whose processes may open 1,024 files, soft and hard: the
    worker cannot raise its limit, only keep to it."""
    c = Cluster("pg_emit-files", port=54338, conf={"shared_preload_libraries": "'pg_emit'"})
    c.init().start(wrap=["prlimit", "--nofile=1024:1024", "--"])
    c.create_db("emit_files")
    with c.connect("emit_files") as conn:
        conn.execute("CREATE EXTENSION pg_emit")
    yield c
    c.destroy()


def test_hanging_receivers_cost_only_themselves(few_files):
    """Forty receivers that accept and never answer, each with a backlog
    and 32 requests allowed in flight, and one healthy receiver: the worker
    keeps to a share of its open files (0.2.0 ran out of descriptors at
    1,024 and the healthy destination got nothing), and the healthy one
    gets its events."""
    hanging = []
    for _ in range(40):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(4096)  # connections wait in the backlog, never accepted
        hanging.append(s)
    healthy = HttpReceiver()
    try:
        with few_files.connect("emit_files") as c:
            assert wait_until(lambda: c.execute("SELECT pid FROM emit.worker").fetchone()[0], 10)
            pid = c.execute("SELECT pid FROM emit.worker").fetchone()[0]
            most = [0]
            sampling = threading.Event()

            def sample():
                while not sampling.is_set():
                    most[0] = max(most[0], len(os.listdir(f"/proc/{pid}/fd")))
                    time.sleep(0.02)
            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            for n, s in enumerate(hanging):
                c.execute("SELECT emit.create_destination(%s, %s)",
                          (f"hang{n}", f"http://127.0.0.1:{s.getsockname()[1]}/"))
                # Keyed: 64 independent events, 32 of them in flight at once.
                c.execute(f"SELECT send_message('hang{n}', '{{\"n\": ' || g || '}}', 'async', g::text) "
                          "FROM generate_series(1, 64) g")
            assert wait_until(lambda: c.execute(
                "SELECT count(*) FROM emit.outbox WHERE first_event_id IS NOT NULL").fetchone()[0] > 20, 10)
            c.execute("SELECT emit.create_destination('fine', %s)", (f"http://127.0.0.1:{healthy.port}/",))
            c.execute("SELECT send_message('fine', '{\"n\": ' || g || '}') FROM generate_series(1, 600) g")
            t = time.monotonic()
            assert wait_until(lambda: len(healthy.requests) == 600, 20), len(healthy.requests)
            took = time.monotonic() - t
            sampling.set()
            sampler.join()
            most = most[0]
            # 384 connections (a share of 1,024) and the files PostgreSQL keeps.
            assert 60 < most < 500, most
            log = few_files.tail_log(200)
            assert "Too many open files" not in log and "out of file descriptors" not in log, log
            print(f"\nworker: at most {most} open files; healthy: 600 events in {took:.1f} s")
    finally:
        healthy.close()
        for s in hanging:
            s.close()


def test_events_are_numbered_durably_after_acknowledgements_that_do_not_wait(cluster, db, table):
    """The worker's records of what it delivered commit without waiting
    for the WAL (a lost one only re-sends events under their ids); the
    claim that numbers events still waits, also for a synchronous standby:
    a standby promoted without the numbering would send those events
    again under other ids. Here the standby never answers, so the claim
    after an acknowledgement waits for it, and nothing is sent meanwhile."""
    from receivers import Receiver, free_port
    port = free_port()
    rx = Receiver("ndjson", port=port)
    db.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
    db.execute(f"CREATE TRIGGER out AFTER INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION "
               f"row_to_socket('127.0.0.1', {port}, 'delivery=async', 'framing=ndjson')")
    waiting = ("SELECT count(*) FROM pg_stat_activity "
               "WHERE backend_type = 'pg_emit worker' AND wait_event = 'SyncRep'")

    def standby(names):
        with cluster.connect() as c:
            c.execute(f"ALTER SYSTEM SET synchronous_standby_names = '{names}'")
            c.execute("SELECT pg_reload_conf()")
    try:
        db.execute(f"INSERT INTO {table} VALUES (1)")
        assert len(rx.wait_for(1, timeout=10)) == 1
        assert wait_until(lambda: db.one(
            "SELECT count(*) FROM emit.outbox WHERE port = %s", (port,)) == 0, 10)
        standby("nobody")
        try:
            with cluster.connect(DB) as w:
                w.execute("SET synchronous_commit = local")  # this writer does not wait
                w.execute(f"INSERT INTO {table} VALUES (2)")
            assert wait_until(lambda: db.one(waiting) == 1, 10)
            time.sleep(0.5)
            assert len(rx.messages) == 1
        finally:
            standby("")
        assert len(rx.wait_for(2, timeout=10)) == 2
        assert db.one(waiting) == 0
    finally:
        rx.close()
