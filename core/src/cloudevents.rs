//! CloudEvents' content modes over HTTP (spec 1.0, HTTP protocol binding).
//!
//! Events are made and queued in structured mode, one JSON object each
//! (see [`crate::event`]); binary mode is a way of sending them, so the
//! split into `ce-*` headers and a body happens here, when a request is
//! built. (Which mode an event goes in is recorded with it when it is
//! queued.)

use crate::options::Format;
use serde_json::value::RawValue;
use std::collections::BTreeMap;

/// `Content-Type` of one structured-mode event.
pub const STRUCTURED: &str = "application/cloudevents+json";
/// `Content-Type` of a JSON array of structured-mode events (batched mode).
pub const BATCH: &str = "application/cloudevents-batch+json";

/// `Content-Type` of a request carrying one event of `format`, or a JSON
/// array of them (`batch`).
pub fn content_type(format: Format, batch: bool) -> &'static str {
    match (format.is_cloudevents(), batch) {
        (true, false) => STRUCTURED,
        (true, true) => BATCH,
        (false, _) => "application/json",
    }
}

/// The `id` an event of a CloudEvents format was made with (sync and
/// commit events put it first), so that the request's `webhook-id` is the
/// same id.
pub fn made_id(event: &[u8]) -> Option<&str> {
    let rest = event.strip_prefix(b"{\"id\":\"")?;
    let end = rest.iter().position(|&b| b == b'"')?;
    std::str::from_utf8(&rest[..end]).ok()
}

/// An event in binary mode: its attributes as headers, its data as body.
#[derive(Debug, PartialEq, Eq)]
pub struct Binary {
    pub content_type: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// Splits one structured-mode event into binary mode, after the
/// destination's own `headers` (less any `ce-*`: the event's attributes
/// are the event's). Every attribute but `data` and `datacontenttype`
/// becomes a `ce-<name>` header (strings percent-encoded as the binding
/// requires, other values as their JSON text), `datacontenttype` becomes
/// `Content-Type`, and `data` the body, byte for byte.
pub fn to_binary(headers: &[(String, String)], structured: &[u8]) -> Result<Binary, String> {
    let attrs: BTreeMap<String, &RawValue> = serde_json::from_slice(structured)
        .map_err(|e| format!("a CloudEvent to send in binary mode is not a JSON object: {e}"))?;
    let mut out = Binary {
        content_type: "application/json".into(),
        headers: headers
            .iter()
            .filter(|(k, _)| !k.to_ascii_lowercase().starts_with("ce-"))
            .cloned()
            .collect(),
        body: Vec::new(),
    };
    for (name, raw) in attrs {
        let text = match serde_json::from_str::<String>(raw.get()) {
            Ok(s) => s,
            Err(_) => raw.get().to_string(),
        };
        match name.as_str() {
            "data" => out.body = raw.get().as_bytes().to_vec(),
            "datacontenttype" => out.content_type = text,
            _ => {
                out.headers
                    .push((format!("ce-{name}"), percent_encode_header(&text)));
            }
        }
    }
    Ok(out)
}

/// `s` for a `ce-*` header: space, `"`, `%` and everything outside
/// printable ASCII are percent-encoded as UTF-8 bytes (HTTP binding,
/// section 3.1.3.2).
fn percent_encode_header(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len());
    encode(&mut out, s, |b| {
        (0x21..=0x7e).contains(&b) && b != b'"' && b != b'%'
    });
    String::from_utf8(out).expect("percent-encoding leaves ASCII")
}

/// Appends `s` as one URI path segment: everything but RFC 3986's
/// unreserved characters is percent-encoded (CloudEvents' `source` is a
/// URI reference, and a database name may hold anything; also a Redis
/// stream's name in its URL).
pub fn percent_encode_path(out: &mut Vec<u8>, s: &str) {
    encode(out, s, |b| {
        b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
    });
}

fn encode(out: &mut Vec<u8>, s: &str, keep: impl Fn(u8) -> bool) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in s.as_bytes() {
        if keep(b) {
            out.push(b);
        } else {
            out.extend([b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_mode_moves_attributes_to_headers() {
        let ev = br#"{"id":"evt_s_7","specversion":"1.0","source":"/pg_emit/shop","type":"pg_emit.row.insert","subject":"caf\u00e9 \"x\" 100%","time":"2026-11-21T10:00:00.000001Z","datacontenttype":"application/json","data":{"n":12345678901234567890,"s":"a\nb"}}"#;
        let own = [
            ("Authorization".to_string(), "Bearer t".to_string()),
            ("CE-Type".to_string(), "forged".to_string()),
        ];
        let b = to_binary(&own, ev).unwrap();
        assert_eq!(b.content_type, "application/json");
        assert_eq!(
            b.body,
            br#"{"n":12345678901234567890,"s":"a\nb"}"#.to_vec(),
            "data byte for byte, big numbers included"
        );
        let h: BTreeMap<_, _> = b.headers.into_iter().collect();
        assert_eq!(h["Authorization"], "Bearer t");
        assert!(
            !h.contains_key("CE-Type"),
            "a destination's ce-* header never goes out"
        );
        assert_eq!(h["ce-id"], "evt_s_7");
        assert_eq!(h["ce-specversion"], "1.0");
        assert_eq!(h["ce-type"], "pg_emit.row.insert");
        assert_eq!(h["ce-subject"], "caf%C3%A9%20%22x%22%20100%25");
        assert_eq!(h["ce-time"], "2026-11-21T10:00:00.000001Z");
        assert!(!h.contains_key("ce-data") && !h.contains_key("ce-datacontenttype"));
        assert!(to_binary(&[], b"[1]").is_err());
    }

    #[test]
    fn made_ids_are_read_back() {
        assert_eq!(
            made_id(br#"{"id":"msg_1_2","specversion":"1.0"}"#),
            Some("msg_1_2")
        );
        assert_eq!(made_id(br#"{"specversion":"1.0","id":"x"}"#), None);
        assert_eq!(made_id(b"{\"id\":\"open"), None);
    }

    #[test]
    fn source_segments_are_encoded() {
        let mut s = Vec::new();
        percent_encode_path(&mut s, "my db/ü");
        assert_eq!(s, b"my%20db%2F%C3%BC");
    }
}
