//! The event envelope.
//!
//! Row bodies arrive already serialized by PostgreSQL's `row_to_json`, so
//! type fidelity (numerics, jsonb, arrays, timestamps) is PostgreSQL's own;
//! this module only wraps them. It writes bytes straight into a reused
//! buffer: at tens of thousands of rows per second a serde tree per row
//! would cost more than the socket write.

use crate::options::Format;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Insert,
    Update,
    Delete,
    Truncate,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Insert => "INSERT",
            Op::Update => "UPDATE",
            Op::Delete => "DELETE",
            Op::Truncate => "TRUNCATE",
        }
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
}

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
    push_header(buf, format, ev);
    buf.extend_from_slice(b",\"new\":");
    push_row(buf, new, one_line);
    buf.extend_from_slice(b",\"old\":");
    push_row(buf, old, one_line);
    buf.push(b'}');
}

/// Opens a statement-level message: the envelope of [`write_event`] with
/// `"rows":[` where `new`/`old` would be. Rows follow with
/// [`push_batch_row`], then [`end_batch`].
pub fn begin_batch(buf: &mut Vec<u8>, format: Format, ev: &Event<'_>) {
    push_header(buf, format, ev);
    buf.extend_from_slice(b",\"rows\":[");
}

/// The keys every message of `format` starts with, object left open.
fn push_header(buf: &mut Vec<u8>, format: Format, ev: &Event<'_>) {
    match format {
        Format::Json => {
            buf.extend_from_slice(b"{\"op\":\"");
            buf.extend_from_slice(ev.op.name().as_bytes());
            buf.extend_from_slice(b"\",\"schema\":");
            push_string(buf, ev.schema);
            buf.extend_from_slice(b",\"table\":");
            push_string(buf, ev.table);
        }
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
            buf.extend_from_slice(ev.relid.to_string().as_bytes());
            buf.extend_from_slice(b"\",\"args\":");
            push_args(buf, ev.args);
        }
    }
}

/// Appends `{"new":...,"old":...}`; `first` is false for every row after
/// the first of a message.
pub fn push_batch_row(
    buf: &mut Vec<u8>,
    first: bool,
    new: Option<&[u8]>,
    old: Option<&[u8]>,
    one_line: bool,
) {
    if !first {
        buf.push(b',');
    }
    buf.extend_from_slice(b"{\"new\":");
    push_row(buf, new, one_line);
    buf.extend_from_slice(b",\"old\":");
    push_row(buf, old, one_line);
    buf.push(b'}');
}

pub fn end_batch(buf: &mut Vec<u8>) {
    buf.extend_from_slice(b"]}");
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
    const HEX: &[u8; 16] = b"0123456789abcdef";
    buf.push(b'"');
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
    buf.push(b'"');
}

/// `msg` as one line of JSON: a message queued for async delivery is one
/// line of the outbox, and the worker puts its `id` first, so it must be a
/// JSON object. Whitespace between tokens (newlines included) is dropped;
/// everything else, numbers' digits included, is kept byte for byte.
pub fn one_line_object(msg: &str) -> Result<Vec<u8>, String> {
    serde_json::from_str::<serde::de::IgnoredAny>(msg)
        .map_err(|e| format!("msg is not JSON: {e}"))?;
    if !msg.trim_start().starts_with('{') {
        return Err("msg must be a JSON object (the worker adds its \"id\" to it)".into());
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
    fn messages_become_one_line_objects() {
        let m =
            "{\n  \"a\": 1.50,\n  \"s\": \"x y\\n\\\"z\\\" \",\n  \"n\": 12345678901234567890\n}";
        assert_eq!(
            String::from_utf8(one_line_object(m).unwrap()).unwrap(),
            r#"{"a":1.50,"s":"x y\n\"z\" ","n":12345678901234567890}"#
        );
        assert!(one_line_object("[1]").unwrap_err().contains("JSON object"));
        assert!(one_line_object("{").unwrap_err().contains("not JSON"));
        assert!(one_line_object("plain text").is_err());
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
            true,
            Some(b"{\"id\":1}"),
            Some(b"{\"id\":0}"),
            false,
        );
        push_batch_row(&mut buf, false, Some(b"{\"id\":2}"), None, false);
        end_batch(&mut buf);
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            r#"{"op":"UPDATE","schema":"public","table":"orders","rows":[{"new":{"id":1},"old":{"id":0}},{"new":{"id":2},"old":null}]}"#
        );
        let mut buf = Vec::new();
        begin_batch(&mut buf, Format::Td, &e);
        end_batch(&mut buf);
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            r#"{"event":"UPDATE","when":"AFTER","level":"STATEMENT","name":"orders_out","table_name":"orders","table_schema":"public","relid":"16384","args":["127.0.0.1","26200"],"rows":[]}"#
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
