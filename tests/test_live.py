"""Live channels: events sent to channel:<name> reach WebSocket and
Server-Sent Events subscribers of the worker's listener, with tokens, and a
subscriber that comes back with its last id gets what it missed, then live
events, with no gap and no duplicate. Real clients: the `websockets`
library, `httpx-sse`, raw sockets for what clients should not do."""

import json
import socket
import threading
import time

import httpx
import psycopg
import pytest
from httpx_sse import connect_sse
from websockets.sync.client import connect as ws_connect

from conftest import DB, Session
from receivers import free_port


@pytest.fixture(scope="module")
def live(cluster):
    """The listener on a free port, serving the test database."""
    port = free_port()
    with cluster.connect() as c:
        c.execute("LOAD 'pg_emit'")
        c.execute(f"ALTER SYSTEM SET pg_emit.listen = '127.0.0.1:{port}'")
        c.execute(f"ALTER SYSTEM SET pg_emit.listen_database = '{DB}'")
        c.execute("SELECT pg_reload_conf()")
    # The worker starts with the first async event of its database.
    with cluster.connect(DB) as c:
        c.execute("SELECT send_message('channel:warmup', '{}')")
    end = time.monotonic() + 15
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    with cluster.connect() as c:
        c.execute("ALTER SYSTEM RESET pg_emit.listen")
        c.execute("ALTER SYSTEM RESET pg_emit.listen_database")
        c.execute("SELECT pg_reload_conf()")


def token(db, *channels, valid_for="1 hour"):
    return db.one("SELECT emit.create_token(%s, %s::interval)", (list(channels), valid_for))


def send(db, channel, n, start=0, size=0):
    """Commits n messages {"n": i} (i from start) to channel, one transaction."""
    db.execute(
        "SELECT send_message(%s, json_build_object('n', i, 'pad', repeat('x', %s::int))::text) "
        "FROM generate_series(%s::int, %s::int) i",
        (f"channel:{channel}", size, start, start + n - 1))


def sse_events(url, tok, n, last_id=None, timeout=15):
    """Reads n events from an SSE subscription: [(id, data)]."""
    headers = {"Authorization": f"Bearer {tok}"}
    if last_id is not None:
        headers["Last-Event-ID"] = str(last_id)
    out = []
    with httpx.Client(timeout=timeout) as client:
        with connect_sse(client, "GET", url, headers=headers) as es:
            for e in es.iter_sse():
                # (httpx-sse also yields the stream's opening `retry:` field.)
                if e.event == "message" and e.data:
                    out.append((int(e.id), json.loads(e.data)))
                if len(out) >= n:
                    break
    return out


class Subscriber(threading.Thread):
    """A WebSocket subscriber reading in the background."""

    def __init__(self, url, after=None):
        super().__init__(daemon=True)
        self.url = url.replace("http://", "ws://")
        if after is not None:
            self.url += f"&last_event_id={after}"
        self.got = []
        self.closed = None
        self.ready = threading.Event()
        self.start()
        assert self.ready.wait(10), self.closed

    def run(self):
        try:
            with ws_connect(self.url, max_size=None, open_timeout=10) as ws:
                self.ws = ws
                self.ready.set()
                for m in ws:
                    self.got.append(json.loads(m))
                self.closed = (ws.close_code, ws.close_reason)
        except Exception as e:
            self.closed = e
            self.ready.set()

    def wait(self, n, timeout=15):
        end = time.monotonic() + timeout
        while len(self.got) < n and time.monotonic() < end:
            time.sleep(0.02)
        return self.got


def test_sse_gets_row_changes_in_commit_order_and_nothing_rolled_back(db, live, table):
    db.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
    db.execute(f"CREATE TRIGGER out AFTER INSERT OR UPDATE OR DELETE ON {table} FOR EACH ROW "
               "EXECUTE FUNCTION row_to_destination('channel:rows', 'delivery=async')")
    tok = token(db, "rows")
    got = []
    reader = threading.Thread(
        target=lambda: got.extend(sse_events(f"{live}/channels/rows", tok, 4)), daemon=True)
    reader.start()
    time.sleep(0.5)
    db.execute(f"INSERT INTO {table} VALUES (1, 'a')")
    db.execute("BEGIN")
    db.execute(f"INSERT INTO {table} VALUES (2, 'rolled back')")
    db.execute("ROLLBACK")
    db.execute(f"UPDATE {table} SET v = 'b' WHERE id = 1")
    db.execute(f"INSERT INTO {table} VALUES (3, 'c')")
    db.execute(f"DELETE FROM {table} WHERE id = 3")
    reader.join(15)
    assert [(e["op"], (e["new"] or e["old"])["id"]) for _, e in got] == [
        ("INSERT", 1), ("UPDATE", 1), ("INSERT", 3), ("DELETE", 3)]
    ids = [i for i, _ in got]
    assert ids == sorted(ids) and len(set(ids)) == 4
    assert got[1][1]["new"]["v"] == "b" and got[1][1]["old"]["v"] == "a"
    stats = db.one("SELECT delivered FROM emit.stats WHERE destination = 'channel:rows'")
    assert stats == 4


def test_websocket_resumes_after_its_last_id_without_gap_or_duplicate(db, live, cluster):
    tok = token(db, "resume")
    url = f"{live}/channels/resume?token={tok}"
    first = Subscriber(url)
    send(db, "resume", 50)
    got = first.wait(50)
    assert [m["data"]["n"] for m in got] == list(range(50))
    last = got[-1]["id"]
    first.ws.close()
    send(db, "resume", 30, start=50)  # while nobody listens
    # Comes back while more are being committed: replay, then live.
    def write():
        other = Session(cluster)
        for k in range(5):
            send(other, "resume", 10, start=80 + 10 * k)
            time.sleep(0.01)
        other.close()

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    again = Subscriber(url, after=last)
    writer.join(30)
    got = again.wait(80)
    assert [m["data"]["n"] for m in got] == list(range(50, 130))
    ids = [m["id"] for m in got]
    assert ids == sorted(set(ids)) and ids[0] > last
    again.ws.close()


def test_payloads_of_any_size(db, live):
    tok = token(db, "big")
    db.execute("SET pg_emit.max_message_size = '4MB'")
    sub = Subscriber(f"{live}/channels/big?token={tok}")
    big = "é" * 1_000_000
    db.execute("SELECT send_message('channel:big', json_build_object('big', %s::text)::text)", (big,))
    got = sub.wait(1)
    assert got and got[0]["data"]["big"] == big
    sub.ws.close()
    # The same event replayed over SSE: one data line of 2 MB.
    (i, e), = sse_events(f"{live}/channels/big", tok, 1, last_id=got[0]["id"] - 1)
    assert i == got[0]["id"] and e["big"] == big
