"""The receivers the README and docs/ show really receive what pg_emit
sends."""

import json
import os
import subprocess
import sys

import pytest

from conftest import docs_text
from receivers import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("ndjson", [False, True])
def test_example_receiver_prints_events(db, table, ndjson):
    port = free_port()
    args = [sys.executable, "-u", os.path.join(ROOT, "examples", "receiver.py"), "--port", str(port)]
    if ndjson:
        args.append("--ndjson")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith(f"listening on 127.0.0.1:{port}")
        framing = ", 'framing=ndjson'" if ndjson else ""
        db.execute(f"CREATE TABLE {table} (id int, note text)")
        db.execute(
            f"CREATE TRIGGER out AFTER INSERT ON {table} FOR EACH ROW "
            f"EXECUTE FUNCTION row_to_socket('127.0.0.1', {port}{framing})"
        )
        db.execute(f"INSERT INTO {table} VALUES (1, 'one'), (2, 'two')")
        events = [json.loads(proc.stdout.readline()) for _ in range(2)]
        assert sorted(e["new"]["id"] for e in events) == [1, 2]
        assert db.warnings() == []
    finally:
        proc.kill()
        proc.wait()


def read_lines(proc, n, timeout=20):
    """`n` lines of `proc`'s output, or fewer when it stops printing: a
    thread reads them, so that a receiver that drops events fails the test
    instead of hanging it."""
    import queue
    import threading

    if not hasattr(proc, "lines"):
        proc.lines = queue.Queue()
        threading.Thread(target=lambda: [proc.lines.put(line) for line in proc.stdout],
                         daemon=True).start()
    out = []
    try:
        while len(out) < n:
            out.append(proc.lines.get(timeout=timeout))
    except queue.Empty:
        pass
    return out


def readme_block(marker):
    """The ```python block of the README or docs/ that contains `marker`."""
    blocks = docs_text().split("```python\n")[1:]
    return next(b.split("```", 1)[0] for b in blocks if marker in b)


@pytest.mark.usefixtures("fast_retries")
def test_readme_cloudevents_consumer_reads_both_modes(db, table, tmp_path):
    port = free_port()
    code = readme_block("from cloudevents.core").replace("8080", str(port))
    script = tmp_path / "consumer.py"
    script.write_text(code)
    proc = subprocess.Popen([sys.executable, "-u", str(script)], stdout=subprocess.PIPE, text=True)
    try:
        db.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
        for n, mode in enumerate(["structured", "binary"]):
            db.execute(f"CREATE OR REPLACE TRIGGER out AFTER INSERT ON {table} FOR EACH ROW "
                       f"EXECUTE FUNCTION row_to_http('http://127.0.0.1:{port}/', 'format=cloudevents', "
                       f"'cloudevents={mode}', 'delivery=async')")
            # The consumer may still be starting: async delivery retries.
            db.execute(f"INSERT INTO {table} VALUES ({n + 1})")
            line = proc.stdout.readline().split()
            assert line[0].startswith("evt_") and line[1:3] == ["pg_emit.row.insert", f"public.{table}"]
            assert json.loads(" ".join(line[3:]).replace("'", '"')) == {"id": n + 1}
    finally:
        proc.kill()
        proc.wait()


def test_readme_kafka_consumer_drops_redeliveries(db, table, tmp_path):
    from receivers import KafkaServer

    server = KafkaServer()
    try:
        server.create_topic("orders")
        code = readme_block("from confluent_kafka").replace("127.0.0.1:9092", server.bootstrap)
        script = tmp_path / "consumer.py"
        script.write_text(code)
        proc = subprocess.Popen([sys.executable, "-u", str(script)], stdout=subprocess.PIPE, text=True)
        try:
            db.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
            db.execute(f"CREATE TRIGGER out AFTER INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION "
                       f"row_to_destination('kafka://{server.bootstrap}/orders', 'delivery=async')")
            db.execute(f"INSERT INTO {table} VALUES (1)")
            # The same record again, as a new producer session after a
            # crash would produce it: the consumer prints it once.
            from confluent_kafka import Consumer, Producer
            c = Consumer({"bootstrap.servers": server.bootstrap, "group.id": "copy",
                          "auto.offset.reset": "earliest"})
            c.subscribe(["orders"])
            m = None
            while m is None or m.error():
                m = c.poll(1.0)
            c.close()
            p = Producer({"bootstrap.servers": server.bootstrap})
            p.produce("orders", key=m.key(), value=m.value(), headers=m.headers(), partition=m.partition())
            p.flush(10)
            db.execute(f"INSERT INTO {table} VALUES (2)")
            import ast
            import time
            lines = [proc.stdout.readline() for _ in range(2)]
            # "<partition> <key> <event>", the event as Python prints a dict.
            ids = [ast.literal_eval(line.split(" ", 2)[2])["new"]["id"] for line in lines]
            assert sorted(ids) == [1, 2]
            # The copy of event 1 was read and dropped: nothing more comes.
            time.sleep(2)
            proc.kill()
            assert proc.stdout.read() == ""
        finally:
            proc.kill()
            proc.wait()
    finally:
        server.close()


@pytest.mark.usefixtures("fast_retries")
def test_readme_webhook_receiver_keeps_every_event_and_drops_repeats(db, table, tmp_path):
    """0.2.0's example kept the highest id: under the default 32 requests
    in flight it dropped most events."""
    import urllib.request

    port = free_port()
    code = readme_block("class Seen:").replace("8080", str(port))
    script = tmp_path / "webhook.py"
    script.write_text(code)
    proc = subprocess.Popen([sys.executable, "-u", str(script)], stdout=subprocess.PIPE, text=True)
    try:
        db.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
        db.execute(f"CREATE TRIGGER out AFTER INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION "
                   f"row_to_http('http://127.0.0.1:{port}/orders', 'delivery=async')")
        db.execute(f"INSERT INTO {table} SELECT g FROM generate_series(1, 300) g")
        lines = read_lines(proc, 300)
        assert [line for line in lines if not line.startswith(f"INSERT {table} ")] == []
        # A repeat of an event already processed (as after a crash) is
        # dropped: the next line printed is the next row's.
        db.execute(f"INSERT INTO {table} VALUES (301)")
        assert read_lines(proc, 1)[0].split()[:2] == ["INSERT", table]
        stream = db.one("SELECT stream::text FROM emit.destinations WHERE destination LIKE %s",
                        (f"http://127.0.0.1:{port}/%",))
        body = json.dumps({"id": 5, "stream": stream, "op": "INSERT", "table": table,
                           "new": {"id": 5}, "old": None}).encode()
        urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/orders", data=body))
        db.execute(f"INSERT INTO {table} VALUES (302)")
        assert "'id': 302" in read_lines(proc, 1)[0]
    finally:
        proc.kill()
        proc.wait()
