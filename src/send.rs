//! `send_socket`, `send_http` and `send_message`: the ad-hoc senders.

use crate::delivery::{commit, outbox, sync, Destination};
use crate::error::EmitError;
use crate::event::{self, Kind};
use crate::interrupts;
use crate::made::Made;
use crate::options::{self, Delivery, Format, Framing, OptionError};
use crate::settings;
use crate::stored;
use pg_emit_core::http_target::{self, UrlError};
use pg_emit_core::schedule::Key;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::{FromDatum, PgLogLevel, PgSqlErrorCode};

fn bad(func: &'static str, source: OptionError) -> ! {
    EmitError::Argument { func, source }.raise()
}

fn check_size(func: &str, len: usize) {
    let limit = settings::max_message_bytes();
    if len > limit {
        EmitError::TooLarge {
            context: func.to_string(),
            size: len,
            limit,
        }
        .raise();
    }
}

/// `send_socket(msg, host, port)`: connect, write `msg`, close.
///
/// Returns 1 when every byte was written and 0 when delivery failed (with a
/// WARNING saying why). STRICT: any NULL argument gives NULL.
#[pg_extern(volatile, parallel_unsafe)]
fn send_socket(msg: &str, host: &str, port: i32) -> i32 {
    options::check_host(host).unwrap_or_else(|e| bad("send_socket", e));
    let port = options::check_port(port).unwrap_or_else(|e| bad("send_socket", e));
    check_size("send_socket", msg.len());
    let target = Destination::Tcp {
        host: host.to_string(),
        port,
        framing: Framing::Close,
    };
    match sync::try_send(
        &target,
        Kind::message(Format::Json),
        msg.as_bytes(),
        Key::default(),
        &interrupts::Statement,
    ) {
        Ok(()) => 1,
        Err(f) => {
            sync::report(f, 1, &|| "send_socket".to_string(), &target.name());
            0
        }
    }
}

/// `send_message(dest, msg, delivery, key)`: one message to a destination
/// URL or a stored destination, in any delivery mode. Returns true when it
/// was sent (`sync`) or queued (`commit`, `async`), false when a sync send
/// failed (with a WARNING). NULL `dest` or `msg` gives NULL.
///
/// A message goes out as its caller wrote it: its event id travels beside
/// it (see [`Kind`]). `async` messages must be JSON, and they and any
/// message to an ndjson destination are sent as one line. `key` is the
/// message's ordering key for async delivery: messages with the same key
/// arrive in commit order, others may overtake them; without a key a
/// message is ordered against every other event of its destination.
#[pg_extern(volatile, parallel_unsafe)]
fn send_message(
    dest: Option<&str>,
    msg: Option<&str>,
    delivery: default!(Option<&str>, "'async'"),
    key: default!(Option<&str>, "NULL"),
) -> Option<bool> {
    const FUNC: &str = "send_message";
    let (dest, msg) = (dest?, msg?);
    // No key: ordered against every other event of the destination.
    let order = key.map(|k| pg_emit_core::schedule::key_hash([Some(k.as_bytes())]));
    let mode = match delivery.map(str::to_ascii_lowercase).as_deref() {
        Some("sync") => Delivery::Sync,
        Some("commit") => Delivery::Commit,
        Some("async") => Delivery::Async,
        other => bad(
            FUNC,
            OptionError::BadValue {
                pos: 3,
                key: "delivery",
                value: other.unwrap_or("NULL").to_string(),
                expected: "sync, commit or async",
            },
        ),
    };
    let resolved = stored::resolve(FUNC, dest);
    let target = &resolved.target;
    // Kafka's `record_key: "columns"` keys the record by the key as given.
    let key = Key {
        order,
        text: key.filter(|_| target.record_keys()),
    };
    let mode = crate::delivery::for_target(&|| FUNC.to_string(), target, mode);
    let format = resolved.format.unwrap_or_default();
    let one_line = mode == Delivery::Async || target.coalesces() || format.is_cloudevents();
    let mut buf =
        if one_line && (mode == Delivery::Async || msg.contains('\n')) || format.is_cloudevents() {
            event::one_line_json(msg).unwrap_or_else(|e| {
                bad(
                    FUNC,
                    OptionError::Destination(format!(
                        "{e} (delivery=async, ndjson and cloudevents destinations send one JSON \
                         value per event, on one line)"
                    )),
                )
            })
        } else {
            msg.as_bytes().to_vec()
        };
    if format.is_cloudevents() {
        let mut wrapped = Vec::with_capacity(buf.len() + 256);
        event::write_message(
            &mut wrapped,
            format,
            &Made::message(format, mode).ctx(),
            &buf,
        );
        buf = wrapped;
    }
    Some(hand_over(
        FUNC,
        target,
        Kind::message(format),
        mode,
        buf,
        key,
    ))
}

/// Hands one finished message of `kind` to its delivery mode: true when it was sent (sync) or held or
/// queued (commit, async), false when a sync send failed (with a WARNING).
fn hand_over(
    func: &'static str,
    target: &Destination,
    kind: Kind,
    mode: Delivery,
    mut buf: Vec<u8>,
    key: Key<'_>,
) -> bool {
    check_size(func, buf.len());
    if target.coalesces() && mode != Delivery::Async {
        buf.push(b'\n');
    }
    let context = || func.to_string();
    if mode != Delivery::Sync {
        crate::delivery::refuse_unless_allowed(&context, target);
    }
    match mode {
        Delivery::Sync => {
            // Events this statement's triggers hold for the same kept-open
            // connection go first.
            sync::flush_all();
            match sync::try_send(target, kind, &buf, key, &interrupts::Statement) {
                Ok(()) => true,
                Err(f) => {
                    sync::report(f, 1, &context, &target.name());
                    false
                }
            }
        }
        Delivery::Commit => {
            commit::hold(&context, target, kind, &buf, key);
            true
        }
        Delivery::Async => {
            outbox::queue(target, kind, &buf, key);
            true
        }
    }
}

/// `send_http(url, body [, method, content_type, headers])`: one request.
///
/// Returns the response status, whatever it is (a 500 is an answer), and
/// 0 with a WARNING when no response came (refused, timeout, DNS, TLS).
/// Redirects are not followed. NULL `url` or `body` gives NULL; a NULL
/// `method` or `content_type` is an error naming it.
///
/// A plain fmgr function (declared in `sql/send_http.sql`, under the symbol
/// 0.1.0 used) rather than `#[pg_extern]`: pgrx would turn a NULL `method`
/// or a deeply nested `headers` value into an internal error (XX000)
/// before this code runs.
///
/// # Safety
/// Called by PostgreSQL's function manager with a valid `fcinfo`.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn send_http_wrapper(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    let text = |i: usize| -> Option<String> { unsafe { text_arg(fcinfo, i) } };
    let (Some(url), Some(body)) = (text(0), text(1)) else {
        (*fcinfo).isnull = true;
        return pg_sys::Datum::from(0);
    };
    let required = |i: usize, name: &'static str| {
        text(i).unwrap_or_else(|| {
            ErrorReport::new(
                PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
                format!("send_http: {name} must not be NULL"),
                "pg_emit",
            )
            .report(PgLogLevel::ERROR);
            unreachable!("ERROR returned")
        })
    };
    let method = required(2, "method");
    let content_type = required(3, "content_type");
    let headers = jsonb_arg(fcinfo, 4);
    pg_sys::Datum::from(send_http(
        &url,
        &body,
        &method,
        &content_type,
        headers.as_deref(),
    ))
}

#[unsafe(no_mangle)]
#[doc(hidden)]
pub extern "C" fn pg_finfo_send_http_wrapper() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// Argument `i` as text, or None when NULL or not passed.
///
/// # Safety
/// `fcinfo` must be a valid call whose argument `i`, if present, is text.
unsafe fn text_arg(fcinfo: pg_sys::FunctionCallInfo, i: usize) -> Option<String> {
    let arg = fcinfo_arg(fcinfo, i)?;
    String::from_datum(arg, false)
}

/// Argument `i` (jsonb) as JSON text, or None when NULL or not passed.
///
/// # Safety
/// As [`text_arg`], for a jsonb argument.
unsafe fn jsonb_arg(fcinfo: pg_sys::FunctionCallInfo, i: usize) -> Option<String> {
    let arg = fcinfo_arg(fcinfo, i)?;
    let out = pg_sys::OidOutputFunctionCall(pg_sys::Oid::from(pg_sys::F_JSONB_OUT), arg);
    let s = std::ffi::CStr::from_ptr(out).to_string_lossy().into_owned();
    pg_sys::pfree(out.cast());
    Some(s)
}

/// # Safety
/// `fcinfo` must be a valid call.
unsafe fn fcinfo_arg(fcinfo: pg_sys::FunctionCallInfo, i: usize) -> Option<pg_sys::Datum> {
    if i >= (*fcinfo).nargs as usize {
        return None;
    }
    let a = &*(*fcinfo).args.as_ptr().add(i);
    (!a.isnull).then_some(a.value)
}

fn send_http(
    url: &str,
    body: &str,
    method: &str,
    content_type: &str,
    headers: Option<&str>,
) -> i32 {
    let url_err = |e: UrlError| -> ! { bad("send_http", OptionError::Url(e)) };
    let parsed = http_target::parse_url(url).unwrap_or_else(|e| url_err(e));
    http_target::check_method(method).unwrap_or_else(|e| url_err(e));
    http_target::check_content_type(content_type).unwrap_or_else(|e| url_err(e));
    let headers = header_pairs(headers).unwrap_or_else(|e| url_err(e));
    check_size("send_http", body.len());
    match sync::http_request(
        &parsed.url,
        method,
        content_type,
        (&headers, body.as_bytes()),
        // Bodies any emit_sender chooses are never signed, nor given an
        // event id.
        None,
        &pg_emit_core::destination::SignWith::Nothing,
        &Default::default(),
        &interrupts::Statement,
    ) {
        Ok(resp) => i32::from(resp.status),
        Err(f) => {
            sync::report(f, 1, &|| "send_http".to_string(), &parsed.url);
            0
        }
    }
}

/// `{"Name": "value", ...}` → header pairs, each validated.
fn header_pairs(headers: Option<&str>) -> Result<Vec<(String, String)>, UrlError> {
    let Some(text) = headers else {
        return Ok(Vec::new());
    };
    let shape = || {
        UrlError::Headers(
            "headers must be a JSON object whose values are strings, e.g. {\"X-Trace\": \"abc\"}"
                .into(),
        )
    };
    // Nesting past serde_json's recursion limit is an error here, like any
    // other shape that is not a flat object.
    let value: serde_json::Value = serde_json::from_str(text).map_err(|_| shape())?;
    let obj = value.as_object().ok_or_else(shape)?;
    obj.iter()
        .map(|(k, v)| {
            let v = v.as_str().ok_or_else(shape)?;
            http_target::check_header(k, v)?;
            Ok((k.clone(), v.to_string()))
        })
        .collect()
}
