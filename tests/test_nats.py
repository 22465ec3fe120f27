"""What only NATS JetStream destinations do (`nats://host:port/subject`),
against a real nats-server read back with nats-py: a subject no stream
captures is an error that says so, credentials (user and password, token)
from a stored destination, none sent to a server that requires TLS, and
NATS's own refusals. What every broker does is in test_brokers.py."""

import json

import psycopg
import pytest

from conftest import attach
from pgcluster import wait_until
from receivers import NatsOperator, NatsServer

pytestmark = pytest.mark.usefixtures("fast_retries")


@pytest.fixture
def server():
    s = NatsServer()
    s.add_stream("ORDERS", ["orders.>"])
    yield s
    s.close()


def test_a_subject_no_stream_captures_waits_and_says_why(db, table, server):
    attach(db, table, f"nats://127.0.0.1:{server.port}/invoices.paid", "delivery=async")
    db.execute(f"INSERT INTO {table} VALUES (1, 'a')")
    assert wait_until(lambda: "no JetStream stream captures subject" in (db.one(
        "SELECT last_error FROM emit.outbox WHERE port = %s", (server.port,)) or ""), 10)
    with pytest.raises(psycopg.errors.ConnectionFailure) as e:
        db.execute("SET pg_emit.on_error = 'error'")
        db.execute(f"SELECT send_message('nats://127.0.0.1:{server.port}/invoices.paid', '{{}}', 'sync')")
    assert "invoices.paid" in str(e.value)
    db.execute("RESET pg_emit.on_error")
    server.add_stream("INVOICES", ["invoices.>"])
    assert [e["new"]["id"] for _, e in server.wait_for("INVOICES", 1)] == [1]


@pytest.mark.parametrize("auth, options", [
    ({"user": "emit", "password": "pw"}, {"username": "emit", "password": "pw"}),
    ({"token": "t0ken"}, {"token": "t0ken"}),
])
def test_credentials_from_a_stored_destination(db, table, dest, auth, options):
    server = NatsServer(**auth)
    try:
        server.add_stream("ORDERS", ["orders.>"])
        wrong = {k: "wrong" if k != "username" else v for k, v in options.items()}
        db.execute("SELECT emit.create_destination(%s, %s, %s)",
                   (dest, f"nats://127.0.0.1:{server.port}/orders.auth", json.dumps(wrong)))
        attach(db, table, dest, "delivery=async")
        db.execute(f"INSERT INTO {table} VALUES (1, 'a')")
        assert wait_until(lambda: "uthorization" in (db.one(
            "SELECT last_error FROM emit.outbox WHERE destination = %s", (dest,)) or ""), 10)
        db.execute("SELECT emit.alter_destination(%s, NULL, %s)", (dest, json.dumps(options)))
        assert [e["new"]["id"] for _, e in server.wait_for("ORDERS", 1)] == [1]
    finally:
        server.close()


def test_no_credentials_go_to_a_server_that_requires_tls(db, table, dest, pki):
    """A server that requires TLS gets it, verified: its certificate is
    not one the system trusts, so nothing (no password) is sent."""
    server = NatsServer(user="emit", password="pw", tls=pki)
    try:
        db.execute("SELECT emit.create_destination(%s, %s, %s)",
                   (dest, f"nats://127.0.0.1:{server.port}/orders.tls",
                    json.dumps({"username": "emit", "password": "pw"})))
        attach(db, table, dest, "delivery=async")
        db.execute(f"INSERT INTO {table} VALUES (1, 'a')")
        assert wait_until(lambda: "not signed by a trusted CA" in (db.one(
            "SELECT last_error FROM emit.outbox WHERE destination = %s", (dest,)) or ""), 10)
    finally:
        server.close()


@pytest.mark.parametrize("call, text", [
    ("send_message('nats://u:pw@127.0.0.1/a', '{}')", "stored destination's options"),
    ("send_message('nats://127.0.0.1/orders.*', '{}')", "without wildcards"),
    ("send_message('nats://127.0.0.1/', '{}')", "nats://host[:port]/subject"),
    ("emit.create_destination('x', 'redis://127.0.0.1/s', '{\"token\": \"t\"}')", "nats:// destinations only"),
    ("emit.create_destination('x', 'nats://127.0.0.1/a', '{\"password\": \"p\"}')", "needs its username"),
])
def test_bad_nats_destinations(db, call, text):
    with pytest.raises(psycopg.errors.InvalidParameterValue) as e:
        db.execute(f"SELECT {call}")
    assert text in str(e.value)


# The NATS documentation's NKeys example pair (checked with the NATS
# project's Python `nkeys`).
NKEY_SEED = "SUACSSL3UAHUDXKFSNVUZRF5UHPMWZ6BFDTJ7M6USDXIEDNPPQYYYCU3VY"
NKEY_PUBLIC = "UDXU4RCSJNZOIQHZNWXHXORDPRTGNJAHAHFRGZNEEJCPQTT2M7NLCNF4"


def test_nkey_users_sign_the_servers_nonce(db, table, dest):
    server = NatsServer(user="reader", password="pw", nkey=NKEY_PUBLIC)
    try:
        server.add_stream("ORDERS", ["orders.>"])
        url = f"nats://127.0.0.1:{server.port}/orders.nkey"
        # Another user's seed: refused by the server.
        other = "SUAMK2FG4MI6UE3ACF3FK3OIQBCEIEZV7NSWFFEW63UXMRLFM2XLAXK4GY"
        db.execute("SELECT emit.create_destination(%s, %s, %s)", (dest, url, json.dumps({"nkey_seed": other})))
        attach(db, table, dest, "delivery=async")
        db.execute(f"INSERT INTO {table} VALUES (1, 'a')")
        assert wait_until(lambda: "uthorization" in (db.one(
            "SELECT last_error FROM emit.outbox WHERE destination = %s", (dest,)) or ""), 10)
        last_error = db.one("SELECT last_error FROM emit.outbox WHERE destination = %s", (dest,))
        assert other not in last_error
        db.execute("SELECT emit.alter_destination(%s, NULL, %s)", (dest, json.dumps({"nkey_seed": NKEY_SEED})))
        assert [e["new"]["id"] for _, e in server.wait_for("ORDERS", 1)] == [1]
    finally:
        server.close()


def test_creds_users_of_an_operator(db, table, dest):
    """A .creds file's user (a JWT user of an operator, as `nsc` and
    Synadia Cloud give them): its JWT is sent and the server's nonce
    signed with its seed. A user of an account the server does not trust
    is refused, and the file's text is never shown."""
    server = NatsServer(operator=True)
    try:
        server.add_stream("ORDERS", ["orders.>"])
        url = f"nats://127.0.0.1:{server.port}/orders.creds"
        stranger = server.operator.creds("stranger", account=NatsOperator.pair("A"))
        db.execute("SELECT emit.create_destination(%s, %s, %s)", (dest, url, json.dumps({"creds": stranger})))
        attach(db, table, dest, "delivery=async")
        db.execute(f"INSERT INTO {table} VALUES (1, 'a')")
        assert wait_until(lambda: "uthorization" in (db.one(
            "SELECT last_error FROM emit.outbox WHERE destination = %s", (dest,)) or ""), 10)
        last_error = db.one("SELECT last_error FROM emit.outbox WHERE destination = %s", (dest,))
        jwt, seed = (line for line in stranger.splitlines() if line.startswith(("eyJ", "SU")))
        assert jwt not in last_error and seed not in last_error
        db.execute("SELECT emit.alter_destination(%s, NULL, %s)",
                   (dest, json.dumps({"creds": server.operator.creds("emit")})))
        assert [e["new"]["id"] for _, e in server.wait_for("ORDERS", 1)] == [1]
        assert db.one("SELECT send_message(%s, '{\"n\": 2}', 'sync')", (dest,)) is True
        assert server.count("ORDERS") == 2
    finally:
        server.close()


def test_bad_creds_are_refused_when_stored(db, dest):
    op = NatsOperator()
    a, b = op.creds("a"), op.creds("b")
    swapped = a.split("-----BEGIN USER NKEY SEED")[0] + "-----BEGIN USER NKEY SEED" + \
        b.split("-----BEGIN USER NKEY SEED")[1]
    seed = swapped.split("-----BEGIN USER NKEY SEED-----\n")[1].split("\n")[0]
    for options, why in [({"creds": swapped}, "another user"),
                         ({"creds": seed}, "not a .creds file"),
                         ({"creds": a, "nkey_seed": NKEY_SEED}, "give one of")]:
        with pytest.raises(psycopg.errors.InvalidParameterValue) as e:
            db.execute("SELECT emit.create_destination(%s, 'nats://127.0.0.1/a', %s)",
                       (dest, json.dumps(options)))
        assert why in str(e.value) and seed not in str(e.value), str(e.value)


def test_bad_nkey_seeds_are_refused_when_stored(db, dest):
    for seed, why in [(NKEY_PUBLIC, "is a public key"), ("SUAC", "not an NKey seed")]:
        with pytest.raises(psycopg.errors.InvalidParameterValue) as e:
            db.execute("SELECT emit.create_destination(%s, 'nats://127.0.0.1/a', %s)",
                       (dest, json.dumps({"nkey_seed": seed})))
        assert why in str(e.value) and seed not in str(e.value)
