"""Real receivers on 127.0.0.1 for tests and benchmarks.

Every receiver binds 127.0.0.1 on a free port, never another address.
"""

import os
import socket
import subprocess
import threading
import time


class Listener:
    """A TCP listener on loopback that hands every accepted connection to
    `serve(conn, seq)` on a thread of its own (`seq` counts connections
    from 1). Subclasses set their state before calling `__init__`, which
    starts accepting."""

    def __init__(self, port=0, host="127.0.0.1", backlog=512, rcvbuf=None):
        assert host in ("127.0.0.1", "::1"), "receivers listen on loopback only"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.bind((host, port))
        self.sock.listen(backlog)
        self.port = self.sock.getsockname()[1]
        self.conns = []
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            self.conns.append(conn)
            threading.Thread(target=self.serve, args=(conn, self.connections), daemon=True).start()

    def serve(self, conn, seq):
        raise NotImplementedError

    def close(self):
        self.sock.close()


class Receiver(Listener):
    """TCP receiver. `mode="eof"`: one message per connection, read until
    end of stream (what the plpython recipe's receivers do); `mode="ndjson"`:
    one message per line on long-lived connections."""

    def __init__(self, mode="eof", port=0, host="127.0.0.1"):
        self.mode = mode
        self.messages = []
        self.cond = threading.Condition()
        super().__init__(port, host)

    def serve(self, conn, seq):
        buf = bytearray()
        try:
            while True:
                chunk = conn.recv(1 << 20)
                if not chunk:
                    break
                buf += chunk
                if self.mode == "ndjson" and b"\n" in buf:
                    *lines, rest = bytes(buf).split(b"\n")
                    buf = bytearray(rest)
                    with self.cond:
                        self.messages.extend(lines)
                        self.cond.notify_all()
        except OSError:
            pass
        finally:
            conn.close()
        if self.mode == "eof" or buf:
            with self.cond:
                # Connections are served by parallel threads: keep messages
                # in the order their connections were accepted, which is
                # the order a sequential sender sent them.
                self.messages.append((seq, bytes(buf)) if self.mode == "eof" else bytes(buf))
                self.cond.notify_all()

    def wait_for(self, n, timeout=10.0):
        """Waits until at least n messages arrived; returns them all."""
        end = time.monotonic() + timeout
        with self.cond:
            while len(self.messages) < n:
                left = end - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
            return self._ordered()

    def _ordered(self):
        if self.mode == "eof":
            return [m for _, m in sorted(self.messages, key=lambda x: x[0])]
        return list(self.messages)

    def drop_connections(self):
        """Closes every accepted connection, as a restarting receiver would."""
        conns, self.conns = self.conns, []
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        super().close()
        self.drop_connections()


class Stalled:
    """A loopback listener whose accept queue is full and never drained:
    new connects hang in SYN-SENT, like a host that drops packets."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.port = self.sock.getsockname()[1]
        self.fillers = []
        # Fill the queue until a connect no longer completes.
        for _ in range(16):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", self.port))
            except BlockingIOError:
                pass
            self.fillers.append(s)
            time.sleep(0.02)
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0 and not self._connected(s):
                break

    @staticmethod
    def _connected(s):
        try:
            s.getpeername()
            return True
        except OSError:
            return False

    def close(self):
        for s in self.fillers:
            s.close()
        self.sock.close()


class Sink(Listener):
    """Accepts connections but never reads: writes stall once buffers fill."""

    def __init__(self):
        super().__init__(backlog=16, rcvbuf=4096)

    def serve(self, conn, seq):
        pass  # kept open in self.conns, never read

    def close(self):
        for c in self.conns:
            c.close()
        super().close()


def free_port():
    """A port on 127.0.0.1 that nothing listens on (connects are refused)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class HttpReceiver:
    """HTTP/1.1 server on 127.0.0.1 (keep-alive) that records every request
    and answers from a script: a list of (status, headers, body) used one
    per request, then `default`. `tls` is an ssl.SSLContext for HTTPS.
    `echo`: the reply body is the request body (as many error pages do).
    `port`: listen there (a receiver restarted on the same address).
    `delay`: seconds each request takes (a slow webhook handler)."""

    def __init__(self, script=None, default=(200, {}, b"ok"), tls=None, hang=False, echo=False,
                 port=0, delay=0.0):
        import http.server

        self.requests = []
        self.peers = set()
        self.conns = []
        self.script = list(script or [])
        self.default = default
        self.hang = hang
        self.cond = threading.Condition()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def setup(self):
                super().setup()
                # Headers and body go out as two writes: without this,
                # Nagle holds the body for the client's delayed ACK (40 ms).
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                outer.conns.append(self.connection)

            def _any(self):
                n = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(n)
                if len(body) < n:  # the connection was cut mid-request
                    self.close_connection = True
                    return
                with outer.cond:
                    outer.requests.append(
                        (self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body,
                         time.monotonic())
                    )
                    outer.peers.add(self.client_address)
                    status, headers, reply = outer.script.pop(0) if outer.script else outer.default
                    outer.cond.notify_all()
                if outer.hang:
                    time.sleep(3600)
                if delay:
                    time.sleep(delay)
                if echo:
                    reply = body
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            do_POST = do_PUT = do_GET = do_PATCH = do_DELETE = _any

        class Server(http.server.ThreadingHTTPServer):
            # The worker opens up to 32 connections at once: the default
            # listen backlog of 5 would drop some handshakes.
            request_queue_size = 256

        self.server = Server(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, n, timeout=10.0):
        end = time.monotonic() + timeout
        with self.cond:
            while len(self.requests) < n:
                left = end - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
            return list(self.requests)

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def kill(self):
        """Stops as a crashed receiver would: open connections are cut, in
        the middle of a request if one is being handled."""
        self.close()
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def serve(args, port):
    """Starts a server process and waits until it listens on `port`."""
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    end = time.monotonic() + 10
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{args[0]} did not start")


class RedisServer:
    """A real redis-server on 127.0.0.1 (the Debian package), without
    persistence; `stop()` and `start()` keep its port, as a server that goes
    away and comes back."""

    def __init__(self, password=None, tls=None, client_certs=False):
        import redis

        self.port = free_port()
        self.password = password
        # tls: the `pki` fixture's directory; TLS only, on self.port.
        self.tls, self.client_certs = tls, client_certs
        self.proc = None
        self.start()
        kw = {}
        if tls:
            kw = {"ssl": True, "ssl_ca_certs": os.path.join(tls, "ca.pem"),
                  "ssl_certfile": os.path.join(tls, "client.pem"),
                  "ssl_keyfile": os.path.join(tls, "client.key")}
        self.client = redis.Redis(host="127.0.0.1", port=self.port, password=password, **kw)

    def start(self):
        args = ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                "--appendonly", "no", "--protected-mode", "no"]
        if self.tls:
            pem = lambda name: os.path.join(self.tls, name)  # noqa: E731
            args[3:5] = ["--port", "0", "--tls-port", str(self.port),
                         "--tls-cert-file", pem("server.pem"), "--tls-key-file", pem("server.key"),
                         "--tls-ca-cert-file", pem("ca.pem"),
                         "--tls-auth-clients", "yes" if self.client_certs else "no"]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = serve(args, self.port)

    def stop(self):
        self.proc.kill()
        self.proc.wait()

    def entries(self, stream):
        """(redis id, event id, event JSON) of every entry, in stream order."""
        import json

        return [(rid.decode(), f[b"id"].decode(), json.loads(f[b"event"]))
                for rid, f in self.client.xrange(stream)]

    def wait_for(self, stream, n, timeout=20.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.client.xlen(stream) >= n:
                break
            time.sleep(0.05)
        return self.entries(stream)

    def close(self):
        self.stop()


class NatsServer:
    """A real nats-server with JetStream on 127.0.0.1 (the Debian package),
    its store in a temporary directory that survives `stop()`/`start()`.
    Read back with nats-py, the NATS project's Python client."""

    def __init__(self, user=None, password=None, token=None, tls=None, client_certs=False,
                 nkey=None, operator=False):
        import tempfile

        self.port = free_port()
        self.store = tempfile.mkdtemp(prefix="pg_emit-nats-")
        self.auth = {"user": user, "password": password, "token": token}
        # nkey: an NKey user's public key the server admits (beside `user`).
        self.nkey = nkey
        # operator: JWT users only (Synadia Cloud's way): `creds(...)` mints
        # a user's .creds file; the server trusts an operator and knows
        # one account with JetStream (and the system account).
        self.operator = NatsOperator() if operator else None
        # tls: the `pki` fixture's directory; TLS required (and client
        # certificates signed by its CA, with client_certs).
        self.tls, self.client_certs = tls, client_certs
        self.proc = None
        self.start()

    def start(self):
        args = ["nats-server", "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", self.store]
        if self.operator:
            conf = os.path.join(self.store, "operator.conf")
            with open(conf, "w") as f:
                f.write(self.operator.config())
            args += ["-c", conf]
        elif self.nkey:
            conf = os.path.join(self.store, "auth.conf")
            with open(conf, "w") as f:
                f.write(f'authorization {{ users = [ {{ nkey: "{self.nkey}" }}, '
                        f'{{ user: "{self.auth["user"]}", password: "{self.auth["password"]}" }} ] }}\n')
            args += ["-c", conf]
        elif self.auth["user"]:
            args += ["--user", self.auth["user"], "--pass", self.auth["password"]]
        if self.auth["token"]:
            args += ["--auth", self.auth["token"]]
        if self.tls:
            args += ["--tls", "--tlscert", os.path.join(self.tls, "server.pem"),
                     "--tlskey", os.path.join(self.tls, "server.key")]
            if self.client_certs:
                args += ["--tlsverify", "--tlscacert", os.path.join(self.tls, "ca.pem")]
        self.proc = serve(args, self.port)

    def tls_context(self):
        """What the official client needs to connect (None without TLS)."""
        import ssl

        if not self.tls:
            return None
        ctx = ssl.create_default_context(cafile=os.path.join(self.tls, "ca.pem"))
        ctx.load_cert_chain(os.path.join(self.tls, "client.pem"), os.path.join(self.tls, "client.key"))
        return ctx

    def stop(self):
        self.proc.kill()
        self.proc.wait()

    def _run(self, work):
        import asyncio

        import nats

        async def go():
            kw = {}
            if self.auth["user"]:
                kw = {"user": self.auth["user"], "password": self.auth["password"]}
            if self.auth["token"]:
                kw = {"token": self.auth["token"]}
            if self.tls:
                kw["tls"] = self.tls_context()
            if self.operator:
                path = os.path.join(self.store, "reader.creds")
                with open(path, "w") as f:
                    f.write(self.operator.creds("reader"))
                kw["user_credentials"] = path
            nc = await nats.connect(f"nats://127.0.0.1:{self.port}", **kw)
            try:
                return await work(nc.jetstream())
            finally:
                await nc.close()

        return asyncio.run(go())

    def add_stream(self, name, subjects, **config):
        async def work(js):
            await js.add_stream(name=name, subjects=subjects, **config)
        self._run(work)

    def count(self, stream):
        async def work(js):
            return (await js.stream_info(stream)).state.messages
        return self._run(work)

    def messages(self, stream):
        """(Nats-Msg-Id, event JSON) of every message, in stream order."""
        import json

        async def work(js):
            info = await js.stream_info(stream)
            out = []
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                m = await js.get_msg(stream, seq)
                out.append(((m.headers or {}).get("Nats-Msg-Id"), json.loads(m.data)))
            return out
        return self._run(work)

    def wait_for(self, stream, n, timeout=20.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                if self.count(stream) >= n:
                    break
            except Exception:  # the stream may not exist yet
                pass
            time.sleep(0.1)
        return self.messages(stream)

    def close(self):
        import shutil

        self.stop()
        shutil.rmtree(self.store, ignore_errors=True)


class NatsOperator:
    """An operator, its account and the system account, as `nsc` makes
    them: NKeys (Ed25519, PyNaCl) and JWTs signed by their issuers, for a
    nats-server in operator mode with a memory resolver."""

    def __init__(self):
        self.op, self.op_pub = self.pair("O")
        self.account, self.account_pub = self.pair("A")
        self.system, self.system_pub = self.pair("A")

    PREFIX = {"O": 14 << 3, "A": 0, "U": 20 << 3}

    @staticmethod
    def _b32(b):
        import base64
        return base64.b32encode(b).decode().rstrip("=")

    @staticmethod
    def _crc(b):
        import binascii
        return binascii.crc_hqx(b, 0).to_bytes(2, "little")

    @classmethod
    def pair(cls, kind):
        """(signing key, public key `O…`/`A…`/`U…`)."""
        import nacl.signing

        sk = nacl.signing.SigningKey.generate()
        pub = bytes([cls.PREFIX[kind]]) + bytes(sk.verify_key)
        return sk, cls._b32(pub + cls._crc(pub))

    @classmethod
    def seed(cls, sk, kind):
        """The seed (`SO…`, `SA…`, `SU…`) of a signing key."""
        p = cls.PREFIX[kind]
        raw = bytes([(18 << 3) | (p >> 5), (p & 31) << 3]) + bytes(sk)
        return cls._b32(raw + cls._crc(raw))

    @staticmethod
    def jwt(signer, iss, sub, name, nats):
        import base64
        import hashlib
        import json

        def b64(b):
            return base64.urlsafe_b64encode(b).decode().rstrip("=")

        claims = {"iat": int(time.time()), "iss": iss, "name": name, "sub": sub, "nats": nats}
        claims["jti"] = NatsOperator._b32(hashlib.sha256(json.dumps(claims).encode()).digest())
        head = b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
        body = b64(json.dumps(claims).encode())
        return f"{head}.{body}." + b64(signer.sign(f"{head}.{body}".encode()).signature)

    def config(self):
        unlimited = {k: -1 for k in ("subs", "conn", "leaf", "imports", "exports", "data", "payload",
                                     "mem_storage", "disk_storage", "streams", "consumer")}
        op = self.jwt(self.op, self.op_pub, self.op_pub, "op", {"type": "operator", "version": 2})
        acc = self.jwt(self.op, self.op_pub, self.account_pub, "app",
                       {"type": "account", "version": 2, "limits": dict(unlimited, wildcards=True)})
        sys = self.jwt(self.op, self.op_pub, self.system_pub, "SYS", {"type": "account", "version": 2})
        return (f"operator: {op}\nsystem_account: {self.system_pub}\nresolver: MEMORY\n"
                f"resolver_preload: {{ {self.account_pub}: {acc}, {self.system_pub}: {sys} }}\n")

    def creds(self, name, account=None):
        """A new user's .creds file, as `nsc generate creds` writes it;
        signed by `account` (a signing key), this operator's by default."""
        sk, pub = self.pair("U")
        signer, iss = (self.account, self.account_pub) if account is None else account
        jwt = self.jwt(signer, iss, pub, name, {"type": "user", "version": 2, "pub": {}, "sub": {},
                                               "subs": -1, "data": -1, "payload": -1})
        return ("-----BEGIN NATS USER JWT-----\n" + jwt + "\n------END NATS USER JWT------\n\n"
                "************************* IMPORTANT *************************\n"
                "NKEY Seed printed below can be used to sign and prove identity.\n"
                "NKEYs are sensitive and should be treated as secrets.\n\n"
                "-----BEGIN USER NKEY SEED-----\n" + self.seed(sk, "U") +
                "\n------END USER NKEY SEED------\n\n"
                "*************************************************************\n")


class KafkaServer:
    """A real Kafka-protocol broker on 127.0.0.1: tansu (from crates.io,
    built by the setup), its log in memory, so `stop()` and `start()` give
    an empty broker on the same port, as a broker that was replaced. Read
    back with confluent-kafka, Confluent's Python client (librdkafka)."""

    def __init__(self, gate=None):
        self.port = free_port()
        # gate: a KafkaGate in front, which the broker advertises as itself,
        # so that every connection of a client goes through it.
        self.gate = gate
        self.proc = None
        if gate:
            gate.upstream = self.port
        self.start()

    @property
    def bootstrap(self):
        return f"127.0.0.1:{self.gate.port if self.gate else self.port}"

    def client_config(self):
        """What confluent-kafka needs to reach the broker (through the gate)."""
        return {"bootstrap.servers": self.bootstrap, **(self.gate.client_config() if self.gate else {})}

    def start(self):
        url = f"tcp://127.0.0.1:{self.port}"
        advertised = f"tcp://{self.bootstrap}"
        self.proc = serve(["tansu", "broker", "--listener-url", url, "--advertised-listener-url",
                           advertised, "--storage-engine", "memory://tansu/"], self.port)

    def stop(self):
        self.proc.kill()
        self.proc.wait()

    close = stop

    def create_topic(self, name, partitions=3):
        subprocess.run(["tansu", "topic", "create", "--broker", f"tcp://127.0.0.1:{self.port}",
                        "--partitions", str(partitions), name],
                       check=True, capture_output=True, timeout=30)

    def records(self, topic, n, partitions=3, timeout=20.0):
        """Every record of `topic` once at least `n` are there (or the time
        is up), read from the start of each partition: dicts with
        partition, offset, key, headers and the value parsed as JSON."""
        import json

        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        c = Consumer({**self.client_config(), "group.id": f"pg_emit-test-{time.monotonic_ns()}",
                      "enable.auto.commit": False, "enable.partition.eof": False})
        try:
            c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
            out = []
            end = time.monotonic() + timeout
            while time.monotonic() < end:
                m = c.poll(0.2)
                if m is not None and not m.error():
                    out.append({"partition": m.partition(), "offset": m.offset(),
                                "key": m.key().decode() if m.key() is not None else None,
                                "headers": {k: v.decode() for k, v in (m.headers() or [])},
                                "value": json.loads(m.value())})
                if len(out) >= n:
                    # Anything beyond n (duplicates) has arrived by now too.
                    end = min(end, time.monotonic() + 0.5)
            return out
        finally:
            c.close()

    def count(self, topic, partitions=3, idle=2.0):
        """Records in `topic`, read from the start of each partition until
        none came for `idle` seconds (tansu's high watermarks can lag
        behind what a consumer reads, so they are not used)."""
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        c = Consumer({**self.client_config(), "group.id": "pg_emit-count",
                      "enable.auto.commit": False})
        try:
            c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
            n, last = 0, time.monotonic()
            while time.monotonic() - last < idle:
                batch = c.consume(10_000, 0.2)
                n += sum(1 for m in batch if not m.error())
                if batch:
                    last = time.monotonic()
            return n
        finally:
            c.close()


class TlsFirst(Listener):
    """A TLS terminator that speaks TLS before anything else, in front of
    a plain server on `upstream` (as a NATS server with `handshake_first`
    does): Python's ssl module, one thread per connection pair."""

    def __init__(self, pki, upstream):
        import ssl

        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(os.path.join(pki, "server.pem"), os.path.join(pki, "server.key"))
        self.upstream = upstream
        self.handshakes = 0
        super().__init__()

    def serve(self, c, seq):
        try:
            t = self.ctx.wrap_socket(c, server_side=True)
        except OSError:
            c.close()
            return
        self.handshakes += 1
        relay(t, socket.create_connection(("127.0.0.1", self.upstream)))


def relay(a, b):
    """Copies bytes both ways between sockets `a` and `b` until either
    side ends (on this thread and one more)."""
    def pump(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
    threading.Thread(target=pump, args=(b, a), daemon=True).start()
    pump(a, b)


class KafkaGate(Listener):
    """TLS and SASL in front of a Kafka broker that has neither (tansu
    0.6: its TLS options are not wired to its listener, and its SASL cannot
    be given users with in-memory storage). The server side of SASL PLAIN
    and SCRAM (RFC 5802) is written here with hashlib and hmac, and checked
    by librdkafka (confluent-kafka) authenticating through it. Requests
    other than SaslHandshake and SaslAuthenticate go to the broker once
    authenticated (ApiVersions also before), one at a time."""

    SASL_HANDSHAKE, SASL_AUTHENTICATE, API_VERSIONS = 17, 36, 18

    def __init__(self, users=None, mechanisms=("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"), tls=None):
        import ssl

        self.users, self.mechanisms, self.tls = users, mechanisms, tls
        self.ctx = None
        if tls:
            self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.ctx.load_cert_chain(os.path.join(tls, "server.pem"), os.path.join(tls, "server.key"))
        self.upstream = None
        self.authenticated = []  # (mechanism, user) of each success
        super().__init__()

    def client_config(self):
        cfg = {"security.protocol": ("sasl_" if self.users else "") + ("ssl" if self.tls else "plaintext")}
        if self.tls:
            cfg["ssl.ca.location"] = os.path.join(self.tls, "ca.pem")
        if self.users:
            user, password = next(iter(self.users.items()))
            cfg.update({"sasl.mechanism": self.mechanisms[-1], "sasl.username": user,
                        "sasl.password": password})
        return cfg

    @staticmethod
    def _frame(sock):
        head = b""
        while len(head) < 4:
            chunk = sock.recv(4 - len(head))
            if not chunk:
                return None
            head += chunk
        n = int.from_bytes(head, "big")
        body = b""
        while len(body) < n:
            chunk = sock.recv(n - len(body))
            if not chunk:
                return None
            body += chunk
        return body

    def serve(self, c, seq):
        import struct

        try:
            if self.ctx:
                c = self.ctx.wrap_socket(c, server_side=True)
            u = socket.create_connection(("127.0.0.1", self.upstream))
        except OSError:
            c.close()
            return
        authed, scram, mechanism = self.users is None, None, None
        try:
            while (req := self._frame(c)) is not None:
                api, version, corr = struct.unpack(">hhi", req[:8])
                n = struct.unpack(">h", req[8:10])[0]
                body = req[10 + max(n, 0):]
                if api == self.SASL_HANDSHAKE:
                    m = body[2:2 + struct.unpack(">h", body[:2])[0]].decode()
                    ok = m in self.mechanisms and self.users is not None
                    mechanism = m if ok else None
                    out = struct.pack(">ih", corr, 0 if ok else 33) + struct.pack(">i", len(self.mechanisms))
                    for name in self.mechanisms:
                        out += struct.pack(">h", len(name)) + name.encode()
                elif api == self.SASL_AUTHENTICATE and mechanism:
                    data = body[4:4 + struct.unpack(">i", body[:4])[0]]
                    reply, scram, error = self._sasl(mechanism, data, scram)
                    if error is None and reply is not None and (mechanism == "PLAIN" or reply.startswith(b"v=")):
                        authed = True
                    out = struct.pack(">ih", corr, 58 if error else 0)
                    out += (struct.pack(">h", len(error)) + error.encode()) if error else struct.pack(">h", -1)
                    out += struct.pack(">i", len(reply or b"")) + (reply or b"")
                    if version >= 1:
                        out += struct.pack(">q", 0)
                elif authed or api == self.API_VERSIONS:
                    u.sendall(struct.pack(">i", len(req)) + req)
                    answer = self._frame(u)
                    if answer is None:
                        return
                    out = answer
                else:
                    return  # unauthenticated: the connection ends, as Kafka's does
                c.sendall(struct.pack(">i", len(out)) + out)
                if api == self.SASL_AUTHENTICATE and not authed and scram is None:
                    return
        except OSError:
            pass
        finally:
            c.close()
            u.close()

    def _sasl(self, mechanism, data, scram):
        """(reply, state, error) of one SASL step."""
        import base64
        import hashlib
        import hmac

        if mechanism == "PLAIN":
            _, user, password = data.split(b"\0")
            if self.users.get(user.decode()) == password.decode():
                self.authenticated.append((mechanism, user.decode()))
                return b"", None, None
            return None, None, "Authentication failed: Invalid username or password"
        h = hashlib.sha256 if mechanism == "SCRAM-SHA-256" else hashlib.sha512
        if scram is None:
            first_bare = data.decode()[3:]
            fields = dict(f.split("=", 1) for f in first_bare.split(","))
            password = self.users.get(fields["n"])
            if password is None:
                return None, None, "Authentication failed: unknown user"
            salt, nonce = os.urandom(16), fields["r"] + base64.b64encode(os.urandom(12)).decode()
            server_first = f"r={nonce},s={base64.b64encode(salt).decode()},i=4096"
            salted = hashlib.pbkdf2_hmac(h().name, password.encode(), salt, 4096)
            return server_first.encode(), (fields["n"], first_bare, server_first, salted, nonce), None
        user, first_bare, server_first, salted, nonce = scram
        final = data.decode()
        without_proof, proof = final.rsplit(",p=", 1)
        if dict(f.split("=", 1) for f in without_proof.split(","))["r"] != nonce:
            return None, None, "Authentication failed: nonce"
        auth = f"{first_bare},{server_first},{without_proof}".encode()
        stored = h(hmac.new(salted, b"Client Key", h).digest()).digest()
        signature = hmac.new(stored, auth, h).digest()
        client_key = bytes(a ^ b for a, b in zip(base64.b64decode(proof), signature))
        if h(client_key).digest() != stored:
            return None, None, "Authentication failed during authentication due to invalid credentials"
        server_key = hmac.new(salted, b"Server Key", h).digest()
        self.authenticated.append((mechanism, user))
        return b"v=" + base64.b64encode(hmac.new(server_key, auth, h).digest()), None, None
