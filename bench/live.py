"""Live channels: fan-out latency to many subscribers, and replay on
reconnect, on one throwaway cluster (fsync on) whose pg_emit worker serves
/channels/<name> on 127.0.0.1.

1. SUBSCRIBERS subscribers of one channel (half Server-Sent Events, half
   WebSocket, spread over PROCESSES client processes) while pgbench commits
   RATE transactions/s for SECONDS s, each one send_message() whose payload
   has "t": clock_timestamp(). Every subscriber must get every stored
   event, in id order, once; latency is receipt time minus t (one machine,
   one clock), over every receipt, and is split into send → commit
   (track_commit_timestamp), commit → the worker's claim transaction
   (the event's created_at) and claim → receipt. The worker's CPU is read
   from /proc, with the rest of the machine's, over the same seconds.
2. RETAINED events kept on a channel: from connect with last_event_id just
   before the first until the last is received, over SSE and WebSocket.

Subscribers are raw asyncio sockets (HTTP and RFC 6455 framing written
here); during scenario 1 they only timestamp and keep what each read
returns, and parse it afterwards, so that the clients take as little as
possible of the 2 cores the server shares with them. LIVE_WS_CLIENT=
websockets uses the `websockets` library for the WebSocket half instead
(parsing as messages arrive). Figures are from one run on one machine;
nothing here is asserted by the test suite.

Usage: .venv/bin/python bench/live.py
LIVE_SUBSCRIBERS, LIVE_RATE, BENCH_SECONDS change scenario 1's numbers.
PG_EMIT_LIBDIR=<dir>: load <dir>/pg_emit.so (e.g. a release build) instead of
the installed library, through dynamic_library_path, without installing it.
"""

import array
import asyncio
import base64
import hashlib
import json
import math
import multiprocessing
import os
import re
import socket
import subprocess
import sys
import threading
import time

from websockets.asyncio.client import connect as ws_connect

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from pgcluster import BIN, Cluster, wait_until  # noqa: E402
from receivers import free_port  # noqa: E402

SUBSCRIBERS = int(os.environ.get("LIVE_SUBSCRIBERS", "100"))
PROCESSES = 2
RATE = int(os.environ.get("LIVE_RATE", "1000"))
SECONDS = int(os.environ.get("BENCH_SECONDS", "10"))
WRITERS = 4  # pgbench clients sharing RATE
RETAINED = 10_000
DB = "live"
WS_CLIENT = os.environ.get("LIVE_WS_CLIENT", "raw")
LIBDIR = os.environ.get("PG_EMIT_LIBDIR")

# SSE: `id: N` then one data line (single-line JSON payloads), blank line.
SSE_EVENT = re.compile(rb"id: (\d+)\ndata: ([^\n]*)\n\n|event: close\ndata: ([^\n]*)\n\n")
WS_EVENT = re.compile(rb'\{"id":(\d+),"data":')
T = re.compile(rb'"t" ?: ?([0-9.]+)')


class Subscriber(asyncio.Protocol):
    """One subscription over a raw socket. Records each event's id, its
    payload's "t" if any, and when the read that brought it returned."""

    def __init__(self, port, channel, token, websocket, after=None):
        self.port, self.websocket = port, websocket
        self.ids = array.array("q")
        self.sent = array.array("d")  # the payload's "t", or NaN
        self.recv = array.array("d")  # when the read that brought it returned
        self.want = None  # the id after which `done` is set
        self.last_at = None  # receipt time of the last event
        self.first_at = None
        self.problem = None  # a close, a refusal, a protocol error
        self.buf = b""
        self.head = True
        self.frags = b""
        # While deferred, reads are only timestamped and appended to `raw`
        # (parsed by catch_up): the client then costs the machine little
        # more than the reads themselves. (Keeping each read's bytes
        # object instead would keep one mapping per read: asyncio reads
        # into 256 KiB buffers, which malloc maps one by one.)
        self.deferred = False
        self.raw = bytearray()
        self.marks = array.array("q")  # end of each read in `raw`
        self.times = array.array("d")  # and when it returned
        self.reads = 0
        self.bytes = 0
        loop = asyncio.get_running_loop()
        self.opened = loop.create_future()
        self.done = asyncio.Event()
        target = f"/channels/{channel}"
        if websocket:
            self.key = base64.b64encode(os.urandom(16)).decode()
            target += f"?token={token}" + (f"&last_event_id={after}" if after is not None else "")
            extra = (f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {self.key}\r\n"
                     "Sec-WebSocket-Version: 13\r\n")
        else:
            extra = f"Accept: text/event-stream\r\nAuthorization: Bearer {token}\r\n"
            if after is not None:
                extra += f"Last-Event-ID: {after}\r\n"
        self.request = f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{extra}\r\n".encode()

    async def connect(self):
        loop = asyncio.get_running_loop()
        await loop.create_connection(lambda: self, "127.0.0.1", self.port)
        await self.opened
        return self

    def connection_made(self, transport):
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.write(self.request)

    def connection_lost(self, exc):
        self.fail(f"connection lost ({exc or 'closed by the listener'})")

    def fail(self, why):
        if self.problem is None and not self.done.is_set():
            self.problem = why
        if not self.opened.done():
            self.opened.set_exception(RuntimeError(why))
        self.done.set()

    def expect(self, last_id):
        self.want = last_id
        if self.ids and self.ids[-1] >= last_id:
            self.done.set()

    def data_received(self, data):
        now = time.time()
        self.reads += 1
        self.bytes += len(data)
        if self.deferred:
            self.raw += data
            self.marks.append(len(self.raw))
            self.times.append(now)
        else:
            self.take(now, data)

    def catch_up(self):
        self.deferred = False
        start = 0
        for end, now in zip(self.marks, self.times):
            self.take(now, bytes(self.raw[start:end]))
            start = end
        self.raw, self.marks, self.times = bytearray(), array.array("q"), array.array("d")

    def take(self, now, data):
        self.buf += data
        if self.head:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = self.buf[:end].split(b"\r\n", 1)[0]
            ok = b" 101 " if self.websocket else b" 200 "
            if ok not in status:
                return self.fail(f"refused: {self.buf[:200]!r}")
            if self.websocket:
                accept = base64.b64encode(hashlib.sha1(
                    (self.key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
                if b"Sec-WebSocket-Accept: " + accept not in self.buf[:end]:
                    return self.fail("bad Sec-WebSocket-Accept")
            self.head = False
            self.buf = self.buf[end + 4:]
            self.opened.set_result(self)
        n = len(self.ids)
        if self.websocket:
            self.frames(now)
        else:
            self.sse(now)
        if len(self.ids) > n:
            self.last_at = now
            if self.first_at is None:
                self.first_at = now
            if self.want is not None and self.ids[-1] >= self.want:
                self.done.set()

    def event(self, now, id_, data):
        self.ids.append(id_)
        self.recv.append(now)
        m = T.search(data)
        self.sent.append(float(m.group(1)) if m else math.nan)

    def sse(self, now):
        end = self.buf.rfind(b"\n\n")
        if end < 0:
            return
        for m in SSE_EVENT.finditer(self.buf, 0, end + 2):
            if m.group(1) is None:
                self.fail(f"SSE close event: {m.group(3).decode()}")
            else:
                self.event(now, int(m.group(1)), m.group(2))
        self.buf = self.buf[end + 2:]

    def frames(self, now):
        buf, i = self.buf, 0
        while len(buf) - i >= 2:
            b0, b1 = buf[i], buf[i + 1]
            n, h = b1 & 0x7F, 2
            if b1 & 0x80:
                return self.fail("masked frame from the server")
            if n == 126:
                if len(buf) - i < 4:
                    break
                n, h = int.from_bytes(buf[i + 2:i + 4], "big"), 4
            elif n == 127:
                if len(buf) - i < 10:
                    break
                n, h = int.from_bytes(buf[i + 2:i + 10], "big"), 10
            if len(buf) - i < h + n:
                break
            payload = buf[i + h:i + h + n]
            i += h + n
            op = b0 & 0x0F
            if op in (1, 0):  # text, continuation
                if not b0 & 0x80:
                    self.frags += payload
                    continue
                if self.frags:
                    payload, self.frags = self.frags + payload, b""
                m = WS_EVENT.match(payload)
                if not m:
                    self.fail(f"unexpected message {payload[:100]!r}")
                    continue
                self.event(now, int(m.group(1)), payload)
            elif op == 9:  # ping: a pong, masked with a zero key
                self.transport.write(bytes([0x8A, 0x80 | len(payload)]) + b"\0\0\0\0" + payload)
            elif op == 8:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
                self.fail(f"WebSocket close {code}: {payload[2:].decode(errors='replace')}")
        self.buf = buf[i:]


class LibrarySubscriber:
    """The same, with the `websockets` library (LIVE_WS_CLIENT=websockets)."""

    def __init__(self, port, channel, token, after=None):
        self.url = f"ws://127.0.0.1:{port}/channels/{channel}?token={token}"
        if after is not None:
            self.url += f"&last_event_id={after}"
        self.websocket = True
        self.ids, self.sent, self.recv = array.array("q"), array.array("d"), array.array("d")
        self.want = self.last_at = self.first_at = self.problem = None
        self.done = asyncio.Event()
        self.reads = self.bytes = 0  # not counted

    def catch_up(self):
        pass

    async def connect(self):
        self.ws = await ws_connect(self.url, max_size=None, compression=None)
        self.task = asyncio.create_task(self.read())
        return self

    async def read(self):
        try:
            async for m in self.ws:
                now = time.time()
                m = m.encode()
                Subscriber.event(self, now, int(WS_EVENT.match(m).group(1)), m)
                self.last_at = now
                self.first_at = self.first_at or now
                if self.want is not None and self.ids[-1] >= self.want:
                    self.done.set()
            self.fail(f"WebSocket close {self.ws.close_code}: {self.ws.close_reason}")
        except Exception as e:
            self.fail(repr(e))

    def fail(self, why):
        if self.problem is None and not self.done.is_set():
            self.problem = why
        self.done.set()

    def expect(self, last_id):
        Subscriber.expect(self, last_id)


def subscriber(port, channel, token, websocket, after=None):
    if websocket and WS_CLIENT == "websockets":
        return LibrarySubscriber(port, channel, token, after)
    return Subscriber(port, channel, token, websocket, after)


def client_process(pipe, port, channel, token, sse, ws):
    """A process of subscribers: opens them, says ready, and when told the
    last id, waits for it and sends back what each received."""

    async def main():
        loop = asyncio.get_running_loop()
        subs = [subscriber(port, channel, token, k >= sse) for k in range(sse + ws)]
        try:
            await asyncio.gather(*(s.connect() for s in subs))
        except Exception as e:
            pipe.send(("error", repr(e)))
            return
        for s in subs:
            s.deferred = True
        pipe.send(("ready", len(subs)))
        last, timeout = await loop.run_in_executor(None, pipe.recv)
        for s in subs:
            s.catch_up()
            s.expect(last)
        try:
            await asyncio.wait_for(asyncio.gather(*(s.done.wait() for s in subs)), timeout)
        except asyncio.TimeoutError:
            pass
        with open("/proc/self/status") as f:
            peak = int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024
        pipe.send(([("ws" if s.websocket else "sse", s.ids.tobytes(), s.sent.tobytes(), s.recv.tobytes(),
                     s.problem, s.reads, s.bytes) for s in subs], peak))

    asyncio.run(main())


def cpu_seconds(pid, tid=None, children=False, system=False):
    """utime + stime of a process (all its threads), or of one thread;
    `children`: plus those of its children that it has waited for;
    `system`: stime only."""
    path = f"/proc/{pid}/task/{tid}/stat" if tid else f"/proc/{pid}/stat"
    with open(path) as f:
        utime, stime, cutime, cstime = [int(x) for x in f.read().rsplit(")", 1)[1].split()[11:15]]
    total = stime if system else utime + stime + (cutime + cstime if children else 0)
    return total / os.sysconf("SC_CLK_TCK")


def wakeups(pid):
    """Voluntary context switches (sleeps that ended) of each thread."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                out[int(tid)] = int(re.search(r"voluntary_ctxt_switches:\s+(\d+)", f.read()).group(1))
        except OSError:
            pass
    return out


def cluster_cpu(cluster):
    """CPU seconds of the cluster: the postmaster, its living children and
    those it has reaped (backends of finished connections)."""
    with open(os.path.join(cluster.data, "postmaster.pid")) as f:
        pm = int(f.readline())
    total = cpu_seconds(pm, children=True)
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pm:
                    total += cpu_seconds(pid)
        except (OSError, ValueError):
            pass
    return total


def machine_cpu():
    """(busy, all) CPU seconds of the machine, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:8]]
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(v) - v[3] - v[4]) / tick, sum(v) / tick


def pct(sorted_values, p):
    return sorted_values[min(len(sorted_values) - 1, int(p / 100 * len(sorted_values)))]


def fanout(cluster, conn, port):
    """Scenario 1. Returns its measurements as a dict."""
    token = conn.execute("SELECT emit.create_token(ARRAY['fanout'], '1 hour')").fetchone()[0]
    ctx = multiprocessing.get_context("fork")
    procs = []
    per = SUBSCRIBERS // PROCESSES
    for k in range(PROCESSES):
        mine, theirs = ctx.Pipe()
        p = ctx.Process(target=client_process, args=(theirs, port, "fanout", token, per // 2, per - per // 2),
                        daemon=True)
        p.start()
        theirs.close()  # so that a process that dies is an EOF here
        procs.append((p, mine))
    for p, pipe in procs:
        if not pipe.poll(30):
            raise SystemExit("subscribers did not open within 30 s")
        what, n = pipe.recv()
        if what != "ready":
            raise SystemExit(f"subscribers could not open: {n}")
    # Every subscriber is subscribed (its 200 or 101 came after the hub
    # added it): events after `head` reach all of them.
    head = conn.execute(
        "SELECT coalesce(max(id), 0) FROM emit.channel_events WHERE channel = 'fanout'").fetchone()[0]
    worker = conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_emit worker' AND datname = %s",
        (DB,)).fetchone()[0]
    threads = len(os.listdir(f"/proc/{worker}/task"))
    with open(f"/proc/{worker}/maps") as f:
        loaded = next(line.split()[-1] for line in f if "pg_emit" in line)
    script = os.path.join(cluster.root, "fanout.sql")
    with open(script, "w") as f:
        f.write("SELECT send_message('channel:fanout', "
                "json_build_object('t', extract(epoch FROM clock_timestamp()), 'x', txid_current())::text);\n")
    os.chmod(script, 0o644)

    def sample():
        me = os.times()
        return {
            "worker": cpu_seconds(worker), "worker main": cpu_seconds(worker, worker),
            "worker system": cpu_seconds(worker, system=True),
            "cluster": cluster_cpu(cluster), "clients": [cpu_seconds(p.pid) for p, _ in procs],
            # this process, and pgbench once it has been waited for
            "bench": me.user + me.system + me.children_user + me.children_system,
            "machine": machine_cpu(), "wakeups": wakeups(worker),
        }

    before = sample()
    t = time.monotonic()
    out = cluster.run(
        f"{BIN}/pgbench", "-n", "-h", cluster.sock, "-p", str(cluster.port), "-c", str(WRITERS),
        "-j", "1", "-R", str(RATE), "-T", str(SECONDS), "-f", script, DB,
    ).stdout
    elapsed = time.monotonic() - t
    after = sample()
    committed = int(re.search(r"number of transactions actually processed: (\d+)", out).group(1))
    # Stored once each, by the worker, in id order.
    if not wait_until(lambda: conn.execute(
            "SELECT count(*) FROM emit.channel_events WHERE channel = 'fanout' AND id > %s",
            (head,)).fetchone()[0] >= committed, timeout=30):
        raise SystemExit("the worker did not store every committed event within 30 s")
    # When each event was sent, committed (track_commit_timestamp) and
    # claimed by the worker (created_at: its claim transaction's start).
    stages = {r[0]: r[1:] for r in conn.execute(
        "SELECT id, (payload::json->>'t')::float8, "
        "extract(epoch FROM pg_xact_commit_timestamp((payload::json->>'x')::xid))::float8, "
        "extract(epoch FROM created_at)::float8 "
        "FROM emit.channel_events WHERE channel = 'fanout' AND id > %s", (head,))}
    expected = array.array("q", sorted(stages))
    for _, pipe in procs:
        pipe.send((expected[-1], 30))
    subs, peaks = [], []
    for p, pipe in procs:
        try:
            if not pipe.poll(60):
                raise EOFError
            got, peak = pipe.recv()
        except EOFError:
            p.join(5)
            raise SystemExit(f"a subscriber process died or hung (exit code {p.exitcode})")
        subs += got
        peaks.append(peak)
        p.join(10)
    # The subscribers are gone: so should their threads be.
    wait_until(lambda: len(os.listdir(f"/proc/{worker}/task")) <= threads - SUBSCRIBERS, timeout=10)
    threads_after = len(os.listdir(f"/proc/{worker}/task"))
    decoded = []
    reads = sum(s[5] for s in subs)
    read = sum(len(s[1]) // 8 for s in subs if s[5])  # events, by subscribers counting reads
    for kind, ids, sent, recv, problem, *_ in subs:
        got, t_sent, t_recv = array.array("q"), array.array("d"), array.array("d")
        got.frombytes(ids)
        t_sent.frombytes(sent)
        t_recv.frombytes(recv)
        decoded.append((kind, got, t_sent, t_recv, problem))
    start = min(t_sent[0] for _, _, t_sent, _, _ in decoded if t_sent)
    complete, problems, counts = 0, [], []
    lat = {"sse": array.array("d"), "ws": array.array("d")}
    seconds = {}  # second of the run (by "t") -> latencies
    delivered = array.array("d")  # claim to receipt
    slowest = (0, None, None)
    for k, (kind, got, t_sent, t_recv, problem) in enumerate(decoded):
        for i, s, r in zip(got, t_sent, t_recv):
            lat[kind].append(r - s)
            seconds.setdefault(int(s - start), []).append(r - s)
            if i in stages:
                delivered.append(r - stages[i][2])
                if r - s > slowest[0]:
                    slowest = (r - s, i, r)
        counts.append(len(got))
        if got == expected and problem is None:
            complete += 1
        else:
            have = set(got)
            problems.append(
                f"subscriber {k} ({kind}): {len(got)} received, {len(set(expected) - have)} missing, "
                f"{len(got) - len(have)} duplicates, "
                f"{sum(1 for a, b in zip(got, got[1:]) if b <= a)} out of order; {problem or 'still open'}")
    cpu = {k: after[k] - before[k] for k in ("worker", "worker main", "worker system", "cluster", "bench")}
    woke = {tid: n - before["wakeups"].get(tid, 0) for tid, n in after["wakeups"].items()}
    main_woke = woke.pop(worker, 0)
    clients = [a - b for a, b in zip(after["clients"], before["clients"])]
    busy = after["machine"][0] - before["machine"][0]
    ours = cpu["cluster"] + cpu["bench"] + sum(clients)
    return {
        "committed": committed, "stored": len(expected), "elapsed": elapsed,
        "ids": (expected[0], expected[-1]) if expected else (None, None),
        "counts": counts, "complete": complete, "problems": problems,
        "lat": {k: sorted(v) for k, v in lat.items()},
        "stages": {
            "send_message → its commit": sorted(c - t for t, c, _ in stages.values()),
            "commit → worker's claim begins": sorted(w - c for _, c, w in stages.values()),
            "claim begins → receipt": sorted(delivered),
        },
        "slowest": (slowest[0], slowest[1], *stages.get(slowest[1], (0, 0, 0)), slowest[2]),
        "seconds": {s: sorted(v) for s, v in sorted(seconds.items())},
        "worker_cpu": cpu["worker"] / elapsed, "worker_main_cpu": cpu["worker main"] / elapsed,
        "worker_system": cpu["worker system"] / cpu["worker"] if cpu["worker"] else 0,
        "worker_threads": threads, "threads_after": threads_after, "library": loaded,
        "main_wakeups": main_woke / elapsed, "thread_wakeups": sum(woke.values()) / elapsed,
        "per_read": read / reads if reads else None,
        "bytes": max(s[6] for s in subs), "client_peak": max(peaks),
        "cluster_cpu": cpu["cluster"] / elapsed,
        "clients_cpu": [c / elapsed for c in clients],
        "pgbench_cpu": cpu["bench"] / elapsed,
        "machine_busy": busy / elapsed, "others_cpu": (busy - ours) / elapsed,
        "pgbench_latency": float(re.search(r"latency average = ([\d.]+) ms", out).group(1)),
        "pgbench_lag": float(re.search(r"schedule lag: avg ([\d.]+)", out).group(1)),
    }


async def replay(port, token, first, last, websocket):
    """Scenario 2, one protocol: seconds from connect to the first and to
    the last event, and whether the ids were exactly first..last."""
    sub = subscriber(port, "replay", token, websocket, after=first - 1)
    sub.expect(last)
    t = time.time()
    await sub.connect()
    await asyncio.wait_for(sub.done.wait(), 30)
    ok = list(sub.ids) == list(range(first, last + 1)) and sub.problem is None
    if hasattr(sub, "transport"):
        sub.transport.close()
    else:
        await sub.ws.close()
    return sub.first_at - t, sub.last_at - t, len(sub.ids), ok, sub.problem


HISTORY_EVENTS = 440  # of 100 kB: 44 MB of history
REPLAYERS = 30


def replay_beside_delivery(conn, port):
    """Scenario 3: an unrelated async TCP destination's commit → receipt
    latency (20 events/s) alone, then while REPLAYERS SSE subscribers
    replay 44 MB of channel history from the start; and the worker's
    highest RSS meanwhile."""
    token = conn.execute("SELECT emit.create_token(ARRAY['history'], '1 hour')").fetchone()[0]
    conn.execute("SELECT send_message('channel:history', json_build_object('n', i, 'pad', "
                 "repeat('x', 100000))::text) FROM generate_series(1, %s) i", (HISTORY_EVENTS,))
    if not wait_until(lambda: conn.execute(
            "SELECT count(*) FROM emit.channel_events WHERE channel = 'history'"
    ).fetchone()[0] >= HISTORY_EVENTS, timeout=60):
        raise SystemExit("the worker did not store the history")
    pid = conn.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_emit worker' "
                       "AND datname = current_database()").fetchone()[0]

    def rss_mb():
        with open(f"/proc/{pid}/status") as f:
            return next(int(x.split()[1]) for x in f if x.startswith("VmRSS:")) / 1024

    tcp = socket.create_server(("127.0.0.1", 0))
    lat = []

    def read_lines():
        c, _ = tcp.accept()
        buf = b""
        while True:
            b = c.recv(1 << 16)
            if not b:
                return
            buf += b
            *lines, buf = buf.split(b"\n")
            now = time.time()
            lat.extend(now - json.loads(line)["t"] for line in lines if line)

    threading.Thread(target=read_lines, daemon=True).start()
    dest = f"tcp://127.0.0.1:{tcp.getsockname()[1]}?framing=ndjson"

    def phase(seconds):
        lat.clear()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            conn.execute("SELECT send_message(%s, json_build_object('t', "
                         "extract(epoch FROM clock_timestamp()))::text)", (dest,))
            time.sleep(0.05)
        time.sleep(0.5)
        return sorted(lat)

    alone = phase(5)
    before = rss_mb()
    got = [0] * REPLAYERS

    def replayer(k):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall((f"GET /channels/history?token={token} HTTP/1.1\r\nHost: x\r\n"
                   "Accept: text/event-stream\r\nLast-Event-ID: 0\r\n\r\n").encode())
        while got[k] < HISTORY_EVENTS * 100_000:
            b = s.recv(1 << 20)
            if not b:
                break
            got[k] += len(b)
        s.close()

    threads = [threading.Thread(target=replayer, args=(k,), daemon=True) for k in range(REPLAYERS)]
    peak = [before]
    sampling = [True]

    def sample():
        while sampling[0]:
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.monotonic()
    for t in threads:
        t.start()
    beside = phase(5)
    for t in threads:
        t.join(60)
    took = time.monotonic() - t0
    sampling[0] = False
    sampler.join()
    tcp.close()
    return {"alone": alone, "beside": beside, "rss_before": before, "rss_peak": peak[0],
            "replayed": sum(g >= HISTORY_EVENTS * 100_000 for g in got), "took": took}


def start_listener(cluster):
    """Listens on a free port for DB and waits until it accepts."""
    port = free_port()
    with cluster.connect() as c:
        c.execute("LOAD 'pg_emit'")
        c.execute(f"ALTER SYSTEM SET pg_emit.listen = '127.0.0.1:{port}'")
        c.execute(f"ALTER SYSTEM SET pg_emit.listen_database = '{DB}'")
        c.execute("SELECT pg_reload_conf()")
    with cluster.connect(DB) as c:
        c.execute("SELECT send_message('channel:warmup', '{}')")

    def accepting():
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    if not wait_until(accepting, timeout=15, every=0.05):
        raise SystemExit(f"the listener did not open 127.0.0.1:{port}\n{cluster.tail_log()}")
    return port


def main():
    conf = {"fsync": "on", "max_connections": "40", "track_commit_timestamp": "on"}
    if LIBDIR:
        conf["dynamic_library_path"] = f"'{os.path.abspath(LIBDIR)}:$libdir'"
    cluster = Cluster("pg_emit-bench-live", port=int(os.environ.get("BENCH_LIVE_PORT", "54400")), conf=conf)
    cluster.init().start()
    try:
        cluster.create_db(DB)
        with cluster.connect(DB) as conn:
            conn.execute("CREATE EXTENSION pg_emit")
            port = start_listener(cluster)
            print(f"  listening on 127.0.0.1:{port}; {SUBSCRIBERS} subscribers, "
                  f"{RATE} events/s for {SECONDS} s", file=sys.stderr)
            one = fanout(cluster, conn, port)
            print("  retaining events for replay", file=sys.stderr)
            token = conn.execute("SELECT emit.create_token(ARRAY['replay'], '1 hour')").fetchone()[0]
            conn.execute(
                "SELECT send_message('channel:replay', json_build_object('n', i, 't0', "
                "extract(epoch FROM clock_timestamp()), 'note', repeat('x', 64))::text) "
                "FROM generate_series(1, %s) i", (RETAINED,))
            if not wait_until(lambda: conn.execute(
                    "SELECT count(*) FROM emit.channel_events WHERE channel = 'replay'"
            ).fetchone()[0] >= RETAINED, timeout=60):
                raise SystemExit("the worker did not store the replay events")
            first, last, size = conn.execute(
                "SELECT min(id), max(id), avg(octet_length(payload))::int FROM emit.channel_events "
                "WHERE channel = 'replay'").fetchone()
            time.sleep(0.5)  # the worker is idle
            two = {ws: asyncio.run(replay(port, token, first, last, ws)) for ws in (False, True)}
            print("  replaying history beside a TCP destination", file=sys.stderr)
            three = replay_beside_delivery(conn, port)
    finally:
        with open(cluster.log, errors="replace") as f:
            log = f.read()
        cluster.destroy()
    report(one, two, size, log)
    report_three(three)


def report_three(three):
    def ms(v):
        return f"{pct(v, 50) * 1e3:.1f} / {v[-1] * 1e3:.1f}" if v else "–"

    print(f"\n3. An async TCP destination (20 events/s) beside {REPLAYERS} SSE subscribers "
          f"replaying {HISTORY_EVENTS * 100_000 / 1e6:.0f} MB of history each\n")
    print("| | commit → receipt p50 / max (ms) |")
    print("|---|---:|")
    print(f"| alone | {ms(three['alone'])} |")
    print(f"| while they replay | {ms(three['beside'])} |")
    print(f"\n  {three['replayed']} of {REPLAYERS} got the whole history in {three['took']:.1f} s; "
          f"worker RSS {three['rss_before']:.0f} MB before, {three['rss_peak']:.0f} MB at most")


def library(path):
    """The library file, as `ls` and `readelf` see it."""
    try:
        sections = subprocess.run(["readelf", "-S", "-W", path], capture_output=True, text=True).stdout
    except OSError:
        return f"{path}, {os.path.getsize(path) / 1e6:.0f} MB"
    debug = "with" if ".debug_info" in sections else "without"
    return f"{path}, {os.path.getsize(path) / 1e6:.0f} MB, {debug} debug info"


def report(one, two, size, log):
    print(f"\nLive channels, {os.cpu_count()} cores, fsync on, one run; WebSocket client: {WS_CLIENT}")
    print(f"library (mapped by the worker): {library(one['library'])}\n")
    print(f"1. {SUBSCRIBERS} subscribers of one channel ({SUBSCRIBERS // 2} SSE + {SUBSCRIBERS // 2} "
          f"WebSocket, {PROCESSES} client processes), pgbench -R {RATE} -c {WRITERS} for {SECONDS} s, "
          "one send_message per transaction\n")
    counts = one["counts"]
    every = "every" if one["complete"] == len(counts) else "NOT every"
    every_lat = sorted(one["lat"]["sse"] + one["lat"]["ws"])
    worst = max(one["seconds"].items(), key=lambda kv: pct(kv[1], 99))

    def ms(v):
        if not v:
            return "–"
        return f"{pct(v, 50) * 1e3:.1f} / {pct(v, 99) * 1e3:.1f} / {v[-1] * 1e3:.1f}"

    print("| | |")
    print("|---|---:|")
    print(f"| events committed (pgbench) | {one['committed']:,} ({one['committed'] / one['elapsed']:,.0f}/s) |")
    print(f"| events stored by the worker (ids {one['ids'][0]}–{one['ids'][1]}) | {one['stored']:,} |")
    print(f"| received per subscriber, min / max | {min(counts):,} / {max(counts):,} |")
    print(f"| subscribers with every event once, in order | {one['complete']} of {len(counts)} |")
    print(f"| latency, all {len(every_lat):,} receipts, p50 / p99 / max (ms) | {ms(every_lat)} |")
    print(f"| latency, SSE, p50 / p99 / max (ms) | {ms(one['lat']['sse'])} |")
    print(f"| latency, WebSocket, p50 / p99 / max (ms) | {ms(one['lat']['ws'])} |")
    print(f"| latency, worst second (s {worst[0]}), p50 / p99 / max (ms) | {ms(worst[1])} |")
    for stage, v in one["stages"].items():
        print(f"| of which {stage}, p50 / p99 / max (ms) | {ms(v)} |")
    _, i, t, c, w, r = one["slowest"]
    if i is not None:
        print(f"| slowest receipt (event {i}): send→commit / commit→claim / claim→receipt (ms) | "
              f"{(c - t) * 1e3:.1f} / {(w - c) * 1e3:.1f} / {(r - w) * 1e3:.1f} |")
    print(f"| pgbench latency average / of which schedule lag (ms) | "
          f"{one['pgbench_latency']:.1f} / {one['pgbench_lag']:.1f} |")
    print(f"| worker CPU, all threads / main thread (cores); all threads' share in the kernel | "
          f"{one['worker_cpu']:.2f} / {one['worker_main_cpu']:.2f}; {one['worker_system']:.0%} |")
    print(f"| worker wake-ups/s, main thread / other threads | "
          f"{one['main_wakeups']:,.0f} / {one['thread_wakeups']:,.0f} |")
    if one["per_read"]:
        print(f"| events per socket read at the subscribers, average | {one['per_read']:.1f} |")
    print(f"| bytes received by a subscriber, most / client process peak RSS | "
          f"{one['bytes'] / 1e6:.1f} MB / {one['client_peak'] / 1e6:.0f} MB |")
    print(f"| worker threads during the run / after the subscribers left | "
          f"{one['worker_threads']} / {one['threads_after']} |")
    print(f"| cluster CPU, every process (cores) | {one['cluster_cpu']:.2f} |")
    print(f"| client processes CPU (cores) | {' + '.join(f'{c:.2f}' for c in one['clients_cpu'])} |")
    print(f"| pgbench CPU (cores) | {one['pgbench_cpu']:.2f} |")
    print(f"| machine CPU busy / of which other processes (cores of {os.cpu_count()}) | "
          f"{one['machine_busy']:.2f} / {one['others_cpu']:.2f} |")
    for p in one["problems"][:10]:
        print(f"  {p}")
    print("\n  p99 by second of the run (ms): " + " ".join(
        f"{pct(v, 99) * 1e3:.0f}" for _, v in one["seconds"].items()))
    print(f"\n2. Replay of {RETAINED:,} retained events ({size} bytes each) from connect with "
          "last_event_id = first id − 1\n")
    print("| | first event (ms) | last event (ms) | received | ids exactly first..last |")
    print("|---|---:|---:|---:|---|")
    for ws, (t_first, t_last, n, ok, problem) in two.items():
        print(f"| {'WebSocket' if ws else 'SSE'} | {t_first * 1e3:.0f} | {t_last * 1e3:.0f} | {n:,} | "
              f"{'yes' if ok else 'NO: ' + str(problem)} |")
    notable = [line for line in log.splitlines() if re.search(r"WARNING|ERROR|FATAL|PANIC", line)]
    print(f"\nserver log: {len(notable)} WARNING/ERROR/FATAL/PANIC lines")
    for line in notable[:10]:
        print(f"  {line}")
    p99 = pct(every_lat, 99)
    print(f"\n(target p99 < 50 ms with every event at every subscriber: "
          f"{'met' if p99 < 0.05 and every == 'every' else 'not met'}; p99 {p99 * 1e3:.1f} ms, "
          f"{every} subscriber complete)")
    slow = max(t[1] for t in two.values())
    good = all(t[3] for t in two.values())
    print(f"(target replay of {RETAINED:,} events < 1 s: {'met' if slow < 1 and good else 'not met'}; "
          f"SSE {two[False][1] * 1e3:.0f} ms, WebSocket {two[True][1] * 1e3:.0f} ms)")


if __name__ == "__main__":
    main()
