"""A backend waiting on the network shows it in pg_stat_activity:
wait_event_type 'Extension', and on PostgreSQL 17 and later a wait event
named for what it waits on (PgEmitConnect, PgEmitSend, PgEmitReply,
PgEmitHttp, PgEmitResolve). Before 0.3.0 such a backend looked idle in
PostgreSQL's eyes: `wait_event` was NULL while it sat in poll(2)."""

import socket
import threading

from conftest import Session
from pgcluster import wait_until
from receivers import HttpReceiver


def expected(db, name):
    return name if int(db.one("SHOW server_version_num")) >= 170000 else "Extension"


def wait_seen(db, cluster, sql, params=None, setup=()):
    """Runs `sql` in another session and returns the (wait_event_type,
    wait_event) it shows while it is blocked."""
    other = Session(cluster)
    for s in setup:
        other.execute(s)
    pid = other.one("SELECT pg_backend_pid()")
    errors = []

    def run():
        try:
            other.execute(sql, params)
        except Exception as e:  # the timeout that ends the wait
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    seen = wait_until(lambda: db.conn.execute(
        "SELECT wait_event_type, wait_event FROM pg_stat_activity "
        "WHERE pid = %s AND wait_event_type = 'Extension'", (pid,)).fetchone(), timeout=5)
    t.join(15)
    other.close()
    return seen


def test_an_http_request(db, cluster):
    rx = HttpReceiver(hang=True)
    try:
        seen = wait_seen(db, cluster, "SELECT send_http(%s, '{}')", (rx.url,),
                         setup=["SET pg_emit.http_timeout = '2s'"])
        assert seen == ("Extension", expected(db, "PgEmitHttp"))
    finally:
        rx.close()


def test_a_reply_that_does_not_come(db, cluster):
    """A Redis server that takes the XADD and never answers."""
    silent = socket.create_server(("127.0.0.1", 0))
    conns = []
    threading.Thread(target=lambda: conns.append(silent.accept()), daemon=True).start()
    try:
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/s"
        seen = wait_seen(db, cluster, "SELECT send_message(%s, '{}', 'sync')", (url,),
                         setup=["SET pg_emit.write_timeout = '2s'"])
        assert seen == ("Extension", expected(db, "PgEmitReply"))
    finally:
        silent.close()


def test_a_receiver_that_does_not_read(db, cluster):
    deaf = socket.create_server(("127.0.0.1", 0))
    conns = []
    threading.Thread(target=lambda: conns.append(deaf.accept()), daemon=True).start()
    try:
        seen = wait_seen(db, cluster, "SELECT send_socket(repeat('x', 64 << 20), '127.0.0.1', %s)",
                         (deaf.getsockname()[1],), setup=["SET pg_emit.write_timeout = '2s'"])
        assert seen == ("Extension", expected(db, "PgEmitSend"))
    finally:
        deaf.close()


def test_a_handshake_that_does_not_finish(db, cluster):
    """A listener whose accept queue is full drops new SYNs: the connect
    waits."""
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    port = full.getsockname()[1]
    queued = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        queued.append(s)
    try:
        seen = wait_seen(db, cluster, "SELECT send_socket('x', '127.0.0.1', %s)", (port,),
                         setup=["SET pg_emit.connect_timeout = '2s'"])
        assert seen == ("Extension", expected(db, "PgEmitConnect"))
    finally:
        for s in queued:
            s.close()
        full.close()


def test_after_commit(db, cluster, table):
    """delivery=commit sends once the transaction committed: the COMMIT
    shows the wait too."""
    rx = HttpReceiver(hang=True)
    try:
        db.execute(f"CREATE TABLE {table} (id int)")
        db.execute(f"CREATE TRIGGER out AFTER INSERT ON {table} FOR EACH ROW "
                   f"EXECUTE FUNCTION row_to_http('{rx.url}', 'delivery=commit')")
        sql = f"BEGIN; INSERT INTO {table} VALUES (1); COMMIT"
        seen = wait_seen(db, cluster, sql, setup=["SET pg_emit.http_timeout = '2s'"])
        assert seen == ("Extension", expected(db, "PgEmitHttp"))
    finally:
        rx.close()
