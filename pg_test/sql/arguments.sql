-- Argument checking and the SQL surface, independent of any receiver.
CREATE EXTENSION pg_emit;
-- Report errors as SQLSTATE: message, so the expected output pins both.
CREATE FUNCTION pg_temp.try(sql text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
  EXECUTE sql;
  RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
  RETURN SQLSTATE || ': ' || SQLERRM;
END $$;

-- Functions live in the installation schema, internals in emit.
SELECT p.proname, n.nspname, p.proisstrict, p.provolatile
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE p.proname IN ('send_socket', 'row_to_socket') ORDER BY 1;
SELECT nspname FROM pg_namespace WHERE nspname = 'emit';

-- send_socket: invalid arguments are 22023, NULL gives NULL.
SELECT pg_temp.try($$SELECT send_socket('x', '127.0.0.1', 0)$$);
SELECT pg_temp.try($$SELECT send_socket('x', '127.0.0.1', 65536)$$);
SELECT pg_temp.try($$SELECT send_socket('x', '', 80)$$);
SELECT pg_temp.try($$SELECT send_socket('x', repeat('h', 300), 80)$$);
SELECT pg_temp.try($$SELECT send_socket('x', E'evil\r\nhost', 80)$$);
SELECT send_socket(NULL, '127.0.0.1', 80) IS NULL AS null_msg,
       send_socket('x', NULL, 80) IS NULL AS null_host,
       send_socket('x', '127.0.0.1', NULL) IS NULL AS null_port;

-- send_http: invalid URL, scheme, method, header are 22023.
SELECT pg_temp.try($$SELECT send_http('ftp://127.0.0.1/x', '{}')$$);
SELECT pg_temp.try($$SELECT send_http('127.0.0.1/x', '{}')$$);
SELECT pg_temp.try($$SELECT send_http('http://127.0.0.1/', '{}', 'get')$$);
SELECT pg_temp.try($$SELECT send_http('http://127.0.0.1/', '{}', 'POST', 'application/json', '{"X-A": "b\r\nC: d"}')$$);
SELECT send_http(NULL, '{}') IS NULL AS null_url;

-- Nobody but superusers may send or attach triggers until granted.
SELECT p.proname, NOT has_function_privilege('public', p.oid, 'EXECUTE') AS public_revoked
  FROM pg_proc p
 WHERE p.proname IN ('send_socket', 'send_http', 'row_to_socket', 'row_to_http') ORDER BY 1;
SELECT has_function_privilege('emit_sender', 'send_socket(text, text, integer)', 'EXECUTE') AS sender_may_send,
       has_schema_privilege('public', 'emit', 'USAGE') AS public_sees_emit;

-- Settings: units, defaults, bad values.
SHOW pg_emit.connect_timeout;
SHOW pg_emit.write_timeout;
SHOW pg_emit.failure_cooldown;
SHOW pg_emit.on_error;
SHOW pg_emit.default_delivery;
SHOW pg_emit.http_timeout;
SHOW pg_emit.statement_batch_size;
SELECT pg_temp.try($$SET pg_emit.allowed_destinations = '10.0.0.0/33'$$);
SET pg_emit.connect_timeout = '2s';
SHOW pg_emit.connect_timeout;
SELECT pg_temp.try($$SET pg_emit.on_error = 'sometimes'$$);
-- PostgreSQL 17 names the unit in the range ("1 ms .. 2147483647 ms").
SELECT regexp_replace(pg_temp.try($$SET pg_emit.connect_timeout = 0$$),
                      '(\d+) ms \.\. (\d+) ms', '\1 .. \2') AS try;
RESET pg_emit.connect_timeout;

-- Trigger arguments are checked at the first firing, naming the trigger.
CREATE TABLE orders (id int);
CREATE TRIGGER no_port AFTER INSERT ON orders FOR EACH ROW
  EXECUTE FUNCTION row_to_socket('127.0.0.1');
SELECT pg_temp.try($$INSERT INTO orders VALUES (1)$$);
DROP TRIGGER no_port ON orders;
CREATE TRIGGER bad_port AFTER INSERT ON orders FOR EACH ROW
  EXECUTE FUNCTION row_to_socket('127.0.0.1', 'eighty');
SELECT pg_temp.try($$INSERT INTO orders VALUES (1)$$);
DROP TRIGGER bad_port ON orders;
CREATE TRIGGER bad_key AFTER INSERT ON orders FOR EACH ROW
  EXECUTE FUNCTION row_to_socket('127.0.0.1', '26200', 'format=json', 'fromat=td');
SELECT pg_temp.try($$INSERT INTO orders VALUES (1)$$);
DROP TRIGGER bad_key ON orders;
CREATE TRIGGER bad_value AFTER INSERT ON orders FOR EACH ROW
  EXECUTE FUNCTION row_to_socket('127.0.0.1', '26200', 'framing=lines');
SELECT pg_temp.try($$INSERT INTO orders VALUES (1)$$);
DROP TRIGGER bad_value ON orders;
CREATE TRIGGER twice AFTER INSERT ON orders FOR EACH ROW
  EXECUTE FUNCTION row_to_socket('127.0.0.1', '26200', 'format=td', 'format=json');
SELECT pg_temp.try($$INSERT INTO orders VALUES (1)$$);
DROP TRIGGER twice ON orders;
CREATE TRIGGER http_bad AFTER INSERT ON orders FOR EACH ROW
  EXECUTE FUNCTION row_to_http('http://127.0.0.1/', 'header=Bad Header: x');
SELECT pg_temp.try($$INSERT INTO orders VALUES (1)$$);
DROP TRIGGER http_bad ON orders;
CREATE TRIGGER per_statement AFTER UPDATE ON orders FOR EACH STATEMENT
  EXECUTE FUNCTION row_to_socket('127.0.0.1', '26200');
SELECT pg_temp.try($$UPDATE orders SET id = 2$$);
DROP TRIGGER per_statement ON orders;
SELECT count(*) AS rows_kept FROM orders;

-- Calling the trigger function directly is refused by PostgreSQL itself.
SELECT pg_temp.try($$SELECT row_to_socket()$$);

DROP TABLE orders;
DROP EXTENSION pg_emit;
SELECT count(*) AS emit_schema_left FROM pg_namespace WHERE nspname = 'emit';
