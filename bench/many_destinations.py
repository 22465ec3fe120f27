"""Five hundred HTTP destinations at once, of which fifty are down
(connection refused) and fifty hang (they accept and never answer): what
the worker holds (threads, open files, memory) and how long the healthy
ones take to get their events, under a limit of 1,024 open files (soft and
hard, PostgreSQL's usual soft limit, here one the worker cannot raise).

Each destination is stored (concurrency 32, the default) and gets 20
keyed messages in one transaction; the 400 healthy ones share one 20 ms
epoll receiver (a path each). Figures are from one run on one machine;
nothing here is asserted by the test suite.

Usage: .venv/bin/python bench/many_destinations.py   (part of make bench)
"""

import os
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from http_receivers import DelayedHttpReceiver  # noqa: E402
from pgcluster import Cluster  # noqa: E402
from receivers import free_port  # noqa: E402

HEALTHY, DOWN, HANGING, EVENTS = 400, 50, 50, 20


def proc_stats(pid):
    with open(f"/proc/{pid}/status") as f:
        status = dict(line.split(":", 1) for line in f)
    return (int(status["Threads"]), len(os.listdir(f"/proc/{pid}/fd")),
            int(status["VmRSS"].split()[0]) // 1024)


def main():
    cluster = Cluster("pg_emit-bench-many", port=54340, conf={"shared_preload_libraries": "'pg_emit'"})
    cluster.init().start(wrap=["prlimit", "--nofile=1024:1024", "--"])
    rx = DelayedHttpReceiver(0.02)
    hanging = []
    for _ in range(HANGING):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(4096)
        hanging.append(s)
    peak = [0, 0, 0]
    try:
        with cluster.connect() as c:
            c.execute("CREATE EXTENSION pg_emit")
            time.sleep(1)
            pid = c.execute("SELECT pid FROM emit.worker").fetchone()[0]
            idle = proc_stats(pid)
            urls = ([f"http://127.0.0.1:{rx.port}/d{n}" for n in range(HEALTHY)]
                    + [f"http://127.0.0.1:{free_port()}/" for _ in range(DOWN)]
                    + [f"http://127.0.0.1:{s.getsockname()[1]}/" for s in hanging])
            for n, url in enumerate(urls):
                c.execute("SELECT emit.create_destination(%s, %s)", (f"d{n}", url))
            stop = threading.Event()

            def sample():
                while not stop.is_set():
                    try:
                        peak[:] = [max(a, b) for a, b in zip(peak, proc_stats(pid))]
                    except OSError:
                        pass
                    time.sleep(0.05)
            threading.Thread(target=sample, daemon=True).start()
            # The body must carry new.id and new.v for the receiver's order
            # check: one key per message.
            t = time.monotonic()
            c.execute("BEGIN")
            for n in range(len(urls)):
                c.execute(f"SELECT send_message('d{n}', json_build_object('new', json_build_object("
                          f"'id', {n} * 1000 + g, 'v', 0))::text, 'async', g::text) "
                          f"FROM generate_series(1, {EVENTS}) g")
            c.execute("COMMIT")
            got = rx.wait_for(HEALTHY * EVENTS, timeout=120)
            took = time.monotonic() - t
            time.sleep(6)  # past the hanging requests' timeout: probes only
            settled = proc_stats(pid)
            stop.set()
            log = cluster.tail_log(400)
    finally:
        rx.close()
        for s in hanging:
            s.close()
        cluster.destroy()
    exhausted = "Too many open files" in log or "out of file descriptors" in log
    print(f"\n{HEALTHY + DOWN + HANGING} HTTP destinations ({DOWN} refusing, {HANGING} hanging), "
          f"{EVENTS} events each, open files limited to 1,024; {os.cpu_count()} cores\n")
    print("| | threads | open files | RSS (MB) |")
    print("|---|---|---|---|")
    print(f"| worker idle | {idle[0]} | {idle[1]} | {idle[2]} |")
    print(f"| peak while delivering | {peak[0]} | {peak[1]} | {peak[2]} |")
    print(f"| after the hanging requests timed out | {settled[0]} | {settled[1]} | {settled[2]} |")
    print(f"\nhealthy destinations: {got:,} of {HEALTHY * EVENTS:,} events in {took:.1f} s; "
          f"descriptors exhausted: {'YES' if exhausted else 'no'}")


if __name__ == "__main__":
    main()
