//! The event envelope.
//!
//! Row bodies arrive already serialized by PostgreSQL's `row_to_json`, so
//! type fidelity (numerics, jsonb, arrays, timestamps) is PostgreSQL's own;
//! this module only wraps them. It writes bytes straight into a reused
//! buffer: at tens of thousands of rows per second a serde tree per row
//! would cost more than the socket write.

use crate::options::Format;
use std::io::Write as _;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Insert,
    Update,
    Delete,
    Truncate,
    /// A row as it was when `emit.backfill` read it.
    Read,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Insert => "INSERT",
            Op::Update => "UPDATE",
            Op::Delete => "DELETE",
            Op::Truncate => "TRUNCATE",
            Op::Read => "READ",
        }
    }
}

/// What a queued event is, which says where its id goes and what may sign
/// it: an event pg_emit wrote in `format` (the formats' envelopes carry
/// their id), or a `send_message` message, which goes out byte for byte
/// as its caller wrote it (CloudEvents formats wrap it as their `data`):
/// its id travels beside the body, and it starts `message_` (see
/// [`event_id`]) so that a signed id tells a receiver who wrote the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Kind {
    pub format: Format,
    pub message: bool,
}

impl Kind {
    pub const fn event(format: Format) -> Kind {
        Kind {
            format,
            message: false,
        }
    }

    pub const fn message(format: Format) -> Kind {
        Kind {
            format,
            message: true,
        }
    }

    /// As `emit.outbox.format` spells it: the format's name, after
    /// `message:` for a message.
    pub fn name(self) -> String {
        match self.message {
            true => format!("{MESSAGE_PREFIX}{}", self.format.name()),
            false => self.format.name().to_string(),
        }
    }

    /// The inverse of [`Kind::name`].
    pub fn from_name(name: &str) -> Option<Kind> {
        match name.strip_prefix(MESSAGE_PREFIX) {
            Some(f) => Format::from_name(f).map(Kind::message),
            None => Format::from_name(name).map(Kind::event),
        }
    }
}

const MESSAGE_PREFIX: &str = "message:";

/// The id of events `first..=last` of `stream` (several for a batch):
/// `evt_<stream>_<first>` (`_<first>-<last>` for a batch), `message_…`
/// for messages. Unique across destinations, databases and restores, like
/// `(stream, id)`, and the same on every retry.
pub fn event_id(kind: Kind, stream: &str, first: i64, last: i64) -> String {
    let prefix = if kind.message { "message" } else { "evt" };
    if first == last {
        format!("{prefix}_{stream}_{first}")
    } else {
        format!("{prefix}_{stream}_{first}-{last}")
    }
}

/// Facts about the firing that only `format=td` needs beyond the basics.
#[derive(Debug, Clone, Copy)]
pub struct Event<'a> {
    pub op: Op,
    pub schema: &'a str,
    pub table: &'a str,
    /// `BEFORE`, `AFTER` or `INSTEAD OF`.
    pub when: &'a str,
    /// `ROW` or `STATEMENT`.
    pub level: &'a str,
    pub trigger_name: &'a str,
    pub relid: u32,
    /// All trigger arguments, as plpython exposes them in `TD["args"]`.
    pub args: &'a [&'a str],
    /// What Debezium and CloudEvents events say beyond the row.
    pub ctx: Context<'a>,
}

/// When, where and in which transaction an event was made: Debezium's
/// `source` and `ts_ms`, CloudEvents' `source`, `time` and `id`. Filled
/// only for formats that [need it](Format::needs_context).
#[derive(Debug, Clone, Copy, Default)]
pub struct Context<'a> {
    pub database: &'a str,
    /// The writing transaction's id.
    pub txid: u64,
    /// Where PostgreSQL's write-ahead log was when the trigger fired: past
    /// the change's own WAL record (AFTER ROW triggers fire at the end of
    /// their statement, so its rows share about the same position).
    pub lsn: u64,
    /// When the trigger fired, in microseconds since the Unix epoch.
    pub micros: i64,
    /// A CloudEvents `id` made when the event is (sync and commit
    /// delivery); `None` for async events, which the worker numbers and
    /// so get their id from [`with_id`].
    pub id: Option<&'a str>,
}

/// `source` of pg_emit's CloudEvents, before the database name.
const CE_SOURCE: &str = "/pg_emit/";

/// Appends one event to `buf`. `new`/`old` are `row_to_json` output.
///
/// With `one_line`, raw line breaks are turned into spaces: a `json`
/// column keeps the whitespace it was stored with, and a line break
/// outside a JSON string is insignificant, so the document stays
/// equivalent while it can no longer split an ndjson line.
pub fn write_event(
    buf: &mut Vec<u8>,
    format: Format,
    ev: &Event<'_>,
    new: Option<&[u8]>,
    old: Option<&[u8]>,
    one_line: bool,
) {
    match format {
        Format::Json | Format::Td | Format::Supabase => {
            push_header(buf, format, ev);
            push_pair(buf, format, new, old, one_line);
            buf.push(b'}');
        }
        // Debezium's truncate events carry no before/after at all.
        Format::Debezium if ev.op == Op::Truncate => {
            buf.push(b'{');
            push_debezium_tail(buf, ev);
            buf.push(b'}');
        }
        Format::Debezium => {
            buf.push(b'{');
            push_pair(buf, format, new, old, one_line);
            buf.push(b',');
            push_debezium_tail(buf, ev);
            buf.push(b'}');
        }
        Format::CloudEvents | Format::CloudEventsBinary => {
            let kind = match ev.op {
                Op::Insert => "pg_emit.row.insert",
                Op::Update => "pg_emit.row.update",
                Op::Delete => "pg_emit.row.delete",
                Op::Truncate => "pg_emit.truncate",
                Op::Read => "pg_emit.row.read",
            };
            push_cloudevent_head(buf, &ev.ctx, kind, Some((ev.schema, ev.table)));
            write_event(buf, Format::Json, ev, new, old, one_line);
            buf.push(b'}');
        }
    }
}

/// Opens a statement-level message: the envelope of [`write_event`] with
/// `"rows":[` where the row would be. Rows follow with
/// [`push_batch_row`], then [`end_batch`].
pub fn begin_batch(buf: &mut Vec<u8>, format: Format, ev: &Event<'_>) {
    match format {
        Format::Json | Format::Td | Format::Supabase => push_header(buf, format, ev),
        Format::Debezium => {
            buf.push(b'{');
            push_debezium_tail(buf, ev);
        }
        Format::CloudEvents | Format::CloudEventsBinary => {
            let kind = match ev.op {
                Op::Insert => "pg_emit.statement.insert",
                Op::Update => "pg_emit.statement.update",
                Op::Delete => "pg_emit.statement.delete",
                Op::Truncate => "pg_emit.truncate",
                // Backfill makes row events only.
                Op::Read => "pg_emit.row.read",
            };
            push_cloudevent_head(buf, &ev.ctx, kind, Some((ev.schema, ev.table)));
            push_header(buf, Format::Json, ev);
        }
    }
    buf.extend_from_slice(b",\"rows\":[");
}

/// Appends one row of a statement-level message: `{"new":..,"old":..}` in
/// the format's own names; `first` is false for every row after the first.
pub fn push_batch_row(
    buf: &mut Vec<u8>,
    format: Format,
    first: bool,
    new: Option<&[u8]>,
    old: Option<&[u8]>,
    one_line: bool,
) {
    if !first {
        buf.push(b',');
    }
    buf.push(b'{');
    push_pair(buf, format, new, old, one_line);
    buf.push(b'}');
}

pub fn end_batch(buf: &mut Vec<u8>, format: Format) {
    buf.extend_from_slice(b"]}");
    if format.is_cloudevents() {
        buf.push(b'}');
    }
}

/// A `send_message` message as `format` sends it: CloudEvents wrap it as
/// `data` of a `pg_emit.message` event; every other format sends it as
/// it is (it is not a row change, so it has no row shape to take).
pub fn write_message(buf: &mut Vec<u8>, format: Format, ctx: &Context<'_>, msg: &[u8]) {
    if format.is_cloudevents() {
        push_cloudevent_head(buf, ctx, "pg_emit.message", None);
        buf.extend_from_slice(msg);
        buf.push(b'}');
    } else {
        buf.extend_from_slice(msg);
    }
}

/// A DDL event (pg_emit's JSON, `event`) as `format` sends it:
/// CloudEvents wrap it as `data` of a `pg_emit.ddl` event whose subject is
/// the object's identity; every other format sends it as it is (formats
/// shape row changes, and a DDL command has no row).
pub fn write_ddl(
    buf: &mut Vec<u8>,
    format: Format,
    ctx: &Context<'_>,
    event: &[u8],
    object: Option<&str>,
) {
    if format.is_cloudevents() {
        push_cloudevent_head(buf, ctx, "pg_emit.ddl", None);
        buf.extend_from_slice(event);
        // CloudEvents forbids an empty subject: none for what has no
        // identity (a GRANT).
        if let Some(o) = object.filter(|o| !o.is_empty()) {
            buf.extend_from_slice(b",\"subject\":");
            push_string(buf, o);
        }
        buf.push(b'}');
    } else {
        buf.extend_from_slice(event);
    }
}

/// The keys every message of `format` starts with, object left open
/// (`json`, `td`, `supabase`).
fn push_header(buf: &mut Vec<u8>, format: Format, ev: &Event<'_>) {
    match format {
        Format::Td => {
            buf.extend_from_slice(b"{\"event\":\"");
            buf.extend_from_slice(ev.op.name().as_bytes());
            buf.extend_from_slice(b"\",\"when\":");
            push_string(buf, ev.when);
            buf.extend_from_slice(b",\"level\":");
            push_string(buf, ev.level);
            buf.extend_from_slice(b",\"name\":");
            push_string(buf, ev.trigger_name);
            buf.extend_from_slice(b",\"table_name\":");
            push_string(buf, ev.table);
            buf.extend_from_slice(b",\"table_schema\":");
            push_string(buf, ev.schema);
            // plpython renders relid with oidout, i.e. as a string.
            buf.extend_from_slice(b",\"relid\":\"");
            let _ = write!(buf, "{}", ev.relid);
            buf.extend_from_slice(b"\",\"args\":");
            push_args(buf, ev.args);
        }
        // Supabase's own key order (its http_request trigger builds the
        // same object): type, table, schema.
        Format::Supabase => {
            buf.extend_from_slice(b"{\"type\":\"");
            buf.extend_from_slice(ev.op.name().as_bytes());
            buf.extend_from_slice(b"\",\"table\":");
            push_string(buf, ev.table);
            buf.extend_from_slice(b",\"schema\":");
            push_string(buf, ev.schema);
        }
        _ => {
            buf.extend_from_slice(b"{\"op\":\"");
            buf.extend_from_slice(ev.op.name().as_bytes());
            buf.extend_from_slice(b"\",\"schema\":");
            push_string(buf, ev.schema);
            buf.extend_from_slice(b",\"table\":");
            push_string(buf, ev.table);
        }
    }
}

/// The new and old row under the format's names, after a `,` unless the
/// object was just opened.
fn push_pair(
    buf: &mut Vec<u8>,
    format: Format,
    new: Option<&[u8]>,
    old: Option<&[u8]>,
    one_line: bool,
) {
    if buf.last() != Some(&b'{') {
        buf.push(b',');
    }
    let (first, second): ((&[u8], _), (&[u8], _)) = match format {
        Format::Supabase => ((b"\"record\":", new), (b",\"old_record\":", old)),
        Format::Debezium => ((b"\"before\":", old), (b",\"after\":", new)),
        _ => ((b"\"new\":", new), (b",\"old\":", old)),
    };
    buf.extend_from_slice(first.0);
    push_row(buf, first.1, one_line);
    buf.extend_from_slice(second.0);
    push_row(buf, second.1, one_line);
}

/// Debezium's `"source":{...},"op":"c","ts_ms":N` (see the README for
/// which `source` fields mean what here).
fn push_debezium_tail(buf: &mut Vec<u8>, ev: &Event<'_>) {
    let ctx = &ev.ctx;
    let ms = ctx.micros.div_euclid(1000);
    buf.extend_from_slice(b"\"source\":{\"version\":\"");
    buf.extend_from_slice(env!("CARGO_PKG_VERSION").as_bytes());
    buf.extend_from_slice(b"\",\"connector\":\"pg_emit\",\"name\":");
    push_string(buf, ctx.database);
    buf.extend_from_slice(b",\"ts_ms\":");
    let _ = write!(buf, "{}", ms);
    buf.extend_from_slice(b",\"ts_us\":");
    let _ = write!(buf, "{}", ctx.micros);
    buf.extend_from_slice(b",\"ts_ns\":");
    let _ = write!(buf, "{}", i128::from(ctx.micros) * 1000);
    // A backfilled row is Debezium's snapshot read.
    buf.extend_from_slice(match ev.op {
        Op::Read => b",\"snapshot\":\"true\",\"db\":",
        _ => b",\"snapshot\":\"false\",\"db\":",
    });
    push_string(buf, ctx.database);
    buf.extend_from_slice(b",\"schema\":");
    push_string(buf, ev.schema);
    buf.extend_from_slice(b",\"table\":");
    push_string(buf, ev.table);
    buf.extend_from_slice(b",\"txId\":");
    let _ = write!(buf, "{}", ctx.txid);
    buf.extend_from_slice(b",\"lsn\":");
    let _ = write!(buf, "{}", ctx.lsn);
    buf.extend_from_slice(b",\"xmin\":null},\"op\":\"");
    buf.push(match ev.op {
        Op::Insert => b'c',
        Op::Update => b'u',
        Op::Delete => b'd',
        Op::Truncate => b't',
        Op::Read => b'r',
    });
    buf.extend_from_slice(b"\",\"ts_ms\":");
    let _ = write!(buf, "{}", ms);
    buf.extend_from_slice(b",\"ts_us\":");
    let _ = write!(buf, "{}", ctx.micros);
    buf.extend_from_slice(b",\"ts_ns\":");
    let _ = write!(buf, "{}", i128::from(ctx.micros) * 1000);
}

/// A CloudEvents structured-mode object up to `"data":`. The `id` comes
/// first when known; async events get it from the worker ([`with_id`]).
fn push_cloudevent_head(
    buf: &mut Vec<u8>,
    ctx: &Context<'_>,
    kind: &str,
    subject: Option<(&str, &str)>,
) {
    buf.push(b'{');
    if let Some(id) = ctx.id {
        buf.extend_from_slice(b"\"id\":");
        push_string(buf, id);
        buf.push(b',');
    }
    // Percent-encoding leaves nothing JSON would escape.
    buf.extend_from_slice(b"\"specversion\":\"1.0\",\"source\":\"");
    buf.extend_from_slice(CE_SOURCE.as_bytes());
    crate::cloudevents::percent_encode_path(buf, ctx.database);
    buf.push(b'"');
    buf.extend_from_slice(b",\"type\":");
    push_string(buf, kind);
    if let Some((schema, table)) = subject {
        buf.extend_from_slice(b",\"subject\":");
        buf.push(b'"');
        push_escaped(buf, schema);
        buf.push(b'.');
        push_escaped(buf, table);
        buf.push(b'"');
    }
    buf.extend_from_slice(b",\"time\":\"");
    push_rfc3339(buf, ctx.micros);
    buf.extend_from_slice(b"\",\"datacontenttype\":\"application/json\",\"data\":");
}

/// Writes `line` (one event of `kind` as queued) with the id the worker
/// gave it: `{"id":N,"stream":"S",...}` for `json` and `td` events,
/// CloudEvents' string `id` (the same as `webhook-id`, see [`event_id`])
/// for `cloudevents`, and nothing for `supabase` and `debezium`, whose
/// shapes have no place for one, nor for messages outside a CloudEvent:
/// their id travels beside the body (`webhook-id`, broker headers).
pub fn with_id(buf: &mut Vec<u8>, kind: Kind, stream: &str, id: i64, line: &str) {
    let rest = line.strip_prefix('{').unwrap_or(line);
    match kind.format {
        Format::CloudEvents | Format::CloudEventsBinary => {
            buf.extend_from_slice(b"{\"id\":");
            push_string(buf, &event_id(kind, stream, id, id));
        }
        _ if kind.message => {
            buf.extend_from_slice(line.as_bytes());
            return;
        }
        Format::Supabase | Format::Debezium => {
            buf.extend_from_slice(line.as_bytes());
            return;
        }
        Format::Json | Format::Td => {
            buf.extend_from_slice(b"{\"id\":");
            let _ = write!(buf, "{}", id);
            buf.extend_from_slice(b",\"stream\":\"");
            buf.extend_from_slice(stream.as_bytes());
            buf.push(b'"');
        }
    }
    if !rest.starts_with('}') {
        buf.push(b',');
    }
    buf.extend_from_slice(rest.as_bytes());
}

/// Appends `micros` since the Unix epoch as RFC 3339 UTC with
/// microseconds (CloudEvents' `time`).
fn push_rfc3339(buf: &mut Vec<u8>, micros: i64) {
    let secs = micros.div_euclid(1_000_000);
    let frac = micros.rem_euclid(1_000_000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let _ = write!(
        buf,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{frac:06}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    );
}

fn push_args(buf: &mut Vec<u8>, args: &[&str]) {
    // plpython gives None, not an empty list, without arguments.
    if args.is_empty() {
        buf.extend_from_slice(b"null");
        return;
    }
    buf.push(b'[');
    for (i, a) in args.iter().enumerate() {
        if i > 0 {
            buf.push(b',');
        }
        push_string(buf, a);
    }
    buf.push(b']');
}

fn push_row(buf: &mut Vec<u8>, row: Option<&[u8]>, one_line: bool) {
    match row {
        None => buf.extend_from_slice(b"null"),
        Some(json) if one_line => buf.extend(json.iter().map(|&b| match b {
            b'\n' | b'\r' => b' ',
            b => b,
        })),
        Some(json) => buf.extend_from_slice(json),
    }
}

/// Appends `s` as a JSON string literal.
pub fn push_string(buf: &mut Vec<u8>, s: &str) {
    buf.push(b'"');
    push_escaped(buf, s);
    buf.push(b'"');
}

/// Appends `s` escaped for inside a JSON string literal.
fn push_escaped(buf: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => b"",
            _ => continue,
        };
        buf.extend_from_slice(&bytes[start..i]);
        if esc.is_empty() {
            buf.extend_from_slice(b"\\u00");
            buf.push(HEX[(b >> 4) as usize]);
            buf.push(HEX[(b & 0xf) as usize]);
        } else {
            buf.extend_from_slice(esc);
        }
        start = i + 1;
    }
    buf.extend_from_slice(&bytes[start..]);
}

/// `msg`, which must be JSON, as one line: a message queued for async
/// delivery is one line of the outbox. A message already on one line is
/// kept byte for byte; from one of several lines the whitespace between
/// tokens is dropped, and everything else, numbers' digits and the order
/// of keys included, is kept.
pub fn one_line_json(msg: &str) -> Result<Vec<u8>, String> {
    serde_json::from_str::<serde::de::IgnoredAny>(msg)
        .map_err(|e| format!("msg is not JSON: {e}"))?;
    if !msg.contains(['\n', '\r']) {
        return Ok(msg.as_bytes().to_vec());
    }
    let mut out = Vec::with_capacity(msg.len());
    let (mut in_string, mut escaped) = (false, false);
    for &b in msg.as_bytes() {
        if in_string {
            out.push(b);
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
        } else if !matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            in_string = b == b'"';
            out.push(b);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ddl_events_as_cloudevents() {
        let ctx = Context {
            database: "db",
            txid: 0,
            lsn: 0,
            micros: 0,
            id: Some("msg_1"),
        };
        let ev = br#"{"op":"DDL","object_identity":"public.t"}"#;
        let mut buf = Vec::new();
        write_ddl(
            &mut buf,
            Format::CloudEvents,
            &ctx,
            ev,
            Some("public.\"t\""),
        );
        let v: serde_json::Value = serde_json::from_slice(&buf).unwrap();
        assert_eq!(v["type"], "pg_emit.ddl");
        assert_eq!(v["subject"], "public.\"t\"");
        assert_eq!(v["data"]["op"], "DDL");
        assert_eq!(v["id"], "msg_1");
        buf.clear();
        write_ddl(&mut buf, Format::CloudEvents, &ctx, ev, None);
        let v: serde_json::Value = serde_json::from_slice(&buf).unwrap();
        assert!(v.get("subject").is_none());
        buf.clear();
        write_ddl(&mut buf, Format::Json, &ctx, ev, Some("public.t"));
        assert_eq!(buf, ev);
    }

    #[test]
    fn messages_become_one_line() {
        let m =
            "{\n  \"a\": 1.50,\n  \"s\": \"x y\\n\\\"z\\\" \",\n  \"n\": 12345678901234567890\n}";
        assert_eq!(
            String::from_utf8(one_line_json(m).unwrap()).unwrap(),
            r#"{"a":1.50,"s":"x y\n\"z\" ","n":12345678901234567890}"#
        );
        for as_written in [r#"{ "b": 1, "a" : [1, 2] }"#, "[1, 2]", r#""text""#, "42"] {
            assert_eq!(one_line_json(as_written).unwrap(), as_written.as_bytes());
        }
        assert!(one_line_json("{").unwrap_err().contains("not JSON"));
        assert!(one_line_json("plain text").is_err());
    }

    fn ev(op: Op) -> Event<'static> {
        Event {
            op,
            schema: "public",
            table: "orders",
            when: "AFTER",
            level: "ROW",
            trigger_name: "orders_out",
            relid: 16384,
            args: &["127.0.0.1", "26200"],
            ctx: Context {
                database: "shop",
                txid: 771,
                lsn: 24_023_128,
                micros: 1_795_262_400_123_456,
                id: None,
            },
        }
    }

    fn render(
        format: Format,
        op: Op,
        new: Option<&str>,
        old: Option<&str>,
        one_line: bool,
    ) -> String {
        let mut buf = Vec::new();
        write_event(
            &mut buf,
            format,
            &ev(op),
            new.map(str::as_bytes),
            old.map(str::as_bytes),
            one_line,
        );
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn json_envelope_matches_the_contract() {
        assert_eq!(
            render(
                Format::Json,
                Op::Update,
                Some(r#"{"id":1,"total":9.50}"#),
                Some(r#"{"id":1,"total":7.00}"#),
                false
            ),
            r#"{"op":"UPDATE","schema":"public","table":"orders","new":{"id":1,"total":9.50},"old":{"id":1,"total":7.00}}"#
        );
        assert_eq!(
            render(Format::Json, Op::Truncate, None, None, false),
            r#"{"op":"TRUNCATE","schema":"public","table":"orders","new":null,"old":null}"#
        );
    }

    #[test]
    fn td_envelope_uses_plpython_names() {
        assert_eq!(
            render(Format::Td, Op::Insert, Some(r#"{"id":1}"#), None, false),
            r#"{"event":"INSERT","when":"AFTER","level":"ROW","name":"orders_out","table_name":"orders","table_schema":"public","relid":"16384","args":["127.0.0.1","26200"],"new":{"id":1},"old":null}"#
        );
        let mut buf = Vec::new();
        let mut e = ev(Op::Delete);
        e.args = &[];
        write_event(&mut buf, Format::Td, &e, None, Some(b"{}"), false);
        assert!(String::from_utf8(buf)
            .unwrap()
            .ends_with(r#""args":null,"new":null,"old":{}}"#));
    }

    #[test]
    fn one_line_removes_raw_line_breaks_only() {
        let row = "{\"j\":{\"a\":\r\n 1},\"s\":\"x\\ny\"}";
        let out = render(Format::Json, Op::Insert, Some(row), None, true);
        assert!(!out.contains('\n') && !out.contains('\r'));
        assert!(out.contains(r#""s":"x\ny""#), "escaped newline kept: {out}");
        let kept = render(Format::Json, Op::Insert, Some(row), None, false);
        assert!(kept.contains("\r\n"));
    }

    #[test]
    fn statement_batches() {
        let mut buf = Vec::new();
        let mut e = ev(Op::Update);
        e.level = "STATEMENT";
        begin_batch(&mut buf, Format::Json, &e);
        push_batch_row(
            &mut buf,
            Format::Json,
            true,
            Some(b"{\"id\":1}"),
            Some(b"{\"id\":0}"),
            false,
        );
        push_batch_row(
            &mut buf,
            Format::Json,
            false,
            Some(b"{\"id\":2}"),
            None,
            false,
        );
        end_batch(&mut buf, Format::Json);
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            r#"{"op":"UPDATE","schema":"public","table":"orders","rows":[{"new":{"id":1},"old":{"id":0}},{"new":{"id":2},"old":null}]}"#
        );
        let mut buf = Vec::new();
        begin_batch(&mut buf, Format::Td, &e);
        end_batch(&mut buf, Format::Td);
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            r#"{"event":"UPDATE","when":"AFTER","level":"STATEMENT","name":"orders_out","table_name":"orders","table_schema":"public","relid":"16384","args":["127.0.0.1","26200"],"rows":[]}"#
        );
    }

    fn parse(s: &str) -> serde_json::Value {
        serde_json::from_str(s).unwrap_or_else(|e| panic!("{e}: {s}"))
    }

    fn keys(v: &serde_json::Value) -> Vec<&str> {
        v.as_object().unwrap().keys().map(String::as_str).collect()
    }

    #[test]
    fn supabase_has_its_five_keys_in_its_order() {
        let ins = render(
            Format::Supabase,
            Op::Insert,
            Some(r#"{"id":1}"#),
            None,
            false,
        );
        assert_eq!(
            ins,
            r#"{"type":"INSERT","table":"orders","schema":"public","record":{"id":1},"old_record":null}"#
        );
        let del = parse(&render(
            Format::Supabase,
            Op::Delete,
            None,
            Some("{}"),
            false,
        ));
        assert_eq!(del["record"], serde_json::Value::Null);
        assert_eq!(del["old_record"], serde_json::json!({}));
        let t = parse(&render(Format::Supabase, Op::Truncate, None, None, false));
        assert_eq!(t["type"], "TRUNCATE");
    }

    #[test]
    fn debezium_value_has_source_and_op_codes() {
        let up = parse(&render(
            Format::Debezium,
            Op::Update,
            Some(r#"{"id":1,"n":2}"#),
            Some(r#"{"id":1,"n":1}"#),
            false,
        ));
        let mut top = keys(&up);
        top.sort_unstable();
        assert_eq!(
            top,
            ["after", "before", "op", "source", "ts_ms", "ts_ns", "ts_us"]
        );
        assert_eq!(up["op"], "u");
        assert_eq!(up["before"]["n"], 1);
        assert_eq!(up["after"]["n"], 2);
        let src = &up["source"];
        assert_eq!(src["connector"], "pg_emit");
        assert_eq!(src["db"], "shop");
        assert_eq!(src["txId"], 771);
        assert_eq!(src["lsn"], 24_023_128);
        assert_eq!(src["ts_ms"], 1_795_262_400_123_i64);
        assert_eq!(src["ts_us"], 1_795_262_400_123_456_i64);
        assert_eq!(up["ts_ns"], 1_795_262_400_123_456_000_i64);
        assert_eq!(src["snapshot"], "false");
        for (op, code) in [(Op::Insert, "c"), (Op::Delete, "d"), (Op::Read, "r")] {
            assert_eq!(
                parse(&render(Format::Debezium, op, Some("{}"), Some("{}"), false))["op"],
                code
            );
        }
        // Truncate events have no before/after keys at all.
        let t = parse(&render(Format::Debezium, Op::Truncate, None, None, false));
        assert_eq!(t["op"], "t");
        assert!(t.get("before").is_none() && t.get("after").is_none());
    }

    #[test]
    fn cloudevents_wrap_the_json_envelope() {
        let line = render(
            Format::CloudEvents,
            Op::Insert,
            Some(r#"{"id":1}"#),
            None,
            true,
        );
        let ce = parse(&line);
        assert!(ce.get("id").is_none(), "async ids come from the worker");
        assert_eq!(ce["specversion"], "1.0");
        assert_eq!(ce["source"], "/pg_emit/shop");
        assert_eq!(ce["type"], "pg_emit.row.insert");
        assert_eq!(ce["subject"], "public.orders");
        assert_eq!(ce["time"], "2026-11-21T12:00:00.123456Z");
        assert_eq!(ce["datacontenttype"], "application/json");
        assert_eq!(
            ce["data"],
            parse(&render(
                Format::Json,
                Op::Insert,
                Some(r#"{"id":1}"#),
                None,
                true
            ))
        );
        let mut withid = Vec::new();
        with_id(&mut withid, Kind::event(Format::CloudEvents), "s", 9, &line);
        assert_eq!(
            parse(std::str::from_utf8(&withid).unwrap())["id"],
            "evt_s_9"
        );
        // Sync and commit events carry the id they were made with.
        let mut e = ev(Op::Truncate);
        e.ctx.id = Some("msg_1");
        let mut buf = Vec::new();
        write_event(&mut buf, Format::CloudEvents, &e, None, None, false);
        let t = parse(std::str::from_utf8(&buf).unwrap());
        assert_eq!(
            (t["id"].as_str(), t["type"].as_str()),
            (Some("msg_1"), Some("pg_emit.truncate"))
        );
    }

    #[test]
    fn ids_go_where_each_format_has_room() {
        let mut b = Vec::new();
        for f in [Format::Supabase, Format::Debezium] {
            b.clear();
            with_id(&mut b, Kind::event(f), "s", 3, r#"{"type":"INSERT"}"#);
            assert_eq!(b, br#"{"type":"INSERT"}"#, "{f:?} stays exactly its shape");
        }
        b.clear();
        with_id(
            &mut b,
            Kind::event(Format::Td),
            "s",
            3,
            r#"{"event":"INSERT"}"#,
        );
        assert_eq!(b, br#"{"id":3,"stream":"s","event":"INSERT"}"#);
    }

    #[test]
    fn messages_go_out_as_written() {
        let caller = r#"{"id":42,"name":"x"}"#;
        for f in [Format::Json, Format::Td, Format::Supabase, Format::Debezium] {
            let mut b = Vec::new();
            with_id(&mut b, Kind::message(f), "s", 3, caller);
            assert_eq!(b, caller.as_bytes(), "{f:?}");
        }
        // A CloudEvent is pg_emit's envelope: its id says it holds a message.
        let mut b = Vec::new();
        let line = r#"{"specversion":"1.0","data":{"id":42}}"#;
        with_id(&mut b, Kind::message(Format::CloudEvents), "s", 3, line);
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["id"], "message_s_3");
        assert_eq!(v["data"]["id"], 42);
        assert_eq!(event_id(Kind::event(Format::Json), "s", 3, 5), "evt_s_3-5");
        assert_eq!(
            event_id(Kind::message(Format::Json), "s", 3, 3),
            "message_s_3"
        );
    }

    #[test]
    fn kinds_by_name() {
        for f in [
            "json",
            "td",
            "supabase",
            "debezium",
            "cloudevents",
            "cloudevents-binary",
        ] {
            for name in [f.to_string(), format!("message:{f}")] {
                assert_eq!(Kind::from_name(&name).map(Kind::name), Some(name));
            }
        }
        assert_eq!(Kind::from_name("message:"), None);
        assert_eq!(Kind::from_name("message"), None);
    }

    #[test]
    fn statement_messages_in_every_format() {
        let mut e = ev(Op::Insert);
        e.level = "STATEMENT";
        for f in [
            Format::Json,
            Format::Td,
            Format::Supabase,
            Format::Debezium,
            Format::CloudEvents,
        ] {
            let mut buf = Vec::new();
            begin_batch(&mut buf, f, &e);
            push_batch_row(&mut buf, f, true, Some(b"{\"id\":1}"), None, true);
            push_batch_row(&mut buf, f, false, Some(b"{\"id\":2}"), None, true);
            end_batch(&mut buf, f);
            let v = parse(std::str::from_utf8(&buf).unwrap());
            let rows = match f {
                Format::CloudEvents => {
                    assert_eq!(v["type"], "pg_emit.statement.insert");
                    v["data"]["rows"].clone()
                }
                _ => v["rows"].clone(),
            };
            let new = match f {
                Format::Supabase => "record",
                Format::Debezium => "after",
                _ => "new",
            };
            assert_eq!(rows[1][new]["id"], 2, "{f:?}: {v}");
        }
    }

    #[test]
    fn messages_are_wrapped_only_as_cloudevents() {
        let ctx = ev(Op::Insert).ctx;
        let mut buf = Vec::new();
        write_message(&mut buf, Format::Supabase, &ctx, br#"{"a":1}"#);
        assert_eq!(buf, br#"{"a":1}"#);
        buf.clear();
        write_message(&mut buf, Format::CloudEvents, &ctx, br#"{"a":1}"#);
        let v = parse(std::str::from_utf8(&buf).unwrap());
        assert_eq!(
            (v["type"].as_str(), &v["data"]),
            (Some("pg_emit.message"), &serde_json::json!({"a":1}))
        );
        assert!(v.get("subject").is_none());
    }

    fn rfc3339(micros: i64) -> String {
        let mut buf = Vec::new();
        push_rfc3339(&mut buf, micros);
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn rfc3339_times() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(rfc3339(951_782_400_000_001), "2000-02-29T00:00:00.000001Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59.999999Z");
        assert_eq!(
            rfc3339(4_102_444_799_999_999),
            "2099-12-31T23:59:59.999999Z"
        );
    }

    #[test]
    fn strings_are_escaped() {
        let mut buf = Vec::new();
        push_string(&mut buf, "a\"b\\c\nd\te\u{1}f\u{7f}é\r");
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            "\"a\\\"b\\\\c\\nd\\te\\u0001f\u{7f}é\\r\""
        );
    }
}
