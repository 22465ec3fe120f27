"""send_http and row_to_http against real HTTP(S) servers on 127.0.0.1."""

import json
import os
import ssl
import subprocess
import time

import psycopg
import pytest

from conftest import docs_block
from pgcluster import Cluster, wait_until
from receivers import HttpReceiver, free_port


# Retries every 20–300 ms instead of 100 ms–30 s, so failure tests are quick.
pytestmark = pytest.mark.usefixtures("fast_retries")


@pytest.fixture
def web():
    r = HttpReceiver()
    yield r
    r.close()


def body_json(req):
    return json.loads(req[3])


# --- send_http -----------------------------------------------------------------


def test_status_codes_pass_through(db):
    srv = HttpReceiver(script=[(201, {}, b""), (404, {}, b"nope"), (500, {}, b"boom")])
    try:
        assert [db.one("SELECT send_http(%s, '{}')", (srv.url,)) for _ in range(3)] == [201, 404, 500]
        assert db.warnings() == []
    finally:
        srv.close()


def test_method_headers_and_body_exactly_as_sent(db, web):
    body = '{"hello": "wörld", "n": [1, 2]}'
    status = db.one(
        "SELECT send_http(%s, %s, 'PUT', 'application/vnd.test+json', %s)",
        (web.url + "?x=1", body, json.dumps({"X-Tenant": "7", "Authorization": "Bearer t"})),
    )
    assert status == 200
    method, path, headers, got, _ = web.wait_for(1)[0]
    assert (method, path) == ("PUT", "/hook?x=1")
    assert got == body.encode()
    assert headers["content-type"] == "application/vnd.test+json"
    assert headers["x-tenant"] == "7" and headers["authorization"] == "Bearer t"
    assert headers["user-agent"].startswith("pg_emit/")


def test_defaults_are_post_json(db, web):
    assert db.one("SELECT send_http(%s, '[1]')", (web.url,)) == 200
    method, _, headers, got, _ = web.wait_for(1)[0]
    assert method == "POST" and headers["content-type"] == "application/json" and got == b"[1]"


def test_network_failure_is_zero_with_warning(db):
    port = free_port()
    assert db.one("SELECT send_http(%s, '{}')", (f"http://127.0.0.1:{port}/",)) == 0
    assert "connection refused" in db.warnings()[0] or "Connection refused" in db.warnings()[0]


@pytest.mark.parametrize(
    "args, fragment",
    [
        ("'ftp://127.0.0.1/x', '{}'", "only http and https"),
        ("'not a url', '{}'", "not a valid absolute URL"),
        ("'http://user:pw@127.0.0.1/', '{}'", "credentials"),
        ("'http://127.0.0.1/', '{}', 'post'", "method"),
        ("'http://127.0.0.1/', '{}', 'POST', 'application/json', '{\"X-A\": \"b\\r\\nInjected: 1\"}'", "header"),
        ("'http://127.0.0.1/', '{}', 'POST', 'application/json', '[1]'", "header"),
        ("'http://127.0.0.1/', '{}', 'POST', E'text/plain\\r\\nX: y'", "content type"),
    ],
)
def test_bad_arguments_are_22023(db, args, fragment):
    with pytest.raises(psycopg.errors.InvalidParameterValue) as e:
        db.execute(f"SELECT send_http({args})")
    assert fragment in str(e.value) and "send_http" in str(e.value)


def test_null_arguments_give_null(db):
    assert db.one("SELECT send_http(NULL, '{}')") is None
    assert db.one("SELECT send_http('http://127.0.0.1/', NULL)") is None


def test_redirects_are_not_followed(db):
    elsewhere = HttpReceiver()
    srv = HttpReceiver(script=[(302, {"Location": elsewhere.url}, b"")])
    try:
        assert db.one("SELECT send_http(%s, '{}')", (srv.url,)) == 302
        assert elsewhere.wait_for(1, timeout=0.3) == []
    finally:
        srv.close()
        elsewhere.close()


def test_silent_server_hits_the_timeout(db):
    srv = HttpReceiver(hang=True)
    try:
        db.execute("SET pg_emit.http_timeout = '500ms'")
        t = time.monotonic()
        assert db.one("SELECT send_http(%s, '{}')", (srv.url,)) == 0
        assert time.monotonic() - t < 10.0  # the receiver never answers
        assert "timed out" in db.warnings()[0]
    finally:
        srv.close()


def test_statement_timeout_cancels_a_request(cluster, db):
    srv = HttpReceiver(hang=True)
    try:
        db.execute("SET pg_emit.http_timeout = '60s'")
        db.execute("SET statement_timeout = '300ms'")
        t = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            db.execute("SELECT send_http(%s, '{}')", (srv.url,))
        # Cancelled, not waited out (pg_emit.http_timeout is 60 s); the
        # bound leaves room for a loaded machine (1.003 s was seen at 1).
        assert time.monotonic() - t < 5.0
    finally:
        srv.close()


# --- row_to_http -------------------------------------------------------------------


def attach(db, table, url, *opts, ops="INSERT"):
    extra = "".join(", " + psycopg.sql.quote(o) for o in opts) if opts else ""
    db.execute(f"CREATE TABLE IF NOT EXISTS {table} (id int primary key, v text)")
    db.execute(
        f"CREATE TRIGGER out AFTER {ops} ON {table} FOR EACH ROW "
        f"EXECUTE FUNCTION row_to_http({psycopg.sql.quote(url)}{extra})"
    )


def test_row_to_http_sync_posts_the_event(db, table, web):
    attach(db, table, web.url, "header=X-Source: pg", ops="INSERT OR UPDATE")
    db.execute(f"INSERT INTO {table} VALUES (1, 'a')")
    db.execute(f"UPDATE {table} SET v = 'b'")
    reqs = web.wait_for(2)
    assert [body_json(r)["op"] for r in reqs] == ["INSERT", "UPDATE"]
    assert body_json(reqs[1]) == {
        "op": "UPDATE", "schema": "public", "table": table,
        "new": {"id": 1, "v": "b"}, "old": {"id": 1, "v": "a"},
    }
    assert reqs[0][2]["x-source"] == "pg" and reqs[0][2]["content-type"] == "application/json"


def test_row_to_http_non_2xx_is_a_warning(db, table):
    srv = HttpReceiver(default=(503, {}, b"down for maintenance"))
    try:
        attach(db, table, srv.url)
        db.execute(f"INSERT INTO {table} VALUES (1, 'a')")
        assert "HTTP 503" in db.warnings()[0]
        # The response body may echo the row: it never goes into a WARNING.
        assert "down for maintenance" not in db.warnings()[0]
    finally:
        srv.close()


def test_row_to_http_commit_mode(db, table, web):
    attach(db, table, web.url, "delivery=commit")
    db.execute("BEGIN")
    db.execute(f"INSERT INTO {table} VALUES (1, 'a')")
    assert web.wait_for(1, timeout=0.3) == []
    db.execute("COMMIT")
    assert body_json(web.wait_for(1)[0])["new"]["id"] == 1


def test_bad_row_to_http_arguments(db, table):
    db.execute(f"CREATE TABLE {table} (id int)")
    db.execute(
        f"CREATE TRIGGER bad AFTER INSERT ON {table} FOR EACH ROW "
        "EXECUTE FUNCTION row_to_http('http://127.0.0.1/', 'framing=ndjson')"
    )
    with pytest.raises(psycopg.errors.InvalidParameterValue) as e:
        db.execute(f"INSERT INTO {table} VALUES (1)")
    assert 'row_to_http trigger "bad"' in str(e.value) and "header" in e.value.diag.message_hint


# --- async ---------------------------------------------------------------------------


def test_async_500_three_times_then_200(db, table):
    srv = HttpReceiver(script=[(500, {}, b"oops")] * 3)
    try:
        attach(db, table, srv.url, "delivery=async")
        db.execute(f"INSERT INTO {table} VALUES (1, 'a')")
        reqs = srv.wait_for(4, timeout=10)
        assert len(reqs) == 4
        ids = {body_json(r)["id"] for r in reqs}
        assert len(ids) == 1  # the same event, retried with its id
        assert wait_until(lambda: db.one("SELECT delivered FROM emit.stats WHERE destination = %s",
                                         (srv.url,)) == 1)
        assert db.one("SELECT failed_attempts FROM emit.stats WHERE destination = %s", (srv.url,)) == 3
    finally:
        srv.close()


def test_async_400_dead_letters_at_once_and_the_rest_flows(db, table):
    srv = HttpReceiver(script=[(400, {}, b'{"error":"bad field v"}')])
    try:
        attach(db, table, srv.url, "delivery=async")
        db.execute(f"INSERT INTO {table} VALUES (1, 'rejected'), (2, 'fine')")
        reqs = srv.wait_for(2, timeout=5)
        # The two rows go in parallel: whichever arrived first was refused.
        assert {body_json(r)["new"]["id"] for r in reqs} == {1, 2}
        refused = body_json(reqs[0])["new"]["id"]
        assert wait_until(lambda: db.one(
            "SELECT count(*) FROM emit.dead_letter WHERE url = %s", (srv.url,)) == 1)
        status, response, payload, err = db.conn.execute(
            "SELECT status, response, payload, last_error FROM emit.dead_letter WHERE url = %s", (srv.url,)
        ).fetchone()
        assert status == 400 and response == '{"error":"bad field v"}'
        assert json.loads(payload)["new"]["id"] == refused and "HTTP 400" in err
        assert wait_until(lambda: db.one("SELECT count(*) FROM emit.outbox WHERE url = %s", (srv.url,)) == 0)
    finally:
        srv.close()


def test_async_429_honours_retry_after(db, table):
    srv = HttpReceiver(script=[(429, {"Retry-After": "1"}, b"slow down")])
    try:
        attach(db, table, srv.url, "delivery=async")
        db.execute(f"INSERT INTO {table} VALUES (1, 'a')")
        reqs = srv.wait_for(2, timeout=10)
        assert len(reqs) == 2
        # pg_emit.retry_backoff_max is 300 ms here: only Retry-After explains this.
        assert reqs[1][4] - reqs[0][4] >= 0.95
    finally:
        srv.close()


def test_async_reuses_keep_alive_connections(db, table, web):
    attach(db, table, web.url, "delivery=async")
    db.execute(f"INSERT INTO {table} SELECT g, 'x' FROM generate_series(1, 50) g")
    reqs = web.wait_for(50, timeout=10)
    assert len(reqs) >= 50  # at least once
    # Different rows go in parallel (up to 32 at once), over kept-alive
    # connections: fewer connections than requests.
    assert sorted(body_json(r)["new"]["id"] for r in reqs) == list(range(1, 51))
    assert len(web.peers) <= 32


def test_worker_holds_no_transaction_while_waiting_on_http(db, table):
    srv = HttpReceiver(hang=True)
    try:
        attach(db, table, srv.url, "delivery=async")
        db.execute(f"INSERT INTO {table} VALUES (1, 'a')")
        assert srv.wait_for(1, timeout=5)  # the request is in flight, unanswered

        def worker_idle():
            state, xact = db.conn.execute(
                "SELECT state, xact_start FROM pg_stat_activity "
                "WHERE backend_type = 'pg_emit worker' AND datname = current_database()"
            ).fetchone()
            return state == "idle" and xact is None

        # The request hangs for good: a worker that held a transaction while
        # waiting would never be idle. (It may be busy for a moment with
        # other work, such as its stats, when first looked at.)
        assert wait_until(worker_idle, timeout=3)
    finally:
        srv.close()
        db.execute("DELETE FROM emit.outbox WHERE url = %s", (srv.url,))


# --- signing ---------------------------------------------------------------------------


def readme_verify():
    """The receiver-side check exactly as docs/formats.md documents it."""
    code = docs_block("python", "import hashlib, hmac, time")
    scope = {}
    exec(code, scope)
    return scope["verify"]


def openssl_signature(key, ts, body):
    """The signature computed by another implementation (OpenSSL)."""
    out = subprocess.run(
        ["openssl", "dgst", "-sha256", "-hmac", key.decode()],
        input=f"{ts}.".encode() + body, capture_output=True, check=True,
    ).stdout.decode()
    return "v1=" + out.split("= ")[-1].strip()


class Headers(dict):
    """Case-insensitive lookups, as receivers' frameworks give them."""

    def __getitem__(self, k):
        return dict.__getitem__(self, k.lower())


def test_trigger_events_are_signed_send_http_bodies_are_not(cluster, db, table, web, secret_file):
    verify = readme_verify()
    path = secret_file("s3cret")
    db.execute("LOAD 'pg_emit'")
    db.execute(f"SET pg_emit.signing_secret_file = '{path}'")
    attach(db, table, web.url)
    db.execute(f"INSERT INTO {table} VALUES (1, 'a')")
    _, _, headers, body, _ = web.wait_for(1)[0]
    ts = headers["x-emit-timestamp"]
    assert abs(time.time() - int(ts)) < 60
    assert headers["x-emit-signature"] == openssl_signature(b"s3cret", ts, body)
    assert verify(b"s3cret", Headers(headers), body)
    # send_http's body is the caller's: a signature would vouch for a body
    # (and event id) that pg_emit never wrote.
    assert db.one("SELECT send_http(%s, '{\"id\": 9223372036854775807}')", (web.url,)) == 200
    _, _, headers, _, _ = web.wait_for(2)[1]
    assert "x-emit-signature" not in headers and "x-emit-timestamp" not in headers
    # A rotated key is used at once, and the worker signs too.
    secret_file("w0rker")
    time.sleep(0.01)
    os.utime(path)
    db.execute(f"ALTER SYSTEM SET pg_emit.signing_secret_file = '{path}'")
    db.execute("SELECT pg_reload_conf()")
    try:
        time.sleep(0.3)
        db.execute(f"DROP TRIGGER out ON {table}")
        attach(db, table, web.url, "delivery=async")
        db.execute(f"INSERT INTO {table} VALUES (2, 'b')")
        _, _, headers, body, _ = web.wait_for(3)[2]
        assert body_json((None, None, None, body))["new"]["id"] == 2
        ts = headers["x-emit-timestamp"]
        assert headers["x-emit-signature"] == openssl_signature(b"w0rker", ts, body)
        assert verify(b"w0rker", Headers(headers), body)
    finally:
        db.execute("ALTER SYSTEM RESET pg_emit.signing_secret_file")
        db.execute("SELECT pg_reload_conf()")


def test_signing_key_is_not_readable_by_ordinary_roles(cluster, db, secret_file):
    """The setting holds a path; the key itself is nowhere a role can look,
    even in a session that has not loaded pg_emit (where settings are plain
    placeholders readable by anyone)."""
    path = secret_file("topsecret")
    db.execute("LOAD 'pg_emit'")
    db.execute(f"ALTER SYSTEM SET pg_emit.signing_secret_file = '{path}'")
    db.execute("SELECT pg_reload_conf()")
    db.execute("DROP ROLE IF EXISTS carol")
    db.execute("CREATE ROLE carol LOGIN")
    try:
        time.sleep(0.3)
        with cluster.connect("emit_test", user="carol") as c:
            values = [v for (v,) in c.execute(
                "SELECT setting FROM pg_settings WHERE name LIKE 'pg_emit.%'").fetchall()]
            values.append(c.execute("SELECT current_setting('pg_emit.signing_secret_file')").fetchone()[0])
            assert path in values
            assert not any("topsecret" in (v or "") for v in values)
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute("SELECT pg_read_file(%s)", (path,))
    finally:
        db.execute("DROP ROLE carol")
        db.execute("ALTER SYSTEM RESET pg_emit.signing_secret_file")
        db.execute("SELECT pg_reload_conf()")


# --- HTTPS with a locally generated CA -------------------------------------------------------


@pytest.fixture
def https(pki):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(os.path.join(pki, "server.pem"), os.path.join(pki, "server.key"))
    srv = HttpReceiver(tls=ctx)
    yield srv
    srv.close()


def test_https_needs_a_trusted_ca(db, https, pki):
    db.execute("LOAD 'pg_emit'")
    db.execute("SET pg_emit.failure_cooldown = 0")
    assert db.one("SELECT send_http(%s, '{}')", (https.url,)) == 0
    assert "certificate" in db.warnings()[0].lower() or "unknown" in db.warnings()[0].lower()
    db.execute(f"SET pg_emit.ca_file = '{os.path.join(pki, 'ca.pem')}'")
    assert db.one("SELECT send_http(%s, '{}')", (https.url,)) == 200, db.warnings()


def test_https_trusted_through_the_system_store(pki, https):
    """The platform verifier reads the system store; SSL_CERT_FILE is how
    this test points it at a bundle with the local CA, without changing the
    machine's store."""
    c = Cluster("pg_emit-tls", port=54333)
    c.init().start(env={"SSL_CERT_FILE": os.path.join(pki, "ca.pem")})
    try:
        with c.connect() as conn:
            conn.execute("CREATE EXTENSION pg_emit")
            assert conn.execute("SELECT send_http(%s, '{}')", (https.url,)).fetchone()[0] == 200
    finally:
        c.destroy()


def test_url_prefix_allowlist(db, web):
    db.execute(f"SET pg_emit.allowed_destinations = 'http://127.0.0.1:{web.port}/hook'")
    assert db.one("SELECT send_http(%s, '{}')", (web.url + "/ok",)) == 200
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        db.execute("SELECT send_http(%s, '{}')", (f"http://127.0.0.1:{web.port}/admin",))
    assert len(web.wait_for(2, timeout=0.3)) == 1
