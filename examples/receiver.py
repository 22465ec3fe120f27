"""A minimal pg_emit receiver: prints every message it gets.

    python3 examples/receiver.py            # 127.0.0.1:26200, one message per connection
    python3 examples/receiver.py --ndjson   # framing=ndjson: one message per line

Standard library only. It listens on loopback; change HOST deliberately if
the database runs on another machine.
"""

import argparse
import json
import socketserver
import sys
import threading

HOST = "127.0.0.1"
# Connections are handled on parallel threads: one line at a time.
PRINT_LOCK = threading.Lock()


class PerConnection(socketserver.StreamRequestHandler):
    """Default framing: the message is everything up to end of stream."""

    def handle(self):
        show(self.rfile.read())


class PerLine(socketserver.StreamRequestHandler):
    """framing=ndjson: a long-lived connection, one JSON document per line."""

    def handle(self):
        for line in self.rfile:
            show(line)


def show(raw):
    try:
        event = json.loads(raw)
    except ValueError:
        print("non-JSON message:", raw[:200])
        return
    with PRINT_LOCK:
        sys.stdout.write(json.dumps(event, ensure_ascii=False) + "\n")
        sys.stdout.flush()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=26200)
    ap.add_argument("--ndjson", action="store_true")
    args = ap.parse_args()
    handler = PerLine if args.ndjson else PerConnection
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    with socketserver.ThreadingTCPServer((HOST, args.port), handler) as srv:
        print(f"listening on {HOST}:{args.port}", flush=True)
        srv.serve_forever()


if __name__ == "__main__":
    main()
