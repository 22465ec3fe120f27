"""The receiver example in the README really receives what pg_emit sends."""

import json
import os
import subprocess
import sys

import pytest

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
