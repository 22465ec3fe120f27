"""Brokers over TLS, against real servers on 127.0.0.1 that speak only
TLS (redis-server --tls-port), read back with the official clients over
TLS. Certificates are verified: an unknown CA, a name the certificate
does not carry and a refused client certificate are delivery failures
that say so, and never where the destination points."""

import json
import os

import psycopg
import pytest

from conftest import DB, Session, attach
from pgcluster import wait_until
from receivers import (HttpReceiver, KafkaGate, KafkaServer, Listener, NatsServer, RedisServer,
                       TlsFirst, relay)

pytestmark = pytest.mark.usefixtures("fast_retries", "no_cooldown")


@pytest.fixture
def no_cooldown(db):
    """Each sync send below tries the network: no skipping a destination
    that just failed."""
    db.execute("SET pg_emit.failure_cooldown = 0")
    yield
    db.execute("RESET pg_emit.failure_cooldown")


def pem(pki, name):
    return os.path.join(pki, name)


@pytest.fixture
def redis_tls(pki):
    server = RedisServer(tls=pki)
    yield server
    server.close()


def test_rediss_delivers_async_and_sync_with_the_destinations_ca(db, table, dest, pki, redis_tls):
    db.execute("SELECT emit.create_destination(%s, %s, %s)",
               (dest, f"rediss://127.0.0.1:{redis_tls.port}/orders",
                json.dumps({"ca_file": pem(pki, "ca.pem")})))
    attach(db, table, dest, "delivery=async")
    db.execute(f"INSERT INTO {table} SELECT g, 'a' FROM generate_series(1, 50) g")
    got = redis_tls.wait_for("orders", 50)
    assert [e["new"]["id"] for _, _, e in got] == list(range(1, 51))
    assert db.one("SELECT send_message(%s, '{\"n\": 1}', 'sync')", (dest,)) is True
    assert redis_tls.wait_for("orders", 51)[-1][2] == {"n": 1}
    # The destination's row says rediss: the outbox and emit.stats keep it.
    assert db.one("SELECT url FROM emit.stored_destinations WHERE name = %s", (dest,)).startswith("rediss://")


def failure(db, dest):
    """The WARNING of one sync send to `dest`."""
    db.notices.clear()
    assert db.one("SELECT send_message(%s, '{}', 'sync')", (dest,)) is False
    w = db.warnings()
    assert len(w) == 1, w
    return w[0]


def test_an_unknown_ca_is_refused_and_says_so(db, dest, pki, redis_tls):
    # Not in the system's store, and not the other CA either.
    for options in ({}, {"ca_file": pem(pki, "other_ca.pem")}):
        db.execute("SELECT emit.create_destination(%s, %s, %s)",
                   (dest, f"rediss://127.0.0.1:{redis_tls.port}/orders", json.dumps(options)))
        w = failure(db, dest)
        assert "not signed by a trusted CA" in w and "127.0.0.1" not in w, w
        db.execute("SELECT emit.drop_destination(%s)", (dest,))
    assert redis_tls.client.xlen("orders") == 0


def test_the_certificate_must_name_the_server(db, dest, pki, redis_tls):
    db.execute("SELECT emit.create_destination(%s, %s, %s)",
               (dest, f"rediss://127.0.0.1:{redis_tls.port}/orders",
                json.dumps({"ca_file": pem(pki, "ca.pem"), "server_name": "redis.internal"})))
    w = failure(db, dest)
    assert "not valid for its name" in w and "redis.internal" not in w, w
    # The name it does carry.
    db.execute("SELECT emit.alter_destination(%s, NULL, %s)",
               (dest, json.dumps({"ca_file": pem(pki, "ca.pem"), "server_name": "localhost"})))
    assert db.one("SELECT send_message(%s, '{}', 'sync')", (dest,)) is True


def test_client_certificates(db, dest, pki):
    server = RedisServer(tls=pki, client_certs=True)
    try:
        url = f"rediss://127.0.0.1:{server.port}/orders"
        db.execute("SELECT emit.create_destination(%s, %s, %s)",
                   (dest, url, json.dumps({"ca_file": pem(pki, "ca.pem")})))
        w = failure(db, dest)
        assert "the server requires a client certificate (cert_file, key_file)" in w, w
        db.execute("SELECT emit.alter_destination(%s, NULL, %s)",
                   (dest, json.dumps({"ca_file": pem(pki, "ca.pem"), "cert_file": pem(pki, "expired.pem"),
                                      "key_file": pem(pki, "expired.key")})))
        w = failure(db, dest)
        assert "the server refused our client certificate (CertificateExpired)" in w, w
        db.execute("SELECT emit.alter_destination(%s, NULL, %s)",
                   (dest, json.dumps({"ca_file": pem(pki, "ca.pem"), "cert_file": pem(pki, "client.pem"),
                                      "key_file": pem(pki, "client.key")})))
        assert db.one("SELECT send_message(%s, '{\"ok\": true}', 'sync')", (dest,)) is True
        assert [e for _, _, e in server.entries("orders")] == [{"ok": True}]
    finally:
        server.close()


def test_a_plain_url_to_a_tls_port_fails_cleanly(db, dest, redis_tls):
    db.execute("SELECT emit.create_destination(%s, %s)",
               (dest, f"redis://127.0.0.1:{redis_tls.port}/orders"))
    w = failure(db, dest)
    assert "127.0.0.1" not in w, w


def test_tls_files_are_for_roles_that_may_read_server_files(db, cluster, dest, pki, redis_tls):
    url = f"rediss://127.0.0.1:{redis_tls.port}/orders"
    db.execute("DROP ROLE IF EXISTS tls_admin")
    db.execute("CREATE ROLE tls_admin LOGIN")
    db.execute("GRANT emit_admin TO tls_admin")
    s = Session(cluster, DB, user="tls_admin")
    try:
        # emit_admin may store TLS destinations that read no files.
        s.execute("SELECT emit.create_destination(%s, %s)", (dest, url))
        # Naming a file the server reads is reading server files.
        for options in ({"ca_file": "/etc/shadow"}, {"ca_file": pem(pki, "ca.pem")}):
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
                s.execute("SELECT emit.alter_destination(%s, NULL, %s)", (dest, json.dumps(options)))
            assert "pg_read_server_files" in str(e.value)
        db.execute("SELECT emit.alter_destination(%s, NULL, %s)",
                   (dest, json.dumps({"ca_file": pem(pki, "ca.pem")})))
        # Files someone allowed stay when emit_admin changes something else.
        s.execute("SELECT emit.alter_destination(%s, %s)", (dest, url.replace("orders", "orders2")))
        # But they do not go to another server with them.
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            s.execute("SELECT emit.alter_destination(%s, %s)",
                      (dest, url.replace(str(redis_tls.port), str(redis_tls.port + 1))))
        db.execute("GRANT pg_read_server_files TO tls_admin")
        s.execute("SELECT emit.alter_destination(%s, NULL, %s)",
                  (dest, json.dumps({"ca_file": pem(pki, "other_ca.pem")})))
    finally:
        s.close()
        db.execute("DROP OWNED BY tls_admin")
        db.execute("DROP ROLE tls_admin")


@pytest.mark.parametrize("options, text", [
    ({"ca_file": "/nonexistent/ca.pem"}, "ca_file: entity not found"),
    ({"ca_file": "/etc/hostname"}, "ca_file holds no PEM certificate"),
    ({"cert_file": "/x.pem"}, "cert_file and key_file go together"),
    ({"server_name": "not a name"}, "server_name"),
])
def test_bad_tls_options_are_refused_when_stored(db, dest, options, text):
    with pytest.raises(psycopg.errors.InvalidParameterValue) as e:
        db.execute("SELECT emit.create_destination(%s, 'rediss://127.0.0.1/orders', %s)",
                   (dest, json.dumps(options)))
    assert text in str(e.value)
    with pytest.raises(psycopg.errors.InvalidParameterValue) as e:
        db.execute("SELECT emit.create_destination(%s, 'redis://127.0.0.1/orders', %s)",
                   (dest, json.dumps({"ca_file": "/etc/ssl/certs/ca-certificates.crt"})))
    assert "rediss://" in str(e.value)


def test_the_stats_and_outbox_hold_no_tls_secrets(db, table, dest, pki, redis_tls):
    """The key file's path is an option like a password: in
    emit.stored_destinations only."""
    db.execute("SELECT emit.create_destination(%s, %s, %s)",
               (dest, f"rediss://127.0.0.1:{redis_tls.port}/orders",
                json.dumps({"ca_file": pem(pki, "other_ca.pem")})))
    attach(db, table, dest, "delivery=async")
    db.execute(f"INSERT INTO {table} VALUES (1, 'a')")
    assert wait_until(lambda: "trusted CA" in (db.one(
        "SELECT last_error FROM emit.outbox WHERE destination = %s", (dest,)) or ""), 10)
    row = db.one("SELECT row_to_json(o)::text FROM emit.outbox o WHERE destination = %s", (dest,))
    assert "other_ca" not in row and "pki" not in row


# --- NATS ----------------------------------------------------------------------------


def nats_dest(db, dest, url, **options):
    db.execute("SELECT emit.create_destination(%s, %s, %s)", (dest, url, json.dumps(options)))


@pytest.mark.parametrize("scheme", ["nats", "tls"])
def test_nats_over_tls_with_credentials(db, table, dest, pki, scheme):
    """A server that requires TLS: nats:// follows it, tls:// asks for it;
    credentials go inside the TLS session."""
    server = NatsServer(user="emit", password="pw", tls=pki)
    try:
        server.add_stream("ORDERS", ["orders.>"])
        nats_dest(db, dest, f"{scheme}://127.0.0.1:{server.port}/orders.tls",
                  username="emit", password="pw", ca_file=pem(pki, "ca.pem"))
        attach(db, table, dest, "delivery=async")
        db.execute(f"INSERT INTO {table} SELECT g, 'a' FROM generate_series(1, 20) g")
        got = server.wait_for("ORDERS", 20)
        assert [e["new"]["id"] for _, e in got] == list(range(1, 21))
        assert db.one("SELECT send_message(%s, '{\"n\": 1}', 'sync')", (dest,)) is True
    finally:
        server.close()


def test_tls_url_to_a_server_without_tls_sends_nothing(db, dest):
    server = NatsServer(user="emit", password="pw")
    try:
        nats_dest(db, dest, f"tls://127.0.0.1:{server.port}/orders.x", username="emit", password="pw")
        w = failure(db, dest)
        assert "does not offer TLS" in w, w
    finally:
        server.close()


def test_nats_client_certificates(db, dest, pki):
    server = NatsServer(tls=pki, client_certs=True)
    try:
        server.add_stream("ORDERS", ["orders.>"])
        url = f"tls://127.0.0.1:{server.port}/orders.cert"
        nats_dest(db, dest, url, ca_file=pem(pki, "ca.pem"))
        w = failure(db, dest)
        assert "client certificate" in w or "closed the connection" in w, w
        db.execute("SELECT emit.drop_destination(%s)", (dest,))
        nats_dest(db, dest, url, ca_file=pem(pki, "ca.pem"), cert_file=pem(pki, "expired.pem"),
                  key_file=pem(pki, "expired.key"))
        w = failure(db, dest)
        assert "client certificate" in w or "closed the connection" in w, w
        db.execute("SELECT emit.drop_destination(%s)", (dest,))
        nats_dest(db, dest, url, ca_file=pem(pki, "ca.pem"), cert_file=pem(pki, "client.pem"),
                  key_file=pem(pki, "client.key"))
        assert db.one("SELECT send_message(%s, '{\"ok\": true}', 'sync')", (dest,)) is True
        assert [e for _, e in server.messages("ORDERS")] == [{"ok": True}]
    finally:
        server.close()


def test_nats_tls_first(db, table, dest, pki):
    """A server that expects the handshake before anything (nats-server's
    `handshake_first`, newer than Debian's 2.9: a TLS terminator in front of
    a plain one here) gets it with `tls_first`."""
    server = NatsServer()
    proxy = TlsFirst(pki, server.port)
    try:
        server.add_stream("ORDERS", ["orders.>"])
        nats_dest(db, dest, f"tls://127.0.0.1:{proxy.port}/orders.first", ca_file=pem(pki, "ca.pem"),
                  tls_first=True)
        attach(db, table, dest, "delivery=async")
        db.execute(f"INSERT INTO {table} SELECT g, 'a' FROM generate_series(1, 10) g")
        assert [e["new"]["id"] for _, e in server.wait_for("ORDERS", 10)] == list(range(1, 11))
        assert proxy.handshakes >= 1
    finally:
        proxy.close()
        server.close()


# --- Kafka ---------------------------------------------------------------------------


def kafka(gate):
    server = KafkaServer(gate=gate)
    server.create_topic("orders")
    return server


@pytest.mark.parametrize("protocol, mechanism", [
    ("sasl_ssl", "PLAIN"), ("sasl_ssl", "SCRAM-SHA-256"), ("sasl_ssl", "SCRAM-SHA-512"),
    ("ssl", None), ("sasl_plaintext", "SCRAM-SHA-256"),
])
def test_kafka_security_protocols(db, table, dest, pki, protocol, mechanism):
    sasl, tls = protocol.startswith("sasl"), protocol.endswith("ssl")
    gate = KafkaGate(users={"emit": "s3cret"} if sasl else None,
                     mechanisms=(mechanism,) if mechanism else (), tls=pki if tls else None)
    server = kafka(gate)
    try:
        options = {"security_protocol": protocol}
        if sasl:
            options.update(sasl_mechanism=mechanism, username="emit", password="s3cret")
        if tls:
            options["ca_file"] = pem(pki, "ca.pem")
        db.execute("SELECT emit.create_destination(%s, %s, %s)",
                   (dest, f"kafka://{server.bootstrap}/orders", json.dumps(options)))
        attach(db, table, dest, "delivery=async")
        db.execute(f"INSERT INTO {table} SELECT g, 'a' FROM generate_series(1, 30) g")
        got = server.records("orders", 30)
        assert sorted(r["value"]["new"]["id"] for r in got) == list(range(1, 31))
        assert db.one("SELECT send_message(%s, '{\"n\": 1}', 'sync')", (dest,)) is True
        if sasl:
            # pg_emit's connections, and the reader's, each authenticated.
            assert (mechanism, "emit") in gate.authenticated
    finally:
        server.close()
        gate.close()


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-512"])
def test_kafka_wrong_password_is_refused_and_not_shown(db, dest, pki, mechanism):
    gate = KafkaGate(users={"emit": "s3cret"}, mechanisms=(mechanism,), tls=pki)
    server = kafka(gate)
    try:
        db.execute("SELECT emit.create_destination(%s, %s, %s)",
                   (dest, f"kafka://{server.bootstrap}/orders",
                    json.dumps({"security_protocol": "sasl_ssl", "sasl_mechanism": mechanism,
                                "username": "emit", "password": "hunter2", "ca_file": pem(pki, "ca.pem")})))
        w = failure(db, dest)
        assert f'SASL {mechanism}: the broker refused: "Authentication failed' in w, w
        assert "hunter2" not in w and "127.0.0.1" not in w
        assert gate.authenticated == []
    finally:
        server.close()
        gate.close()


def test_kafka_no_downgrade_to_a_weaker_mechanism(db, dest, pki):
    """A broker that offers only PLAIN, to a destination configured for
    SCRAM: refused, and the password never sent."""
    gate = KafkaGate(users={"emit": "s3cret"}, mechanisms=("PLAIN",), tls=pki)
    server = kafka(gate)
    try:
        db.execute("SELECT emit.create_destination(%s, %s, %s)",
                   (dest, f"kafka://{server.bootstrap}/orders",
                    json.dumps({"security_protocol": "sasl_ssl", "sasl_mechanism": "SCRAM-SHA-256",
                                "username": "emit", "password": "s3cret", "ca_file": pem(pki, "ca.pem")})))
        w = failure(db, dest)
        assert 'SASL SCRAM-SHA-256: the broker does not offer it (it offers "PLAIN")' in w, w
        assert gate.authenticated == []
    finally:
        server.close()
        gate.close()


def test_kafka_ssl_verifies_the_broker(db, dest, pki):
    gate = KafkaGate(tls=pki)
    server = kafka(gate)
    try:
        db.execute("SELECT emit.create_destination(%s, %s, %s)",
                   (dest, f"kafka://{server.bootstrap}/orders",
                    json.dumps({"security_protocol": "ssl", "ca_file": pem(pki, "other_ca.pem")})))
        w = failure(db, dest)
        assert "not signed by a trusted CA" in w, w
    finally:
        server.close()
        gate.close()


# --- HTTPS ---------------------------------------------------------------------------


@pytest.fixture
def https_mtls(pki):
    """An HTTPS receiver that requires a client certificate from its CA."""
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pem(pki, "server.pem"), pem(pki, "server.key"))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(pem(pki, "ca.pem"))
    srv = HttpReceiver(tls=ctx)
    yield srv
    srv.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_https_client_certificates_and_own_ca(db, table, dest, pki, https_mtls, mode):
    """A stored https:// destination's own ca_file (not pg_emit.ca_file)
    and client certificate, in a backend and in the worker."""
    db.execute("SELECT emit.create_destination(%s, %s, %s)",
               (dest, https_mtls.url, json.dumps({"ca_file": pem(pki, "ca.pem"),
                                                  "cert_file": pem(pki, "client.pem"),
                                                  "key_file": pem(pki, "client.key")})))
    attach(db, table, dest, f"delivery={mode}")
    db.execute(f"INSERT INTO {table} SELECT g, 'a' FROM generate_series(1, 5) g")
    got = https_mtls.wait_for(5)
    assert sorted(json.loads(r[3])["new"]["id"] for r in got) == [1, 2, 3, 4, 5]
    assert db.warnings() == []


def test_https_without_the_client_certificate_is_refused(db, dest, pki, https_mtls):
    db.execute("SELECT emit.create_destination(%s, %s, %s)",
               (dest, https_mtls.url, json.dumps({"ca_file": pem(pki, "ca.pem")})))
    assert "certificate" in failure(db, dest).lower()
    db.execute("SELECT emit.alter_destination(%s, NULL, %s)",
               (dest, json.dumps({"ca_file": pem(pki, "ca.pem"), "cert_file": pem(pki, "expired.pem"),
                                  "key_file": pem(pki, "expired.key")})))
    failure(db, dest)
    assert https_mtls.requests == []


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_https_server_name(db, table, dest, pki, mode):
    """server_name is the name the certificate is checked against and the
    SNI sent, while the request still names the URL's host. The server's
    certificate names 127.0.0.1 too: a refusal of another name shows the
    check uses server_name, not the URL."""
    import ssl

    seen = []
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pem(pki, "server.pem"), pem(pki, "server.key"))
    ctx.sni_callback = lambda sock, name, c: seen.append(name)
    srv = HttpReceiver(tls=ctx)
    try:
        db.execute("SELECT emit.create_destination(%s, %s, %s)",
                   (dest, srv.url, json.dumps({"ca_file": pem(pki, "ca.pem"),
                                               "server_name": "api.internal"})))
        w = failure(db, dest)
        assert "not valid for its name (server_name)" in w and "api.internal" not in w, w
        assert srv.requests == [] and "api.internal" in seen
        db.notices.clear()
        db.execute("SELECT emit.alter_destination(%s, NULL, %s)",
                   (dest, json.dumps({"ca_file": pem(pki, "ca.pem"), "server_name": "localhost"})))
        attach(db, table, dest, f"delivery={mode}")
        db.execute(f"INSERT INTO {table} VALUES (1, 'a')")
        got = srv.wait_for(1)
        assert len(got) == 1 and json.loads(got[0][3])["new"]["id"] == 1
        assert got[0][2]["host"] == f"127.0.0.1:{srv.port}"
        assert seen[-1] == "localhost"
        assert db.warnings() == []
    finally:
        srv.close()


def test_https_options_need_https(db, dest):
    with pytest.raises(psycopg.errors.InvalidParameterValue) as e:
        db.execute("SELECT emit.create_destination(%s, 'http://127.0.0.1:1/x', %s)",
                   (dest, json.dumps({"ca_file": "/etc/hostname"})))
    assert "https://" in str(e.value)


class Scripted(Listener):
    """A listener that answers each connection with `first` (bytes), after
    `delay` seconds, then relays to `upstream` if given."""

    def __init__(self, first=b"", delay=0.0, upstream=None):
        self.first, self.delay, self.upstream = first, delay, upstream
        super().__init__()

    def serve(self, c, seq):
        import socket
        import time

        time.sleep(self.delay)
        if self.first:
            c.sendall(self.first)
        if self.upstream is not None:
            relay(c, socket.create_connection(("127.0.0.1", self.upstream)))


def test_nats_cleartext_after_info_is_not_taken_for_tls(db, dest, pki):
    """STARTTLS injection: a PONG sent in the clear after an INFO that
    asks for TLS must not pass for the server's answer over TLS."""
    fake = Scripted(b'INFO {"tls_required":true}\r\nPONG\r\n')
    try:
        nats_dest(db, dest, f"nats://127.0.0.1:{fake.port}/orders.x", username="u", password="pw",
                  ca_file=pem(pki, "ca.pem"))
        assert "sent more than INFO before TLS" in failure(db, dest)
    finally:
        fake.close()


def test_nats_tls_with_a_slow_info(db, dest, pki):
    """A TLS server whose INFO takes 400 ms (a loaded server, a far one)
    still gets the upgrade after INFO, not a handshake it did not expect."""
    server = NatsServer(tls=pki)
    slow = Scripted(delay=0.4, upstream=server.port)
    try:
        server.add_stream("ORDERS", ["orders.>"])
        nats_dest(db, dest, f"tls://127.0.0.1:{slow.port}/orders.slow", ca_file=pem(pki, "ca.pem"),
                  server_name="localhost")
        assert db.one("SELECT send_message(%s, '{\"n\": 1}', 'sync')", (dest,)) is True, db.warnings()
    finally:
        slow.close()
        server.close()
