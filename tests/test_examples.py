"""The receivers the README and docs/ show really receive what pg_emit
sends."""

import json
import os
import subprocess
import sys

import pytest

from conftest import docs_block
from pgcluster import wait_until
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


@pytest.mark.usefixtures("fast_retries")
def test_readme_cloudevents_consumer_reads_both_modes(db, table, tmp_path):
    port = free_port()
    code = docs_block("python", "from cloudevents.core").replace("8080", str(port))
    proc = python(tmp_path, code)
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
        code = docs_block("python", "from confluent_kafka").replace("127.0.0.1:9092", server.bootstrap)
        proc = python(tmp_path, code)
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
    code = docs_block("python", "class Seen:").replace("8080", str(port))
    proc = python(tmp_path, code)
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


def printed_events(lines):
    """The events a consumer printed as Python prints a dict, after
    whatever comes before them on the line."""
    import ast

    return [ast.literal_eval(line[line.index("{"):]) for line in lines]


def test_docs_redis_consumer_prints_each_event_once(db, table, tmp_path):
    from receivers import RedisServer

    server = RedisServer()
    try:
        code = docs_block("python", "import json, redis").replace(
            "redis.Redis()", f"redis.Redis(port={server.port})")
        proc = python(tmp_path, code)
        try:
            db.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
            db.execute(f"CREATE TRIGGER out AFTER INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION "
                       f"row_to_destination('redis://127.0.0.1:{server.port}/orders', 'delivery=async')")
            db.execute(f"INSERT INTO {table} VALUES (1), (2)")
            assert [e["new"]["id"] for e in printed_events(read_lines(proc, 2))] == [1, 2]
            # A redelivered entry (same event id) is dropped: the next
            # line printed is the next row's.
            (_, fields), = server.client.xrange("orders", count=1)
            server.client.xadd("orders", fields)
            db.execute(f"INSERT INTO {table} VALUES (3)")
            assert [e["new"]["id"] for e in printed_events(read_lines(proc, 1))] == [3]
        finally:
            proc.kill()
            proc.wait()
    finally:
        server.close()


def test_docs_nats_consumer_reads_and_acks(db, table, tmp_path):
    from receivers import NatsServer

    server = NatsServer()
    try:
        server.add_stream("ORDERS", ["orders.>"])
        code = docs_block("python", "import asyncio, json, nats").replace(
            "127.0.0.1:4222", f"127.0.0.1:{server.port}")
        proc = python(tmp_path, code)
        try:
            db.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
            db.execute(f"CREATE TRIGGER out AFTER INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION "
                       f"row_to_destination('nats://127.0.0.1:{server.port}/orders.new', 'delivery=async')")
            db.execute(f"INSERT INTO {table} VALUES (1), (2)")
            lines = read_lines(proc, 2)
            assert [line.split(" ", 1)[0] for line in lines] == [
                f"evt_{e['stream']}_{e['id']}" for e in printed_events(lines)]
            assert [e["new"]["id"] for e in printed_events(lines)] == [1, 2]
            # It acknowledges what it printed (just after printing it): its
            # durable consumer soon has nothing pending.
            import asyncio

            import nats

            async def pending():
                nc = await nats.connect(f"nats://127.0.0.1:{server.port}")
                try:
                    info = await nc.jetstream().consumer_info("ORDERS", "reader")
                    return info.num_pending, info.num_ack_pending
                finally:
                    await nc.close()
            assert wait_until(lambda: asyncio.run(pending()) == (0, 0), 10), asyncio.run(pending())
        finally:
            proc.kill()
            proc.wait()
    finally:
        server.close()


def python(tmp_path, code):
    """`code` run by this Python, its output read line by line."""
    script = tmp_path / "snippet.py"
    script.write_text(code)
    return subprocess.Popen([sys.executable, "-u", str(script)], stdout=subprocess.PIPE, text=True)


def node(tmp_path, code):
    """`code` run by Node.js (Debian's `nodejs`), its output read line by line."""
    script = tmp_path / "receiver.js"
    script.write_text(code)
    return subprocess.Popen(["node", str(script)], stdout=subprocess.PIPE, text=True)


def wait_listening(port, timeout=10):
    """Until a socket listens on 127.0.0.1:`port` (from /proc, without
    connecting to it)."""
    import time

    want = f"0100007F:{port:04X}"
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with open("/proc/net/tcp") as f:
            if any(line.split()[1] == want and line.split()[3] == "0A" for line in f.readlines()[1:]):
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


def test_docs_node_receiver_prints_events(db, table, tmp_path):
    port = free_port()
    proc = node(tmp_path, docs_block("js", 'require("net")').replace("26200", str(port)))
    try:
        db.execute(f"CREATE TABLE {table} (id int, note text)")
        db.execute(f"CREATE TRIGGER out AFTER INSERT ON {table} FOR EACH ROW "
                   f"EXECUTE FUNCTION row_to_socket('127.0.0.1', {port})")
        # A probe connection would be an empty message, which the
        # snippet does not expect: wait for its listening socket instead.
        wait_listening(port)
        db.execute(f"INSERT INTO {table} VALUES (1, 'one')")
        db.execute(f"INSERT INTO {table} VALUES (2, 'two')")
        assert db.warnings() == []
        # Node prints the parsed object (util.inspect), one per connection.
        out = "".join(read_lines(proc, 2 * 9, timeout=5))
        assert "op: 'INSERT'" in out and "new: { id: 2, note: 'two' }" in out, out
    finally:
        proc.kill()
        proc.wait()


# Deno.serve, as the Supabase Edge Functions runtime has it, over Node's
# own HTTP server and fetch classes: the handler is run as written.
DENO_SERVE = """
globalThis.Deno = { serve(handler) {
  require("http").createServer(async (req, res) => {
    const chunks = [];
    for await (const c of req) chunks.push(c);
    const r = await handler(new Request("http://127.0.0.1" + req.url, {
      method: req.method, headers: { "content-type": req.headers["content-type"] },
      body: Buffer.concat(chunks) }));
    res.writeHead(r.status).end();
  }).listen(PORT, "127.0.0.1", () => console.log("listening"));
} };
"""


def test_docs_supabase_edge_function_reads_format_supabase(db, table, dest, tmp_path):
    port = free_port()
    proc = node(tmp_path, DENO_SERVE.replace("PORT", str(port)) + docs_block("ts", "Deno.serve"))
    try:
        assert read_lines(proc, 1) == ["listening\n"]
        db.execute("SELECT emit.create_destination(%s, %s, %s)",
                   (dest, f"http://127.0.0.1:{port}/functions/v1/orders",
                    json.dumps({"format": "supabase", "headers": {"Authorization": "Bearer anon"}})))
        db.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, status text, note text)")
        db.execute(f"CREATE TRIGGER out AFTER INSERT OR UPDATE ON {table} FOR EACH ROW "
                   f"EXECUTE FUNCTION row_to_destination('{dest}')")
        db.execute(f"INSERT INTO {table} VALUES (1, 'new', '')")
        db.execute(f"UPDATE {table} SET note = 'only the note'")
        db.execute(f"UPDATE {table} SET status = 'paid'")
        assert db.warnings() == []
        # Only the status change is printed.
        assert read_lines(proc, 2, timeout=3) == [f"{table} 1: new -> paid\n"]
    finally:
        proc.kill()
        proc.wait()
