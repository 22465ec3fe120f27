"""Standard Webhooks signing, verified by the official `standardwebhooks`
library (PyPI), as a receiver built on it would."""

import base64
import json
import os

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from conftest import docs_block
from pgcluster import wait_until
from receivers import HttpReceiver

pytestmark = pytest.mark.usefixtures("fast_retries")


def new_secret():
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


def verify(secret, req):
    """The library's own check: raises unless the signature is right."""
    return Webhook(secret).verify(req[3], req[2])


def test_async_events_verify_and_keep_their_webhook_id_across_retries(db, table, dest):
    secret = new_secret()
    rx = HttpReceiver(script=[(500, {}, b"try later")])
    try:
        db.execute("SELECT emit.create_destination(%s, %s, %s)",
                   (dest, rx.url, json.dumps({"secret": secret})))
        db.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
        db.execute(f"CREATE TRIGGER out AFTER INSERT ON {table} FOR EACH ROW "
                   f"EXECUTE FUNCTION row_to_destination('{dest}', 'delivery=async')")
        db.execute(f"INSERT INTO {table} VALUES (7)")
        first, retry = rx.wait_for(2)[:2]
        for req in (first, retry):
            assert verify(secret, req)["new"]["id"] == 7
        # The retry is the same message to the receiver: same webhook-id,
        # made of the event's stream and id.
        assert first[2]["webhook-id"] == retry[2]["webhook-id"]
        event = json.loads(retry[3])
        assert retry[2]["webhook-id"] == f"evt_{event['stream']}_{event['id']}"
        # No 0.1.0 headers beside the standard ones.
        assert "x-emit-signature" not in retry[2]
        # A body changed on the way fails verification.
        with pytest.raises(WebhookVerificationError):
            Webhook(secret).verify(retry[3].replace(b"7", b"8"), retry[2])
    finally:
        rx.close()


def test_two_secrets_sign_twice_for_rotation(db, dest):
    old, new = new_secret(), new_secret()
    rx = HttpReceiver()
    try:
        db.execute("SELECT emit.create_destination(%s, %s, %s)",
                   (dest, rx.url, json.dumps({"secret": f"{new} {old}"})))
        assert db.one("SELECT send_message(%s, '{\"n\":1}', 'sync')", (dest,)) is True
        req = rx.wait_for(1)[0]
        # A receiver still on the old secret and one already on the new
        # one both accept it.
        assert verify(old, req) == {"n": 1}
        assert verify(new, req) == {"n": 1}
        assert len(req[2]["webhook-signature"].split(" ")) == 2
        with pytest.raises(WebhookVerificationError):
            verify(new_secret(), req)
    finally:
        rx.close()


def test_the_documented_check_verifies_a_real_request(db, dest):
    """docs/formats.md's fragment, run as written with `request` being
    what the receiver got."""
    import types

    secret = new_secret()
    rx = HttpReceiver()
    try:
        db.execute("SELECT emit.create_destination(%s, %s, %s)",
                   (dest, rx.url, json.dumps({"secret": secret})))
        assert db.one("SELECT send_message(%s, '{\"n\":1}', 'sync')", (dest,)) is True
        req = rx.wait_for(1)[0]
        code = docs_block("python", "from standardwebhooks").replace("whsec_...", secret)
        scope = {"request": types.SimpleNamespace(body=req[3], headers=req[2])}
        exec(code, scope)
        assert scope["event"] == {"n": 1}
        scope["request"] = types.SimpleNamespace(body=req[3].replace(b"1", b"2"), headers=req[2])
        with pytest.raises(WebhookVerificationError):
            exec(code, scope)
    finally:
        rx.close()


def test_commit_and_batch_requests_verify(db, table, dest):
    secret = new_secret()
    rx = HttpReceiver()
    try:
        db.execute("SELECT emit.create_destination(%s, %s, %s)",
                   (dest, rx.url, json.dumps({"secret": secret, "batch": 10})))
        db.execute("SELECT send_message(%s, '{\"n\":1}', 'commit')", (dest,))
        db.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
        db.execute(f"CREATE TRIGGER out AFTER INSERT ON {table} FOR EACH ROW "
                   f"EXECUTE FUNCTION row_to_destination('{dest}', 'delivery=async')")
        db.execute(f"INSERT INTO {table} SELECT g FROM generate_series(1, 5) g")
        got = rx.wait_for(2)
        assert verify(secret, got[0]) == {"n": 1}
        batch = verify(secret, got[1])
        assert sorted(e["new"]["id"] for e in batch) == [1, 2, 3, 4, 5]
        first, last = batch[0], batch[-1]
        assert got[1][2]["webhook-id"] == f"evt_{first['stream']}_{first['id']}-{last['id']}"
    finally:
        rx.close()


def test_signing_none_sends_no_signature(db, dest):
    rx = HttpReceiver()
    try:
        db.execute("SELECT emit.create_destination(%s, %s, '{\"signing\": \"none\"}')", (dest, rx.url))
        db.execute("SELECT send_message(%s, '{}', 'sync')", (dest,))
        headers = rx.wait_for(1)[0][2]
        signed = ("webhook-signature", "webhook-timestamp", "x-emit-signature", "x-emit-timestamp")
        assert not any(k in headers for k in signed), headers
        # The event id still goes out (unsigned): a receiver's dedupe key
        # whatever the body's format.
        assert headers["webhook-id"].startswith("message_")
    finally:
        rx.close()


def test_secrets_stay_out_of_sight(db, dest):
    secret = new_secret()
    db.execute("SELECT emit.create_destination(%s, 'https://127.0.0.1:1/x', %s)",
               (dest, json.dumps({"secret": secret})))
    # Not in stats, not in the outbox of a queued message.
    db.execute("SELECT send_message(%s, '{}')", (dest,))
    assert wait_until(lambda: db.one("SELECT count(*) FROM emit.stats WHERE destination = %s", (dest,)) == 1)
    assert secret[6:] not in repr(db.execute("SELECT * FROM emit.stats").fetchall())
    assert secret[6:] not in repr(db.execute("SELECT * FROM emit.outbox").fetchall())
    db.execute("DELETE FROM emit.outbox WHERE destination = %s", (dest,))
