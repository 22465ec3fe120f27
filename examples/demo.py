"""pg_emit end to end: a throwaway cluster, a receiver on 127.0.0.1:26200,
a trigger, some writes, and the JSON the receiver got. Run by `make demo`.
"""

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from pgcluster import Cluster  # noqa: E402
from receivers import Receiver, free_port  # noqa: E402

BOLD, DIM, OFF = "\033[1m", "\033[2m", "\033[0m"


def step(text):
    print(f"\n{BOLD}{text}{OFF}")


def main():
    try:
        rx = Receiver("eof", port=26200)
    except OSError:
        rx = Receiver("eof")  # 26200 is taken here: any free port will do
    step(f"receiver listening on 127.0.0.1:{rx.port} (reads each connection until EOF)")

    cluster = Cluster("pg_emit-demo", port=54330)
    try:
        cluster.init().start()
        step(f"throwaway PostgreSQL 15 cluster in {cluster.root}")
        conn = cluster.connect()
        conn.add_notice_handler(lambda d: print(f"   {d.severity}: {d.message_primary}"))

        def sql(q):
            print(f"   {DIM}sql>{OFF} {q}")
            cur = conn.execute(q)
            if cur.description:
                for row in cur.fetchall():
                    print(f"        {row}")

        shown = 0

        def show_received(expect):
            nonlocal shown
            msgs = rx.wait_for(shown + expect, timeout=5)
            for m in msgs[shown:]:
                print(f"   {BOLD}received:{OFF} {m.decode()}")
            shown = len(msgs)

        step("install the extension and attach the trigger")
        sql("CREATE EXTENSION pg_emit")
        sql("CREATE TABLE orders (id int PRIMARY KEY, item text, total numeric(8,2), tags text[])")
        sql(
            "CREATE TRIGGER orders_out AFTER INSERT OR UPDATE OR DELETE ON orders "
            f"FOR EACH ROW EXECUTE FUNCTION row_to_socket('127.0.0.1', {rx.port})"
        )

        step("write rows: each change reaches the receiver as one JSON document")
        sql("INSERT INTO orders VALUES (1, 'coffee \"beans\"', 7.00, ARRAY['hot'])")
        show_received(1)
        sql("UPDATE orders SET total = 9.50 WHERE id = 1")
        show_received(1)
        sql("DELETE FROM orders WHERE id = 1")
        show_received(1)

        step("send an ad-hoc message")
        sql(f"SELECT send_socket('{{\"hello\":1}}', '127.0.0.1', {rx.port})")
        show_received(1)

        step("a receiver that is down: the write goes on, with a WARNING")
        down = free_port()
        sql(f"SELECT send_socket('lost', '127.0.0.1', {down})")

        step(f"delivery=async: nothing is lost while the receiver on port {down} is down")
        sql("CREATE TABLE payments (id int PRIMARY KEY, amount numeric)")
        sql(
            "CREATE TRIGGER payments_out AFTER INSERT ON payments FOR EACH ROW "
            f"EXECUTE FUNCTION row_to_socket('127.0.0.1', {down}, 'delivery=async', 'framing=ndjson')"
        )
        sql("INSERT INTO payments VALUES (1, 10.00), (2, 20.00)")
        time.sleep(0.5)
        sql("SELECT destination, queued + in_flight AS waiting, failed_attempts, last_error FROM emit.stats")
        late = Receiver("ndjson", port=down)
        print(f"   {DIM}(receiver started on 127.0.0.1:{down}; the worker retries with backoff){OFF}")
        for m in late.wait_for(2, timeout=10):
            print(f"   {BOLD}received:{OFF} {m.decode()}")
        late.close()

        conn.close()
    finally:
        cluster.destroy()
        rx.close()
    step("done: cluster stopped and removed")


if __name__ == "__main__":
    t = time.monotonic()
    main()
    print(f"{DIM}({time.monotonic() - t:.1f} s){OFF}")
